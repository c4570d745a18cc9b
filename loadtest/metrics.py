"""Per-request records and the arithmetic that turns them into one run's summary.

Pure Python, no I/O: tests drive it with synthetic event streams.

Definitions (times in seconds on one monotonic clock; reported in milliseconds):

- TTFT: first content chunk minus request start.
- ITL (inter-token latency): gaps between consecutive content chunks.  Servers may merge
  several tokens into one chunk (mlx_lm.server holds back tokens that decode to no text), so
  ITL is per chunk, as in vLLM's ``benchmark_serving``.
- TPOT (time per output token): ``(end - first chunk) / (output_tokens - 1)`` for requests
  with more than one output token.
- E2E: end of stream minus request start.
- Output tokens/s and requests/s: successful output tokens (requests) divided by the measured
  window, first request start to last request end.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class RequestRecord:
    """One request as seen by the client.

    Invariants: ``start <= chunk_times[0] <= ... <= chunk_times[-1] <= end``;
    ``error`` is None for a success and a short failure kind (``http_429``, ``timeout``,
    ``connect``, ``protocol``, ...) otherwise, with ``detail``: the start of what the
    server or the transport said (error body, stream error, exception text), for the report.
    ``output_tokens`` is the server's usage count when it sent one, else the number of
    content chunks.
    """

    start: float
    end: float
    chunk_times: tuple[float, ...] = ()
    output_tokens: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    error: str | None = None
    detail: str | None = None

    def __post_init__(self) -> None:
        times = (self.start, *self.chunk_times, self.end)
        if any(b < a for a, b in zip(times, times[1:], strict=False)):
            raise ValueError("times must satisfy start <= chunks (non-decreasing) <= end")
        if self.output_tokens < 0 or self.prompt_tokens < 0:
            raise ValueError("token counts must be >= 0")

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def ttft(self) -> float | None:
        return self.chunk_times[0] - self.start if self.chunk_times else None

    @property
    def itls(self) -> list[float]:
        c = self.chunk_times
        return [b - a for a, b in zip(c, c[1:], strict=False)]

    @property
    def tpot(self) -> float | None:
        if not self.chunk_times or self.output_tokens < 2:
            return None
        return (self.end - self.chunk_times[0]) / (self.output_tokens - 1)

    @property
    def e2e(self) -> float:
        return self.end - self.start


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolation percentile (numpy's default); ``q`` in [0, 100]; NaN if empty."""
    if not 0 <= q <= 100:
        raise ValueError("q must be in [0, 100]")
    if not values:
        return math.nan
    s = sorted(values)
    rank = q / 100 * (len(s) - 1)
    lo = math.floor(rank)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (rank - lo)


@dataclass(frozen=True)
class Dist:
    """mean / p50 / p90 / p99 of a sample, in milliseconds (NaN when ``n == 0``)."""

    n: int
    mean: float
    p50: float
    p90: float
    p99: float

    @classmethod
    def of_seconds(cls, values: Sequence[float]) -> Dist:
        ms = [v * 1e3 for v in values]
        mean = sum(ms) / len(ms) if ms else math.nan
        return cls(len(ms), mean, percentile(ms, 50), percentile(ms, 90), percentile(ms, 99))


@dataclass(frozen=True)
class RunSummary:
    """One run (one endpoint, context, concurrency) reduced to its reported numbers."""

    requests_ok: int
    requests_failed: int
    failures: dict[str, int]
    duration_s: float
    output_tokens: int
    prompt_tokens_mean: float
    cached_tokens: int
    short_outputs: int
    output_tok_s: float
    requests_s: float
    ttft: Dist
    itl: Dist
    tpot: Dist
    e2e: Dist


def summarize(records: Sequence[RequestRecord], expected_output_tokens: int = 0) -> RunSummary:
    """Reduce ``records`` (the measured requests only, warm-up excluded).

    ``short_outputs`` counts successes with fewer than ``expected_output_tokens`` tokens
    (a server that stopped at EOS although asked not to); they stay in the statistics.
    """
    ok = [r for r in records if r.ok]
    failures = Counter(r.error for r in records if not r.ok)
    if records:
        duration = max(r.end for r in records) - min(r.start for r in records)
    else:
        duration = 0.0
    out_tokens = sum(r.output_tokens for r in ok)
    per_s = (lambda x: x / duration) if duration > 0 else (lambda x: math.nan)
    return RunSummary(
        requests_ok=len(ok),
        requests_failed=len(records) - len(ok),
        failures=dict(sorted(failures.items())),
        duration_s=duration,
        output_tokens=out_tokens,
        prompt_tokens_mean=(sum(r.prompt_tokens for r in ok) / len(ok)) if ok else math.nan,
        cached_tokens=sum(r.cached_tokens for r in ok),
        short_outputs=sum(1 for r in ok if r.output_tokens < expected_output_tokens),
        output_tok_s=per_s(out_tokens),
        requests_s=per_s(len(ok)),
        ttft=Dist.of_seconds([r.ttft for r in ok if r.ttft is not None]),
        itl=Dist.of_seconds([g for r in ok for g in r.itls]),
        tpot=Dist.of_seconds([r.tpot for r in ok if r.tpot is not None]),
        e2e=Dist.of_seconds([r.e2e for r in ok]),
    )
