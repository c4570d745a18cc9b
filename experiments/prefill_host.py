"""How much of a prefill chunk is host work: the most that compiling prefill could save.

Issue 27 asks for the decode step's treatment (compiled, shape-bucketed graphs) for prefill
chunks too. A chunk's forward is built eagerly, node by node. This times one chunk of `L`
tokens of a fresh prompt through ``ModelRunner.forward``, as the scheduler calls it, on the
embedded model (the pool and runner of ``slabserve bench decode-phases``), per `L`:
- build: the host building the forward's graph (``runner.last_build_s``);
- launch: ``mx.async_eval`` of it (MLX evaluating nodes and launching kernels);
- rest: the wait until the logits are there.

Each is the median of `--repeat` chunks. Compiling could at most remove most of build
and launch; with `rest` near zero the device waited on the host.

    python -m experiments.prefill_host --embedded llama-3.2-1b:bfloat16 --lengths 32,128,512,2048
"""

from __future__ import annotations

import argparse
import statistics
import time


def main() -> None:
    from slabserve.cli import prepare_mlx_env

    prepare_mlx_env()
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--embedded", default="llama-3.2-1b:bfloat16")
    ap.add_argument("--lengths", default="32,128,512,2048")
    ap.add_argument("--repeat", type=int, default=9)
    args = ap.parse_args()
    import mlx.core as mx
    import numpy as np

    from slabserve.bench.decode_step import BenchConfig, load_runner
    from slabserve.engine.runner import SeqInput
    from slabserve.kvcache import blocks_needed

    name, _, dtype = args.embedded.partition(":")
    runner, _, _ = load_runner(BenchConfig(model=name, dtype=dtype or "bfloat16",
                                           mem_bytes=4 << 30))
    vocab = runner.model.args.vocab_size
    rng = np.random.default_rng(0)
    print(f"{args.embedded} on {mx.default_device()}: one chunk of L tokens at position 0, "
          f"ms, median of {args.repeat}")
    print("| L | build | launch | rest | wall | host share | tokens/s |")
    print("|--:|--:|--:|--:|--:|--:|--:|")
    for length in (int(x) for x in args.lengths.split(",")):
        rows = []
        for i in range(args.repeat + 2):  # two warm-up chunks per length
            blocks = runner.allocator.allocate(blocks_needed(length, runner.block_size))
            tokens = [int(t) for t in rng.integers(1, vocab, length)]
            t0 = time.perf_counter()
            pre, _ = runner.forward([SeqInput(tokens, 0, blocks)], [])
            t1 = time.perf_counter()
            mx.eval(pre[0])
            t2 = time.perf_counter()
            runner.allocator.free(blocks)
            if i >= 2:
                build = runner.last_build_s
                rows.append((build, (t1 - t0) - build, t2 - t1, t2 - t0))
        b, la, rest, wall = (1e3 * statistics.median(r[j] for r in rows) for j in range(4))
        print(f"| {length} | {b:.2f} | {la:.2f} | {rest:.2f} | {wall:.2f} | "
              f"{(b + la) / wall:.0%} | {length / wall * 1e3:.0f} |", flush=True)


if __name__ == "__main__":
    main()
