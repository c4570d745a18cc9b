"""``slabserve loadtest --scenario chat``: the history each turn sends, the first/later-turn
split, the cached-token share, the report; against a fake OpenAI-compatible server on
loopback (a thread), and one small run against our real server."""

from __future__ import annotations

import asyncio
import json
import math
import threading
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from slabserve.loadtest.__main__ import main
from slabserve.loadtest.chat import (
    ChatResult,
    ChatSpec,
    ChatTexts,
    TurnRecord,
    build_chat_texts,
    run_chat,
    summarize_chat,
)
from slabserve.loadtest.chatcompare import chat_ratio_rows, chat_runs_markdown
from slabserve.loadtest.client import Endpoint
from slabserve.loadtest.metrics import RequestRecord
from slabserve.loadtest.prompts import char_tokenizer


def _tokens(messages: list[dict]) -> int:
    """The fake's prompt length: 4 characters a token, 3 tokens of template a message."""
    return sum(len(m["content"]) // 4 + 3 for m in messages)


class FakeChat(BaseHTTPRequestHandler):
    """Streams ``max_tokens`` content chunks of a reply that names the request, then the
    finish reason, a usage chunk and ``[DONE]``.  ``cached`` (class-wide): report
    ``prompt_tokens_details.cached_tokens`` as everything but the last message; ``fail_at``:
    (messages count, first user message) of the request answered with a 500."""

    bodies: list[dict] = []
    cached = True
    fail_at: tuple[int, str] | None = None
    lock = threading.Lock()

    def log_message(self, *a) -> None:
        pass

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with self.lock:
            self.bodies.append(body)
            n = len(self.bodies)
        msgs = body["messages"]
        if (len(msgs), msgs[1]["content"]) == self.fail_at:
            self.send_response(500)
            self.end_headers()
            self.wfile.write(b'{"error": "boom"}')
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        pieces = [f"r{n}.{i} " for i in range(body["max_tokens"])]
        usage = {"prompt_tokens": _tokens(msgs), "completion_tokens": len(pieces),
                 "total_tokens": _tokens(msgs) + len(pieces)}
        if self.cached:
            usage["prompt_tokens_details"] = {"cached_tokens": _tokens(msgs[:-1])}
        events = [{"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}]
        events += [{"choices": [{"index": 0, "delta": {"content": p}}]} for p in pieces]
        events += [{"choices": [{"index": 0, "delta": {}, "finish_reason": "length"}]},
                   {"choices": [], "usage": usage}]
        for ev in events:
            self.wfile.write(f"data: {json.dumps(ev)}\n\n".encode())
        self.wfile.write(b"data: [DONE]\n\n")


@contextmanager
def fake_server(cached: bool = True, fail_at: tuple[int, str] | None = None):
    handler = type("Handler", (FakeChat,), {"bodies": [], "cached": cached,
                                            "fail_at": fail_at})
    srv = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{srv.server_address[1]}", handler.bodies
    finally:
        srv.shutdown()
        srv.server_close()


def _run(url: str, spec: ChatSpec, eos_mode: str = "ignore_eos") -> tuple[ChatResult,
                                                                          ChatTexts]:
    texts = build_chat_texts(spec, char_tokenizer())
    ep = Endpoint(url, "m", eos_mode, (7,) if eos_mode == "logit_bias" else ())
    return asyncio.run(run_chat(ep, spec, texts, "fake", show_progress=False)), texts


def test_each_turn_sends_the_whole_history_as_a_chat_client_does():
    spec = ChatSpec(sessions=3, turns=3, system_tokens=40, user_tokens=6, reply_tokens=4,
                    warmup=2)
    with fake_server() as (url, bodies):
        res, texts = _run(url, spec)
    assert len(bodies) == 2 * 3 + 9 and res.summary.requests_ok == 9
    warm, measured = bodies[:6], bodies[6:]
    assert sorted(len(b["messages"]) for b in warm) == [2, 2, 4, 4, 6, 6]  # every turn
    assert {b["messages"][0]["content"] for b in warm} == {texts.warmup_system}
    assert texts.warmup_system != texts.system
    assert not {b["messages"][1]["content"] for b in warm} & {u for r in texts.users for u in r}
    for b in bodies:
        assert b["stream"] is True and b["temperature"] == 0.0 and b["max_tokens"] == 4
        assert b["ignore_eos"] is True and b["stream_options"] == {"include_usage": True}
    replies = {(t.session, t.turn): t.reply for t in res.turns}
    for s in range(3):
        sent = [b["messages"] for b in measured
                if b["messages"][1]["content"] == texts.users[s][0]]
        assert [len(m) for m in sent] == [2, 4, 6]  # turn k: 2k messages incl. system
        last = sent[-1]
        assert [m["role"] for m in last] == ["system"] + ["user", "assistant"] * 2 + ["user"]
        assert last[0]["content"] == texts.system
        assert [m["content"] for m in last[1::2]] == list(texts.users[s])
        assert [m["content"] for m in last[2::2]] == [replies[(s, 1)], replies[(s, 2)]]
        assert sent[1] == last[:4] and sent[0] == last[:2]  # earlier turns are prefixes
    assert all(r.startswith("r") and r.count(" ") == 4 for r in replies.values())
    assert len({t.reply for t in res.turns}) == 9
    assert len({u for row in texts.users for u in row}) == 9


def test_logit_bias_mode_reaches_the_chat_body():
    spec = ChatSpec(sessions=1, turns=1, system_tokens=8, user_tokens=2, reply_tokens=2,
                    warmup=0)
    with fake_server() as (url, bodies):
        _run(url, spec, "logit_bias")
    assert bodies[0]["logit_bias"] == {"7": -100.0} and "ignore_eos" not in bodies[0]


def test_cached_share_is_what_the_server_reported():
    spec = ChatSpec(sessions=2, turns=3, system_tokens=40, user_tokens=6, reply_tokens=3,
                    warmup=0)
    with fake_server(cached=True) as (url, bodies):
        res, _ = _run(url, spec)
    prompt = sum(_tokens(b["messages"]) for b in bodies)
    cached = sum(_tokens(b["messages"][:-1]) for b in bodies)
    s = res.summary
    assert s.prompt_tokens == prompt and s.cached_tokens == cached
    assert s.cached_share == pytest.approx(cached / prompt)
    assert 0 < s.cached_share < 1 and all(t.cached_reported for t in res.turns)
    assert s.first_ttft.n == 2 and s.later_ttft.n == 4 and s.output_tokens == 18


def test_a_server_without_cached_tokens_gives_none():
    spec = ChatSpec(sessions=2, turns=2, system_tokens=20, user_tokens=4, reply_tokens=2,
                    warmup=0)
    with fake_server(cached=False) as (url, _):
        res, _ = _run(url, spec)
    assert res.summary.requests_ok == 4 and res.summary.prompt_tokens > 0
    assert res.summary.cached_share is None and res.summary.cached_tokens is None
    assert "| n/a |" in chat_runs_markdown([res])


def test_a_failed_turn_ends_its_session_only():
    spec = ChatSpec(sessions=2, turns=3, system_tokens=20, user_tokens=4, reply_tokens=2,
                    warmup=0)
    texts = build_chat_texts(spec, char_tokenizer())
    with fake_server(fail_at=(4, texts.users[1][0])) as (url, _):  # session 1, turn 2
        res, _ = _run(url, spec)
    by = {s: [t.turn for t in res.turns if t.session == s] for s in (0, 1)}
    assert by == {0: [1, 2, 3], 1: [1, 2]}
    assert res.summary.failures == {"http_500": 1} and res.summary.requests_ok == 4


def _turn(session: int, turn: int, ttft: float, prompt: int = 100, cached: int = 0,
          told: bool = True, error: str | None = None) -> TurnRecord:
    start = 10.0 * (session * 10 + turn)
    chunks = () if error else (start + ttft, start + ttft + 0.5)
    rec = RequestRecord(start, start + ttft + 1.0, chunks, 0 if error else 2,
                        0 if error else prompt, cached, error)
    return TurnRecord(session, turn, 2 * turn, rec, "x", told)


def test_metrics_split_first_and_later_turns():
    turns = [_turn(0, 1, 2.0, 100, 0), _turn(0, 2, 0.2, 200, 150), _turn(0, 3, 0.4, 300, 250),
             _turn(1, 1, 4.0, 100, 0), _turn(1, 2, 9.0, error="timeout"),
             _turn(2, 1, 3.0, 100, 0, told=False)]
    s = summarize_chat(turns, reply_tokens=2)
    assert s.first_ttft.n == 3 and s.first_ttft.p50 == pytest.approx(3000)
    assert s.later_ttft.n == 2 and s.later_ttft.p50 == pytest.approx(300)
    assert s.requests_ok == 5 and s.failures == {"timeout": 1}
    assert s.prompt_tokens == 800 and s.cached_tokens == 400
    assert s.cached_share == pytest.approx(400 / 700)  # the unreported turn left out
    assert s.output_tokens == 10 and s.short_outputs == 0
    assert s.wall_s == pytest.approx(214.0 - 10.0)
    assert s.tpot.n == 5 and s.tpot.p50 == pytest.approx(1000)
    assert summarize_chat([_turn(0, 1, 1.0, told=False)]).cached_share is None


def test_ratios_against_mlx_lm():
    spec = ChatSpec(sessions=1, turns=2)

    def result(label: str, first: float, later: float) -> ChatResult:
        turns = (_turn(0, 1, first), _turn(0, 2, later))
        return ChatResult(label, spec, summarize_chat(turns), turns)

    rows = chat_ratio_rows([result("auto", 2.0, 0.1), result("mlx_lm", 2.0, 0.4)])
    auto, base = rows
    assert auto["later_ttft_vs_mlx_lm"] == pytest.approx(0.25)
    assert auto["later_vs_first_ttft"] == pytest.approx(0.05)
    assert base["later_vs_first_ttft"] == pytest.approx(0.2)
    assert auto["tok_s_vs_mlx_lm"] > 1.0
    alone = chat_ratio_rows([result("auto", 2.0, 0.1)])[0]
    assert math.isnan(alone["later_ttft_vs_mlx_lm"]) and alone["later_vs_first_ttft"] > 0


def test_cli_url_mode_writes_json_and_markdown(tmp_path, capsys):
    out = tmp_path / "chat"
    with fake_server() as (url, bodies):
        rc = main(["--url", url, "--scenario", "chat", "--sessions", "2", "--turns", "2",
                   "--system-tokens", "30", "--user-tokens", "5", "--reply-tokens", "3",
                   "--warmup", "0", "--no-progress", "--out", str(out)])
    assert rc == 0 and len(bodies) == 4
    data = json.loads((out / "chat.json").read_text())
    (run,) = data["runs"]
    assert run["summary"]["requests_ok"] == 4 and run["summary"]["cached_share"] > 0
    assert data["meta"]["chat"]["sessions"] == 2
    assert [t["messages"] for t in run["turns"] if t["session"] == 0] == [2, 4]
    md = (out / "chat.md").read_text()
    assert "| server | 4/0 |" in md and "TTFT turns 2+ / turn 1" in md
    assert main(["--url", url, "--scenario", "chat", "--sessions", "0"]) == 2
    assert main(["--compare", "--model", str(tmp_path), "--scenario", "chat",
                 "--rounds", "2"]) == 2


@pytest.mark.slow
def test_chat_smoke_against_our_server(tmp_path):
    out = tmp_path / "chat"
    rc = main(["--compare", "--embedded", "tiny", "--configs", "auto", "--scenario", "chat",
               "--sessions", "2", "--turns", "2", "--system-tokens", "48", "--user-tokens",
               "8", "--reply-tokens", "4", "--timeout", "120", "--no-progress",
               "--out", str(out)])
    assert rc == 0, (out / "server-auto.log").read_text()[-3000:]
    (run,) = json.loads((out / "chat.json").read_text())["runs"]
    assert run["label"] == "auto" and run["summary"]["requests_ok"] == 4
    assert all(t["record"]["output_tokens"] == 4 for t in run["turns"])
    share = run["summary"]["cached_share"]  # None until the server reports cached_tokens
    assert share is None or 0.0 <= share <= 1.0
    by_session = {}
    for t in run["turns"]:
        by_session.setdefault(t["session"], []).append(t["record"]["prompt_tokens"])
    # each later turn's prompt holds the earlier one, the reply and the new message
    assert all(len(p) == 2 and p[1] > p[0] + 8 for p in by_session.values())
