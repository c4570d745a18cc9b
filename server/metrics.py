"""Prometheus metrics (prometheus-client, one registry per app), vLLM's names under the
``slabserve:`` prefix.

Read from the serving loop at scrape time: ``num_requests_running``, ``num_requests_waiting``,
``kv_cache_usage_perc`` (a fraction, as vLLM's), ``kv_blocks_used``/``kv_blocks_total``,
``prompt_tokens_total``, ``generation_tokens_total``, ``num_preemptions_total``,
``prefix_cache_queries_total`` / ``prefix_cache_hits_total`` (tokens, vLLM's names) and the
``prefix_cache_blocks`` gauge, our ``decode_step_seconds`` (a histogram),
``decode_step_phase_seconds{phase}`` and ``decode_step_host_cpu_seconds`` (summaries; no
vLLM equivalent: the engine's decode-only steps and their time, whole, per phase
(schedule, forward, sample, wait, update, deliver) and the engine thread's CPU time
outside the wait; ``_sum / _count`` is the mean step a stream's tokens wait on),
``decode_steps_ahead_total`` (of those steps, the ones async scheduling submitted while the
step before them ran), ``decode_graph_traces_total`` (compiled decode step graphs
traced), and the attention-path counters
``attention_path_total{path, reason}`` from ``ServingLoop.attention_path_counts()``.
Observed by the server per choice: ``time_to_first_token_seconds``,
``inter_token_latency_seconds``, ``e2e_request_latency_seconds``,
``request_success_total{finished_reason}``; per refused
request ``request_errors_total{status}``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
    SummaryMetricFamily,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from slabserve.scheduler.api import Delta, ServingLoop

log = logging.getLogger("slabserve.server")

P = "slabserve:"
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5,
                5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0,
               7.5, 10.0, 20.0, 40.0, 80.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
               60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)


class _ServingCollector(Collector):
    def __init__(self, serving: ServingLoop, model: str,
                 path_counts: Callable[[], dict[tuple[str, str], int]]) -> None:
        self.serving = serving
        self.model = model
        self.path_counts = path_counts

    def _gauge(self, name: str, doc: str, value: float) -> GaugeMetricFamily:
        g = GaugeMetricFamily(P + name, doc, labels=["model_name"])
        g.add_metric([self.model], value)
        return g

    def _counter(self, name: str, doc: str, value: float) -> CounterMetricFamily:
        c = CounterMetricFamily(P + name, doc, labels=["model_name"])
        c.add_metric([self.model], value)
        return c

    def _summary(self, name: str, doc: str, count: int, total: float) -> SummaryMetricFamily:
        m = SummaryMetricFamily(P + name, doc, labels=["model_name"])
        m.add_metric([self.model], count_value=count, sum_value=total)
        return m

    def _step_histogram(self, s) -> HistogramMetricFamily:
        h = HistogramMetricFamily(P + "decode_step_seconds", "Engine steps that only "
                                  "decoded: their time, planning to handing the tokens over.",
                                  labels=["model_name"])
        buckets = [(floatToGoString(le), float(n)) for le, n in s.decode_step_buckets]
        if not buckets or buckets[-1][0] != "+Inf":
            buckets.append(("+Inf", float(s.decode_steps)))
        h.add_metric([self.model], buckets, sum_value=s.decode_step_seconds)
        return h

    def collect(self) -> Iterator[Metric]:
        s = self.serving.stats()
        usage = s.kv_blocks_used / s.kv_blocks_total if s.kv_blocks_total else 0.0
        yield self._gauge("num_requests_running", "Requests in the running batch.", s.running)
        yield self._gauge("num_requests_waiting", "Requests waiting to be scheduled.",
                          s.waiting)
        yield self._gauge("kv_cache_usage_perc", "KV cache usage (1 = 100%).", usage)
        yield self._gauge("kv_blocks_used", "KV cache blocks in use.", s.kv_blocks_used)
        yield self._gauge("kv_blocks_total", "KV cache blocks in the budget.", s.kv_blocks_total)
        yield self._counter("prompt_tokens", "Prefilled prompt tokens.", s.prompt_tokens)
        yield self._counter("generation_tokens", "Generated tokens.", s.generated_tokens)
        yield self._counter("num_preemptions", "Preempted requests.", s.preemptions)
        yield self._counter("prefix_cache_queries", "Prompt tokens looked up in the prefix "
                            "cache.", s.prefix_cache_queries)
        yield self._counter("prefix_cache_hits", "Prompt tokens found in the prefix cache.",
                            s.prefix_cache_hits)
        yield self._gauge("prefix_cache_blocks", "KV blocks held by the prefix cache (in use "
                          "or evictable).", s.prefix_cache_blocks)
        yield self._counter("kv_integrity_checks", "Idle-time KV cache integrity checks.",
                            s.integrity_checks)
        yield self._counter("kv_integrity_failures", "Failed KV cache integrity checks.",
                            s.integrity_failures)
        yield self._step_histogram(s)
        phases = SummaryMetricFamily(P + "decode_step_phase_seconds", "Of those steps, each "
                                     "phase's time.", labels=["model_name", "phase"])
        for phase, total in s.decode_phase_seconds:
            phases.add_metric([self.model, phase], count_value=s.decode_steps,
                              sum_value=total)
        yield phases
        yield self._summary("decode_step_host_cpu_seconds", "Of those steps, the engine "
                            "thread's CPU time outside the wait for tokens.", s.decode_steps,
                            s.decode_host_cpu_seconds)
        yield self._counter("decode_steps_ahead", "Of those steps, the ones submitted while "
                            "the step before them ran (async scheduling).",
                            s.decode_steps_ahead)
        yield self._counter("decode_graph_traces", "Compiled decode step graphs traced (one "
                            "per new step signature).", s.decode_graph_traces)
        info = GaugeMetricFamily(P + "cache_config_info", "KV cache configuration (vLLM's "
                                 "name).", labels=["block_size", "cache_dtype", "num_gpu_blocks"])
        info.add_metric([str(s.kv_block_size), s.kv_dtype, str(s.kv_blocks_total)], 1.0)
        yield info
        paths = CounterMetricFamily(P + "attention_path", "Decode attention calls by path "
                                    "and the reason it was chosen.", labels=["path", "reason"])
        for (path, reason), n in sorted(self.path_counts().items()):
            paths.add_metric([str(path), str(reason)], n)
        yield paths


class ServerMetrics:
    """The app's registry; ``exposition()`` is the body of ``GET /metrics``."""

    def __init__(self, serving: ServingLoop, model: str,
                 path_counts: Callable[[], dict[tuple[str, str], int]] | None = None) -> None:
        self.model = model
        self.registry = CollectorRegistry()
        r, lab = self.registry, ["model_name"]
        self.ttft = Histogram(P + "time_to_first_token_seconds", "Time to first token.", lab,
                              buckets=TTFT_BUCKETS, registry=r).labels(model)
        self.itl = Histogram(P + "inter_token_latency_seconds", "Time between output tokens.",
                             lab, buckets=ITL_BUCKETS, registry=r).labels(model)
        self.e2e = Histogram(P + "e2e_request_latency_seconds", "Arrival to last token.", lab,
                             buckets=E2E_BUCKETS, registry=r).labels(model)
        self.success = Counter(P + "request_success", "Finished choices by finish reason.",
                               lab + ["finished_reason"], registry=r)
        self.errors = Counter(P + "request_errors", "Requests refused with an error status.",
                              lab + ["status"], registry=r)
        r.register(_ServingCollector(serving, model,
                                      path_counts or serving.attention_path_counts))

    def exposition(self) -> bytes:
        return generate_latest(self.registry)

    def refused(self, status: int) -> None:
        self.errors.labels(self.model, str(status)).inc()


class ChoiceTimer:
    """Latencies of one choice, measured from the request's arrival ``t0``
    (``time.perf_counter``): TTFT at the first token, inter-token gaps (a delta with k
    tokens counts k gaps of 1/k each), end-to-end and the finish reason at the end."""

    def __init__(self, metrics: ServerMetrics, t0: float) -> None:
        self.metrics = metrics
        self.t0 = t0
        self.last: float | None = None

    def on_delta(self, delta: Delta) -> None:
        now = time.perf_counter()
        n = len(delta.token_ids)
        if n:
            if self.last is None:
                self.metrics.ttft.observe(now - self.t0)
            else:
                for _ in range(n):
                    self.metrics.itl.observe((now - self.last) / n)
            self.last = now
        if delta.finish_reason is not None:
            self.metrics.e2e.observe(now - self.t0)
            self.metrics.success.labels(self.metrics.model, delta.finish_reason).inc()

    def on_abandon(self) -> None:
        """The consumer left (client disconnect): counted as finished by ``abort``."""
        self.metrics.success.labels(self.metrics.model, "abort").inc()
