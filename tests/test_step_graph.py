"""Whole decode steps as one compiled graph (engine/step_graph.py).

The native CUDA path's kernels only run on CUDA, so on CPU its Python (plan, launch
arguments, slab inputs, graph keys) runs with a stand-in kernel that computes the kernel's
contract with MLX ops from the same inputs (block table, lengths, every slab): attention of
each sequence's query over its first ``lengths[b]`` tokens, its pages gathered slab by
slab.  With it the step graph is checked against mlx-lm's greedy output, against the staged
step's logits and K/V, over an int8 pool, for the selector's per-layer counts and for a
failed trace.  The stand-in is a CPU check (on an H100 its graphs of ~400 gather ops a layer
did not finish a test in 90 s); on a CUDA device the real kernels' tests run instead, and
the in-place test runs either way (the real kernels on CUDA)."""

import gc

import mlx.core as mx
import pytest
from mlx_lm.utils import load
from models import make, make_cuda
from sched_fakes import drive
from test_runner import prompts, reference

from slabserve.attention import Selector
from slabserve.attention.cuda_plan import PlanParams
from slabserve.attention.native_cuda import NativeCUDA
from slabserve.engine.config import CacheConfig, RunnerConfig
from slabserve.engine.generate import greedy_generate
from slabserve.engine.runner import ModelRunner, SeqInput
from slabserve.engine.step_graph import batch_bucket, capture_sizes

HAS_CUDA = mx.cuda.is_available()
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device (MLX CUDA build)")
# the stand-in kernel's checks: CPU (CI); a CUDA device runs the real kernels' tests
stand_in = pytest.mark.skipif(HAS_CUDA, reason="kernel stand-in: a CPU check; on CUDA the "
                              "real kernels run (test_cuda_graph_generation)")


class ContractKernelCUDA(NativeCUDA):
    """NativeCUDA whose one-chunk kernel is its contract in MLX ops (module docstring);
    accepted on any device and shape."""

    def __init__(self) -> None:
        super().__init__(PlanParams(max_chunks=1))  # the direct kernel only

    def decline(self, q, pool, batch):  # the test models' head_dim 16 is no kernel's
        return None

    def _kernel(self, kind, ns, smem, variant, scale=1.0, sb=0):
        assert kind == "direct"

        def kernel(*, inputs, output_shapes, output_dtypes, template, **_):
            t = dict(template)
            q, table, lengths, *slabs, dep = inputs  # dep: an in-place write's token
            assert dep.dtype == mx.int32 and dep.shape == (4,)
            b, w = table.shape
            hkv, bs = t["HKV"], t["BS"]

            def pages(side):  # [B, H, W * bs, width], gathered slab by slab (no slab copied)
                sb = side[0].shape[0] // (hkv * bs)
                width = side[0].shape[1]
                got = None
                for i, slab in enumerate(side):
                    part = slab.reshape(sb, hkv, bs, width)[mx.clip(table - i * sb, 0, sb - 1)]
                    mine = (table // sb == i)[:, :, None, None, None]
                    got = part if got is None else mx.where(mine, part, got)
                return got.transpose(0, 2, 1, 3, 4).reshape(b, hkv, w * bs, width)

            k, v = pages(slabs[:ns]), pages(slabs[ns:2 * ns])
            if len(slabs) == 4 * ns:  # int8 values and their float16 scale slabs
                k = k.astype(mx.float32) * pages(slabs[2 * ns:3 * ns]).astype(mx.float32)
                v = v.astype(mx.float32) * pages(slabs[3 * ns:]).astype(mx.float32)
                k, v = k.astype(q.dtype), v.astype(q.dtype)
            keep = mx.arange(w * bs)[None, :] < lengths[:, None]
            mask = mx.where(keep, 0.0, -1e30).astype(q.dtype)[:, None, None, :]
            out = mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)
            return [out.astype(output_dtypes[0])]
        return kernel


def graph_runner(model, **cache):
    cfg = dict(block_size=16, slab_tokens=64, kv_budget_bytes=1 << 24) | cache
    runner = ModelRunner(model, CacheConfig(**cfg),
                         RunnerConfig(compile_decode=True, linear_layout=False, max_context=512),
                         Selector(override=True, natives={"cpu": ContractKernelCUDA()}))
    assert runner.step_graph
    return runner


@pytest.fixture(scope="module", params=["llama-gqa", "qwen3-qknorm"])
def model(request, model_root):
    return load(str(make(model_root, request.param)))[0]


