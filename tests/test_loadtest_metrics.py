"""Load-test arithmetic on synthetic event streams: no server, no MLX."""

from __future__ import annotations

import json
import math
import random
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest

from slabserve.loadtest.client import _Stream
from slabserve.loadtest.compare import (
    comparison_markdown,
    goal_checks,
    median_runs,
    path_checks,
    phases_markdown,
)
from slabserve.loadtest.metrics import Dist, RequestRecord, percentile, summarize
from slabserve.loadtest.report import row, runs_markdown
from slabserve.loadtest.runner import RunResult, RunSpec
from slabserve.loadtest.sse import ProtocolError, parse_line
from slabserve.loadtest.traces import (
    counter_deltas,
    histogram_delta,
    histogram_quantile,
    labelled_deltas,
    parse_prometheus,
    path_delta,
)


def test_percentile_matches_numpy_linear():
    rng = random.Random(3)
    for n in (1, 2, 5, 17, 100):
        xs = [rng.uniform(-5, 50) for _ in range(n)]
        for q in (0, 1, 37.5, 50, 90, 99, 100):
            assert percentile(xs, q) == pytest.approx(float(np.percentile(xs, q)), rel=1e-12)
    assert math.isnan(percentile([], 50))
    with pytest.raises(ValueError):
        percentile([1.0], 101)


def test_record_derived_latencies():
    # sent at 10.0; chunks at 10.5, 10.6, 10.8, 11.1; stream closed at 11.2; 5 tokens
    rec = RequestRecord(start=10.0, end=11.2, chunk_times=(10.5, 10.6, 10.8, 11.1),
                        output_tokens=5)
    assert rec.ttft == pytest.approx(0.5)
    assert rec.itls == pytest.approx([0.1, 0.2, 0.3])
    assert rec.tpot == pytest.approx((11.2 - 10.5) / 4)
    assert rec.e2e == pytest.approx(1.2)
    single = RequestRecord(start=0.0, end=1.0, chunk_times=(0.4,), output_tokens=1)
    assert single.tpot is None and single.itls == []


def test_record_rejects_out_of_order_times():
    with pytest.raises(ValueError):
        RequestRecord(start=1.0, end=2.0, chunk_times=(1.5, 1.2))
    with pytest.raises(ValueError):
        RequestRecord(start=1.0, end=1.4, chunk_times=(1.5,))


def _synthetic(n: int, ttft: float, gap: float, tokens: int, stagger: float):
    recs = []
    for i in range(n):
        s = i * stagger
        chunks = tuple(s + ttft + k * gap for k in range(tokens))
        recs.append(RequestRecord(s, chunks[-1] + 0.01, chunks, tokens, prompt_tokens=100))
    return recs


def test_summarize_rates_and_distributions():
    recs = _synthetic(4, ttft=0.2, gap=0.05, tokens=11, stagger=0.1)
    recs.append(RequestRecord(0.05, 0.07, error="http_429"))
    recs.append(RequestRecord(0.06, 0.08, error="timeout"))
    recs.append(RequestRecord(0.07, 0.09, error="http_429"))
    s = summarize(recs, expected_output_tokens=11)
    window = (0.3 + 0.2 + 0.5 + 0.01) - 0.0  # last end - first start
    assert s.duration_s == pytest.approx(window)
    assert s.requests_ok == 4 and s.requests_failed == 3
    assert s.failures == {"http_429": 2, "timeout": 1}
    assert s.output_tokens == 44 and s.short_outputs == 0
    assert s.output_tok_s == pytest.approx(44 / window)
    assert s.requests_s == pytest.approx(4 / window)
    assert s.ttft.n == 4 and s.ttft.p50 == pytest.approx(200.0)
    assert s.itl.n == 40 and s.itl.p99 == pytest.approx(50.0)
    assert s.tpot.mean == pytest.approx((0.5 + 0.01) / 10 * 1e3)
    assert s.prompt_tokens_mean == 100


def test_summarize_counts_short_outputs_and_handles_empty():
    recs = _synthetic(3, 0.1, 0.01, tokens=4, stagger=0.0)
    assert summarize(recs, expected_output_tokens=8).short_outputs == 3
    empty = summarize([], 8)
    assert empty.requests_ok == 0 and math.isnan(empty.output_tok_s)
    assert Dist.of_seconds([]).n == 0


