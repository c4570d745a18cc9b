"""Where the engine thread's steps went: one ``StepRecord`` per step (the serving loop
keeps the latest in ``step_log``) and ``DecodeStepTime``, the running totals and histogram
of the decode-only steps behind /metrics' ``decode_step_seconds``."""

from __future__ import annotations

import bisect
import itertools
import time
from dataclasses import dataclass


@dataclass
class StepRecord:
    """Where one engine step's time went (seconds), in order: planning, the model
    forward, the rest of submitting it (sampling, host glue), waiting for its tokens,
    update + detokenize + stop strings, and handing deltas to the loop.  With async
    scheduling an iteration collects one step and submits the next: planning, forward
    and sampling are then the next step's, the wait is this one's.  ``host_cpu_s``: the
    engine thread's CPU time outside the wait; the host phases' wall time beyond it is
    the thread waiting to run (for the GIL, or the OS).  ``ahead``: the step collected
    was submitted while the step before it ran (async scheduling), so its device time
    could hide behind that step's host work.  ``step_log`` keeps the latest ones
    (docs/adr/0005-scheduler.md)."""

    decodes: int
    prefill_tokens: int
    schedule_s: float
    forward_s: float
    sample_s: float
    wait_s: float
    update_s: float
    deliver_s: float = 0.0
    host_cpu_s: float = 0.0
    ahead: bool = False

    @property
    def phases(self) -> tuple[float, ...]:
        """Seconds per phase, in ``PHASES`` order; they sum to ``total_s``."""
        return (self.schedule_s, self.forward_s, self.sample_s, self.wait_s, self.update_s,
                self.deliver_s)

    @property
    def total_s(self) -> float:
        return sum(self.phases)


class StepClock:
    """Wall and engine-thread CPU marks of one engine iteration: made when it starts,
    ``waiting()`` before it waits for the step's tokens, ``collected()`` after; ``record``
    then splits the iteration into a ``StepRecord``."""

    __slots__ = ("t0", "c0", "tw", "cw", "t1", "c1")

    def __init__(self) -> None:
        self.t0, self.c0 = time.perf_counter(), time.thread_time()
        self.tw = self.cw = self.t1 = self.c1 = 0.0

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def waiting(self) -> None:
        self.tw, self.cw = time.perf_counter(), time.thread_time()

    def collected(self) -> None:
        self.t1, self.c1 = time.perf_counter(), time.thread_time()

    def record(self, decodes: int, prefill_tokens: int, schedule_s: float,
               forward_s: float, ahead: bool = False) -> StepRecord:
        """The iteration up to now: planning and forward as measured by the caller, the
        rest of submitting before the wait, the wait, and the update since."""
        return StepRecord(decodes, prefill_tokens, schedule_s, forward_s,
                          max(self.tw - self.t0 - schedule_s - forward_s, 0.0),
                          self.t1 - self.tw, time.perf_counter() - self.t1,
                          host_cpu_s=time.thread_time() - self.c0 - (self.c1 - self.cw),
                          ahead=ahead)


PHASES = ("schedule", "forward", "sample", "wait", "update", "deliver")  # StepRecord.phases' names


class DecodeStepTime:
    """Running totals over the engine's pure decode steps (no prefill token): how many,
    their whole time (``StepRecord.total_s``: planning to handing the deltas over), its
    split into ``PHASES``, the engine thread's CPU time outside the wait (the rest of the
    other phases' wall time is the thread waiting to run: for the GIL, or the OS), how
    many were submitted ahead (``StepRecord.ahead``), and how many took at most each of
    ``BOUNDS`` seconds (not cumulative; the last bound is infinite), so a mean can be
    told from its tail (a step that traces a graph, a collection).  Written by the
    engine thread only; read at scrape time."""

    BOUNDS = (0.001, 0.0015, 0.002, 0.0025, 0.003, 0.004, 0.005, 0.006, 0.008, 0.01, 0.015,
              0.02, 0.03, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, float("inf"))

    def __init__(self) -> None:
        self.steps = 0
        self.seconds = 0.0
        self.phase_seconds = [0.0] * len(PHASES)
        self.host_cpu_seconds = 0.0
        self.ahead_steps = 0
        self.counts = [0] * len(self.BOUNDS)

    def add(self, record: StepRecord) -> None:
        if record.prefill_tokens == 0 and record.decodes > 0:
            self.steps += 1
            self.seconds += record.total_s
            for i, t in enumerate(record.phases):
                self.phase_seconds[i] += t
            self.host_cpu_seconds += record.host_cpu_s
            self.ahead_steps += record.ahead
            self.counts[bisect.bisect_left(self.BOUNDS, record.total_s)] += 1

    def phases(self) -> tuple[tuple[str, float], ...]:
        """(phase, seconds summed over the decode-only steps), in ``PHASES`` order."""
        return tuple(zip(PHASES, self.phase_seconds, strict=True))

    def buckets(self) -> tuple[tuple[float, int], ...]:
        """(upper bound, steps at most that long) per bound, cumulative."""
        return tuple(zip(self.BOUNDS, itertools.accumulate(self.counts), strict=True))