@stand_in
def test_graph_generation_is_token_exact(model):
    """Ragged batches over several slabs (4 blocks a slab): mlx-lm's greedy tokens, every
    decode step a graph, a handful of signatures traced."""
    runner = graph_runner(model)
    ps = prompts(5, seed=11)
    got = greedy_generate(runner, ps, 20)
    assert got == [reference(model, p, 20) for p in ps]
    assert 0 < runner.step_graphs.traces <= 40
    counts = runner.attention.selector.path_counts()
    assert set(counts) == {("native", "env_native")}
    assert runner.allocator.num_used == 0 and runner.allocator.check_integrity()


@stand_in
def test_graph_and_staged_logits_agree(model):
    """One decode step as a graph and as staged layers in one runner: the same logits
    and the same K/V written (the staged step then overwrites the position identically)."""
    runner = graph_runner(model)
    tables = [runner.allocator.allocate(3), runner.allocator.allocate(4)]
    runner.forward([SeqInput(list(range(1, 40)), 0, tables[0], want_logits=False),
                    SeqInput(list(range(3, 60)), 0, tables[1], want_logits=False)], [])
    seqs = [SeqInput([7], 39, tables[0]), SeqInput([9], 57, tables[1])]
    out = []
    for mode in (True, False, True):
        runner.step_graph = mode
        logits = runner.forward([], seqs)[1]
        mx.eval(logits)
        out.append((logits, [mx.array(a) for a in runner.pool.arrays()]))
    assert runner.step_graphs.traces == 1
    # one count per layer and step, graph or staged
    assert runner.attention.selector.path_counts() == {
        ("native", "env_native"): 3 * len(model.layers)}
    for logits, arrays in out[1:]:
        assert mx.allclose(logits, out[0][0], atol=1e-5, rtol=1e-5)
        assert all(mx.array_equal(a, b) for a, b in zip(arrays, out[0][1], strict=True))
    for t in tables:
        runner.allocator.free(t)


@stand_in
def test_graph_over_an_int8_pool(model_root):
    """An int8 pool (values and scale slabs, quantized inside the graph): the graph's
    greedy tokens equal the staged layers' over the same quantized cache."""
    model = load(str(make(model_root, "llama-gqa")))[0]
    ps = prompts(4, seed=13)
    out = []
    for graph in (True, False):
        runner = graph_runner(model, dtype="int8")
        runner.step_graph = graph
        out.append(greedy_generate(runner, ps, 16))
        assert (runner.step_graphs.traces > 0) == graph
        assert len(runner.pool.arrays()) == 4 * 2 * runner.pool.num_slabs
    assert out[0] == out[1]


def test_graph_writes_the_slabs_in_place(model_root):
    """A step graph's K/V writes do not copy a slab: a step's peak memory stays under half
    of one slab (8 MiB a layer and side; the stand-in kernel's gathers take ~1 MiB).  On
    CUDA with the real kernels (a head_dim 64 model) and in-place writes, over 32 MiB
    slabs (an H100 step's own buffers came to 4.3 MiB)."""
    if HAS_CUDA:
        model = load(str(make_cuda(model_root)))[0]
        runner = ModelRunner(model, CacheConfig(block_size=16, slab_tokens=1 << 16,
                                                kv_budget_bytes=1 << 30),
                             RunnerConfig(compile_decode=True), Selector(override=True))
    else:
        model = load(str(make(model_root, "llama-gqa")))[0]
        runner = graph_runner(model, slab_tokens=1 << 16, kv_budget_bytes=1 << 30)
    slab = runner.pool.arrays()[0].nbytes
    assert slab >= 8 << 20
    table = runner.allocator.allocate(2)
    runner.forward([SeqInput(list(range(1, 20)), 0, table, want_logits=False)], [])
    for pos in range(19, 23):
        gc.collect()
        mx.reset_peak_memory()
        base = mx.get_active_memory()
        logits = runner.forward([], [SeqInput([6], pos, table)])[1]
        mx.eval(logits, runner.pool.arrays())
        assert mx.get_peak_memory() - base < slab // 2
    assert runner.step_graphs.traces >= 1
    runner.allocator.free(table)


