"""Tiny random-weight model configs for tests (written through engine.embedded)."""

from __future__ import annotations

from pathlib import Path

from slabserve.engine.embedded import TINY_GAIN, write_model_dir

_COMMON = dict(
    hidden_size=64, num_hidden_layers=2, intermediate_size=128, vocab_size=259,
    rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=2048,
    tie_word_embeddings=True,
)

CONFIGS: dict[str, dict] = {
    "llama-mha": dict(_COMMON, model_type="llama", num_attention_heads=4, num_key_value_heads=4),
    "llama-gqa": dict(_COMMON, model_type="llama", num_attention_heads=4, num_key_value_heads=2,
                      tie_word_embeddings=False),
    "qwen2-bias": dict(_COMMON, model_type="qwen2", num_attention_heads=4, num_key_value_heads=2),
    "qwen3-qknorm": dict(_COMMON, model_type="qwen3", num_attention_heads=4,
                         num_key_value_heads=2, head_dim=32),
    "phi3": dict(_COMMON, model_type="phi3", num_attention_heads=4, num_key_value_heads=4),
}
# head_dim 64: a shape the CUDA kernels take (the models above have 16 or 32)
CUDA_CONFIG = dict(model_type="llama", hidden_size=256, num_hidden_layers=3,
                   intermediate_size=512, num_attention_heads=4, num_key_value_heads=2,
                   vocab_size=259, rms_norm_eps=1e-5, rope_theta=10000.0,
                   max_position_embeddings=4096, tie_word_embeddings=False)


def _written(path: Path, config: dict, seed: int) -> Path:
    if not (path / "config.json").exists():
        write_model_dir(path, config, "float32", seed=seed, gain=TINY_GAIN)
    return path


def make(root: Path, name: str) -> Path:
    return _written(root / name, CONFIGS[name], seed=1)


def make_cuda(root: Path) -> Path:
    """The CUDA_CONFIG model (head_dim 64) under ``root``, written once."""
    return _written(root / "cuda-llama", CUDA_CONFIG, seed=3)
