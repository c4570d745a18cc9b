"""The soak's result: counts by scenario, result and status, the server's state after the
run, memory before and after, and the checks that must hold (``SoakReport.violations``).

Invariants checked (each violation is one line of text):
  - every valid request ``completed``, was ``dropped`` by its client, or was ``refused``
    with 429 and a ``Retry-After`` header during a load spike (no ``failed``, no 429
    without ``Retry-After``; no 429 at all unless ``allow_refused``);
  - every invalid request was ``rejected`` with a 4xx;
  - zero 5xx, seen by the clients and counted by the server;
  - after the run the server is idle: nothing running or waiting, zero KV blocks used,
    and the integrity check passes where the server publishes it;
  - a request sent after the run still completes (the engine loop is alive);
  - resident memory grew by at most the allowed amount after warm-up;
  - SIGTERM ended the server with exit status 0, and its log has no traceback.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field

from slabserve.reliability.observe import ServerState
from slabserve.reliability.traffic import Outcome

MIB = 1 << 20


@dataclass
class SoakReport:
    duration_s: float
    warmup_s: float
    concurrency: int
    server_args: list[str]
    outcomes: list[Outcome] = field(default_factory=list)
    state_after: ServerState | None = None
    canary: Outcome | None = None
    rss_before: int | None = None
    rss_after: int | None = None
    rss_peak: int | None = None
    rss_samples: list[tuple[float, int]] = field(default_factory=list)  # (s since warm-up, B)
    rss_growth_limit: int = 256 * MIB
    exit_code: int | None = None
    log_problems: list[str] = field(default_factory=list)
    allow_refused: bool = True
    server_counters: dict[str, float] = field(default_factory=dict)
    excluded: list[str] = field(default_factory=list)  # scenarios left out of the mix

    # ---- figures --------------------------------------------------------------------
    def count(self, **where: object) -> int:
        return sum(1 for o in self.outcomes
                   if all(getattr(o, k) == v for k, v in where.items()))

    def by(self, attr: str) -> dict[str, int]:
        return dict(sorted(Counter(str(getattr(o, attr)) for o in self.outcomes).items()))

    def by_scenario(self) -> dict[str, dict[str, int]]:
        table: dict[str, Counter] = {}
        for o in self.outcomes:
            table.setdefault(o.scenario, Counter())[o.result] += 1
        return {k: dict(sorted(v.items())) for k, v in sorted(table.items())}

    @property
    def client_5xx(self) -> int:
        return sum(1 for o in self.outcomes if o.status is not None and o.status >= 500)

    def rss_timeline(self, points: int = 5) -> list[tuple[float, float]]:
        """``points`` evenly spaced (seconds, MiB) samples of the measured phase."""
        xs = self.rss_samples
        if not xs:
            return []
        idx = sorted({round(i * (len(xs) - 1) / max(1, points - 1)) for i in range(points)})
        return [(round(xs[i][0], 1), round(xs[i][1] / MIB, 1)) for i in idx]

    @property
    def leaked_blocks(self) -> int | None:
        return None if self.state_after is None else self.state_after.kv_blocks_used

    # ---- checks ---------------------------------------------------------------------
    def violations(self) -> list[str]:
        v = [f"{o.scenario}: {o.result} (status {o.status}) {o.detail}"
             for o in self.outcomes
             if o.result == "failed" or (o.result == "refused" and not (
                 self.allow_refused and o.retry_after is not None))]
        v = v[:20] + ([f"... {len(v) - 20} more"] if len(v) > 20 else [])
        if self.client_5xx:
            v.append(f"{self.client_5xx} responses with a 5xx status")
        v += self._server_violations()
        v += self._memory_violations()
        if self.exit_code != 0:
            v.append(f"server exit status after SIGTERM: {self.exit_code}")
        v += self.log_problems
        return v

    def _server_violations(self) -> list[str]:
        s = self.state_after
        if s is None:
            return ["server state after the run was not read"]
        v = []
        if not s.idle:
            v.append(f"not idle after the run: running={s.running} waiting={s.waiting} "
                     f"kv_blocks_used={s.kv_blocks_used}")
        if s.server_5xx:
            v.append(f"server counted {s.server_5xx} 5xx responses")
        if s.integrity_ok is False:
            v.append("server reports a KV integrity failure")
        if self.canary is None or self.canary.result != "completed":
            v.append(f"request after the run did not complete: {self.canary}")
        return v

    def _memory_violations(self) -> list[str]:
        if self.rss_before is None or self.rss_after is None:
            return ["resident memory was not read"]
        growth = self.rss_after - self.rss_before
        if growth > self.rss_growth_limit:
            return [f"RSS grew by {growth / MIB:.1f} MiB after warm-up "
                    f"(limit {self.rss_growth_limit / MIB:.0f} MiB)"]
        return []

    # ---- output ---------------------------------------------------------------------
    def summary(self) -> dict:
        s = self.state_after
        return {
            "duration_s": round(self.duration_s, 1), "warmup_s": round(self.warmup_s, 1),
            "concurrency": self.concurrency, "server_args": self.server_args,
            "excluded_scenarios": self.excluded,
            "requests": len(self.outcomes),
            "valid": self.count(valid=True), "invalid": self.count(valid=False),
            "by_result": self.by("result"), "by_status": self.by("status"),
            "by_scenario": self.by_scenario(),
            "disconnects": self.count(result="dropped"),
            "preemptions": None if s is None else s.preemptions,
            "leaked_blocks": self.leaked_blocks,
            "kv_blocks_total": None if s is None else s.kv_blocks_total,
            "integrity_ok": None if s is None else s.integrity_ok,
            "client_5xx": self.client_5xx, "server_5xx": None if s is None else s.server_5xx,
            "rss_before_mib": _mib(self.rss_before), "rss_after_mib": _mib(self.rss_after),
            "rss_peak_mib": _mib(self.rss_peak), "rss_timeline_s_mib": self.rss_timeline(),
            "exit_code": self.exit_code,
            "server_counters": self.server_counters,
            "violations": self.violations(),
        }

    def to_json(self) -> str:
        return json.dumps(self.summary(), indent=1)

    def to_markdown(self) -> str:
        s = self.summary()
        lines = ["| figure | value |", "|---|---|"]
        for key in ("duration_s", "warmup_s", "concurrency", "excluded_scenarios", "requests",
                    "valid", "invalid", "disconnects", "preemptions", "leaked_blocks",
                    "kv_blocks_total", "integrity_ok", "client_5xx", "server_5xx", "rss_before_mib",
                    "rss_after_mib", "rss_peak_mib", "exit_code"):
            lines.append(f"| {key} | {s[key]} |")
        lines.append(f"| RSS over time (s, MiB) | {s['rss_timeline_s_mib']} |")
        lines.append(f"| outcomes by result | {s['by_result']} |")
        lines.append(f"| outcomes by status | {s['by_status']} |")
        lines += ["", "| scenario | results |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in s["by_scenario"].items()]
        lines += ["", "violations: " + ("none" if not s["violations"] else "")]
        lines += [f"- {x}" for x in s["violations"]]
        return "\n".join(lines)


def _mib(n: int | None) -> float | None:
    return None if n is None else round(n / MIB, 1)
