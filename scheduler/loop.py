"""The asyncio front: ``ServingLoop`` over a ``Scheduler`` and an ``Executor``.

Threads: the event loop only queues commands (add, abort) and reads deltas; one
dedicated engine thread owns the scheduler and the executor and runs
``schedule -> submit -> collect -> update`` back to back, posting each step's deltas to
the loop in one ``call_soon_threadsafe``.  MLX releases the GIL while it waits for the
device, so the loop stays responsive while a step computes.

Async scheduling (``SchedulerConfig.async_scheduling``, executors that ``overlap``):
after submitting step t the thread plans and submits step t+1
(``Scheduler.schedule_next``, decode tokens fed on the device by step t's samples), and
only then waits for step t's tokens, updates and emits them, so the host's work on
t+1 overlaps the device's on t (docs/adr/0013-async-scheduling.md).

Cancellation: closing a stream's iterator, cancelling its task, or ``abort(id)`` queues
an abort; the engine thread applies it before planning the next step, freeing the
request's blocks.

Start-up: ``start`` returns once the engine thread has run ``Executor.prepare`` (start-up
capture of compiled decode steps, which MLX caches per stream: they must be traced on the
thread that serves them).

Control: ``between_steps(fn)`` queues ``fn`` the same way and awaits its result, so it
runs on the engine thread with no step in flight (a step submitted ahead is collected
first; ``set_attention_path`` uses it).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from typing import TypeVar

from slabserve.engine.step import Executor, StepPlan
from slabserve.scheduler.api import (
    ATTENTION_PATHS,
    AttentionPath,
    Delta,
    GrammarSpec,
    Request,
    RequestError,
    ServingLoop,
    ServingStats,
)
from slabserve.scheduler.handoff import settle
from slabserve.scheduler.output import OutputStream
from slabserve.scheduler.scheduler import Scheduler, SeqUpdate
from slabserve.scheduler.steplog import DecodeStepTime, StepClock, StepRecord

log = logging.getLogger("slabserve.engine")
_Queue = asyncio.Queue | None
_Out = list[tuple[_Queue, Delta]]  # (consumer queue, delta) per delta of one step
T = TypeVar("T")


class _Live:
    """A request the front knows about: its delta queue and output stream."""

    __slots__ = ("queue", "out")

    def __init__(self, queue: asyncio.Queue, out: OutputStream) -> None:
        self.queue = queue
        self.out = out


class ThreadedServingLoop(ServingLoop):
    """See the module docstring.  ``tokenizer`` (mlx-lm ``TokenizerWrapper``) gives
    streaming detokenization; without one, deltas carry token ids and empty text."""

    def __init__(self, scheduler: Scheduler, executor: Executor, tokenizer=None,
                 model_name: str = "", check_when_idle: bool = True,
                 step_log_size: int = 4096) -> None:
        self.scheduler = scheduler
        self.executor = executor
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.max_context = scheduler.max_context
        self.check_when_idle = check_when_idle
        self.integrity_checks = 0
        self.integrity_failures = 0
        self._live: dict[str, _Live] = {}
        self._inbox: deque[tuple[str, object]] = deque()
        self._wake = threading.Event()
        self._prepared = threading.Event()  # the engine thread's warm-up is over
        self._stopping = False
        self._accepting = True
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._idle = asyncio.Event()
        self.steps = 0
        # async scheduling: the step submitted ahead, collected by the next iteration
        self.overlap = scheduler.cfg.async_scheduling and executor.overlaps
        self.ahead_steps = 0  # steps submitted while the one before them ran
        self._inflight: StepPlan | None = None
        self.step_log: deque[StepRecord] = deque(maxlen=step_log_size)
        self.decode_time = DecodeStepTime()
        if tokenizer is not None:
            executor.bind_tokenizer(tokenizer)

    # ---- lifecycle -------------------------------------------------------------------
    async def start(self) -> None:
        if self._thread is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._idle = asyncio.Event()
        self._idle.set()
        self._thread = threading.Thread(target=self._run, name="slabserve-engine", daemon=True)
        self._thread.start()
        await asyncio.to_thread(self._prepared.wait)  # serve once the engine is warm

    async def shutdown(self, timeout: float) -> None:
        self._accepting = False
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except asyncio.TimeoutError:
            for rid in list(self._live):
                self.abort(rid)
            await asyncio.wait_for(self._idle.wait(), 30.0)
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            while self._thread.is_alive():  # no executor thread: MLX objects stay put
                await asyncio.sleep(0.005)
            self._thread = None

    # ---- requests --------------------------------------------------------------------
    def generate(self, request: Request) -> AsyncIterator[Delta]:
        if self._thread is None:
            raise RuntimeError("engine not started: await engine.start() first")
        if not self._accepting:
            raise RequestError("shutting_down", "the server is shutting down")
        self.scheduler.validate(request)
        rid = request.request_id
        if rid in self._live:
            raise RequestError("invalid", f"duplicate request id {rid!r}")
        queued = self.scheduler.num_waiting + sum(1 for k, _ in list(self._inbox) if k == "add")
        if queued >= self.scheduler.cfg.max_queued:
            raise RequestError("queue_full", f"{queued} requests already queued")
        detok = self.tokenizer.detokenizer if self.tokenizer is not None else None
        live = _Live(asyncio.Queue(), OutputStream(request.params, len(request.prompt_tokens),
                                                   detok))
        self._live[rid] = live
        self._idle.clear()
        self._post("add", request)
        return self._stream(rid, live.queue)

    async def _stream(self, rid: str, queue: asyncio.Queue) -> AsyncIterator[Delta]:
        done = False
        try:
            while True:
                delta = await queue.get()
                done = delta.finish_reason is not None
                yield delta
                if done:
                    return
        finally:
            if not done:
                self.abort(rid)

    def abort(self, request_id: str) -> None:
        self._post("abort", request_id)

    async def check_constraint(self, spec: GrammarSpec) -> None:
        """Compile ``spec`` on a worker thread (not the event loop, not the engine thread)."""
        try:
            await asyncio.to_thread(self.executor.check_constraint, spec)
        except ValueError as e:
            raise RequestError("invalid", str(e)) from None

    def stats(self) -> ServingStats:
        s, a = self.scheduler, self.scheduler.allocator
        return ServingStats(s.num_running, s.num_waiting, a.num_used, a.max_blocks,
                            s.preemptions, s.prompt_tokens, s.generated_tokens,
                            self.integrity_checks, self.integrity_failures,
                            s.prefix.queries, s.prefix.hits, a.num_cached,
                            self.executor.kv_dtype(), s.block_size, self.decode_time.steps,
                            self.decode_time.seconds, self.decode_time.phases(),
                            self.decode_time.host_cpu_seconds,
                            self.executor.decode_graph_traces(), self.decode_time.buckets(),
                            self.decode_time.ahead_steps)

    def _post(self, kind: str, item: object) -> None:
        self._inbox.append((kind, item))
        self._wake.set()

    # ---- control between steps -------------------------------------------------------
    async def between_steps(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on the engine thread after the step in flight (if any) and before the
        next one, and return its result or raise its exception;
        ``RequestError`` ``shutting_down`` when the engine is not running."""
        if self._thread is None or self._stopping:
            raise RequestError("shutting_down", "the engine is not running")
        fut = asyncio.get_running_loop().create_future()
        self._post("call", (fn, fut))
        return await fut

    def attention_path(self) -> AttentionPath | None:
        return self.executor.attention_path()

    def attention_path_counts(self) -> dict[tuple[str, str], int]:
        return self.executor.attention_path_counts()

    async def set_attention_path(self, path: AttentionPath) -> AttentionPath:
        if path not in ATTENTION_PATHS:
            raise RequestError("invalid", f"path must be one of {', '.join(ATTENTION_PATHS)}",
                               "path")
        if self.executor.attention_path() is None:
            raise RequestError("invalid", "this engine has no switchable attention path")
        return await self.between_steps(lambda: self.executor.set_attention_path(path))

    # ---- engine thread ---------------------------------------------------------------
    def _run(self) -> None:
        self.executor.bind_thread()
        try:
            self.executor.prepare()
        except Exception:  # warm-up is an optimisation: serve without it
            log.exception("engine warm-up failed; serving without it")
        finally:
            self._prepared.set()
        while not self._stopping:
            out: _Out = []
            record = None
            try:
                record = self._iteration(out)
            except Exception as e:  # a bug must not leave streams hanging: fail them all
                log.exception("engine iteration failed; failing every live request")
                for rid in list(self._live):
                    self.scheduler.finish(rid, "error")
                    out.append(self._close(rid, "error", f"engine failure: {e!r}"))
            if out:
                t, c = time.perf_counter(), time.thread_time()
                self._deliver(out)
                if record is not None:
                    record.deliver_s = time.perf_counter() - t
                    record.host_cpu_s += time.thread_time() - c
            if record is not None:
                self.decode_time.add(record)
            if not self.scheduler.has_work and not self._inbox and self._inflight is None:
                if self.check_when_idle:
                    self._check_integrity()  # once per idle spell, before sleeping
                self._wake.wait()
                self._wake.clear()
        for kind, item in list(self._inbox):  # calls queued while stopping: refused
            if kind == "call":
                settle(item[1], None, RequestError("shutting_down", "the engine stopped"))

    def _iteration(self, out: _Out) -> StepRecord | None:
        if self._inflight is not None and any(k == "call" for k, _ in list(self._inbox)):
            return self._step(out)  # a queued call runs with no step in flight
        self._drain(out)
        busy = self.scheduler.has_work or self._inflight is not None
        return self._step(out) if busy else None

    def _check_integrity(self) -> None:
        """Idle-time ``check_integrity()``: counted (for /metrics), a failure logged, never
        fatal to the engine thread."""
        self.integrity_checks += 1
        try:
            self.scheduler.check_integrity()
        except AssertionError as e:
            self.integrity_failures += 1
            log.error("KV cache integrity check failed: %s", e)

    def _drain(self, out: _Out) -> None:
        while self._inbox:
            kind, item = self._inbox.popleft()
            if kind == "add":
                try:
                    self._check_spec(item)
                    self.scheduler.add(item, enforce_queue_limit=False)
                except RequestError as e:
                    out.append(self._close(item.request_id, "error", e.message))
            elif kind == "call":
                self._call(*item)
            elif self.scheduler.finish(item, "abort") is not None or item in self._live:
                self.executor.release(item)
                out.append(self._close(item, "abort"))

    def _check_spec(self, req: Request) -> None:
        """A constraint that does not compile fails its request here, not the step it
        would join (free when the server checked it first: compiled grammars are cached)."""
        if req.params.constraint is not None:
            try:
                self.executor.check_constraint(req.params.constraint)
            except ValueError as e:
                raise RequestError("invalid", str(e)) from None

    @staticmethod
    def _call(fn: Callable[[], object], fut: asyncio.Future) -> None:
        try:
            result, error = fn(), None
        except Exception as e:  # the caller gets it; the engine goes on
            result, error = None, e
        settle(fut, result, error)

    def _step(self, out: _Out) -> StepRecord | None:
        """Collect the step in flight (or plan and submit one), then update and emit.
        With async scheduling the next pure-decode step is planned and submitted before
        this one's tokens are waited for, and stays in flight into the next iteration."""
        clock = StepClock()
        plan, self._inflight = self._inflight, None
        ahead = plan is not None
        schedule_s = forward_s = 0.0
        if plan is None:
            plan = self.scheduler.schedule()
            schedule_s = clock.elapsed()
            if not self._submit(plan, out):
                return None
            forward_s = self.executor.last_forward_s
        nxt, ahead_s = self._plan_ahead(plan)
        schedule_s += ahead_s
        if nxt is not None:
            forward_s += self.executor.last_forward_s
        clock.waiting()
        try:
            result = self.executor.collect(plan)
        except Exception as e:  # nxt reads plan's tokens: it fails with it
            self._fail(plan, e, out)
            if nxt is not None:
                with contextlib.suppress(Exception):
                    self.executor.collect(nxt)
                self._fail(nxt, e, out)
            return None
        clock.collected()
        self.steps += 1
        for upd in self.scheduler.update(plan, result):
            self._emit(upd, out)
        self._inflight = nxt
        record = clock.record(len(plan.decodes), plan.num_tokens - len(plan.decodes),
                              schedule_s, forward_s, ahead)
        self.step_log.append(record)
        return record

    def _submit(self, plan: StepPlan, out: _Out) -> bool:
        try:
            self.executor.submit(plan)
        except Exception as e:  # a failed step fails its requests, not the engine
            self._fail(plan, e, out)
            return False
        return True

    def _plan_ahead(self, plan: StepPlan) -> tuple[StepPlan | None, float]:
        """(the next step, planned and submitted while ``plan`` runs, or None; seconds
        spent planning it).  None: async scheduling off, commands waiting, or
        ``Scheduler.schedule_next`` declines.  A submit that fails leaves nothing behind:
        the blocks it reserved cover the sequences' next positions, which the next
        ``schedule`` plans again."""
        if not self.overlap or self._inbox:
            return None, 0.0
        t0 = time.perf_counter()
        nxt = self.scheduler.schedule_next(plan)
        planned_s = time.perf_counter() - t0
        if nxt is None:
            return None, planned_s
        try:
            self.executor.submit(nxt)
        except Exception:
            log.exception("step %d failed to submit ahead; planning it after the update",
                          nxt.step)
            return None, planned_s
        self.ahead_steps += 1
        return nxt, planned_s

    def _fail(self, plan: StepPlan, e: Exception, out: _Out) -> None:
        log.error("step %d failed: %r", plan.step, e, exc_info=e)
        for c in plan.chunks():
            if self.scheduler.finish(c.request_id, "error") is not None:
                out.append(self._close(c.request_id, "error", repr(e)))

    def _emit(self, upd: SeqUpdate, out: _Out) -> None:
        live = self._live.get(upd.request_id)
        if live is None or upd.token is None:
            return
        delta, stop_hit = live.out.push(upd.token, upd.finish_reason, upd.cached_tokens)
        if stop_hit and upd.finish_reason is None:
            self.scheduler.finish(upd.request_id, "stop")
        if delta.finish_reason is not None:
            self._live.pop(upd.request_id, None)
            self.executor.release(upd.request_id)
        out.append((live.queue, delta))

    def _close(self, rid: str, reason, error: str | None = None) -> tuple[_Queue, Delta]:
        live = self._live.pop(rid, None)
        if live is None:
            return None, Delta((), "", None, reason, 0, 0, error)
        return live.queue, live.out.close(reason, error)

    def _deliver(self, out: _Out) -> None:
        """Hand one step's deltas to the loop in one call (a consumer that left just
        never reads its queue)."""
        try:
            self._loop.call_soon_threadsafe(self._dispatch, out)
        except RuntimeError:  # loop closed: nobody is listening any more
            pass

    def _dispatch(self, items: _Out) -> None:
        for q, d in items:
            if q is not None:
                q.put_nowait(d)
        if not self._live:
            self._idle.set()

