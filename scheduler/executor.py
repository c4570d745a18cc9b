"""The model side as the scheduler sees it: plain data in, plain data out."""

from __future__ import annotations

from abc import ABC, abstractmethod

from slabserve.kvcache import BlockAllocator
from slabserve.scheduler.api import AttentionPath
from slabserve.scheduler.plan import StepOutput, StepPlan


class Executor(ABC):
    """Runs one ``StepPlan``: writes every chunk's K/V into the blocks named in the plan
    and samples one token for each chunk with ``sample`` set.

    Invariants: ``execute`` does not allocate or free blocks (the scheduler does, through
    ``allocator``); per-request sampling state depends only on the request (its seed and
    token index), never on the batch it ran in.
    """

    block_size: int
    allocator: BlockAllocator
    max_context: int
    last_forward_s: float = 0.0  # seconds of the last step inside the model forward

    @abstractmethod
    def execute(self, plan: StepPlan) -> StepOutput: ...

    def release(self, request_id: str) -> None:  # noqa: B027 - optional hook
        """Forget any per-request state (called when a request finishes or aborts)."""

    def bind_thread(self) -> None:  # noqa: B027 - optional hook
        """Called once on the engine thread before its first step (MLX needs a stream
        per thread)."""

    def attention_path(self) -> AttentionPath | None:
        """The decode attention path setting (None: this executor has no switch).  May
        be read from any thread."""
        return None

    def set_attention_path(self, path: AttentionPath) -> AttentionPath:
        """Switch the decode attention path; returns the previous setting.  Called on the
        engine thread between two ``execute`` calls only."""
        raise NotImplementedError("this executor has no switchable attention path")
