"""Serving over MLX distributed (engine/distributed.py): the step message, the start-up
refusals, and ``mlx.launch -n 2 --backend ring`` on loopback serving the same greedy tokens
as one process on llama and qwen2, tensor parallel and pipeline parallel (``--pipeline``,
engine/pipeline.py), with twice the KV tokens per rank either way."""

from __future__ import annotations

import threading

import httpx
import mlx.core as mx
import numpy as np
import pytest
from dist_launch import Server
from models import make

from slabserve import serve
from slabserve.engine.dist_wire import Watchdog, decode_inputs, encode_inputs
from slabserve.engine.distributed import DistConfig
from slabserve.engine.loader import check_tensor_parallel, load_sharded
from slabserve.engine.runner import SeqInput


def test_step_message_round_trips():
    pre = [SeqInput([5, 6, 7], 0, [3, 9], True), SeqInput([1] * 20, 16, [4, 2], False)]
    dec = [SeqInput([258], 40, [1, 2, 8], True), SeqInput([0], 0, [11], True)]
    words = encode_inputs(pre, dec)
    assert words.dtype == np.int32
    got_pre, got_dec = decode_inputs(words, 2, 2)
    assert got_pre == pre and got_dec == dec
    with pytest.raises(ValueError):
        decode_inputs(words[:-1], 2, 2)
    with pytest.raises(ValueError):
        decode_inputs(words, 1, 2)


def test_dist_config_validates():
    assert DistConfig(timeout_s=4).heartbeat == 1.0
    assert DistConfig().heartbeat == 2.0
    for bad in (dict(timeout_s=0), dict(timeout_s=5, heartbeat_s=5)):
        with pytest.raises(ValueError):
            DistConfig(**bad)


def test_watchdog_reports_a_wait_past_its_timeout_once():
    faults: list[str] = []
    fired = threading.Event()
    dog = Watchdog(0.2, lambda r: (faults.append(r), fired.set()), "rank 1")
    with dog.waiting("quick step"):
        pass
    with dog.waiting("step message 7"):
        assert fired.wait(30)
    dog.close()
    assert len(faults) == 1 and "rank 1: step message 7 waited" in faults[0]


def test_heads_must_divide_by_the_ranks():
    check_tensor_parallel({"model_type": "llama", "num_attention_heads": 4,
                           "num_key_value_heads": 2}, 2)
    with pytest.raises(ValueError, match="do not divide by 3 ranks"):
        check_tensor_parallel({"model_type": "llama", "num_attention_heads": 4}, 3)
    with pytest.raises(ValueError, match="2 KV heads do not divide by 4"):
        check_tensor_parallel({"model_type": "llama", "num_attention_heads": 4,
                               "num_key_value_heads": 2}, 4)


def test_architecture_without_shard_is_refused(model_root, tmp_path):
    group = mx.distributed.init()  # one process: a group of one
    with pytest.raises(ValueError, match="phi3: mlx-lm has no tensor-parallel shard"):
        load_sharded(str(make(model_root, "phi3")), cache_dir=tmp_path, group=group)


def test_pipeline_in_one_process_is_refused(capsys):
    assert serve.main(["--pipeline"]) == 2
    assert "this process is alone: start it under `mlx.launch -n N`" in capsys.readouterr().err


# ---- two ranks on loopback vs one process ------------------------------------------
PROMPTS = ["Hello there", "The quick brown fox jumps over the lazy dog. " * 3, "a",
           "0123456789" * 9]
FLAGS = ("--prefill-chunk", "24", "--max-step-tokens", "64", "--kv-budget", "8M",
         "--distributed-timeout", "60")


def _complete(url: str, prompt: str, max_tokens: int = 24) -> dict:
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
    r = httpx.post(url + "/v1/completions", json=body, timeout=300)
    assert r.status_code == 200, r.text
    return r.json()


