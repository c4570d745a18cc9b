"""``engine.step.Executor`` on the paged ``ModelRunner`` and ``engine.sampling``, with
grammar-constrained rows through ``engine.constraint`` (masks computed while the forward
runs)."""

from __future__ import annotations

import logging
import time

import mlx.core as mx
import numpy as np

from slabserve.engine import sampling
from slabserve.engine.constraint import ConstraintEngine, StepMasks, StepRow
from slabserve.engine.runner import ModelRunner, SeqInput
from slabserve.engine.sampling_graph import CompiledSampler
from slabserve.engine.step import (
    PENDING,
    AttentionPath,
    Executor,
    GrammarSpec,
    SampledToken,
    SamplingParams,
    ScheduledChunk,
    StepOutput,
    StepPlan,
    TokenLogprob,
)
from slabserve.engine.step_graph import batch_bucket
from slabserve.kvcache.arrays import host_array

log = logging.getLogger(__name__)

# the selector's override per path setting: True forces native, False gather, None = auto
_OVERRIDES: dict[AttentionPath, bool | None] = {"auto": None, "native": True, "gather": False}
_SETTINGS = {v: k for k, v in _OVERRIDES.items()}


def _seq_input(c: ScheduledChunk) -> SeqInput:
    return SeqInput(list(c.tokens), c.start, list(c.blocks), want_logits=c.sample)


def _model_vocab(runner: ModelRunner) -> int | None:
    """The width of the model's logits as its config states it (None: not stated)."""
    n = getattr(getattr(runner.model, "args", None), "vocab_size", None)
    return int(n) if isinstance(n, int) and n > 0 else None


def _vocab(runner: ModelRunner, tokenizer) -> int:
    """The width of the model's logits (the config's ``vocab_size``, else the tokenizer's)."""
    return _model_vocab(runner) or len(tokenizer)


