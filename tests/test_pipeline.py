"""Pipeline parallel's stages (engine/pipeline.py) in one process: how the layers split,
what each rank keeps of the model, the refusals, and a one-rank pipeline model on the
paged runner giving the full model's greedy tokens.  Two ranks under ``mlx.launch``:
tests/test_distributed.py and tests/test_distributed_faults.py (``--pipeline``)."""

from __future__ import annotations

import mlx.core as mx
import pytest
from mlx_lm.utils import load_model
from models import make

from slabserve.engine.config import CacheConfig, RunnerConfig
from slabserve.engine.generate import greedy_generate
from slabserve.engine.loader import load_sharded
from slabserve.engine.pipeline import Passthrough, PipelineModel, Split, check_pipeline
from slabserve.engine.runner import ModelRunner


class _Group:
    """A stand-in for an ``mx.distributed`` group (building a stage sends nothing)."""

    def __init__(self, rank: int, size: int) -> None:
        self._rank, self._size = rank, size

    def rank(self) -> int:
        return self._rank

    def size(self) -> int:
        return self._size


def test_split_gives_the_first_layers_to_the_last_rank():
    s = Split(24, 2)
    assert s.sizes == [12, 12] and s.span(1) == range(0, 12) and s.span(0) == range(12, 24)
    s = Split(7, 3)  # the extra layers go to the highest ranks: rank 0 holds the head too
    assert s.sizes == [2, 2, 3] and s.most == 3
    assert [s.span(r) for r in (2, 1, 0)] == [range(0, 3), range(3, 5), range(5, 7)]
    with pytest.raises(ValueError, match="at least one layer per rank"):
        Split(2, 3)


def test_unsupported_architectures_are_refused(model_root, tmp_path):
    assert check_pipeline({"model_type": "qwen2", "num_hidden_layers": 4}, 2).sizes == [2, 2]
    with pytest.raises(ValueError, match="phi3: pipeline parallel runs llama"):
        check_pipeline({"model_type": "phi3", "num_hidden_layers": 4}, 2)
    group = mx.distributed.init()  # one process: a group of one
    with pytest.raises(ValueError, match="phi3: pipeline parallel runs llama"):
        load_sharded(str(make(model_root, "phi3")), cache_dir=tmp_path, group=group,
                     pipeline=True)


@pytest.mark.parametrize("name", ["llama-gqa", "qwen2-bias"])
def test_each_rank_keeps_only_its_stage(model_root, name):
    full, _ = load_model(make(model_root, name), lazy=True)
    tied = getattr(full, "lm_head", None) is None
    first = PipelineModel(full, Split(2, 2), _Group(1, 2))
    last = PipelineModel(full, Split(2, 2), _Group(0, 2))
    assert len(first.layers) == 1 and first.layers[0] is full.model.layers[0]
    assert len(last.layers) == 1 and last.layers[0] is full.model.layers[1]
    assert "embed_tokens" in first.model and "norm" not in first.model
    assert isinstance(first.lm_head, Passthrough)
    assert "norm" in last.model
    assert ("embed_tokens" in last.model) == tied  # a tied head is the embedding
    assert ("lm_head" in last) == (not tied)
    assert first.args.model_type == last.model_type == full.model_type


@pytest.mark.parametrize("name", ["llama-gqa", "qwen2-bias"])
def test_one_rank_pipeline_model_gives_the_full_models_tokens(model_root, tmp_path, name):
    path = make(model_root, name)
    group = mx.distributed.init()
    stage, _tok, _ = load_sharded(str(path), cache_dir=tmp_path, group=group, pipeline=True)
    full, _ = load_model(path)
    cache = CacheConfig(block_size=16, kv_budget_bytes=1 << 22)
    prompts = [[1, 2, 3, 4, 5] * 7, [9, 8, 7]]
    runs = []
    for m in (full, stage):
        runner = ModelRunner(m, cache, RunnerConfig())
        runs.append(greedy_generate(runner, prompts, 12, chunk=16))
    assert runs[0] == runs[1]
    assert stage.model.wire_hidden == 64 and stage.model.wire_dtype == mx.float32
