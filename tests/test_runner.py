"""The paged runner is token-exact with mlx-lm's own greedy generation (float32)."""

import mlx.core as mx
import pytest
from mlx_lm.generate import generate_step
from mlx_lm.utils import load
from models import CONFIGS, make

from slabserve.engine.config import CacheConfig
from slabserve.engine.generate import greedy_generate
from slabserve.engine.runner import ModelRunner

ARCHS = list(CONFIGS)


def reference(model, prompt, n):
    return [int(t) for t, _ in generate_step(mx.array(prompt), model, max_tokens=n)]


def last_logits(model, tokens):
    """mlx-lm's float32 next-token logits after ``tokens`` (one full forward)."""
    return model(mx.array([tokens]))[0, -1].astype(mx.float32)


# On CUDA, MLX's float32 products differ from the CPU's in the low bits: the tests' tiny
# random models put two tokens within 5.8e-4 of the largest |logit| (experiments/tie_margin,
# phi3 on an H100), where summation order decides.  A flip is accepted only there, with
# about 3x that margin.
TIE = 0.0 if mx.default_device() == mx.cpu else 2e-3


def departure(model, prompt, got, n):
    """Where ``got`` first leaves mlx-lm's ``n`` greedy tokens for ``prompt``: (position,
    mlx-lm's tokens, its logits there), or None when they are equal."""
    ref = reference(model, prompt, n)
    k = next((i for i, (a, b) in enumerate(zip(got, ref, strict=True)) if a != b), None)
    return None if k is None else (k, ref, last_logits(model, prompt + ref[:k]))


def greedy_agrees(model, prompt, got, n, tie=TIE):
    """``got`` is mlx-lm's greedy output for ``prompt``, or first leaves it where mlx-lm's
    own logits put our token within ``tie`` of its choice (relative to the largest
    |logit|); on CPU (``tie`` 0) token-exact."""
    left = departure(model, prompt, got, n)
    if left is None:
        return True
    k, ref, lg = left
    return float(lg[ref[k]] - lg[got[k]]) <= tie * float(mx.abs(lg).max())


def prompts(count, vocab=256, seed=0):
    import random

    rng = random.Random(seed)
    lengths = [rng.randint(1, 70) for _ in range(count)]
    return [[rng.randrange(vocab) for _ in range(n)] for n in lengths]


@pytest.fixture(scope="module", params=ARCHS)
def arch_model(request, model_root):
    model, _ = load(str(make(model_root, request.param)))
    return request.param, model


def runner_for(model, block_size=16, slab_tokens=64, budget=1 << 24):
    return ModelRunner(model, CacheConfig(block_size=block_size, slab_tokens=slab_tokens,
                                          kv_budget_bytes=budget))


def test_one_prompt(arch_model):
    _, model = arch_model
    p = prompts(1, seed=1)[0] + [5, 6, 7]
    ref = reference(model, p, 24)
    assert len(set(ref)) > 3, "degenerate model output makes the comparison weak"
    assert greedy_generate(runner_for(model), [p], 24) == [ref]


def test_ragged_batch_matches_solo(arch_model):
    _, model = arch_model
    ps = prompts(8, seed=2)
    runner = runner_for(model)
    got = greedy_generate(runner, ps, 12)
    assert got == [reference(model, p, 12) for p in ps]
    assert runner.allocator.num_used == 0 and runner.allocator.check_integrity()


@pytest.mark.parametrize("arch", ["llama-gqa", "qwen3-qknorm"])
def test_many_blocks_and_slabs_with_chunked_prefill(arch, model_root):
    model, _ = load(str(make(model_root, arch)))
    runner = runner_for(model, block_size=4, slab_tokens=8)  # 2 blocks per slab
    ps = prompts(3, seed=3) + [list(range(90))]
    got = greedy_generate(runner, ps, 20, chunk=7)
    assert got == [reference(model, p, 20) for p in ps]
    assert runner.pool.num_slabs > 10  # the sequences crossed many slab boundaries
    assert runner.allocator.num_used == 0 and runner.allocator.check_integrity()


def test_exhaustion_is_reported_and_leaks_nothing(model_root):
    model, _ = load(str(make(model_root, "llama-mha")))
    geom_probe = runner_for(model, block_size=4, slab_tokens=8)
    budget = geom_probe.geom.slab_bytes * 2  # 4 blocks of 4 tokens in all
    runner = runner_for(model, block_size=4, slab_tokens=8, budget=budget)
    with pytest.raises(MemoryError):
        greedy_generate(runner, [list(range(10))], 20)
    assert runner.allocator.num_used == 0 and runner.allocator.check_integrity()
    assert runner.pool.num_slabs == 2


