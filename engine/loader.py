"""Load a local mlx-lm model directory (or an embedded model by name) with mlx-lm's loader."""

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


__all__ = ["SHAPES", "load", "resolve_model_path"]