def test_sse_lines():
    assert parse_line(": keepalive 10/11") is None and parse_line("") is None
    assert parse_line("data: [DONE]").done
    c = parse_line('data: {"choices":[{"index":0,"text":"ab","finish_reason":null}]}')
    assert c.text == "ab" and c.has_content and c.finish_reason is None
    chat = parse_line('data: {"choices":[{"delta":{"content":"x"},"finish_reason":"length"}]}')
    assert chat.text == "x" and chat.finish_reason == "length"
    usage = parse_line('data: {"choices":[],"usage":{"completion_tokens":7}}')
    assert not usage.has_content and usage.usage["completion_tokens"] == 7
    err = parse_line('data: {"error":{"message":"boom","type":"server_error"}}')
    assert err.error == "boom" and '"type": "server_error"' in err.error_json
    assert c.finishes == () and chat.finishes == ((0, "length"),)
    two = parse_line('data: {"choices":[{"index":1,"text":"","finish_reason":"stop"},'
                     '{"index":0,"text":"z","finish_reason":null}]}')
    assert two.finishes == ((1, "stop"),) and two.finish_reason == "stop" and two.text == "z"
    with pytest.raises(ProtocolError):
        parse_line("data: {not json")


def _line(text: str, finish=None, usage=None) -> str:
    obj = {"choices": [{"index": 0, "text": text, "finish_reason": finish}]}
    if usage is not None:
        obj = {"choices": [], "usage": usage}
    return "data: " + json.dumps(obj)


def test_stream_record_uses_server_usage_and_detects_incomplete():
    st = _Stream()
    events = [(1.0, ": keepalive 1/2"), (1.2, _line("a")), (1.3, _line("")),
              (1.5, _line("bc")), (1.6, _line("", "length")),
              (1.6, _line("", usage={"prompt_tokens": 9, "completion_tokens": 4,
                                     "prompt_tokens_details": {"cached_tokens": 2}})),
              (1.7, "data: [DONE]")]
    for t, line in events:
        st.feed(line, t)
    rec = st.record(start=0.9, end=1.7)
    assert rec.ok and rec.chunk_times == (1.2, 1.5)
    assert (rec.output_tokens, rec.prompt_tokens, rec.cached_tokens) == (4, 9, 2)
    cut = _Stream()
    cut.feed(_line("a"), 1.0)
    assert cut.record(0.5, 1.1).error == "incomplete"
    quiet = _Stream()  # every token decoded to '' until the final chunk
    quiet.feed(_line("", "length"), 2.0)
    quiet.feed("data: [DONE]", 2.0)
    assert quiet.record(1.0, 2.1).ttft == pytest.approx(1.0)
    broken = _Stream()  # an error object inside the stream: kind and what it said
    broken.feed(_line("a"), 1.0)
    broken.feed('data: {"error": {"message": "KV cache   exhausted", "type": "x"}}', 1.1)
    rec = broken.record(0.5, 1.2)
    assert (rec.error, rec.detail) == ("stream_error", "KV cache exhausted")


METRICS_BEFORE = """# TYPE slabserve:attention_path counter
slabserve:attention_path_total{path="native",reason="calibrated"} 10.0
slabserve:attention_path_total{path="gather",reason="short_context"} 5.0
slabserve:generation_tokens_total{model_name="m"} 100.0
slabserve:decode_step_seconds_count{model_name="m"} 10.0
slabserve:decode_step_seconds_sum{model_name="m"} 0.05
slabserve:decode_graph_traces_total{model_name="m"} 3.0
"""
METRICS_AFTER = """# TYPE slabserve:attention_path counter
slabserve:attention_path_total{path="native",reason="calibrated"} 70.0
slabserve:attention_path_total{path="gather",reason="short_context"} 25.0
slabserve:attention_path_total{path="native",reason="forced"} 20.0
slabserve:generation_tokens_total{model_name="m"} 900.0
slabserve:decode_step_seconds_count{model_name="m"} 50.0
slabserve:decode_step_seconds_sum{model_name="m"} 0.25
slabserve:decode_graph_traces_total{model_name="m"} 7.0
"""


