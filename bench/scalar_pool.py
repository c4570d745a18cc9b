"""What reading a tiny array costs a GPU kernel under MLX's CUDA allocator.

``python -m slabserve.bench.scalar_pool [--ops 16] [--repeat 4]``

MLX's CUDA allocator serves buffers of at most 8 bytes from a managed, read-mostly pool
(kvcache/arrays.py).  This times chains of a tiny elementwise multiply (``y * s``, y of
[1, 32, 1, 64] float16) whose second operand is, per chain:

* ``python_float``: a Python float (MLX makes a scalar array per op while building);
* ``pool_scalar``: one 4-byte array made beforehand (in the pool);
* ``host_array``: the same value as a 4-byte view of a 16-byte buffer (kvcache.arrays);
* ``full_array``: an array of y's shape (no scalar at all);

and ``y + y`` (no second input).  Each figure is the marginal cost per op (chains of
``--repeat`` x ``--ops`` ops less the ``--ops`` one, medians of 10 evals; bench.cuda_kernel's
``per_layer``), so the fixed cost of an eval drops out.  Runs anywhere; the pool exists only
on CUDA.
"""

from __future__ import annotations

import argparse
import json

import mlx.core as mx
from slabserve.bench.cuda_kernel import chain, gpu_name, per_layer
from slabserve.kvcache.arrays import host_array


def operands() -> dict:
    """name -> (second operand or None for ``y + y``)."""
    return {
        "python_float": 1.0001,
        "pool_scalar": mx.array(1.0001, dtype=mx.float16),
        "host_array": host_array([1.0001], mx.float16).reshape(()),
        "full_array": mx.full((1, 32, 1, 64), 1.0001, dtype=mx.float16),
        "self_add": None,
    }


def measure(ops: int, repeat: int) -> dict:
    y = mx.random.normal((1, 32, 1, 64)).astype(mx.float16)
    ops_by_name = operands()
    mx.eval(y, *[v for v in ops_by_name.values() if isinstance(v, mx.array)])
    out = {}
    for name, s in ops_by_name.items():
        def op(x, i, s=s):
            return x + x if s is None else x * s

        per_op, marginal = per_layer(lambda n, op=op: chain(op, y, ops, n), ops, repeat)
        out[name] = {"per_op_us": round(per_op, 2), "marginal_us": round(marginal, 2)}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m slabserve.bench.scalar_pool")
    ap.add_argument("--ops", type=int, default=16)
    ap.add_argument("--repeat", type=int, default=4)
    a = ap.parse_args(argv)
    res = measure(a.ops, max(2, a.repeat))
    print(f"# {gpu_name()}; mlx {mx.__version__}; {mx.default_device()}; chains of {a.ops} "
          f"and {max(2, a.repeat) * a.ops} ops")
    print(json.dumps(res))
    print("| operand | us per op (chain of --ops) | marginal us per op |")
    print("|---|--:|--:|")
    for name, r in res.items():
        print(f"| {name} | {r['per_op_us']} | {r['marginal_us']} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
