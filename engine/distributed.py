"""Serving over MLX distributed (tensor or pipeline parallel): rank 0 plans every step,
every rank runs it.

One logical server spans the ranks of an ``mlx.launch`` group.  Each rank loads its part of
the model (``engine.loader.load_sharded``).  Tensor parallel: sharded by mlx-lm (attention
heads, KV heads and MLP columns split N ways; the sharded layers all-sum their outputs, so
every rank ends a forward with the complete hidden state and logits).  Pipeline parallel
(``engine.pipeline``): a slice of the layers per rank, the hidden state sent rank to rank
inside the forward, ending on rank 0, the only rank with logits.  Either way rank 0 runs the
HTTP server, the scheduler and the ``ModelExecutor`` on a ``ShardedRunner`` with a
``Leader``; every other rank runs a ``Follower`` over its own ``ShardedRunner``, and the
protocol below is the same (only the collectives inside the forward differ).

One step, as messages (all through ``mx.distributed.all_sum``: rank 0 contributes the
message, the others zeros, so every backend that sums int32 carries it; no side channel)::

    rank 0 (engine thread)                       rank r > 0 (main thread)
    scheduler.schedule() -> plan
    ModelExecutor.execute(plan)
      ShardedRunner.forward(prefills, decodes)
        header [op, seq, #pre, #dec, slabs, path, len]
          + payload (tokens, positions, blocks) ---> Follower.run: recv, grow pool to ``slabs``
        ModelRunner.forward  <-- all-sums (TP) or -->   ModelRunner.forward (same inputs)
                             send/recv (pipeline)
        ack (checked: every rank took part)     <--->   ack
      sample on rank 0 (only it has the grammars,
      penalties and seeds); the tokens reach the
      others as the next step's decode inputs
    scheduler.update(plan, output)

Invariants:
  * every rank evaluates the same collectives in the same order: followers run
    ``ModelRunner.forward`` on exactly the inputs rank 0 ran (``want_logits`` included), and
    ``eval_each_forward`` evaluates each forward of a step before building the next, so two
    independent forwards never interleave their collectives differently on two ranks (the
    attention path chosen per rank may differ; it holds no collective);
  * block decisions are rank 0's alone (allocation, prefix caching, preemption, aborts);
    the other ranks' pools are plain storage indexed by the same block ids, grown to rank
    0's slab count before each step, so they hold the same blocks for their own KV heads
    (tensor parallel) or layers (pipeline).
    Followers keep no per-request state: ``release`` and aborts need no message;
  * messages carry a sequence number and per-rank check words (``dist_wire.Channel``): a
    message some rank missed fails on rank 0, one out of order fails on the follower;
  * on rank 0, once ``Leader.start`` ran, every collective goes through the ``Leader`` and
    its lock (steps with their forwards, heartbeats, stop): any other would interleave with
    a heartbeat (the check words then fail it);
  * a wait on the other ranks (a step, a message, a heartbeat) that outlasts
    ``DistConfig.timeout_s`` calls ``on_fault`` from a watchdog thread (the waiting thread is
    blocked inside MLX and cannot be interrupted); a collective that raises (a peer's
    socket closed) does the same on rank 0 and ends ``Follower.run`` elsewhere.  The
    composition root decides what a fault does (it ends the process, non-zero);
  * rank 0 sends a heartbeat whenever it has sent nothing for ``heartbeat_s`` (an idle
    server), so a follower's wait for rank 0 is bounded even when no request arrives.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace

import mlx.core as mx
import numpy as np

from slabserve.engine.dist_wire import (
    OP_HEARTBEAT,
    OP_STEP,
    OP_STOP,
    Channel,
    Fault,
    Watchdog,
    decode_inputs,
    encode_inputs,
    make_header,
)
from slabserve.engine.runner import ModelRunner, SeqInput

log = logging.getLogger("slabserve.distributed")

EXIT_GROUP_LOST = 3  # a rank's exit status when the group failed under it
# the selector's override as one int32 word: auto, force native, force gather
_OVERRIDE_CODES: dict[bool | None, int] = {None: 0, True: 1, False: 2}
_OVERRIDES = {v: k for k, v in _OVERRIDE_CODES.items()}


@dataclass(frozen=True)
class DistConfig:
    """``timeout_s``: the longest any rank waits on the others (one step, or rank 0's next
    message) before the group counts as failed; it must exceed the slowest step.
    ``heartbeat_s``: an idle rank 0 sends a heartbeat this often (None: a quarter of the
    timeout, at most 2 s)."""

    timeout_s: float = 60.0
    heartbeat_s: float | None = None

    def __post_init__(self) -> None:
        if self.timeout_s <= 0:
            raise ValueError("the distributed timeout must be positive")
        if self.heartbeat_s is not None and not 0 < self.heartbeat_s < self.timeout_s:
            raise ValueError("heartbeat_s must be positive and below timeout_s")

    @property
    def heartbeat(self) -> float:
        return self.heartbeat_s or min(2.0, self.timeout_s / 4)


class Leader:
    """Rank 0's end of the group: sends each step's inputs (``step``), heartbeats while
    idle and ``stop`` at shutdown, all under one lock (one message at a time, and a step's
    forward, whose all-sums the others join, inside it).  ``fault`` is the first failure's
    reason (None while healthy); after one, every ``step`` raises at once."""

    def __init__(self, group: mx.distributed.Group, cfg: DistConfig, on_fault: Fault) -> None:
        self.channel = Channel(group)
        self.cfg = cfg
        self.fault: str | None = None
        self._on_fault = on_fault
        self._lock = threading.Lock()
        self._seq = 0
        self._last_send = time.monotonic()
        self._stopped = threading.Event()
        self._stop_sent = False
        self._watchdog = Watchdog(cfg.timeout_s, self._fail, "rank 0")
        self._beat: threading.Thread | None = None

    def start(self) -> None:
        """Start the heartbeat thread (idempotent)."""
        if self._beat is None:
            self._beat = threading.Thread(target=self._heartbeats, daemon=True,
                                          name="slabserve-dist-heartbeat")
            self._beat.start()

    @contextlib.contextmanager
    def step(self, prefills: Sequence[SeqInput], decodes: Sequence[SeqInput], slabs: int,
             override: bool | None) -> Iterator[None]:
        """Send the step to every rank, then run the body (rank 0's own forward) while
        holding the channel: an exception there leaves the ranks out of step, a fault."""
        words = encode_inputs(prefills, decodes)
        with self._lock:
            if self.fault is not None or self._stopped.is_set():
                raise RuntimeError(f"the distributed group is down: {self.fault or 'stopped'}")
            seq = self._next()
            head = make_header(OP_STEP, seq, len(prefills), len(decodes), slabs,
                               _OVERRIDE_CODES[override], len(words))
            try:
                with self._watchdog.waiting(f"step message {seq}"):
                    self.channel.send(head, words)
                    yield
                    self.channel.ack(seq)
            except Exception as e:
                self._fail(f"rank 0: step message {seq} failed ({e}): a rank died or left the "
                           "group, the ranks are out of step")
                raise

    def stop(self) -> None:
        """End the heartbeats and send every rank ``stop`` (they exit 0); idempotent."""
        self._stopped.set()
        if self._beat is not None:
            self._beat.join()
        with self._lock:
            if self.fault is None and not self._stop_sent:
                self._stop_sent = True
                self._control(OP_STOP, "stop")
        self._watchdog.close()

    def _next(self) -> int:
        self._seq += 1
        self._last_send = time.monotonic()
        return self._seq

    def _control(self, op: int, what: str) -> None:
        seq = self._next()
        try:
            with self._watchdog.waiting(f"{what} message {seq}"):
                self.channel.send(make_header(op, seq), np.zeros(0, dtype=np.int32))
        except Exception as e:
            self._fail(f"rank 0: {what} message {seq} failed ({e}): a rank died or left the "
                       "group")

    def _heartbeats(self) -> None:
        mx.set_default_stream(mx.new_stream(mx.default_device()))  # streams are per thread
        period = self.cfg.heartbeat
        while not self._stopped.wait(period / 4):
            if self.fault is not None:
                return
            if time.monotonic() - self._last_send < period:
                continue
            if self._lock.acquire(blocking=False):  # a step in flight is a heartbeat too
                try:
                    if not self._stopped.is_set():
                        self._control(OP_HEARTBEAT, "heartbeat")
                finally:
                    self._lock.release()

    def _fail(self, reason: str) -> None:
        if self.fault is None:
            self.fault = reason
            self._on_fault(reason)


class Follower:
    """A rank other than 0: runs every step rank 0 sends on its own shard until ``stop``.
    ``run`` returns 0 after ``stop`` and ``EXIT_GROUP_LOST`` when the group fails under it
    (logged); a wait past the timeout calls ``on_fault`` from the watchdog instead."""

    def __init__(self, runner: ShardedRunner, group: mx.distributed.Group, cfg: DistConfig,
                 on_fault: Fault) -> None:
        self.runner = runner
        self.rank = group.rank()
        self.channel = Channel(group)
        self.cfg = cfg
        self.on_fault = on_fault
        self.steps = 0

    def run(self) -> int:
        dog = Watchdog(self.cfg.timeout_s, self.on_fault, f"rank {self.rank}")
        expect = 1
        try:
            while True:
                with dog.waiting("the wait for rank 0's next message"):
                    header, payload = self.channel.recv(expect)
                op, seq, n_pre, n_dec, slabs, override, _ = header
                if seq != expect:
                    raise RuntimeError(f"message {seq} from rank 0, expected {expect}")
                expect += 1
                if op == OP_STOP:
                    log.info("rank %d: stop from rank 0 after %d steps", self.rank, self.steps)
                    return 0
                if op == OP_STEP:
                    prefills, decodes = decode_inputs(payload, n_pre, n_dec)
                    with dog.waiting(f"step message {seq}"):
                        self.runner.follow(prefills, decodes, slabs, _OVERRIDES[override])
                        self.channel.ack(seq)
                    self.steps += 1
                elif op != OP_HEARTBEAT:
                    raise RuntimeError(f"unknown message {op} from rank 0")
        except Exception as e:
            log.critical("rank %d: lost the group (%s): rank 0 or another rank died; exiting "
                         "with %d", self.rank, e, EXIT_GROUP_LOST)
            return EXIT_GROUP_LOST
        finally:
            dog.close()


class ShardedRunner(ModelRunner):
    """A ``ModelRunner`` over one rank's shard of the model.  On rank 0 (``leader`` set)
    ``forward`` first sends its inputs to the other ranks; the others call ``follow``
    with what rank 0 sent.  Every rank's pool holds its own KV heads (tensor parallel) or
    its own layers (``pipeline``: the model is an ``engine.pipeline.PipelineModel``); the
    geometry is probed from the rank's model and checked equal across ranks at start (all
    but the layer count for a pipeline)."""

    def __init__(self, model, cache_cfg, cfg, selector, group: mx.distributed.Group,
                 leader: Leader | None = None, pipeline: bool = False) -> None:
        # evaluated layer by layer, never as compiled stages: the layers stay unstaged and
        # unfused (no start-up work for stages that would never run)
        super().__init__(model, cache_cfg, replace(cfg, compile_decode=False), selector)
        self.eval_each_forward = True  # one chain of collectives at a time (module docstring)
        self.group = group
        self.leader = leader
        # a pipeline stage (engine/pipeline.py) holds its own number of layers
        check_same_geometry(group, self, layers=not pipeline)

    # the other ranks get the step's tokens from rank 0's message: host tokens only
    device_tokens = False

    def forward(self, prefills: list[SeqInput], decodes: list[SeqInput],
                decode_tokens: mx.array | None = None):
        if decode_tokens is not None:
            raise ValueError("a sharded runner sends its decode tokens from the host")
        if self.leader is None:
            raise RuntimeError("only rank 0 plans steps; other ranks call follow()")
        override = self.attention.selector.override
        with self.leader.step(prefills, decodes, self.pool.num_slabs, override):
            return super().forward(prefills, decodes)

    def follow(self, prefills: list[SeqInput], decodes: list[SeqInput], slabs: int,
               override: bool | None) -> None:
        """Run the step rank 0 sent: same pool size, same attention override, same forward
        (its logits are dropped: rank 0 samples)."""
        self.pool.grow(slabs)
        selector = self.attention.selector
        if selector.override is not override:
            selector.set_override(override)
        super().forward(prefills, decodes)


def agree_min(group: mx.distributed.Group, value: int, unit: int = 1 << 10) -> int:
    """The smallest ``value`` over the ranks, in whole ``unit``s (a KV budget sized from
    each device's free memory must be one number, or the pools differ)."""
    x = mx.distributed.all_min(mx.array([value // unit], dtype=mx.int32), group=group)
    return int(x.item()) * unit


def check_same_geometry(group: mx.distributed.Group, runner: ModelRunner,
                        layers: bool = True) -> None:
    """ValueError unless every rank's KV pool has the same shape (layers unless ``layers``
    is False, KV heads per rank, head size, block size, slab size, most slabs, element
    size): the same block id must exist on every rank."""
    g = runner.geom
    mine = [g.num_layers if layers else 0, g.kv_heads, g.head_dim, g.block_size,
            g.slab_blocks, runner.pool.max_slabs or 0, g.dtype.size]
    x = mx.array(mine, dtype=mx.int32)
    lo = mx.distributed.all_min(x, group=group).tolist()
    hi = mx.distributed.all_max(x, group=group).tolist()
    if lo != hi:
        raise ValueError(f"the ranks' KV pools differ (layers, kv heads, head dim, block, "
                         f"slab blocks, slabs, bytes: {lo} .. {hi}); give every rank the "
                         "same model, --kv-budget and cache flags")