def test_path_trace_deltas_and_shares():
    tr = path_delta(parse_prometheus(METRICS_BEFORE), parse_prometheus(METRICS_AFTER))
    assert tr.by_path == {"gather": 20.0, "native": 80.0}
    assert tr.by_reason == {"gather:short_context": 20.0, "native:calibrated": 60.0,
                            "native:forced": 20.0}
    assert tr.shares() == {"gather": pytest.approx(0.2), "native": pytest.approx(0.8)}
    assert tr.describe() == "gather 20% / native 80%"
    assert tr.describe(reasons=True) == ("gather 20% (short_context) / "
                                         "native 80% (calibrated, forced)")
    # a restarted server (counter went down) counts from zero
    again = path_delta(parse_prometheus(METRICS_AFTER), parse_prometheus(METRICS_BEFORE))
    assert again.by_path == {"gather": 5.0, "native": 10.0}
    assert path_delta({}, {}).describe() == "-"
    deltas = counter_deltas(parse_prometheus(METRICS_BEFORE), parse_prometheus(METRICS_AFTER))
    assert deltas == {"generation_tokens": 800.0, "decode_step_seconds_count": 40.0,
                      "decode_step_seconds_sum": 0.2, "decode_graph_traces": 4.0}


def test_step_histogram_deltas_and_median():
    """The server's decode-step histogram between two snapshots, and its median the way
    Prometheus' histogram_quantile reads it (linear inside the bucket)."""
    before = parse_prometheus(
        'slabserve:decode_step_seconds_bucket{le="0.002",model_name="m"} 1.0\n'
        'slabserve:decode_step_seconds_bucket{le="0.004",model_name="m"} 2.0\n'
        'slabserve:decode_step_seconds_bucket{le="+Inf",model_name="m"} 2.0\n')
    after = parse_prometheus(
        'slabserve:decode_step_seconds_bucket{le="0.002",model_name="m"} 3.0\n'
        'slabserve:decode_step_seconds_bucket{le="0.004",model_name="m"} 10.0\n'
        'slabserve:decode_step_seconds_bucket{le="+Inf",model_name="m"} 12.0\n')
    buckets = histogram_delta(before, after)
    assert buckets == [(0.002, 2.0), (0.004, 8.0), (math.inf, 10.0)]
    # rank 5 of 10: 3 of the 6 steps in (2, 4] ms
    assert histogram_quantile(0.5, buckets) == pytest.approx(0.003)
    assert histogram_quantile(0.95, buckets) == 0.004  # the infinite bucket: its lower bound
    assert histogram_quantile(0.5, []) is None
    assert histogram_quantile(0.5, histogram_delta(after, after)) is None


def _result(label: str, conc: int, tok_s_scale: float, ttft: float) -> RunResult:
    recs = _synthetic(4, ttft=ttft, gap=0.1 / tok_s_scale, tokens=8, stagger=0.0)
    spec = RunSpec(context=64, concurrency=conc, max_tokens=8, requests=4)
    return RunResult(label, spec, summarize(recs, 8), None, tuple(recs))


def test_goal_checks_and_tables():
    results = [_result("auto", 8, 2.0, 0.2), _result("native", 8, 1.9, 0.2),
               _result("gather", 8, 2.2, 0.2), _result("mlx_lm", 8, 1.0, 0.2),
               _result("auto", 1, 1.0, 0.1), _result("mlx_lm", 1, 1.0, 0.2)]
    lines = goal_checks(results)
    assert any("conc 8: auto/mlx_lm" in x and x.endswith("PASS") for x in lines)
    assert any("conc 8: auto/best forced" in x and x.endswith("FAIL") for x in lines)
    assert any("conc 1: auto/mlx_lm TTFT" in x and "0.50" in x and x.endswith("PASS")
               for x in lines)
    # the same time per token as mlx_lm.server: over the 0.7 goal; half of it: under
    assert any("conc 1: auto/mlx_lm TPOT p50 = 1.00" in x and x.endswith("FAIL") for x in lines)
    faster = goal_checks([_result("auto", 1, 2.0, 0.1), _result("mlx_lm", 1, 1.0, 0.2)])
    assert any("TPOT p50 = 0.5" in x and x.endswith("PASS") for x in faster)
    # a second process of auto's configuration: within 5% of auto's tok/s, or not
    twin = replace(_result("auto", 1, 1.04, 0.1), label="twin")
    far = replace(_result("auto", 1, 1.2, 0.1), label="far")
    pair = goal_checks([_result("auto", 1, 1.0, 0.1), twin, far], twins=["twin", "far"])
    assert any(x.startswith("ctx 64 conc 1: twin/auto tok/s") and x.endswith("PASS")
               for x in pair)
    assert any(x.startswith("ctx 64 conc 1: far/auto tok/s") and x.endswith("FAIL")
               for x in pair)
    assert not any("/auto tok/s" in x for x in goal_checks(results))  # no twins named
    assert not any("throughout" in x for x in lines)  # no path trace: no choice check
    table = comparison_markdown(results, ["auto", "native", "gather", "mlx_lm"])
    assert table.count("\n") == 4  # header, rule, two cells
    assert runs_markdown(results).count("| auto |") == 2
    assert row(results[0])["paths"] == "n/a"


