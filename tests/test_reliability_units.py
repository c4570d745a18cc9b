"""The reliability drivers' own logic, without a server: metrics parsing, the integrity
verdict, how responses are classified (httpx mock transport) and which reports count as
violations."""

from __future__ import annotations

import asyncio
import json
import random

import httpx

from slabserve.reliability import badinput, traffic
from slabserve.reliability.observe import ServerState, integrity_verdict, parse_metrics, state_from
from slabserve.reliability.report import MIB, SoakReport
from slabserve.reliability.traffic import Outcome, Target

METRICS = """\
# HELP slabserve:num_requests_running Requests in the running batch.
# TYPE slabserve:num_requests_running gauge
slabserve:num_requests_running{model_name="tiny"} 2.0
# TYPE slabserve:kv_blocks_used gauge
slabserve:kv_blocks_used{model_name="tiny"} 7.0
# TYPE slabserve:num_preemptions counter
slabserve:num_preemptions_total{model_name="tiny"} 3.0
# TYPE slabserve:request_errors counter
slabserve:request_errors_total{model_name="tiny",status="400"} 5.0
slabserve:request_errors_total{model_name="tiny",status="500"} 1.0
slabserve:request_errors_total{model_name="tiny",status="503"} 2.0
slabserve:request_errors_created{model_name="tiny",status="500"} 1.7e9
"""


def test_parse_metrics_sums_labels_and_skips_created():
    m = parse_metrics(METRICS)
    assert m["slabserve:request_errors_total"] == 8.0
    assert m["slabserve:request_errors_total{status=500}"] == 1.0
    assert not any(k.endswith("_created") for k in m)
    s = state_from(m, {})
    assert (s.running, s.waiting, s.kv_blocks_used, s.preemptions) == (2, 0, 7, 3)
    assert s.server_5xx == 3 and not s.idle and s.integrity_ok is None


def test_integrity_verdict_sources():
    p = "slabserve:"
    assert integrity_verdict({p + "kv_integrity_checks_total": 4.0,
                              p + "kv_integrity_failures_total": 0.0}, {}) is True
    assert integrity_verdict({p + "kv_integrity_failures_total": 1.0}, {}) is False
    assert integrity_verdict({p + "kv_integrity_ok": 0.0}, {}) is False
    assert integrity_verdict({}, {"integrity": True}) is True
    assert integrity_verdict({}, {}) is None


def _sse(*objs: object) -> bytes:
    return b"".join(f"data: {o if isinstance(o, str) else json.dumps(o)}\n\n".encode()
                    for o in objs)


def _classify(status: int, content: bytes, stream: bool, n: int = 1) -> Outcome:
    transport = httpx.MockTransport(lambda req: httpx.Response(status, content=content))
    body = {"prompt": "x", "stream": stream}

    async def go():
        async with httpx.AsyncClient(transport=transport) as client:
            return await traffic.generate(client, Target("http://t", "m", 64), "s",
                                          "/v1/completions", body, n)
    return asyncio.run(go())


def test_stream_classification():
    chunk = {"choices": [{"index": 0, "text": "a", "finish_reason": None}]}
    last = {"choices": [{"index": 0, "text": "", "finish_reason": "length"}]}
    assert _classify(200, _sse(chunk, last, "[DONE]"), True).result == "completed"
    assert _classify(200, _sse(chunk, last), True).result == "failed"  # no [DONE]
    assert _classify(200, _sse(chunk, "[DONE]"), True).result == "failed"  # unfinished
    err = {"error": {"message": "boom"}}
    assert "error event" in _classify(200, _sse(chunk, err, "[DONE]"), True).detail
    aborted = {"choices": [{"index": 0, "text": "", "finish_reason": "abort"}]}
    assert _classify(200, _sse(aborted, "[DONE]"), True).result == "failed"


def test_stream_text_with_unicode_line_separators():
    """U+2028/U+2029/U+0085 stay raw in JSON strings; they are not SSE line ends (a 10-min
    soak once failed a valid stream when lines were split with ``aiter_lines``)."""
    text = "a\u2028b\u2029c\u0085d\x1ce"
    chunk = {"choices": [{"index": 0, "text": text, "finish_reason": None}]}
    last = {"choices": [{"index": 0, "text": "", "finish_reason": "stop"}]}
    raw = "".join(f"data: {json.dumps(o, ensure_ascii=False)}\r\n\r\n" for o in (chunk, last))
    out = _classify(200, raw.encode() + b"data: [DONE]\n\n", True)
    assert out.result == "completed", out


def test_plain_classification():
    ok = {"choices": [{"index": 0, "finish_reason": "stop"}, {"index": 1,
                                                              "finish_reason": "length"}]}
    assert _classify(200, json.dumps(ok).encode(), False, n=2).result == "completed"
    assert _classify(200, json.dumps(ok).encode(), False, n=3).result == "failed"
    assert _classify(429, b'{"error": {}}', False).result == "refused"
    assert _classify(500, b'{"error": {}}', False).status == 500


def test_bad_cases_are_distinct_and_out_of_bounds():
    t = Target("http://t", "m", 64, max_body_bytes=4096)
    cases = badinput.cases(t, random.Random(0))
    assert len({c.name for c in cases}) == len(cases)
    big = next(c for c in cases if c.name == "body_too_large")
    assert len(big.content) > t.max_body_bytes
    too_long = next(c for c in cases if c.name == "prompt_too_long")
    assert len(too_long.json["prompt"]) >= t.max_context


def _clean_report() -> SoakReport:
    r = SoakReport(10.0, 1.0, 2, [], rss_growth_limit=64 * MIB)
    r.outcomes = [Outcome("chat", True, "completed", 200), Outcome("bad", False, "rejected", 400),
                  Outcome("disconnect_stream", True, "dropped", 200)]
    r.state_after = ServerState(0, 0, 0, 64, 2, 0, None)
    r.canary = Outcome("canary", True, "completed", 200)
    r.rss_before, r.rss_after, r.exit_code = 100 * MIB, 120 * MIB, 0
    return r


def test_report_violations():
    assert _clean_report().violations() == []
    cases = {
        "failed": lambda r: r.outcomes.append(Outcome("chat", True, "failed", None, "hang")),
        "5xx": lambda r: r.outcomes.append(Outcome("bad", False, "failed", 502)),
        "429 without Retry-After": lambda r: r.outcomes.append(
            Outcome("chat", True, "refused", 429)),
        "leak": lambda r: setattr(r, "state_after", ServerState(0, 0, 3, 64, 0, 0, None)),
        "server 5xx": lambda r: setattr(r, "state_after", ServerState(0, 0, 0, 64, 0, 1, None)),
        "integrity": lambda r: setattr(r, "state_after", ServerState(0, 0, 0, 64, 0, 0, False)),
        "canary": lambda r: setattr(r, "canary", Outcome("canary", True, "failed", None)),
        "rss": lambda r: setattr(r, "rss_after", 200 * MIB),
        "exit": lambda r: setattr(r, "exit_code", None),
        "log": lambda r: r.log_problems.append("server log: Traceback"),
    }
    for name, spoil in cases.items():
        r = _clean_report()
        spoil(r)
        assert r.violations(), name
    r = _clean_report()
    r.outcomes.append(Outcome("chat", True, "refused", 429, retry_after="1"))
    assert r.violations() == []  # a spike's 429 with Retry-After is not a loss
    r.allow_refused = False
    assert r.violations()
