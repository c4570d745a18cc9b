"""Decode stages written for the llama family: fewer graph nodes per layer than stages
traced from the layer's own ``__call__``.

A GPU decode step of a small model is bound by MLX's cost per graph node (~1.5 us to
build, ~2 us to launch; docs/adr/0012-decode-step-host-cost.md).  A traced llama layer
is ~55 nodes: seven matmuls, each with a transposed-weight view and a flatten /
unflatten pair around it, and the head transposes.  Here a layer's decode stages run on
two-dimensional ``[B, hidden]`` activations with one matmul for q/k/v and one for
gate/up (weights concatenated along their output rows) against pre-transposed weight
views: 17 nodes at B = 1 (20 with the K/V writes and the attention kernel between
them).

The layer keeps computing prefill (and any eager forward) itself: its projections'
weights become row slices of the concatenated weight, i.e. views of the same memory, so
nothing is stored twice.

Invariants: ``pre`` and ``post`` compute what the layer computes for one token per
sequence (the same matmuls per output column, norms, RoPE, SwiGLU and residual adds);
``match`` answers None for anything it does not know exactly (the caller then traces the
layer), including sharded or mixed-type projections.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.activations import swiglu

from slabserve.engine.rows_matmul import RowsMatmul

# mlx-lm modules whose TransformerBlock is input_layernorm -> self_attn (q/k/v/o_proj,
# optional q_norm / k_norm over head_dim, rope) -> residual -> post_attention_layernorm
# -> mlp (gate/up/down_proj, SwiGLU) -> residual (mistral loads through llama)
LLAMA_FAMILY = ("mlx_lm.models.llama", "mlx_lm.models.qwen2", "mlx_lm.models.qwen3")


class Projection:
    """One or more projections of the same input as one matmul: ``__call__(x)`` is the
    concatenation of each projection's output along the last axis.  Plain ``nn.Linear``
    (against a transposed view of the weight, so no transpose node per call) or
    ``nn.QuantizedLinear`` with equal quantization; once built, each layer's own weight
    (scales, biases) is a row slice of the concatenated one.  With ``rows``, plain
    projections of the few rows it takes run as its kernel (engine/rows_matmul.py)."""

    def __init__(self, layers: list[nn.Module], rows: RowsMatmul | None = None) -> None:
        self.rows = rows
        self.quantized = isinstance(layers[0], nn.QuantizedLinear)
        names = ("weight", "scales", "biases", "bias") if self.quantized else ("weight", "bias")
        self.arrays = {n: _concat([lin[n] for lin in layers]) for n in names if n in layers[0]}
        if self.quantized:
            q = layers[0]
            self.qargs = dict(group_size=q.group_size, bits=q.bits, mode=q.mode)
        else:
            self.arrays["weight_t"] = self.arrays["weight"].T
        mx.eval(self.arrays)
        start = 0
        for lin in layers:  # each layer's arrays become views of the fused ones
            rows = lin.weight.shape[0]
            for n in names:
                if n in lin:
                    lin[n] = self.arrays[n][start : start + rows]
            start += rows
        mx.eval([lin.parameters() for lin in layers])

    @staticmethod
    def accepts(layers: list[nn.Module]) -> bool:
        kind = type(layers[0])
        if kind not in (nn.Linear, nn.QuantizedLinear) or any(type(x) is not kind for x in layers):
            return False
        keys = [sorted(k for k in x if isinstance(x[k], mx.array)) for x in layers]
        if any(k != keys[0] for k in keys):
            return False
        if kind is nn.QuantizedLinear:
            first = (layers[0].group_size, layers[0].bits, layers[0].mode)
            return all((x.group_size, x.bits, x.mode) == first for x in layers)
        return True

    def __call__(self, x: mx.array) -> mx.array:
        a = self.arrays
        if self.quantized:
            y = mx.quantized_matmul(x, a["weight"], scales=a["scales"], biases=a.get("biases"),
                                    transpose=True, **self.qargs)
            return y + a["bias"] if "bias" in a else y
        if self.rows is not None and self.rows.applies(x, a["weight"]):
            return self.rows(x, a["weight"], a.get("bias"))
        if "bias" in a:
            return mx.addmm(a["bias"], x, a["weight_t"])
        return x @ a["weight_t"]


def _concat(arrays: list[mx.array]) -> mx.array:
    return arrays[0] if len(arrays) == 1 else mx.concatenate(arrays, axis=0)


class FusedDecodeStages:
    """A llama-family layer's decode stages (module docstring): ``pre(x, offset)`` ->
    (queries ``[B, heads, 1, D]``, keys, values as the pool's flat token-major rows
    ``[B * kv_heads, D]``) for ``x`` of shape ``[B, 1, hidden]`` or ``[B, hidden]``;
    ``post(x, attention)`` -> the layer's output as ``[B, hidden]`` given the attention
    output ``[B, heads, 1, D]``: the activations stay two-dimensional between layers and
    after the last one (the model's final norm and head take ``[B, hidden]``; the runner
    reads such logits as they are), no reshape node on either side.

    Every graph node counts (~3 us each to launch on an H100 host): the head groups and
    gate/up are one ``split`` node each, and no reshape is issued to a shape an array
    already has (MLX records even those as nodes)."""

    def __init__(self, layer: nn.Module, rows: RowsMatmul | None = None) -> None:
        attn, mlp = layer.self_attn, layer.mlp
        self.heads, self.kv_heads = attn.n_heads, attn.n_kv_heads
        self.scale = attn.scale
        self.rope = attn.rope
        self.q_norm = getattr(attn, "q_norm", None)
        self.k_norm = getattr(attn, "k_norm", None)
        self.in_norm, self.post_norm = layer.input_layernorm, layer.post_attention_layernorm
        self.qkv = Projection([attn.q_proj, attn.k_proj, attn.v_proj], rows)
        self.o = Projection([attn.o_proj], rows)
        self.gate_up = Projection([mlp.gate_proj, mlp.up_proj], rows)
        self.down = Projection([mlp.down_proj], rows)
        self.inter = mlp.gate_proj.weight.shape[0]

    @staticmethod
    def match(layer: nn.Module, rows: RowsMatmul | None = None) -> FusedDecodeStages | None:
        if type(layer).__module__ not in LLAMA_FAMILY:
            return None
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        try:
            groups = ([attn.q_proj, attn.k_proj, attn.v_proj], [attn.o_proj],
                      [mlp.gate_proj, mlp.up_proj], [mlp.down_proj])
            norms = (layer.input_layernorm, layer.post_attention_layernorm)
        except AttributeError:
            return None
        if not all(Projection.accepts(g) for g in groups):
            return None
        if not all(type(n) is nn.RMSNorm for n in norms):
            return None
        return FusedDecodeStages(layer, rows)

    def pre(self, x: mx.array, offset: mx.array):
        b = x.shape[0]
        qkv = self.qkv(self.in_norm(_rows(x)))
        # one reshape to [B, q + 2 kv heads, 1, D], then one split into the head groups
        hq, hk = self.heads, self.kv_heads
        q, k, v = mx.split(qkv.reshape(b, hq + 2 * hk, 1, -1), [hq, hq + hk], axis=1)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        k = self.rope(k, offset=offset)
        return self.rope(q, offset=offset), k.reshape(b * hk, -1), v.reshape(b * hk, -1)

    def post(self, x: mx.array, attention: mx.array) -> mx.array:
        b = x.shape[0]
        h = _rows(x) + self.o(attention.reshape(b, -1))
        gate, up = mx.split(self.gate_up(self.post_norm(h)), [self.inter], axis=1)
        return h + self.down(swiglu(gate, up))


def _rows(x: mx.array) -> mx.array:
    """``x`` as ``[B, hidden]`` (no node when it already is)."""
    return x if x.ndim == 2 else x.reshape(x.shape[0], -1)