def _run_load(url: str) -> dict:
    """Greedy texts one at a time, all at once (batched decode), a repeated prompt (prefix
    cache hit), and the pool's size."""
    alone = [_complete(url, p)["choices"][0]["text"] for p in PROMPTS]
    together: list[str] = [""] * len(PROMPTS)

    def one(i: int) -> None:
        together[i] = _complete(url, PROMPTS[i])["choices"][0]["text"]

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(PROMPTS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    again = _complete(url, PROMPTS[1])
    metrics = httpx.get(url + "/metrics", timeout=30).text
    blocks = next(float(ln.split()[-1]) for ln in metrics.splitlines()
                  if ln.startswith("slabserve:kv_blocks_total"))
    return {"alone": alone, "together": together, "again": again["choices"][0]["text"],
            "cached": again["usage"]["prompt_tokens_details"]["cached_tokens"],
            "blocks": blocks}


@pytest.fixture(scope="module")
def one_process() -> dict:
    """Model name -> the single-process server's ``_run_load`` (run once per model)."""
    return {}


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["tensor", "pipeline"])
@pytest.mark.parametrize("name", ["llama-gqa", "qwen2-bias"])
def test_two_ranks_serve_the_single_process_greedy_tokens(model_root, one_process, name, mode):
    model = make(model_root, name)
    if name not in one_process:
        with Server(model, *FLAGS, ranks=1) as one:
            one.wait_healthy()
            one_process[name] = _run_load(one.url)
    ref = one_process[name]
    flags = FLAGS + (("--pipeline",) if mode == "pipeline" else ())
    with Server(model, *flags, ranks=2) as two:
        two.wait_healthy()
        got = _run_load(two.url)
        out = two.output()
    assert got["alone"] == ref["alone"]
    assert got["together"] == ref["alone"] and ref["together"] == ref["alone"]
    assert got["again"] == ref["alone"][1] and got["cached"] > 0
    # half the KV heads (tensor) or half the layers (pipeline) per rank, same budget
    assert got["blocks"] == 2 * ref["blocks"]
    assert "[rank 1/2] slabserve.build: rank 1/2: KV pool" in out
    if mode == "tensor":
        assert "2 layers, 1 KV heads" in out and "tensor parallel over 2 ranks" in out
    else:
        assert "1 layers, 2 KV heads" in out and "pipeline parallel over 2 ranks" in out


def _metric(url: str, name: str) -> float:
    text = httpx.get(url + "/metrics", timeout=30).text
    return sum(float(ln.split()[-1]) for ln in text.splitlines()
               if ln.startswith(f"slabserve:{name}"))


@pytest.mark.slow
@pytest.mark.parametrize("mode", [(), ("--pipeline",)], ids=["tensor", "pipeline"])
def test_preemption_and_cancellation_across_ranks(model_root, mode):
    """A pool of 16 blocks per rank under four 100-token requests: rank 0 preempts and
    recomputes, and the greedy texts equal the ones each request got alone; a stream cut
    off mid-way frees its blocks on every rank (the next requests still run exactly)."""
    flags = ("--kv-budget", "64K", "--slab-tokens", "64", "--prefill-chunk", "24",
             "--max-step-tokens", "64", *mode)
    prompts = [f"{i} the quick brown fox jumps over the lazy dog" for i in range(4)]
    with Server(make(model_root, "llama-gqa"), *flags, ranks=2) as srv:
        srv.wait_healthy()
        alone = [_complete(srv.url, p, 60)["choices"][0]["text"] for p in prompts]
        body = {"prompt": prompts[0], "max_tokens": 200, "stream": True, "ignore_eos": True}
        with httpx.stream("POST", srv.url + "/v1/completions", json=body, timeout=300) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: {")  # then the client goes away
        together: list[str] = [""] * len(prompts)

        def one(i: int) -> None:
            together[i] = _complete(srv.url, prompts[i], 60)["choices"][0]["text"]

        threads = [threading.Thread(target=one, args=(i,)) for i in range(len(prompts))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert _metric(srv.url, "num_preemptions") > 0
        assert together == alone
        assert _metric(srv.url, "kv_integrity_failures") == 0
