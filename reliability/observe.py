"""Reading the server's state from outside: ``/metrics`` (Prometheus text) and
``/health``, and waiting until it is idle.

``ServerState`` is what the checks need: requests running and waiting, KV blocks used,
preemptions, 5xx counted by the server itself, and the KV integrity verdict when the
server publishes one: the counters ``slabserve:kv_integrity_checks_total`` and
``slabserve:kv_integrity_failures_total`` (the engine's idle-time ``check_integrity()``),
a ``slabserve:kv_integrity_ok`` gauge, or an ``integrity`` boolean in ``/health``; None
when it publishes none of these.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import httpx
from prometheus_client.parser import text_string_to_metric_families

P = "slabserve:"


def parse_metrics(text: str) -> dict[str, float]:
    """Samples summed over their labels, by sample name (``_created`` timestamps left
    out); samples with a ``status`` label also appear as ``NAME{status=...}``."""
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name.endswith("_created"):
                continue
            out[s.name] = out.get(s.name, 0.0) + s.value
            status = s.labels.get("status")
            if status is not None:
                key = f"{s.name}{{status={status}}}"
                out[key] = out.get(key, 0.0) + s.value
    return out


@dataclass(frozen=True)
class ServerState:
    running: int
    waiting: int
    kv_blocks_used: int
    kv_blocks_total: int
    preemptions: int
    server_5xx: int
    integrity_ok: bool | None

    @property
    def idle(self) -> bool:
        return self.running == 0 and self.waiting == 0 and self.kv_blocks_used == 0


def _get(m: dict[str, float], name: str) -> float:
    for key in (P + name, P + name + "_total"):
        if key in m:
            return m[key]
    return 0.0


def state_from(metrics: dict[str, float], health: dict) -> ServerState:
    errors_5xx = sum(v for k, v in metrics.items()
                     if k.startswith(P + "request_errors") and "{status=5" in k)
    return ServerState(
        running=int(_get(metrics, "num_requests_running")),
        waiting=int(_get(metrics, "num_requests_waiting")),
        kv_blocks_used=int(_get(metrics, "kv_blocks_used")),
        kv_blocks_total=int(_get(metrics, "kv_blocks_total")),
        preemptions=int(_get(metrics, "num_preemptions")),
        server_5xx=int(errors_5xx),
        integrity_ok=integrity_verdict(metrics, health),
    )


def integrity_verdict(metrics: dict[str, float], health: dict) -> bool | None:
    failures = metrics.get(P + "kv_integrity_failures_total")
    checks = metrics.get(P + "kv_integrity_checks_total")
    if failures is not None and failures > 0:
        return False
    if checks is not None and checks > 0:
        return True
    if P + "kv_integrity_ok" in metrics:
        return metrics[P + "kv_integrity_ok"] == 1.0
    if isinstance(health.get("integrity"), bool):
        return health["integrity"]
    return None


async def read_state(client: httpx.AsyncClient, url: str) -> ServerState:
    m = await client.get(url + "/metrics", timeout=10.0)
    m.raise_for_status()
    h = await client.get(url + "/health", timeout=10.0)
    health = h.json() if h.status_code == 200 else {}
    return state_from(parse_metrics(m.text), health)


async def wait_idle(client: httpx.AsyncClient, url: str, timeout_s: float) -> ServerState:
    """Poll until nothing runs, waits or holds KV blocks; the last state either way."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    state = await read_state(client, url)
    while not state.idle and loop.time() < deadline:
        await asyncio.sleep(0.2)
        state = await read_state(client, url)
    return state
