"""Server traces from Prometheus ``/metrics``: attention-path decisions during a run.

The run snapshots the counters before and after; the difference is what the server decided
while serving this run's requests (warm-up excluded).  The counter is
``slabserve:attention_path_total{path=...,reason=...}``; any counter whose name ends in
``attention_path_total`` is accepted, so a renamed prefix still shows up.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import httpx

PATH_COUNTER_SUFFIX = "attention_path_total"

Key = tuple[str, tuple[tuple[str, str], ...]]  # (sample name, sorted labels)


def parse_prometheus(text: str) -> dict[Key, float]:
    """Every sample of a Prometheus text exposition, keyed by name and sorted labels."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[Key, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = float(s.value)
    return out


@dataclass(frozen=True)
class PathTrace:
    """Decisions per path (and per (path, reason)) between two snapshots.

    ``total == sum(by_path.values())``; shares are fractions of ``total``.
    """

    by_path: dict[str, float]
    by_reason: dict[str, float]  # "path:reason" -> count

    @property
    def total(self) -> float:
        return sum(self.by_path.values())

    def shares(self) -> dict[str, float]:
        t = self.total
        return {p: (c / t if t else 0.0) for p, c in sorted(self.by_path.items())}

    def describe(self, reasons: bool = False) -> str:
        """``native 83% / gather 17%``, with ``reasons`` e.g. ``native 83% (rule:x) / ...``;
        ``-`` when nothing was decided."""
        if not self.total:
            return "-"
        parts = []
        for p, share in self.shares().items():
            why = [r.split(":", 1)[1] for r in self.by_reason if r.split(":", 1)[0] == p]
            parts.append(f"{p} {share:.0%}" + (f" ({', '.join(why)})" if reasons else ""))
        return " / ".join(parts)


def _increase(before: Mapping[Key, float], key: Key, value: float) -> float:
    """A sample's increase since ``before``; one that went down (the server restarted)
    counts from zero."""
    prev = before.get(key, 0.0)
    return value - prev if value >= prev else value


def _named(name: str, suffix: str) -> bool:
    """Whether sample ``name`` is ``suffix`` under any prefix (``slabserve:<suffix>``)."""
    return name == suffix or name.endswith(":" + suffix)


def path_delta(before: Mapping[Key, float], after: Mapping[Key, float]) -> PathTrace:
    """The attention-path counters' increase from ``before`` to ``after``.  A counter that
    went down (server restarted) counts from zero."""
    by_path: dict[str, float] = {}
    by_reason: dict[str, float] = {}
    for (name, labels), value in after.items():
        if not name.endswith(PATH_COUNTER_SUFFIX):
            continue
        inc = _increase(before, (name, labels), value)
        if inc <= 0:
            continue
        lab = dict(labels)
        path = lab.get("path", "?")
        by_path[path] = by_path.get(path, 0.0) + inc
        reason = f"{path}:{lab.get('reason', '?')}"
        by_reason[reason] = by_reason.get(reason, 0.0) + inc
    return PathTrace(dict(sorted(by_path.items())), dict(sorted(by_reason.items())))


SERVER_COUNTERS = ("num_preemptions_total", "prompt_tokens_total", "generation_tokens_total",
                   "decode_step_seconds_count", "decode_step_seconds_sum",
                   "decode_step_host_cpu_seconds_sum", "decode_graph_traces_total",
                   "decode_steps_ahead_total")
PHASE_SUM = "decode_step_phase_seconds_sum"  # our servers' decode step phases, by label


def counter_deltas(before: Mapping[Key, float], after: Mapping[Key, float],
                   suffixes: tuple[str, ...] = SERVER_COUNTERS) -> dict[str, float]:
    """Increase of each counter named ``...<suffix>`` (summed over labels), keyed by the
    suffix without ``_total``; counters absent from ``after`` are left out."""
    out: dict[str, float] = {}
    for (name, labels), value in after.items():
        for suf in suffixes:
            if _named(name, suf):
                key = suf.removesuffix("_total")
                out[key] = out.get(key, 0.0) + _increase(before, (name, labels), value)
    return out


def labelled_deltas(before: Mapping[Key, float], after: Mapping[Key, float], suffix: str,
                    label: str) -> dict[str, float]:
    """Increase of the samples named ``...<suffix>`` per value of their ``label`` (summed
    over their other labels), e.g. the decode step's seconds per ``phase``."""
    out: dict[str, float] = {}
    for (name, labels), value in after.items():
        if _named(name, suffix):
            key = dict(labels).get(label, "?")
            out[key] = out.get(key, 0.0) + _increase(before, (name, labels), value)
    return out


STEP_BUCKETS = "decode_step_seconds_bucket"


def histogram_delta(before: Mapping[Key, float], after: Mapping[Key, float],
                    suffix: str = STEP_BUCKETS) -> list[tuple[float, float]]:
    """(upper bound, cumulative count increase) of the histogram whose bucket samples are
    named ``...<suffix>``, summed over its other labels, ascending; empty when absent."""
    by_le: dict[float, float] = {}
    for (name, labels), value in after.items():
        if not _named(name, suffix):
            continue
        le = float(dict(labels).get("le", "inf"))
        by_le[le] = by_le.get(le, 0.0) + _increase(before, (name, labels), value)
    return sorted(by_le.items())


def histogram_quantile(q: float, buckets: list[tuple[float, float]]) -> float | None:
    """Prometheus' ``histogram_quantile`` over cumulative ``buckets``: linear inside the
    bucket that holds rank ``q * count`` (its lower bound if that is the infinite one);
    None without observations."""
    if not buckets or buckets[-1][1] <= 0:
        return None
    rank = q * buckets[-1][1]
    lo, below = 0.0, 0.0
    for le, n in buckets:
        if n >= rank:
            if math.isinf(le):
                return lo
            return le if n == below else lo + (le - lo) * (rank - below) / (n - below)
        lo, below = le, n
    return lo


async def snapshot(client: httpx.AsyncClient, base_url: str,
                   metrics_path: str | None) -> dict[Key, float] | None:
    """Current samples, or None when the server has no usable ``/metrics``."""
    if metrics_path is None:
        return None
    try:
        resp = await client.get(base_url.rstrip("/") + metrics_path, timeout=10.0)
    except httpx.HTTPError:
        return None
    if resp.status_code != 200:
        return None
    try:
        return parse_prometheus(resp.text)
    except ValueError:
        return None
