"""What one model step is, as plain data (no MLX): the contract between the scheduler,
which plans steps, and the executor, which runs them on the model.

One step: ``Scheduler.schedule() -> StepPlan``; ``Executor.execute(plan) -> StepOutput``;
then the scheduler's ``update(plan, output)``.  The scheduler imports this module (layers
point down: scheduler -> engine); nothing here imports MLX, so the scheduler's tests drive
it with hand-made executors.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Literal

AttentionPath = Literal["auto", "native", "gather"]
ATTENTION_PATHS: tuple[AttentionPath, ...] = ("auto", "native", "gather")
GrammarKind = Literal["json_schema", "regex", "choice", "lark"]
GRAMMAR_KINDS: tuple[GrammarKind, ...] = ("json_schema", "regex", "choice", "lark")
# A decode chunk's token that the step before it samples (async scheduling): the executor
# feeds that step's sampled token for the sequence, read on the device, never the host.
PENDING = -1


@dataclass(frozen=True)
class GrammarSpec:
    """What a constrained request's output must match, as plain data (the grammar engine
    lives in ``engine.constraint``; nothing above the engine knows it).

    ``kind``/``source``: ``json_schema`` (the schema as JSON text), ``regex`` (a regular
    expression the whole output matches), ``choice`` (a JSON list of strings: the output is
    one of them) or ``lark`` (an llguidance Lark grammar, EBNF-like).  Equal specs compile
    once (the engine caches by value)."""

    kind: GrammarKind
    source: str

    def __post_init__(self) -> None:
        if self.kind not in GRAMMAR_KINDS:
            raise ValueError(f"grammar kind must be one of {', '.join(GRAMMAR_KINDS)}")


@dataclass(frozen=True)
class SamplingParams:
    """Per-request sampling and stopping.  ``logprobs``: None = none; k >= 0 = the chosen
    token's logprob plus the top k alternatives.  ``seed`` makes sampling reproducible
    whether the request runs alone or batched.  ``constraint``: the output must match this
    grammar (each step samples only tokens it allows; see ``engine.constraint``)."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None
    constraint: GrammarSpec | None = None

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError("max_tokens must be >= 1")
        if self.temperature < 0 or not 0 < self.top_p <= 1 or self.top_k < 0:
            raise ValueError("temperature >= 0, 0 < top_p <= 1, top_k >= 0 required")
        if not 0 <= self.min_p <= 1 or self.repetition_penalty <= 0:
            raise ValueError("0 <= min_p <= 1 and repetition_penalty > 0 required")
        if self.logprobs is not None and not 0 <= self.logprobs <= 20:
            raise ValueError("logprobs must be between 0 and 20")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()  # (token id, logprob), best first


@dataclass(frozen=True)
class ScheduledChunk:
    """Feed ``tokens`` at positions ``[start, start + len(tokens))`` of sequence
    ``request_id``, whose block table ``blocks`` covers all of them.  ``sample`` is True
    when the chunk ends at the sequence's last known token: the step then samples the
    sequence's next token, its ``output_index``-th generated one (0-based).

    ``params`` are the request's sampling parameters; ``seed`` its sampling seed
    (``params.seed``, or one drawn once when the request was added); ``output_index``
    the number of tokens generated so far.  ``prompt``/``output`` (the token history)
    are filled only when a penalty needs them, and only on chunks that sample.
    ``tokens == (PENDING,)``: a decode chunk planned while the step before it runs (see
    ``Executor.overlaps``); its token is the one that step samples for this sequence.
    """

    request_id: str
    tokens: tuple[int, ...]
    start: int
    blocks: tuple[int, ...]
    sample: bool
    params: SamplingParams
    prompt: tuple[int, ...] = ()
    output: tuple[int, ...] = ()
    seed: int = 0
    output_index: int = 0


