"""Float32 Linear weights stored transposed on CPU ("linear layout", docs/adr/0009).

``nn.Linear`` keeps ``W`` as ``[out, in]`` and computes ``x @ W.T``.  For the few-row
products of a decode step, OpenBLAS on this CPU streams the same weight faster when it is a
contiguous ``[in, out]`` matrix multiplied as ``x @ Wt`` (Qwen2.5-0.5B's shapes at 8 rows:
1.1-1.4x, the tied LM head 1.4x; docs/adr/0009-cpu-linear-layout.md).

``apply(model, enabled)`` replaces, in place, every float32 ``nn.Linear`` of the model by a
``TransposedLinear`` holding ``contiguous(W.T)`` (and the bias), and an ``nn.Embedding`` by
a ``TransposedEmbedding`` holding ``contiguous(E.T)``: its ``as_linear`` (a tied LM head) is
then ``x @ Et``, and its lookup gathers columns of ``Et``.  Each weight is transposed and
evaluated one at a time and the original dropped, so the model takes the same memory (one
extra weight at the peak), not a second copy.

Multi-token products by numpy's BLAS: where MLX's float32 products run on the reference
BLAS bundled in its Linux wheel (``host_math.mlx_blas()``: no OpenBLAS preloaded, ADR
0003), a prefill chunk's products (a ``[B, L > 1, in]`` input, at least
``MIN_HOST_WORK`` multiply-adds) go to numpy's own OpenBLAS (``host_math.host_product``;
docs/adr/0009); decode products (one token per sequence) stay in MLX (no faster on
the host at a tiny model's step, and the only forward the runner compiles, engine/staged.py,
is a decode).  Invariant: a multi-token call evaluates its input, so a converted model with
host products must not be run under ``mx.compile`` / ``vmap`` / ``grad`` on several tokens.

Where it applies: default device CPU (MLX's GPU backends keep their own layout untouched),
float32 weights (float16 / bfloat16 products have no BLAS on CPU and run slower transposed),
exact ``nn.Linear`` / ``nn.Embedding`` (quantized layers are other classes and stay as they
are).  The decision is returned as a ``Decision`` with its reason and logged once per model.
"""

from __future__ import annotations

import enum
import logging
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_unflatten

from slabserve.attention import host_math

log = logging.getLogger(__name__)


def _transposed(w: mx.array) -> mx.array:
    """``w.T`` as its own contiguous array, evaluated now (so ``w`` can be dropped)."""
    wt = mx.contiguous(w.T)
    mx.eval(wt)
    return wt


class _WeightView:
    """``weight`` as the replaced module had it (``[out, in]`` / ``[vocab, dims]``): read as
    a transposed view of ``weight_t`` (no copy), assigned by storing its transpose, for
    model code that touches ``.weight`` directly (e.g. mlx-lm's minicpm, seed_oss and
    llama4 heads compute ``h @ embed_tokens.weight.T``)."""

    @property
    def weight(self) -> mx.array:
        return self["weight_t"].T

    def __setattr__(self, key: str, val) -> None:
        if key == "weight":
            key, val = "weight_t", _transposed(val)
        super().__setattr__(key, val)


# multiply-adds: a prefill chunk's products are far above it; a tiny model's decode step
# (at most 2^18 per product at 8 sequences) gained nothing on the host
MIN_HOST_WORK = 1 << 20


class TransposedLinear(_WeightView, nn.Module):
    """``x @ weight_t (+ bias)`` with ``weight_t`` a contiguous ``[in, out]`` matrix: the
    same function as the ``nn.Linear`` it replaces.  ``host_products``: multi-token
    products by numpy's BLAS (module docstring)."""

    def __init__(self, weight_t: mx.array, bias: mx.array | None = None,
                 host_products: bool = False) -> None:
        super().__init__()
        self.weight_t = weight_t
        if bias is not None:
            self.bias = bias
        self.host_products = host_products

    @classmethod
    def from_linear(cls, linear: nn.Linear, host_products: bool = False) -> TransposedLinear:
        return cls(_transposed(linear.weight), linear["bias"] if "bias" in linear else None,
                   host_products)

    def on_host(self, x: mx.array) -> bool:
        """Whether this call's product goes to numpy: host products on, a float32
        ``[B, L > 1, in]`` input, enough work."""
        return (self.host_products and x.ndim == 3 and x.shape[1] > 1
                and x.dtype == mx.float32
                and x.shape[0] * x.shape[1] * self["weight_t"].size >= MIN_HOST_WORK)

    def _extra_repr(self) -> str:
        d_in, d_out = self.weight_t.shape
        return f"input_dims={d_in}, output_dims={d_out}, bias={'bias' in self}"

    def __call__(self, x: mx.array) -> mx.array:
        if self.on_host(x):
            bias = self["bias"] if "bias" in self else None
            return host_math.host_product(x, self["weight_t"], bias)
        if "bias" in self:
            return mx.addmm(self["bias"], x, self["weight_t"])
        return x @ self["weight_t"]