def test_paths_without_graphs_run_staged(model_root):
    """Gather-SDPA (host-planned gathers) has no graph key: the step runs staged layers,
    counted once per layer."""
    model = load(str(make(model_root, "llama-gqa")))[0]
    runner = ModelRunner(model, CacheConfig(block_size=16, slab_tokens=64,
                                            kv_budget_bytes=1 << 24),
                         RunnerConfig(compile_decode=True, linear_layout=False, max_context=512),
                         Selector(override=False))
    ps = prompts(2, seed=4)
    assert greedy_generate(runner, ps, 6) == [reference(model, p, 6) for p in ps]
    assert runner.step_graphs.traces == 0
    counts = runner.attention.selector.path_counts()
    assert counts == {("gather", "env_gather"): 5 * len(model.layers)}  # 5 decode steps


@stand_in
def test_padded_batches_share_a_graph_and_write_only_their_rows(model):
    """Batches of 5 to 7 sequences in one slab run one graph (padded to 8 by copies of the
    first sequence; 8 runs its own, without the padding's row selection); a padded step's
    logits and K/V match the staged step's (to float32
    rounding: a matmul over 8 rows may round differently from one over 5; that the extra
    rows' writes never land is checked exactly in test_pool.py)."""
    runner = graph_runner(model, slab_tokens=1024)
    tables = [runner.allocator.allocate(3) for _ in range(8)]
    runner.forward([SeqInput(list(range(1 + i, 41 + i)), 0, t, want_logits=False)
                    for i, t in enumerate(tables)], [])
    for b in (5, 6, 7, 8):
        seqs = [SeqInput([7 + i], 40, t) for i, t in enumerate(tables[:b])]
        out = []
        for mode in (True, False):
            runner.step_graph = mode
            logits = runner.forward([], seqs)[1]
            mx.eval(logits)
            out.append((logits, [mx.array(a) for a in runner.pool.arrays()]))
        assert out[0][0].shape == (b, model.args.vocab_size)
        assert mx.allclose(out[0][0], out[1][0], atol=1e-5, rtol=1e-5)
        assert all(mx.allclose(x, y, atol=1e-5, rtol=1e-5)
                   for x, y in zip(out[0][1], out[1][1], strict=True))
        assert runner.step_graphs.traces == (1 if b < 8 else 2)
    for t in tables:
        runner.allocator.free(t)


def test_batch_bucket():
    assert [batch_bucket(b) for b in (1, 2, 3, 4, 5, 8, 9, 16, 17, 33, 64)] == [
        1, 2, 4, 4, 8, 8, 16, 16, 24, 40, 64]


def test_capture_sizes_cover_every_bucket_and_its_padded_form():
    assert capture_sizes(0) == []
    assert capture_sizes(3) == [1, 2, 3]
    assert capture_sizes(10) == [1, 2, 3, 4, 7, 8, 10]
    assert capture_sizes(16) == [1, 2, 3, 4, 7, 8, 15, 16]
    for top in range(1, 70):
        sizes = capture_sizes(top)
        assert max(sizes) == top and sizes == sorted(set(sizes))
        # every batch up to top meets a captured size of its bucket and padding
        forms = {(batch_bucket(b), batch_bucket(b) > b) for b in sizes}
        assert forms == {(batch_bucket(b), batch_bucket(b) > b) for b in range(1, top + 1)}


@stand_in
def test_captured_steps_leave_nothing_to_trace(model):
    """``capture_decode`` traces one graph per captured size and frees its blocks; batches
    of those buckets then trace nothing at any context (the table is the device table's
    fixed shape: no width follows the longest sequence), and their tokens are mlx-lm's."""
    runner = graph_runner(model, slab_tokens=1024)  # one slab: every write lands in it
    assert runner.capture_decode(capture_sizes(5)) == 5  # 1, 2, 3 (pads to 4), 4, 5 (to 8)
    assert runner.allocator.num_used == 0 and runner.allocator.check_integrity()
    shape = runner.step_graphs.tables.shape  # 8 rows (the largest bucket), 512 / 16 blocks
    assert shape == (8, 32)
    for n in (5, 3, 2):
        ps = prompts(n, seed=20 + n)
        if n == 2:  # contexts from 1 to ~330 tokens: 1 to 21 blocks a table row
            ps = [ps[0][:1], (ps[1] * 5)[:300]]
        assert greedy_generate(runner, ps, 30) == [reference(model, p, 30) for p in ps]
    assert runner.step_graphs.traces == 5 and runner.step_graphs.tables.shape == shape
    assert runner.allocator.num_used == 0 and runner.allocator.check_integrity()