@dataclass(frozen=True)
class StepPlan:
    """``prefills``: chunks of more than one token, one forward each; ``decodes``: one
    token per sequence, one batched forward.  ``preempted`` lists sequences whose blocks
    were taken back while planning (they will be recomputed)."""

    step: int
    prefills: tuple[ScheduledChunk, ...] = ()
    decodes: tuple[ScheduledChunk, ...] = ()
    preempted: tuple[str, ...] = ()

    @property
    def empty(self) -> bool:
        return not self.prefills and not self.decodes

    @property
    def num_tokens(self) -> int:
        return sum(len(c.tokens) for c in self.prefills) + len(self.decodes)

    def chunks(self) -> tuple[ScheduledChunk, ...]:
        return self.prefills + self.decodes


@dataclass(frozen=True)
class SampledToken:
    """``final``: the request's constraint is complete with this token (its grammar admits
    nothing more), so the request finishes with ``stop`` whatever ``ignore_eos`` says."""

    token_id: int
    logprob: TokenLogprob | None = None
    final: bool = False


@dataclass(frozen=True)
class StepOutput:
    """The executor's answer: one sampled token per chunk of the plan with ``sample``."""

    sampled: dict[str, SampledToken] = field(default_factory=dict)




class Executor(ABC):
    """Runs one ``StepPlan``: writes every chunk's K/V into the blocks named in the plan
    and samples one token for each chunk with ``sample`` set.

    Invariants: ``execute`` does not allocate or free blocks (the scheduler does, through
    ``allocator``); per-request sampling state depends only on the request (its seed and
    token index), never on the batch it ran in.
    """

    block_size: int
    max_context: int
    last_forward_s: float = 0.0  # seconds of the last step inside the model forward
    # True: ``submit`` takes a plan whose decode chunks carry ``PENDING`` tokens while the
    # plan before it is still in flight (submitted, not collected), reading them from
    # that plan's sampled tokens on the device (async scheduling)
    overlaps: bool = False

    @abstractmethod
    def execute(self, plan: StepPlan) -> StepOutput: ...

    def submit(self, plan: StepPlan) -> None:  # noqa: B027 - optional split of execute
        """Hand ``plan`` to the device without waiting for it; ``collect(plan)`` returns its
        output.  Plans are collected in the order submitted.  The default runs nothing
        here and the whole ``execute`` in ``collect``."""

    def collect(self, plan: StepPlan) -> StepOutput:
        """The output of a submitted ``plan`` (waits for its sampled tokens)."""
        return self.execute(plan)

    def release(self, request_id: str) -> None:  # noqa: B027 - optional hook
        """Forget any per-request state (called when a request finishes or aborts)."""

    def bind_tokenizer(self, tokenizer) -> None:  # noqa: B027 - optional hook
        """The tokenizer of the served model (an mlx-lm ``TokenizerWrapper``), given once
        before the first step; executors that constrain sampling need it."""

    def check_constraint(self, spec: GrammarSpec) -> None:
        """Raise ``ValueError`` (with the reason) if ``spec`` cannot be enforced.  May be
        called from any thread, before the request is added; may take a while (a grammar
        compiles), so callers run it off the event loop."""
        raise ValueError("this engine cannot constrain its output")

    def bind_thread(self) -> None:  # noqa: B027 - optional hook
        """Called once on the engine thread before its first step (MLX needs a stream
        per thread)."""

    def prepare(self) -> None:  # noqa: B027 - optional hook
        """Called once on the engine thread after ``bind_thread``, before serving starts:
        warm-up that must run on that thread (MLX caches compiled graphs per stream)."""

    def attention_path(self) -> AttentionPath | None:
        """The decode attention path setting (None: this executor has no switch).  May
        be read from any thread."""
        return None

    def set_attention_path(self, path: AttentionPath) -> AttentionPath:
        """Switch the decode attention path; returns the previous setting.  Called on the
        engine thread between two ``execute`` calls only."""
        raise NotImplementedError("this executor has no switchable attention path")

    def attention_path_counts(self) -> dict[tuple[str, str], int]:
        """(path, reason) -> decode layer-steps so far, for /metrics (empty: none)."""
        return {}

    def kv_dtype(self) -> str:
        """The KV pool's element type (``float16``, ...; empty: unknown)."""
        return ""

    def decode_graph_traces(self) -> int:
        """Decode step graphs traced so far (a new step signature each; 0: none or no
        graphs).  May be read from any thread."""
        return 0