def test_server_decode_step_mean_from_the_metrics_deltas():
    """The server's mean decode step over a run (/metrics' decode_step_seconds sum over
    count) lands in the row and the comparison table; servers without it get '-'."""
    ours = replace(_result("auto", 1, 1.0, 0.1), server_counters={
        "decode_step_seconds_count": 40.0, "decode_step_seconds_sum": 0.2,
        "decode_forward_seconds_sum": 0.12, "decode_graph_traces": 3.0})
    # (runner.run_once turns /metrics' decode_step_phase_seconds{phase} into these keys)
    base = _result("mlx_lm", 1, 1.0, 0.2)
    x = row(ours)
    assert x["server_decode_step_ms"] == pytest.approx(5.0)
    assert x["server_decode_forward_ms"] == pytest.approx(3.0)
    assert row(base)["server_decode_step_ms"] is None
    table = comparison_markdown([ours, base], ["auto", "mlx_lm"])
    head, _, cell = table.splitlines()
    cols = dict(zip(head.strip("| ").split(" | "), cell.strip("| ").split(" | "), strict=True))
    assert cols["auto step ms"] == "5.00" and cols["mlx_lm step ms"] == "-"
    with_median = replace(ours, server_counters={**ours.server_counters,
                                                 "decode_step_p50_seconds": 0.004})
    assert row(with_median)["server_decode_step_p50_ms"] == pytest.approx(4.0)
    table = comparison_markdown([with_median, base], ["auto", "mlx_lm"])
    assert "| 5.00 (p50 4.00) |" in table
    assert cols["step graph traces"] == "auto 3"


PHASES_BEFORE = """
slabserve:decode_step_phase_seconds_sum{model_name="m",phase="forward"} 1.0
slabserve:decode_step_phase_seconds_sum{model_name="m",phase="wait"} 2.0
"""
PHASES_AFTER = """
slabserve:decode_step_phase_seconds_sum{model_name="m",phase="forward"} 1.5
slabserve:decode_step_phase_seconds_sum{model_name="m",phase="wait"} 2.25
slabserve:decode_step_phase_seconds_count{model_name="m",phase="wait"} 9
"""


def test_phase_deltas_and_table():
    """Per-phase increases come out keyed by the label (counts left out); the phase
    table lists our servers only, with stall = step - wait - engine CPU."""
    got = labelled_deltas(parse_prometheus(PHASES_BEFORE), parse_prometheus(PHASES_AFTER),
                          "decode_step_phase_seconds_sum", "phase")
    assert got == pytest.approx({"forward": 0.5, "wait": 0.25})
    phases = {f"decode_{p}_seconds_sum": 0.01 for p in
              ("schedule", "forward", "sample", "update", "deliver")}
    ours = replace(_result("auto", 1, 1.0, 0.1), server_counters={
        "decode_step_seconds_count": 10.0, "decode_step_seconds_sum": 0.04,
        "decode_wait_seconds_sum": 0.015, "decode_step_host_cpu_seconds_sum": 0.02,
        "decode_steps_ahead": 7.0, **phases})
    x = row(ours)
    assert x["server_decode_wait_ms"] == pytest.approx(1.5)
    assert x["server_decode_step_host_cpu_ms"] == pytest.approx(2.0)
    table = phases_markdown([ours, _result("mlx_lm", 1, 1.0, 0.2)], ["auto", "mlx_lm"])
    head, _, cell = table.splitlines()
    cols = dict(zip(head.strip("| ").split(" | "), cell.strip("| ").split(" | "), strict=True))
    assert cols["server"] == "auto" and cols["step"] == "4.00" and cols["wait"] == "1.50"
    assert cols["engine CPU"] == "2.00" and cols["stall"] == "0.50"
    assert cols["ahead"] == "70%"
    assert phases_markdown([_result("mlx_lm", 1, 1.0, 0.2)], ["mlx_lm"]) == ""


