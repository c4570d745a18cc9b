"""``engine.step.Executor`` on the paged ``ModelRunner`` and ``engine.sampling``."""

from __future__ import annotations

import time

import mlx.core as mx

from slabserve.engine import sampling
from slabserve.engine.runner import ModelRunner, SeqInput
from slabserve.engine.step import (
    AttentionPath,
    Executor,
    SampledToken,
    ScheduledChunk,
    StepOutput,
    StepPlan,
)
from slabserve.kvcache.arrays import host_array

# the selector's override per path setting: True forces native, False gather, None = auto
_OVERRIDES: dict[AttentionPath, bool | None] = {"auto": None, "native": True, "gather": False}
_SETTINGS = {v: k for k, v in _OVERRIDES.items()}


def _seq_input(c: ScheduledChunk) -> SeqInput:
    return SeqInput(list(c.tokens), c.start, list(c.blocks), want_logits=c.sample)


class ModelExecutor(Executor):
    """Runs a plan as one ``ModelRunner.forward`` (prefill chunks + one batched decode),
    then samples every row that wants a token in one batch.

    ``forward_seconds``/``steps`` accumulate the time inside ``runner.forward`` so the
    step-overhead benchmark can subtract it from the whole step."""

    def __init__(self, runner: ModelRunner, max_context: int) -> None:
        self.runner = runner
        self.allocator = runner.allocator
        self.block_size = runner.block_size
        self.max_context = max_context
        self.forward_seconds = 0.0
        self.steps = 0

    def bind_thread(self) -> None:
        """MLX 0.32 keeps streams per thread: give the engine thread its own."""
        mx.set_default_stream(mx.new_stream(mx.default_device()))

    def attention_path(self) -> AttentionPath:
        """The runner's decode-attention selector's override as a path setting."""
        return _SETTINGS[self.runner.attention.selector.override]

    def set_attention_path(self, path: AttentionPath) -> AttentionPath:
        return _SETTINGS[self.runner.attention.selector.set_override(_OVERRIDES[path])]

    def attention_path_counts(self) -> dict[tuple[str, str], int]:
        return self.runner.attention.selector.path_counts()

    def execute(self, plan: StepPlan) -> StepOutput:
        if plan.empty:
            return StepOutput()
        t0 = time.perf_counter()
        pre, dec = self.runner.forward(
            [_seq_input(c) for c in plan.prefills], [_seq_input(c) for c in plan.decodes])
        self.last_forward_s = time.perf_counter() - t0
        self.forward_seconds += self.last_forward_s
        self.steps += 1
        rows: list[mx.array] = []
        chunks: list[ScheduledChunk] = []
        for c, lg in zip(plan.prefills, pre, strict=True):
            if c.sample:
                rows.append(lg[None])
                chunks.append(c)
        want = [i for i, c in enumerate(plan.decodes) if c.sample]
        if want:
            rows.append(dec if len(want) == len(plan.decodes) else dec[host_array(want)])
            chunks.extend(plan.decodes[i] for i in want)
        if not chunks:
            return StepOutput()
        logits = rows[0] if len(rows) == 1 else mx.concatenate(rows)
        specs = [sampling.RowSpec(c.params, c.seed, c.prompt, c.output, c.output_index)
                 for c in chunks]
        picked = sampling.sample(logits, specs)
        pairs = zip(chunks, picked, strict=True)
        return StepOutput({c.request_id: SampledToken(tok, lp) for c, (tok, lp) in pairs})
