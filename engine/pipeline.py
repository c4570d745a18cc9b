"""Pipeline parallel: each rank of an MLX distributed group holds a contiguous slice of the
model's decoder layers, and a forward's hidden states travel rank to rank.

``PipelineModel`` is what a rank's ``ModelRunner`` sees: an ordinary mlx-lm model whose
``layers`` are this rank's slice (so the runner's slab pool holds K/V for those layers only)
and whose inner ``model`` is a ``PipelineStage``.  The stages run in reverse rank order, as
mlx-lm's own ``PipelineMixin`` does, so the hidden state makes N - 1 hops and ends on rank 0,
which samples::

    rank N-1: embed -> layers [0, a)     --send-->
    rank N-2: recv  -> layers [a, b)     --send-->   ...
    rank 0:   recv  -> layers [z, L) -> final norm (last position) -> LM head -> logits

Every rank gets the same step inputs (engine/distributed.py, rank 0's step message) and runs
the same ``ModelRunner.forward``; the hidden state is the only thing a forward sends.

Invariants:
  * send and recv pair up in program order: every rank runs the forwards of a step in one
    order (``eval_each_forward``), each forward does exactly one recv (not rank N-1) and one
    send (not rank 0), and both use the forward's ``[rows, tokens]`` input shape;
  * a sending stage evaluates its send inside the call: the runner evaluates a forward's
    output only when it wants logits, and rank 0 would wait forever for a send nobody
    evaluated.  Rank 0's recv needs no such care: its layers' K/V writes depend on it;
  * rank 0's stage returns the last position only (``[rows, 1, hidden]``): the runner reads
    logits at ``[:, -1:, :]`` and nowhere else, and the hidden states of other positions
    are needed only for the K/V of rank 0's own layers, which its layers write;
  * the other ranks' "logits" are their sent hidden state (``Passthrough`` head): their
    runner drops them, and no rank but 0 holds or computes the LM head.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.base import create_attention_mask

# Inner models of these mlx-lm architectures are embed_tokens -> layers(h, mask, cache) ->
# norm, with one attention mask for every layer; others are refused.
SUPPORTED = ("llama", "mistral", "qwen2", "qwen3")


@dataclass(frozen=True)
class Split:
    """Which decoder layers each rank runs: ``sizes[r]`` layers on rank r, rank N-1 the
    first ones (it embeds), rank 0 the last (it holds the norm and the LM head).  Uneven
    counts give the extra layers to the highest ranks (rank 0 holds the head besides)."""

    layers: int
    ranks: int

    def __post_init__(self) -> None:
        if self.ranks < 1 or self.layers < self.ranks:
            raise ValueError(f"{self.layers} decoder layers cannot be split over {self.ranks} "
                             "ranks: pipeline parallel needs at least one layer per rank")

    @property
    def sizes(self) -> list[int]:
        base, extra = divmod(self.layers, self.ranks)
        return [base + (1 if r >= self.ranks - extra else 0) for r in range(self.ranks)]

    def span(self, rank: int) -> range:
        """The layer indices rank ``rank`` runs."""
        start = sum(self.sizes[rank + 1 :])
        return range(start, start + self.sizes[rank])

    @property
    def most(self) -> int:
        return max(self.sizes)


def check_pipeline(config: dict, ranks: int) -> Split:
    """The split of a model with this ``config.json`` over ``ranks``; ValueError with the
    reason when its architecture or layer count cannot be served pipelined."""
    kind = config.get("model_type", "?")
    if kind not in SUPPORTED:
        raise ValueError(f"{kind}: pipeline parallel runs {', '.join(SUPPORTED)} models; serve "
                         "this one tensor parallel (without --pipeline) or in one process")
    layers = config.get("num_hidden_layers")
    if not isinstance(layers, int):
        raise ValueError(f"{kind}: config.json has no num_hidden_layers")
    return Split(layers, ranks)


class Passthrough(nn.Module):
    """The LM head of a rank other than 0: its input, unchanged (the runner drops it)."""

    def __call__(self, x: mx.array) -> mx.array:
        return x


class PipelineStage(nn.Module):
    """One rank's part of the inner model (``model.model`` to the runner): ``embed_tokens``
    on the first stage (rank N-1) and, for a tied head, on rank 0; ``norm`` on rank 0.
    ``wire_hidden``, ``wire_dtype``: what every recv expects, set by ``agree_wire``."""

    def __init__(self, inner: nn.Module, split: Split, group: mx.distributed.Group,
                 tied: bool) -> None:
        super().__init__()
        self.rank, self.size, self.group = group.rank(), group.size(), group
        self.span = split.span(self.rank)
        self.layers = [inner.layers[i] for i in self.span]
        if any(getattr(layer, "use_sliding", False) for layer in self.layers):
            raise ValueError("sliding-window layers cannot be paged; pipeline refused")
        if self.first or (self.last and tied):
            self.embed_tokens = inner.embed_tokens
        if self.last:
            self.norm = inner.norm
        self.wire_hidden, self.wire_dtype = 0, mx.float32

    @property
    def first(self) -> bool:
        return self.rank == self.size - 1

    @property
    def last(self) -> bool:
        return self.rank == 0

    def __call__(self, inputs: mx.array, cache=None) -> mx.array:
        cache = cache if cache is not None else [None] * len(self.layers)
        if self.first:
            h = self.embed_tokens(inputs)
        else:
            h = mx.distributed.recv((*inputs.shape[:2], self.wire_hidden), self.wire_dtype,
                                    self.rank + 1, group=self.group)
        mask = create_attention_mask(h, cache[0])
        for layer, c in zip(self.layers, cache, strict=True):
            h = layer(h, mask, cache=c)
        if self.last:
            return self.norm(h[:, -1:, :])
        sent = mx.distributed.send(h.astype(self.wire_dtype), self.rank - 1, group=self.group)
        mx.eval(sent)  # now: the runner may never evaluate this forward's output
        return sent


class PipelineModel(nn.Module):
    """An mlx-lm model reduced to one rank's pipeline stage (module docstring): ``args``
    and ``model_type`` of the original, ``layers`` this rank's slice, ``model`` the stage,
    ``lm_head`` the real head on rank 0 (None there for a tied head: the runner then uses
    ``model.embed_tokens.as_linear``), ``Passthrough`` elsewhere."""

    def __init__(self, model: nn.Module, split: Split, group: mx.distributed.Group) -> None:
        super().__init__()
        self.args = model.args
        self.model_type = getattr(model, "model_type", model.args.model_type)
        self.split = split
        tied = getattr(model, "lm_head", None) is None
        self.model = PipelineStage(model.model, split, group, tied)
        if group.rank() != 0:
            self.lm_head = Passthrough()
        elif not tied:
            self.lm_head = model.lm_head

    @property
    def layers(self) -> list:
        return self.model.layers

    def __call__(self, inputs: mx.array, cache=None) -> mx.array:
        h = self.model(inputs, cache)
        if "lm_head" in self:
            return self.lm_head(h)
        return self.model.embed_tokens.as_linear(h)


def agree_wire(stage: PipelineStage, group: mx.distributed.Group) -> None:
    """Tell every stage the hidden size and dtype the first stage (rank N-1, the one that
    embeds) produces: what each recv expects and each send casts to.  ValueError on every
    rank when that dtype is not a float type MLX sends."""
    dtypes = [mx.float32, mx.float16, mx.bfloat16]
    mine = [0, 0]
    if stage.first:
        probe = stage.embed_tokens(mx.array([[0]]))
        mine = [probe.shape[-1], dtypes.index(probe.dtype) + 1 if probe.dtype in dtypes else 0]
    hidden, code = mx.distributed.all_max(mx.array(mine, dtype=mx.int32), group=group).tolist()
    if code == 0:  # every rank sees it, so every rank refuses
        raise ValueError("the embeddings' output is not float32, float16 or bfloat16; "
                         "pipeline refused")
    stage.wire_hidden, stage.wire_dtype = hidden, dtypes[code - 1]