def test_goal_checks_summarise_auto_over_cells():
    """Two or more cells with auto and a forced path: one line with the geometric mean of
    auto / best forced and its 95% interval; PASS only when the interval's low end meets
    the 5% tolerance."""
    def cell(conc, auto, native):
        return [_result("auto", conc, auto, 0.2), _result("native", conc, native, 0.2)]

    close = goal_checks(cell(1, 1.0, 1.0) + cell(4, 1.0, 1.01) + cell(8, 1.01, 1.0))
    assert close[-1].startswith("all cells: auto/best forced tok/s geometric mean")
    assert "over 3 cells" in close[-1] and close[-1].endswith("PASS")
    spread = goal_checks(cell(1, 1.0, 1.2) + cell(4, 1.2, 1.0))
    assert spread[-1].startswith("all cells:") and spread[-1].endswith("FAIL")
    assert not any(x.startswith("all cells") for x in goal_checks(cell(8, 1.0, 1.0)))


def test_rounds_compare_each_cells_median_run():
    """Three interleaved rounds: each (label, cell) is represented by its median run by
    tok/s, so one slow or fast process does not decide a ratio; the runs table keeps all."""
    slow, mid, fast = 0.8, 1.0, 1.3
    results = []
    for rnd, (a, n) in enumerate(((fast, mid), (slow, fast), (mid, slow))):
        results += [replace(_result("auto", 8, a, 0.2), round=rnd),
                    replace(_result("native", 8, n, 0.2), round=rnd)]
    picked = median_runs(results)
    assert [(r.label, r.round) for r in picked] == [("auto", 2), ("native", 0)]
    assert median_runs(picked) == picked  # one round: itself
    two = median_runs([replace(results[0], round=0), replace(results[2], round=1)])
    assert [r.round for r in two] == [1]  # even count: the lower middle (slower) run
    table = runs_markdown(results)
    assert table.count("| auto (round ") == 3 and "| native (round 3) |" in table
    assert row(results[2])["round"] == 1


