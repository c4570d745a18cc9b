"""One NativeCPU (the process-wide selector's) used from two threads: MLX streams are
per thread, so each thread must get its own."""

import threading

import mlx.core as mx
import numpy as np
from attention_cases import make_case

from slabserve.attention.gather import GatherSDPA
from slabserve.attention.native_cpu import NativeCPU


def test_native_cpu_from_two_threads():
    q, pool, batch = make_case(8, 2, 64, 16, [3000, 2100], slabs=2)
    native = NativeCPU()
    ref = np.array(GatherSDPA()(q, pool, 0, batch, 0.125))
    results, errors = {}, []

    def run(name):
        try:
            out = native(q, pool, 0, batch, 0.125)
            mx.eval(out)
            results[name] = np.array(out)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(repr(e))

    for name in ("a", "b"):
        t = threading.Thread(target=run, args=(name,))
        t.start()
        t.join()
    assert not errors
    for out in results.values():
        np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-5)