@needs_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("kv_dtype", [None, "int8"])
def test_cuda_graph_generation(kv_dtype, model_root):
    """The real kernels inside step graphs: ragged batches with a context long enough for
    several chunks (the fused merge's counters), graph tokens equal to the staged layers'
    and, for the float32 pool, to mlx-lm's greedy output."""
    model = load(str(make_cuda(model_root)))[0]
    ps = prompts(3, seed=7) + [[(7 * i) % 251 for i in range(700)]]
    out = {}
    for graph in (True, False):
        runner = ModelRunner(model, CacheConfig(block_size=16, slab_tokens=256,
                                                kv_budget_bytes=1 << 26, dtype=kv_dtype),
                             RunnerConfig(compile_decode=True, step_graph=graph))
        out[graph] = greedy_generate(runner, ps, 24)
        counts = runner.attention.selector.path_counts()
        assert [label[0] for label in counts] == ["native"], counts
        assert (runner.step_graphs.traces > 0) == graph
    assert out[True] == out[False]
    if kv_dtype is None:
        assert out[True] == [reference(model, p, 24) for p in ps]


@stand_in
def test_executor_reports_traces(model_root):
    """/metrics' ``decode_graph_traces`` comes from the runner's step graphs."""
    from slabserve.engine.executor import ModelExecutor

    model = load(str(make(model_root, "llama-gqa")))[0]
    runner = graph_runner(model)
    executor = ModelExecutor(runner, 1024)
    assert executor.decode_graph_traces() == 0
    greedy_generate(runner, prompts(2, seed=9), 4)
    assert executor.decode_graph_traces() == runner.step_graphs.traces > 0


class FailsOnceCUDA(ContractKernelCUDA):
    """Its kernel raises on the first launch it is asked for (inside the first trace)."""

    def __init__(self) -> None:
        super().__init__()
        self.failed = False

    def _kernel(self, *args, **kw):
        kernel = super()._kernel(*args, **kw)

        def once(**launch):
            if not self.failed:
                self.failed = True
                raise RuntimeError("launch failed")
            return kernel(**launch)
        return once


@stand_in
def test_a_failed_trace_runs_staged(model_root):
    """A trace that raises leaves nothing half done: the step runs the staged layers
    (counted once per layer), the signature is not traced again, output is mlx-lm's."""
    model = load(str(make(model_root, "llama-gqa")))[0]
    path = FailsOnceCUDA()
    runner = ModelRunner(model, CacheConfig(block_size=16, slab_tokens=64,
                                            kv_budget_bytes=1 << 24),
                         RunnerConfig(compile_decode=True, linear_layout=False, max_context=512),
                         Selector(override=True, natives={"cpu": path}))
    p = prompts(1, seed=12)[0]
    assert greedy_generate(runner, [p], 8) == [reference(model, p, 8)]
    assert path.failed and len(runner.step_graphs._failed) == 1
    assert runner.attention.selector.path_counts() == {
        ("native", "env_native"): 7 * len(model.layers)}
    assert runner.allocator.num_used == 0 and runner.allocator.check_integrity()


@stand_in
def test_pending_tokens_feed_padded_graphs(model):
    """Async scheduling's order over step graphs: steps planned ahead read their tokens on
    the device from the step before, in batches of 3 (padded to 4) that shrink as requests
    end; every request gets mlx-lm's greedy tokens."""
    from slabserve.engine.executor import ModelExecutor
    from slabserve.scheduler.api import Request, SamplingParams
    from slabserve.scheduler.config import SchedulerConfig
    from slabserve.scheduler.scheduler import Scheduler

    runner = graph_runner(model)
    executor = ModelExecutor(runner, 4096)
    sched = Scheduler(SchedulerConfig(), runner.allocator, runner.block_size, 4096)
    ps = prompts(3, seed=21)
    for i, p in enumerate(ps):
        sched.add(Request(f"r{i}", tuple(p), SamplingParams(max_tokens=8 + 3 * i,
                                                            temperature=0.0,
                                                            ignore_eos=True)))
    tokens, _, ahead = drive(sched, executor)
    assert [tokens[f"r{i}"] for i in range(3)] == [
        reference(model, p, 8 + 3 * i) for i, p in enumerate(ps)]
    assert ahead > 10 and runner.step_graphs.traces > 0
    assert runner.allocator.num_used == 0