class TransposedEmbedding(_WeightView, nn.Module):
    """An ``nn.Embedding`` stored as ``weight_t`` (``[dims, vocab]``, contiguous): lookups
    gather columns (a 256-token chunk: ~11 ms instead of ~0.4 ms at Qwen2.5-0.5B's shape,
    under 1% of the chunk's prefill), ``as_linear`` (the tied LM head) streams it as
    ``x @ weight_t`` without a second copy of the matrix."""

    def __init__(self, weight_t: mx.array) -> None:
        super().__init__()
        self.weight_t = weight_t

    @classmethod
    def from_embedding(cls, emb: nn.Embedding) -> TransposedEmbedding:
        return cls(_transposed(emb.weight))

    def _extra_repr(self) -> str:
        dims, vocab = self.weight_t.shape
        return f"{vocab}, {dims}"

    def __call__(self, x: mx.array) -> mx.array:
        return mx.moveaxis(mx.take(self["weight_t"], x, axis=1), 0, -1)

    def as_linear(self, x: mx.array) -> mx.array:
        return x @ self["weight_t"]


class Reason(enum.Enum):
    APPLIED = "applied"
    SWITCHED_OFF = "switched off (--linear-layout off / SLABSERVE_LINEAR_LAYOUT=off)"
    NOT_CPU = "default device is not the CPU"
    NOTHING_FLOAT32 = "no float32 nn.Linear or nn.Embedding"


@dataclass(frozen=True)
class Decision:
    """What ``apply`` did: modules replaced and the weight bytes they hold; whether their
    multi-token products go to numpy's BLAS (``host_products``) and why (``blas``)."""

    reason: Reason
    linears: int = 0
    embeddings: int = 0
    bytes: int = 0
    host_products: bool = False
    blas: str = ""


def on_cpu() -> bool:
    """Whether MLX computes on the CPU by default (tests patch this)."""
    return mx.default_device().type == mx.cpu


def _eligible(m: nn.Module) -> bool:
    return type(m) in (nn.Linear, nn.Embedding) and m.weight.dtype == mx.float32


def apply(model: nn.Module, enabled: bool = True,
          host_products: bool | None = None) -> Decision:
    """Store the model's float32 Linear / Embedding weights transposed, in place, where
    that applies (see the module docstring).  ``enabled``: False = never, True = wherever
    it applies.  ``host_products``: multi-token products by numpy's BLAS; None = where
    ``mlx_blas()`` finds MLX on its bundled reference BLAS."""
    if not enabled:
        decision = Decision(Reason.SWITCHED_OFF)
    elif not on_cpu():
        decision = Decision(Reason.NOT_CPU)
    else:
        blas = host_math.mlx_blas()
        host = blas.reference if host_products is None else host_products
        decision = _replace_all(model, host,
                                blas.detail if host_products is None else "set by the caller")
    log.info("linear layout: %s (%d linear, %d embedding, %.0f MB); multi-token products: "
             "%s%s", decision.reason.value, decision.linears, decision.embeddings,
             decision.bytes / 1e6, "numpy" if decision.host_products else "MLX",
             f" ({decision.blas})" if decision.blas else "")
    return decision


def _replace_all(model: nn.Module, host: bool, blas: str) -> Decision:
    names = [name for name, m in model.named_modules() if name and _eligible(m)]
    if not names:
        return Decision(Reason.NOTHING_FLOAT32)
    linears = embeddings = nbytes = 0
    lookup = dict(model.named_modules())
    for name in names:  # one at a time: the original is dropped before the next copy
        old = lookup.pop(name)
        if type(old) is nn.Linear:
            new, linears = TransposedLinear.from_linear(old, host), linears + 1
        else:
            new, embeddings = TransposedEmbedding.from_embedding(old), embeddings + 1
        nbytes += new.weight_t.nbytes
        del old
        model.update_modules(tree_unflatten([(name, new)]))
    return Decision(Reason.APPLIED, linears, embeddings, nbytes, host, blas)