def test_loadtest_imports_no_mlx_engine_scheduler_attention():
    code = ("import sys, slabserve.loadtest.__main__, slabserve.loadtest.servers, "
            "slabserve.loadtest.grid, slabserve.loadtest.chat; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('mlx', 'mlx_lm') or "
            "m.split('.')[:2] in (['slabserve', p] for p in "
            "('engine', 'scheduler', 'attention', 'kvcache', 'server'))]; "
            "assert 'slabserve.loadtest.grid' in sys.modules; print(bad)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=str(__import__("conftest").ROOT)).stdout
    assert out.strip() == "[]"


def _bpe_tokenizer():
    """A small BPE with real merges, trained on the prompt vocabulary (so cuts can merge)."""
    from tokenizers import Tokenizer as HF
    from tokenizers import decoders, models, pre_tokenizers, trainers

    from slabserve.loadtest.prompts import WORDS, Tokenizer

    t = HF(models.BPE(unk_token="[UNK]"))
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["[UNK]"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    t.train_from_iterator([" ".join(WORDS)] * 50, trainer)
    return Tokenizer(lambda s: t.encode(s).ids, lambda ids: t.decode(ids), "bpe")


@pytest.mark.parametrize("n", [1, 7, 100, 1000])
def test_prompts_have_exact_length_and_distinct_first_tokens(n):
    from slabserve.loadtest.prompts import make_prompt

    tok = _bpe_tokenizer()
    prompts = [make_prompt(tok, n, i) for i in range(60)]
    assert all(len(tok.encode(p)) == n for p in prompts)
    firsts = [tok.encode(p)[0] for p in prompts]
    assert all(len(set(firsts[i:i + 52])) == len(firsts[i:i + 52]) for i in range(8))
    assert make_prompt(tok, n, 3) == prompts[3]  # deterministic


def test_path_checks_flag_forced_configs_that_ran_another_path():
    before = parse_prometheus(METRICS_BEFORE)
    after = parse_prometheus(METRICS_AFTER)
    mixed = replace(_result("native", 4, 1.0, 0.1), trace=path_delta(before, after))
    pure = replace(_result("gather", 4, 1.0, 0.1), trace=path_delta({}, parse_prometheus(
        'slabserve:attention_path_total{path="gather",reason="env_gather"} 9\n')))
    lines = path_checks([mixed, pure])
    assert len(lines) == 1 and "native ctx 64 conc 4" in lines[0] and "80.0%" in lines[0]


def test_kv_budget_for_launched_server(tmp_path):
    from slabserve.loadtest.servers import kv_budget_args, kv_bytes_per_token

    cfg = {"num_hidden_layers": 24, "hidden_size": 896, "num_attention_heads": 14,
           "num_key_value_heads": 2, "torch_dtype": "float16"}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert kv_bytes_per_token(tmp_path) == 2 * 24 * 2 * 64 * 2
    assert kv_budget_args(tmp_path, 100, ()) == ("--kv-budget", str(1 << 30))
    big = 16384 * 8
    assert kv_budget_args(tmp_path, big, ()) == ("--kv-budget", str(int(12288 * big * 1.25)))
    assert kv_budget_args(tmp_path, big, ("--kv-budget=2G",)) == ()


def test_grid_requests_per_concurrency_and_distinct_prompts():
    from slabserve.loadtest.grid import GridSpec, build_prompts
    from slabserve.loadtest.prompts import char_tokenizer

    g = GridSpec((64, 128), (1, 4, 8), max_tokens=8, requests=(4, 4, 8))
    assert [(s.context, s.concurrency, s.requests) for s in g.specs()][:3] == [
        (64, 1, 4), (64, 4, 4), (64, 8, 8)]
    assert [s.requests for s in GridSpec((64,), (1, 8), 8).specs()] == [4, 16]
    with pytest.raises(ValueError):
        GridSpec((64,), (1, 4, 8), 8, requests=(4, 4))
    prompts = build_prompts(g, char_tokenizer())
    flat = [p for ps in prompts.values() for p in ps]
    # default warm-up: one concurrent round per run (1, 4, 8 requests)
    assert [s.warmup for s in g.specs()][:3] == [1, 4, 8]
    assert len(flat) == len(set(flat)) == 2 * ((4 + 1) + (4 + 4) + (8 + 8))
    fixed = GridSpec((64,), (1, 8), 8, warmup=2)
    assert [s.warmup for s in fixed.specs()] == [2, 2]


def test_length_spread_gives_mixed_but_reproducible_prompt_lengths():
    from slabserve.loadtest.grid import GridSpec, build_prompts
    from slabserve.loadtest.prompts import char_tokenizer

    tok = char_tokenizer()
    g = GridSpec((1000,), (8,), max_tokens=8, requests=(32,), length_spread=0.5)
    lengths = [len(tok.encode(p)) for p in build_prompts(g, tok)[(1000, 8)]]
    assert all(496 <= n <= 992 for n in lengths) and len(set(lengths)) > 20
    assert lengths == [len(tok.encode(p)) for p in build_prompts(g, tok)[(1000, 8)]]
    exact = GridSpec((1000,), (8,), max_tokens=8, requests=(4,))
    assert {len(tok.encode(p)) for p in build_prompts(exact, tok)[(1000, 8)]} == {992}
    with pytest.raises(ValueError):
        GridSpec((64,), (1,), 8, length_spread=1.0)


def test_choice_check_when_auto_ran_one_forced_path():
    from slabserve.loadtest.compare import dominant_path

    tr = path_delta(parse_prometheus(METRICS_BEFORE), parse_prometheus(METRICS_AFTER))
    base = [_result("native", 8, 1.9, 0.2), _result("gather", 8, 2.2, 0.2)]
    only_native = {"native:rule:x": 50.0}
    auto = _result("auto", 8, 2.0, 0.2)
    auto = RunResult(auto.label, auto.spec, auto.summary, _trace(only_native), auto.records)
    lines = goal_checks([auto, *base])
    choice = [x for x in lines if "throughout" in x]
    # auto ran native, but forced gather was faster: the choice fails (1.9 / 2.2 = 0.86)
    assert len(choice) == 1 and "auto ran native" in choice[0] and choice[0].endswith("FAIL")
    mixed = RunResult("auto", auto.spec, auto.summary, tr, auto.records)  # 80% / 20%
    assert not any("throughout" in x for x in goal_checks([mixed, *base]))
    assert dominant_path({"path_counts": '{"gather:a": 99.5, "native:b": 0.5}'}) == "gather"
    assert dominant_path({"path_counts": ""}) is None


def _trace(by_reason: dict):
    from slabserve.loadtest.traces import PathTrace

    by_path: dict = {}
    for k, v in by_reason.items():
        by_path[k.split(":", 1)[0]] = by_path.get(k.split(":", 1)[0], 0.0) + v
    return PathTrace(by_path, by_reason)
