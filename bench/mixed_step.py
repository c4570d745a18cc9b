"""Is a step that mixes prefill chunks and decodes dearer than its parts?

``python -m slabserve.bench.mixed_step --model embedded:qwen2.5-0.5b --dtype bfloat16 --ctx 16000``

Drives ``ModelRunner.forward`` directly (no scheduler): sequence A is prefilled to
``--ctx`` tokens, then these forwards are timed (median of ``--reps`` after a warm-up):
a decode of A alone, one 2048-token prefill chunk of B alone (prefix 0 and ``--prefix``),
two chunks (B and C) as two forwards and as the rows of one forward
(``ModelRunner.merge_prefills``), and each of those together with A's decode, as the
engine runs a mixed step.  The same positions are rewritten each repetition.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

from slabserve.bench.step_overhead import add_runner_args, allocate_tokens, load_runner
from slabserve.engine.runner import SeqInput


def _time(runner, pre, dec, reps: int, advance: bool) -> float:
    """Median ms of ``runner.forward(pre, dec)``; with ``advance`` every repetition
    decodes the next position (new tables and write slots each step, as the engine)."""

    def step(i):
        d = [SeqInput(x.tokens, x.start + i, x.blocks) for x in dec] if advance else dec
        runner.forward(pre, d)

    step(0)  # warm (shapes, kernels)
    ts = []
    for i in range(1, reps + 1):
        t = time.perf_counter()
        step(i)
        ts.append(time.perf_counter() - t)
    return 1e3 * statistics.median(ts)


def _in_thread(fn):
    """Run ``fn`` in a worker thread on its own MLX stream, as the engine does."""
    import threading

    import mlx.core as mx

    box = {}

    def work():
        mx.set_default_stream(mx.new_stream(mx.default_device()))
        box["v"] = fn()

    t = threading.Thread(target=work)
    t.start()
    t.join()
    return box["v"]


def _setup(runner, a, toks) -> tuple[list[SeqInput], dict[str, SeqInput]]:
    """``--decodes`` sequences prefilled to ``--ctx`` (their next decode inputs), and four
    chunks to prefill: B and C at position 0, B and C after a ``--prefix`` prefix."""
    decs = []
    for _ in range(a.decodes):  # sequences at --ctx tokens, prefilled chunk by chunk
        blocks = allocate_tokens(runner, a.ctx + a.reps + 2)
        for s in range(0, a.ctx, a.chunk):
            n = min(a.chunk, a.ctx - s)
            runner.forward([SeqInput(toks(n), s, blocks, want_logits=False)], [])
        decs.append(SeqInput(toks(1), a.ctx, blocks))
    pres = {}
    for name, start in (("B0", 0), ("C0", 0), ("Bp", a.prefix), ("Cp", a.prefix)):
        blocks = allocate_tokens(runner, start + a.chunk)
        for s in range(0, start, a.chunk):
            runner.forward([SeqInput(toks(a.chunk), s, blocks, want_logits=False)], [])
        pres[name] = SeqInput(toks(a.chunk), start, blocks, want_logits=False)
    return decs, pres


def _rows(a, decs, pres) -> list[tuple[str, list, list, bool]]:
    """(label, prefill chunks, decodes, merge_prefills) of each timed forward."""
    two0, twop, p = [pres["B0"], pres["C0"]], [pres["Bp"], pres["Cp"]], a.prefix
    return [
        (f"decode x{a.decodes} alone", [], decs, True),
        ("chunk prefix 0", [pres["B0"]], [], True),
        (f"chunk prefix {p}", [pres["Bp"]], [], True),
        ("2 chunks prefix 0, two forwards", two0, [], False),
        ("2 chunks prefix 0, one forward (rows)", two0, [], True),
        (f"2 chunks prefix {p}, two forwards", twop, [], False),
        (f"2 chunks prefix {p}, one forward (rows)", twop, [], True),
        ("chunk prefix 0 + decodes", [pres["B0"]], decs, True),
        (f"2 chunks prefix {p} + decodes, two forwards", twop, decs, False),
        (f"2 chunks prefix {p} + decodes, one forward (rows)", twop, decs, True),
        ("2 chunks prefix 0 + decodes, two forwards", two0, decs, False),
        ("2 chunks prefix 0 + decodes, one forward (rows)", two0, decs, True),
    ]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m slabserve.bench.mixed_step")
    add_runner_args(ap)
    ap.add_argument("--ctx", type=int, default=16000)
    ap.add_argument("--prefix", type=int, default=8192)
    ap.add_argument("--chunk", type=int, default=2048)
    ap.add_argument("--decodes", type=int, default=2)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--advance", action="store_true", help="decode a new position each rep")
    ap.add_argument("--thread", action="store_true",
                    help="time in a worker thread on its own stream (as the engine)")
    a = ap.parse_args(argv)

    runner, tok, _ = load_runner(a)
    rng = random.Random(0)
    vocab = min(len(tok), 30_000)
    decs, pres = _setup(runner, a, lambda n: [rng.randrange(vocab) for _ in range(n)])
    mode = ("advancing" if a.advance else "same positions") + (
        ", worker thread" if a.thread else "")
    print(f"| forward ({a.decodes} decodes at {a.ctx}, {a.chunk}-token chunks; {mode}) | ms |")
    print("|---|--:|")
    for name, pre, dec, merge in _rows(a, decs, pres):
        def fn(pre=pre, dec=dec, merge=merge):
            runner.merge_prefills = merge
            return _time(runner, pre, dec, a.reps, a.advance)

        ms = _in_thread(fn) if a.thread else fn()
        print(f"| {name} | {ms:.1f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
