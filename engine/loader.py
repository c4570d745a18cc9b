"""Load a local mlx-lm model directory (or an embedded model by name) with mlx-lm's loader,
whole, tensor-parallel sharded, or as one rank's pipeline stage."""

from __future__ import annotations

from pathlib import Path

from slabserve.engine.embedded import SHAPES, ensure_model


def resolve_model_path(model: str | None, dtype: str = "float32", *,
                       cache_dir: Path) -> Path:
    """``None`` -> the embedded tiny model; ``embedded:NAME`` -> an embedded shape
    (written under ``cache_dir``); anything else must be a local directory (no hub access
    at run time)."""
    if model is None:
        return ensure_model("tiny", dtype, cache_dir=cache_dir)
    if model.startswith("embedded:"):
        return ensure_model(model.split(":", 1)[1], dtype, cache_dir=cache_dir)
    path = Path(model).expanduser()
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path}: not a local mlx-lm model directory (no config.json)")
    return path


def load(model: str | None, dtype: str = "float32", *, cache_dir: Path):
    """(model, tokenizer wrapper, path) through ``mlx_lm.utils.load``."""
    from mlx_lm.utils import load as mlx_load

    path = resolve_model_path(model, dtype, cache_dir=cache_dir)
    m, tok = mlx_load(str(path))
    return m, tok, path


def check_tensor_parallel(config: dict, ranks: int) -> None:
    """ValueError unless a model with this ``config.json`` can be split over ``ranks`` by
    heads: every rank needs whole attention and KV heads (mlx-lm's ``shard`` divides them)."""
    heads = config.get("num_attention_heads")
    kv = config.get("num_key_value_heads") or heads
    kind = config.get("model_type", "?")
    if not isinstance(heads, int) or not isinstance(kv, int):
        raise ValueError(f"{kind}: config.json has no num_attention_heads; cannot shard it")
    if heads % ranks or kv % ranks:
        raise ValueError(f"{kind}: {heads} attention heads and {kv} KV heads do not divide by "
                         f"{ranks} ranks; tensor parallel needs both to (use fewer ranks)")


def load_sharded(model: str | None, dtype: str = "float32", *, cache_dir: Path, group,
                 pipeline: bool = False):
    """(model, tokenizer wrapper, path) with the model split over ``group``'s ranks.
    Tensor parallel (default): mlx-lm's ``sharded_load`` (its ``shard()``: attention and
    MLP weights split by heads and columns, layers all-summing their outputs).
    ``pipeline``: each rank keeps a contiguous slice of the decoder layers
    (``engine.pipeline``), and reads only those layers' weights from disk (plus the
    embeddings on the first stage and the norm and head on rank 0).  Every rank must pass
    the same model: the same directory, or an embedded model (written identically from
    its seed).  ValueError with the reason when the architecture cannot be split this way
    (no ``shard()``, heads that do not divide by the group size; for pipeline an
    architecture outside ``engine.pipeline.SUPPORTED`` or fewer layers than ranks)."""
    import json

    from mlx_lm.utils import _get_classes, sharded_load

    path = resolve_model_path(model, dtype, cache_dir=cache_dir)
    config = json.loads((path / "config.json").read_text())
    if pipeline:
        return (*_load_pipeline(path, config, group), path)
    check_tensor_parallel(config, group.size())
    model_cls, _ = _get_classes(config)
    if not hasattr(model_cls, "shard"):
        raise ValueError(f"{config.get('model_type')}: mlx-lm has no tensor-parallel shard() "
                         "for this architecture; serve it in one process")
    m, tok = sharded_load(str(path), tensor_group=group)
    return m, tok, path


def _load_pipeline(path: Path, config: dict, group):
    """mlx-lm's lazy ``load_model`` (weights stay on disk until evaluated), reduced to this
    rank's stage, then only the stage's weights evaluated."""
    import mlx.core as mx
    from mlx_lm.utils import load_model, load_tokenizer

    from slabserve.engine.pipeline import PipelineModel, agree_wire, check_pipeline

    split = check_pipeline(config, group.size())
    full, _ = load_model(path, lazy=True)
    if len(full.model.layers) != split.layers:
        raise ValueError(f"{config.get('model_type')}: the model has {len(full.model.layers)} "
                         f"layers, its config {split.layers}")
    stage = PipelineModel(full, split, group)
    del full  # the other ranks' layers were never read
    mx.eval(stage.parameters())
    agree_wire(stage.model, group)
    tok = load_tokenizer(path, eos_token_ids=config.get("eos_token_id"))
    return stage, tok


__all__ = ["SHAPES", "check_tensor_parallel", "load", "load_sharded", "resolve_model_path"]
