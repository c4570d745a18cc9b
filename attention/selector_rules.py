"""What the decode-path selector decides on and with: its decisions (``Path``,
``Reason``, ``Decision``), the cache key of a layer-step (``SelectorKey``, ``make_key``)
and the built-in rules per backend (``RULES``; docs/adr/0002-selector-rules.md).

Invariants: a rule is a pure function of the key; the key holds only what a native path's
``decline`` may depend on (attention/selector.py's contract).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum
from functools import cached_property, lru_cache
from typing import NamedTuple

import mlx.core as mx

from slabserve.attention.base import DecodeBatch
from slabserve.kvcache.pool import PoolGeometry, SlabPool


class Path(str, Enum):
    NATIVE = "native"
    GATHER = "gather"


class Reason(str, Enum):
    ENV_NATIVE = "env_native"  # forced native (environment or ``set_override``)
    ENV_GATHER = "env_gather"  # forced gather (environment or ``set_override``)
    PROFILE = "profile"  # the calibration profile's faster path
    RULE = "rule"  # a built-in rule (detail: its name)
    DECLINED = "declined"  # native chosen but declined (detail: the reason)


@dataclass(frozen=True)
class Decision:
    path: Path
    reason: Reason
    detail: str = ""

    @cached_property
    def label(self) -> tuple[str, str]:
        """(path, reason) as counted for /metrics, e.g. ("gather", "declined:no_kernel").
        A free-text detail becomes a short token (lower case, digits and punctuation
        dropped, at most 48 characters) to keep label sets small."""
        if not self.detail:
            return self.path.value, self.reason.value
        token = re.sub(r"[^a-z]+", "_", re.sub(r"\d+", "", self.detail.lower()))
        return self.path.value, f"{self.reason.value}:{token.strip('_')[:48]}"


class SelectorKey(NamedTuple):
    backend: str  # "cpu", "cuda", "metal"
    dtype: str  # K/V dtype, e.g. "float16"
    head_dim: int
    q_heads: int
    kv_heads: int
    block_size: int
    batch_bucket: int  # next power of two >= batch size
    ctx_bucket: int  # next power of two >= longest visible context (>= 256)
    slabs_bucket: str  # "1" or "many": slabs the batch's tables touch


def pow2_bucket(n: int, floor: int = 1) -> int:
    """The next power of two >= ``n``, at least ``floor``."""
    return max(floor, 1 << (max(n, 1) - 1).bit_length())


def slabs_touched_bucket(pool: SlabPool, batch: DecodeBatch) -> str:
    """"1" when every block of the batch lies in one slab, else "many" (two C-level
    passes over the tables, skipped when the pool has one slab)."""
    if pool.num_slabs == 1:
        return "1"
    sb = batch.geom.slab_blocks
    try:
        lo = min(map(min, batch.tables))
        hi = max(map(max, batch.tables))
    except ValueError:  # an empty table: the path's decline will say so
        return "1"
    return "1" if lo // sb == hi // sb else "many"


def current_backend() -> str:
    if mx.default_device().type == mx.cpu:
        return "cpu"
    return "metal" if mx.metal.is_available() else "cuda"


@lru_cache(maxsize=256)
def _static_fields(backend: str, g: PoolGeometry, hq: int) -> tuple:
    """The key's fields that depend on the model and pool only (a pure function, memoised:
    a step asks once per layer)."""
    dtype = str(g.dtype).rsplit(".", 1)[-1]
    return backend, dtype, g.head_dim, hq, g.kv_heads, g.block_size


def make_key(q: mx.array, pool: SlabPool, batch: DecodeBatch, backend: str) -> SelectorKey:
    return SelectorKey(*_static_fields(backend, pool.geom, q.shape[1]),
                       pow2_bucket(len(batch.lengths)), pow2_bucket(max(batch.lengths), 256),
                       slabs_touched_bucket(pool, batch))


# ---- built-in rules ---------------------------------------------------------------------
def _rule_cpu(key: SelectorKey) -> tuple[Path, str]:
    # docs/benchmarks/attention-cpu.md: native won 94 of 96 cells (median 1.77x; the two
    # others flip between runs) for structural reasons: a matmul per kv head with the
    # q-head group as rows, and a second stream on the second core for long steps.
    # int8 pools too: native reads half the bytes and scales scores, not pages, where
    # gather dequantizes whole pages (docs/benchmarks/kv-int8.md).
    return Path.NATIVE, "cpu_native_all"


def _rule_cuda(key: SelectorKey) -> tuple[Path, str]:
    # docs/benchmarks/attention/cuda-h200*.md (two runs, 96 cells each): the pooled kernel
    # (issue 7) beat gather-SDPA 1.3-23x except at float32, B=1, one slab, ctx <= 1-4k,
    # where the two are within ~10 us per layer and the winner flips between runs; gather
    # won both runs only for the small-head geometry (14/2/64) at ctx 1k.  Worst regret
    # of this rule over both runs: 1.033 (always-native: 1.133).
    # int8 pools: the int8 kernel reads half the bytes in place where gather dequantizes
    # every gathered page (docs/benchmarks/kv-int8.md, "GPU").
    if key.dtype == "int8":
        return Path.NATIVE, "cuda_int8_native"
    if (key.dtype == "float32" and key.batch_bucket == 1 and key.slabs_bucket == "1"
            and key.ctx_bucket <= 1024 and key.q_heads <= 16):
        return Path.GATHER, "cuda_f32_single_short_small"
    return Path.NATIVE, "cuda_native"


def _rule_metal(key: SelectorKey) -> tuple[Path, str]:
    return Path.GATHER, "metal_unverified"


RULES = {"cpu": _rule_cpu, "cuda": _rule_cuda, "metal": _rule_metal}