def test_prefill_and_decode_in_one_forward(model_root):
    """A step that decodes running sequences while prefilling a new one (what the
    scheduler does) gives the same tokens as running them apart."""
    from slabserve.engine.runner import SeqInput

    model, _ = load(str(make(model_root, "qwen2-bias")))
    runner = runner_for(model, block_size=4, slab_tokens=8)
    a, b = prompts(2, seed=5)
    alloc = runner.allocator
    ta = alloc.allocate(-(-(len(a) + 8) // 4))
    tb = alloc.allocate(-(-(len(b) + 8) // 4))
    pre, _ = runner.forward([SeqInput(a, 0, ta)], [])
    out_a = [int(mx.argmax(pre[0]).item())]
    out_b: list[int] = []
    for i in range(6):
        dec = [SeqInput([out_a[-1]], len(a) + i, ta)]
        if i == 0:
            pre, logits = runner.forward([SeqInput(b, 0, tb)], dec)
            out_b.append(int(mx.argmax(pre[0]).item()))
        else:
            dec.append(SeqInput([out_b[-1]], len(b) + i - 1, tb))
            _, logits = runner.forward([], dec)
            out_b.append(int(mx.argmax(logits[1]).item()))
        out_a.append(int(mx.argmax(logits[0]).item()))
    assert out_a == reference(model, a, 7)
    assert out_b == reference(model, b, 6)
    alloc.free(ta + tb)
    assert alloc.num_used == 0


def test_auto_slab_size_holds_the_budget_in_at_most_32_slabs(model_root):
    from slabserve.engine.config import AUTO_MAX_SLABS, auto_slab_tokens

    assert auto_slab_tokens(1 << 30, 1 << 20) == 4096  # small budgets keep the floor
    for budget, per_token in [(2 << 30, 12288), (40 << 30, 12288), (7 << 30, 32768)]:
        t = auto_slab_tokens(budget, per_token)
        assert t & (t - 1) == 0 and t >= 4096
        assert -(-budget // (t * per_token)) <= AUTO_MAX_SLABS
        assert -(-budget // (t // 2 * per_token)) > AUTO_MAX_SLABS  # the smallest such
    model, _ = load(str(make(model_root, ARCHS[0])))
    cfg = CacheConfig(block_size=16, kv_budget_bytes=64 << 20)
    runner = ModelRunner(model, cfg)
    g = runner.geom
    assert g.slab_blocks * g.block_size == auto_slab_tokens(64 << 20, g.block_bytes // 16)
    assert runner.allocator.max_slabs <= AUTO_MAX_SLABS
    explicit = ModelRunner(model, CacheConfig(block_size=16, slab_tokens=64,
                                              kv_budget_bytes=64 << 20))
    assert explicit.geom.slab_blocks == 4


def test_equal_chunks_of_several_sequences_share_one_forward(arch_model):
    """Equally long prefill chunks of different sequences run as the rows of one forward
    (``merge_prefills``): same logits, same pages written and the same greedy tokens as
    mlx-lm, whatever each row's start; a chunk of another length runs on its own."""
    import numpy as np

    from slabserve.attention import DecodeBatch
    from slabserve.engine.runner import SeqInput

    _, model = arch_model
    a, b, c = (prompts(1, seed=s)[0] * 3 + list(range(40)) for s in (11, 12, 13))
    runs = []
    for merge in (False, True):
        runner = runner_for(model, block_size=4, slab_tokens=8)
        runner.merge_prefills = merge
        rows_seen: list[int] = []
        merged_fn = runner._prefill_rows
        runner._prefill_rows = lambda seqs, f=merged_fn, r=rows_seen: (r.append(len(seqs)),
                                                                      f(seqs))[1]
        ta, tb, tc = (runner.allocator.allocate(10) for _ in range(3))
        runner.forward([SeqInput(a[:16], 0, ta, want_logits=False)], [])
        pre1, _ = runner.forward([SeqInput(a[16:32], 16, ta), SeqInput(b[:16], 0, tb, False),
                                  SeqInput(c[:10], 0, tc)], [])
        pre2, _ = runner.forward([SeqInput(a[32:40], 32, ta), SeqInput(b[16:24], 16, tb)], [])
        logits = [None if x is None else np.array(x.astype(mx.float32)) for x in pre1 + pre2]
        g = runner.geom
        kv = [np.array(runner.pool.gather(layer, side, DecodeBatch(g, [t], [n]).gather_plan))
              for t, n in ((ta, 40), (tb, 24), (tc, 10)) for layer in (0, g.num_layers - 1)
              for side in (0, 1)]
        runs.append((logits, kv))
        assert rows_seen == ([2, 2] if merge else [])
    (sep, kv_sep), (merged, kv_merged) = runs
    assert sep[1] is None and merged[1] is None
    for x, y in zip(sep, merged, strict=True):
        if x is not None:
            np.testing.assert_allclose(y, x, rtol=1e-4, atol=1e-4)
    for x, y in zip(kv_sep, kv_merged, strict=True):
        np.testing.assert_allclose(y, x, rtol=1e-4, atol=1e-4)
    assert int(merged[3].argmax()) == reference(model, a[:40], 1)[0]
    assert int(merged[4].argmax()) == reference(model, b[:24], 1)[0]
    assert int(merged[2].argmax()) == reference(model, c[:10], 1)[0]


def test_dispatching_every_few_layers_changes_nothing(arch_model):
    """``dispatch_every`` hands the partial graph to the device while the host builds the
    rest: the same prefill and decode logits and the same greedy tokens as one eval."""
    import numpy as np

    from slabserve.engine.runner import SeqInput

    _, model = arch_model
    p, q = (x[:30] for x in prompts(2, seed=21))
    q = (q * 10)[:23]  # lengths 1..30 and 23, so q has a second chunk
    outs = []
    for every in (0, 1, 2):
        runner = runner_for(model, block_size=4, slab_tokens=8)
        runner.dispatch_every = every
        tp, tq = (runner.allocator.allocate(10) for _ in range(2))
        pre, _ = runner.forward([SeqInput(p, 0, tp), SeqInput(q[:5], 0, tq, False)], [])
        pre2, _ = runner.forward([SeqInput(q[5:], 5, tq)], [])
        nxt = [int(pre[0].argmax()), int(pre2[0].argmax())]
        _, dec = runner.forward([], [SeqInput([nxt[0]], len(p), tp),
                                     SeqInput([nxt[1]], len(q), tq)])
        outs.append((nxt, np.array(dec.astype(mx.float32))))
    assert outs[0][0] == [reference(model, p, 1)[0], reference(model, q, 1)[0]]
    for nxt, dec in outs[1:]:
        assert nxt == outs[0][0]
        np.testing.assert_allclose(dec, outs[0][1], rtol=1e-5, atol=1e-5)
