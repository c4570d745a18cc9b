"""Models with deterministic random weights and a byte-level tokenizer, written as an
ordinary mlx-lm model directory and loaded through mlx-lm's own loader.

``tiny`` (the default model) is a few MB for CI; ``qwen2.5-0.5b`` and ``llama-3.2-1b``
have those models' real shapes for benchmarks.  Nothing is downloaded.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# ChatML with Hermes/Qwen-style tools: the tool list in a system turn, calls as
# <tool_call>{"name": ..., "arguments": {...}}</tool_call>, results as <tool_response>.
# (No newline right after a block tag: Hugging Face renders with trim_blocks.)
_NL = '{{ "\\n" }}'
CHAT_TEMPLATE = (
    "{% if tools %}<|im_start|>system\n"
    "{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] }}\n" + _NL + "{% endif %}"
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>"
    "{% for tool in tools %}" + _NL + "{{ tool | tojson }}{% endfor %}" + _NL + "</tools>\n\n"
    "For each function call, return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags:\n<tool_call>\n"
    '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call><|im_end|>\n'
    "{% endif %}"
    "{% for m in messages %}"
    "{% if tools and loop.first and m['role'] == 'system' %}"
    "{% elif m['role'] == 'assistant' and m.get('tool_calls') %}<|im_start|>assistant\n"
    "{% if m['content'] %}{{ m['content'] }}" + _NL + "{% endif %}"
    "{% for tc in m['tool_calls'] %}<tool_call>\n"
    "{\"name\": {{ tc['function']['name'] | tojson }}, \"arguments\": "
    "{{ tc['function']['arguments'] | tojson }}}\n</tool_call>"
    "{% if not loop.last %}" + _NL + "{% endif %}{% endfor %}<|im_end|>\n"
    "{% elif m['role'] == 'tool' %}<|im_start|>user\n<tool_response>\n{{ m['content'] }}"
    "\n</tool_response><|im_end|>\n"
    "{% else %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

SHAPES: dict[str, dict] = {
    "tiny": dict(
        model_type="llama", hidden_size=128, num_hidden_layers=4, intermediate_size=256,
        num_attention_heads=4, num_key_value_heads=2, vocab_size=259, rms_norm_eps=1e-5,
        rope_theta=10000.0, tie_word_embeddings=True, max_position_embeddings=4096,
    ),
    "qwen2.5-0.5b": dict(
        model_type="qwen2", hidden_size=896, num_hidden_layers=24, intermediate_size=4864,
        num_attention_heads=14, num_key_value_heads=2, vocab_size=151936, rms_norm_eps=1e-6,
        rope_theta=1000000.0, tie_word_embeddings=True, max_position_embeddings=32768,
    ),
    "llama-3.2-1b": dict(
        model_type="llama", hidden_size=2048, num_hidden_layers=16, intermediate_size=8192,
        num_attention_heads=32, num_key_value_heads=8, head_dim=64, vocab_size=128256,
        rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=True,
        max_position_embeddings=131072,
        rope_scaling=dict(factor=32.0, high_freq_factor=4.0, low_freq_factor=1.0,
                          original_max_position_embeddings=8192, rope_type="llama3"),
    ),
}


def _write_tokenizer(path: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIALS)
    tok.save(str(path / "tokenizer.json"))
    cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "bos_token": None,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 1 << 20,
        "chat_template": CHAT_TEMPLATE,
    }
    (path / "tokenizer_config.json").write_text(json.dumps(cfg, indent=1))


# Weights scaled by this (norms excepted) so that a tiny random model's greedy output
# varies from token to token instead of repeating one token: exactness tests then mean
# something.  Realistic shapes keep the default initialisation (gain 1).
TINY_GAIN = 3.0


def write_model_dir(
    path: Path, config: dict, dtype: str = "float32", seed: int = 0, gain: float = 1.0
) -> Path:
    """Write an mlx-lm model directory with random weights drawn from ``seed``."""
    import mlx.core as mx
    from mlx.utils import tree_flatten, tree_map_with_path
    from mlx_lm.utils import _get_classes

    path.mkdir(parents=True, exist_ok=True)
    config = dict(config)
    eos = [256, 258]  # <|endoftext|>, <|im_end|>
    config.setdefault("eos_token_id", eos)
    model_cls, args_cls = _get_classes(config)
    mx.random.seed(seed)
    model = model_cls(args_cls.from_dict(config))
    if gain != 1.0:
        model.update(tree_map_with_path(
            lambda k, p: p if "norm" in k else p * gain, model.parameters()))
    model.set_dtype(getattr(mx, dtype))
    weights = dict(tree_flatten(model.parameters()))
    mx.save_safetensors(str(path / "model.safetensors"), weights, metadata={"format": "mlx"})
    config["torch_dtype"] = dtype
    (path / "config.json").write_text(json.dumps(config, indent=1))
    _write_tokenizer(path)
    return path


def ensure_model(name: str = "tiny", dtype: str = "float32", seed: int = 0, *,
                 cache_dir: Path) -> Path:
    """Directory of the embedded model ``name`` (see SHAPES) under ``cache_dir``/models,
    writing it on first use (the caller passes ``slabserve.env.cache_dir()``)."""
    if name not in SHAPES:
        raise ValueError(f"unknown embedded model {name!r}; choose from {sorted(SHAPES)}")
    gain = TINY_GAIN if name == "tiny" else 1.0
    spec = json.dumps([SHAPES[name], dtype, seed, gain, SPECIALS, CHAT_TEMPLATE], sort_keys=True)
    digest = hashlib.sha256(spec.encode()).hexdigest()[:12]
    path = cache_dir / "models" / f"{name}-{dtype}-{digest}"
    if not (path / "config.json").exists():
        tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
        write_model_dir(tmp, SHAPES[name], dtype, seed, gain)
        try:
            tmp.rename(path)
        except OSError:  # another process finished first: keep theirs
            shutil.rmtree(tmp, ignore_errors=True)
    return path