class ModelExecutor(Executor):
    """Runs a plan as one ``ModelRunner.forward`` (prefill chunks + one batched decode),
    then samples every row that wants a token in one batch.  ``submit`` hands both to the
    device and ``collect`` waits for the tokens, so the next plan can be submitted in
    between, its decodes fed on the device by this one's samples (``overlaps``).

    ``forward_seconds``/``steps`` accumulate the time inside ``runner.forward`` so the
    step-overhead benchmark can subtract it from the whole step.  Constrained steps:
    ``last_mask_s`` the worker's time on the masks (overlapping the forward),
    ``last_mask_wait_s`` what the step still waited for them after the forward,
    ``last_commit_s`` advancing the grammars after sampling (``mask_wait_seconds`` sums
    the waits).  Constrained sampling needs ``bind_tokenizer`` first."""

    def __init__(self, runner: ModelRunner, max_context: int,
                 capture: tuple[int, ...] = ()) -> None:
        self.runner = runner
        self.capture = capture  # batch sizes whose decode steps ``prepare`` traces
        self.allocator = runner.allocator
        self.block_size = runner.block_size
        self.max_context = max_context
        self.forward_seconds = 0.0
        self.mask_wait_seconds = 0.0
        self.last_mask_s = self.last_mask_wait_s = self.last_commit_s = 0.0
        self.steps = 0
        self.constraints: ConstraintEngine | None = None
        self.overlaps = runner.device_tokens
        # step -> (sampled chunks, grammar masks, lazy draw) of submitted, uncollected plans
        self._submitted: dict[int, tuple] = {}
        # the last submitted step's sampled tokens (device) and each request's row in them
        self._last: tuple[mx.array, dict[str, int]] | None = None
        # the sampler's compiled graphs, used while the runner compiles decode forwards
        self.sampler = CompiledSampler()
        # request -> its prompt as int32, for the compiled sampler's repetition entries
        # (copied into them each step; a tuple would be converted each step)
        self._prompts: dict[str, np.ndarray] = {}

    def bind_tokenizer(self, tokenizer) -> None:
        """Enable constrained sampling against ``tokenizer`` (its llguidance view is built
        on the first constrained request)."""
        from slabserve.engine.grammar import GrammarCompiler

        if self.constraints is not None:
            self.constraints.close()
        compiler = GrammarCompiler(tokenizer, _vocab(self.runner, tokenizer),
                                   tokenizer.eos_token_ids)
        self.constraints = ConstraintEngine(compiler)

    def check_constraint(self, spec: GrammarSpec) -> None:
        if self.constraints is None:
            raise ValueError("this engine has no tokenizer bound: it cannot constrain output")
        self.constraints.check(spec)

    def _prompt(self, c: ScheduledChunk):
        """``c``'s prompt for its row spec: an int32 array, made once per request, where
        the compiled sampler copies it into repetition entries each step."""
        if c.params.repetition_penalty == 1.0 or not self.runner.compile_decode:
            return c.prompt
        got = self._prompts.get(c.request_id)
        if got is None or len(got) != len(c.prompt):
            got = self._prompts[c.request_id] = np.asarray(c.prompt, dtype=np.int32)
        return got

    def release(self, request_id: str) -> None:
        self._prompts.pop(request_id, None)
        if self.constraints is not None:
            self.constraints.drop(request_id)

    def bind_thread(self) -> None:
        """MLX 0.32 keeps streams per thread: give the engine thread its own."""
        mx.set_default_stream(mx.new_stream(mx.default_device()))

    def prepare(self) -> None:
        """Start-up capture (``ModelRunner.capture_decode``) of the ``capture`` batch sizes
        on the engine thread, whose stream the served steps run on."""
        if not (self.capture and self.runner.compile_decode):
            return
        t0 = time.perf_counter()
        graphs = self.runner.capture_decode(list(self.capture))
        warmed = self._warm_sampler()
        log.info("captured decode steps for batch sizes %s in %.1f s (%d step graphs, "
                 "sampler for %d batch buckets)", list(self.capture),
                 time.perf_counter() - t0, graphs, warmed)

    def _warm_sampler(self) -> int:
        """Trace the compiled sampler's most common feature set (temperature only, what
        an OpenAI request without filters asks for) at each captured batch bucket, so the
        first sampled request does not pay the trace and kernel compilation.  Returns the
        buckets warmed (0 where the model does not state its vocabulary size)."""
        vocab = _model_vocab(self.runner)
        if vocab is None:
            return 0
        buckets = sorted({batch_bucket(b) for b in self.capture
                          if b >= sampling.COMPILED_MIN_ROWS})  # one row samples eagerly
        for rows in buckets:
            specs = [sampling.RowSpec(SamplingParams(temperature=1.0), 0, (), ())] * rows
            tokens, _ = self.sampler(mx.zeros((rows, vocab), dtype=mx.float32), specs, False)
            mx.eval(tokens)
        return len(buckets)

    def attention_path(self) -> AttentionPath:
        """The runner's decode-attention selector's override as a path setting."""
        return _SETTINGS[self.runner.attention.selector.override]

    def set_attention_path(self, path: AttentionPath) -> AttentionPath:
        return _SETTINGS[self.runner.attention.selector.set_override(_OVERRIDES[path])]

    def attention_path_counts(self) -> dict[tuple[str, str], int]:
        return self.runner.attention.selector.path_counts()

    def kv_dtype(self) -> str:
        return str(self.runner.geom.dtype).rsplit(".", 1)[-1]

    def decode_graph_traces(self) -> int:
        return self.runner.graph_traces

    def execute(self, plan: StepPlan) -> StepOutput:
        self.submit(plan)
        return self.collect(plan)

    def submit(self, plan: StepPlan) -> None:
        """Build ``plan``'s forward and its sampling and hand both to the device.  Decode
        chunks with ``PENDING`` tokens read them from the previous submitted step's
        sampled tokens (on the device)."""
        self.last_mask_s = self.last_mask_wait_s = self.last_commit_s = 0.0
        if plan.empty:
            return
        for rid in plan.preempted:  # rebuilt by replay when it samples again
            self.release(rid)
        chunks = [c for c in plan.prefills if c.sample] + [c for c in plan.decodes if c.sample]
        masks = self._begin_masks(chunks)
        t0 = time.perf_counter()
        pre, dec = self.runner.forward(
            [_seq_input(c) for c in plan.prefills], [_seq_input(c) for c in plan.decodes],
            self._pending_tokens(plan.decodes))
        self.last_forward_s = time.perf_counter() - t0
        self.forward_seconds += self.last_forward_s
        self.steps += 1
        if not chunks:
            return
        rows: list[mx.array] = [lg[None] for c, lg in zip(plan.prefills, pre, strict=True)
                                if c.sample]
        want = [i for i, c in enumerate(plan.decodes) if c.sample]
        if want:
            rows.append(dec if len(want) == len(plan.decodes) else dec[host_array(want)])
        logits = rows[0] if len(rows) == 1 else mx.concatenate(rows)
        specs = [sampling.RowSpec(c.params, c.seed, self._prompt(c), c.output, c.output_index)
                 for c in chunks]
        drawn = sampling.draw(logits, specs, self._allowed(masks, len(chunks), logits.shape[-1]),
                              self.sampler if self.runner.compile_decode else None)
        mx.async_eval(drawn.arrays())
        self._last = (drawn.tokens, {c.request_id: i for i, c in enumerate(chunks)})
        self._submitted[plan.step] = (chunks, masks, drawn)

    def collect(self, plan: StepPlan) -> StepOutput:
        entry = self._submitted.pop(plan.step, None)
        if entry is None:
            return StepOutput()
        chunks, masks, drawn = entry
        picked = drawn.host()
        if masks is not None:
            tokens = self._commit(chunks, masks, picked)
        else:
            tokens = [SampledToken(tok, lp) for tok, lp in picked]
        return StepOutput({c.request_id: t for c, t in zip(chunks, tokens, strict=True)})

    def _pending_tokens(self, decodes: tuple[ScheduledChunk, ...]) -> mx.array | None:
        """The decodes' tokens from the last submitted step's samples when they are
        ``PENDING`` (all or none of them are), else None (host tokens)."""
        pending = [c.tokens[0] == PENDING for c in decodes]
        if not any(pending):
            return None
        if not all(pending) or self._last is None:
            raise ValueError("a step's decode tokens are either all pending or none")
        tokens, rows = self._last
        idx = [rows[c.request_id] for c in decodes]
        if idx == list(range(tokens.shape[0])):  # the same rows in the same order
            return tokens
        return tokens[host_array(idx)]

    # ---- constrained rows ----------------------------------------------------------
    def _begin_masks(self, chunks: list[ScheduledChunk]) -> tuple[list[int], list[StepRow],
                                                                   StepMasks] | None:
        idx = [i for i, c in enumerate(chunks) if c.params.constraint is not None]
        if not idx:
            return None
        if self.constraints is None:
            raise RuntimeError("a constrained request reached an engine without a tokenizer")
        rows = [StepRow(chunks[i].request_id, chunks[i].params.constraint,
                        chunks[i].output_index,
                        chunks[i].params.max_tokens - chunks[i].output_index,
                        chunks[i].output) for i in idx]
        vocab = self.constraints.compiler.tokenizer.vocab_size  # the masks' width
        return idx, rows, self.constraints.begin(rows, vocab)

    def _allowed(self, masks, batch: int, vocab: int) -> mx.array | None:
        if masks is None:
            return None
        idx, _, step = masks
        t0 = time.perf_counter()
        part = step.allowed()
        self.last_mask_wait_s = time.perf_counter() - t0
        self.last_mask_s = step.compute_s
        self.mask_wait_seconds += self.last_mask_wait_s
        if part.shape[1] != vocab:  # logits wider than the mask: the rest is never allowed
            fit = np.zeros((part.shape[0], vocab), dtype=bool)
            n = min(vocab, part.shape[1])
            fit[:, :n] = part[:, :n]
            part = fit
        if len(idx) == batch:
            return mx.array(part)
        full = np.ones((batch, vocab), dtype=bool)
        full[idx] = part
        return mx.array(full)

    def _commit(self, chunks, masks, picked) -> list[SampledToken]:
        idx, rows, step = masks
        t0 = time.perf_counter()
        done = self.constraints.commit(rows, step, [picked[i][0] for i in idx])
        self.last_commit_s = time.perf_counter() - t0
        eos = self.constraints.eos
        out = [SampledToken(tok, lp) for tok, lp in picked]
        for i, c in zip(idx, done, strict=True):
            lp = picked[i][1]
            if c.replaced and lp is not None:  # the only token left that finishes in time
                lp = TokenLogprob(c.token, 0.0, ((c.token, 0.0),))
            # an end token that completes the grammar ends the request as eos does
            final = c.final and (c.token not in eos or chunks[i].params.ignore_eos)
            out[i] = SampledToken(c.token, lp, final)
        return out
