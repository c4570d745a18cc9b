"""The decode-path selector: native pooled kernel or gather-SDPA, per layer and step.

Decision order (docs/adr/0002-selector-rules.md):
  1. override (True forces native, False forces gather, None = auto): given when the
     selector is built (the composition root reads ``SLABSERVE_PAGED_ATTENTION_NATIVE``),
     or set at run time with ``set_override`` (the server's admin endpoint);
  2. the per-layer cache, keyed by (``SelectorKey``, pool slab count), so the
     steady state costs one list index per layer;
  3. the calibration profile of this device (``attention.profile``), if one was loaded;
  4. built-in rules per backend (``RULES``, attention/selector_rules.py, with the key and
     the decision types).
A native path that declines (``decline()`` returns a reason), is missing for the
backend, or raises, falls back to gather with that reason.

Every decision is a ``Decision`` (a ``Path`` and a ``Reason`` enum value plus a short
detail), counted by (path, reason label) for /metrics and logged once per label.  With a
trace path set, one JSONL line per step and layer records what was done.

Contract for native paths: ``decline`` may depend only on what the cache key holds
(backend, K/V dtype (q's is constant per model), head geometry, block size, buckets of batch,
context and slabs touched, and the pool's slab count); the cache does not ask again
inside a key.
"""

from __future__ import annotations

import importlib
import json
import logging
import threading
from collections import Counter
from dataclasses import dataclass
from pathlib import Path as FsPath

from slabserve.attention.base import DecodeAttention, DecodeBatch
from slabserve.attention.gather import GatherSDPA
from slabserve.attention.profile import Profile
from slabserve.attention.selector_rules import (
    RULES,
    Decision,
    Path,
    Reason,
    SelectorKey,
    current_backend,
    make_key,
)
from slabserve.kvcache.pool import SlabPool

log = logging.getLogger("slabserve.attention")


NATIVE_IMPLS = {
    "cpu": ("slabserve.attention.native_cpu", "NativeCPU"),
    "cuda": ("slabserve.attention.native_cuda", "NativeCUDA"),
    "metal": ("slabserve.attention.native_metal", "NativeMetal"),
}


class _Missing(DecodeAttention):
    """Stands in for a native path that could not be imported: always declines."""

    name = "native"

    def __init__(self, reason: str) -> None:
        self.reason = reason

    def decline(self, q, pool, batch) -> str | None:
        return self.reason

    def __call__(self, q, pool, layer, batch, scale):  # pragma: no cover - never chosen
        raise RuntimeError(self.reason)


def load_native(backend: str) -> DecodeAttention:
    """The native path for ``backend``, or a stand-in that declines with the reason."""
    spec = NATIVE_IMPLS.get(backend)
    if spec is None:
        return _Missing("no_kernel_for_backend")
    try:
        return getattr(importlib.import_module(spec[0]), spec[1])()
    except ImportError:
        return _Missing("no_kernel_for_backend")
    except Exception as exc:  # a kernel that fails to build must not take serving down
        log.warning("native attention for %s failed to load: %r", backend, exc)
        return _Missing("kernel_load_failed")


class _Slot:
    """One layer's cached decision, the path object that runs it, its backend, and how
    many layer-steps used it."""

    __slots__ = ("decision", "impl", "backend", "count")

    def __init__(self, decision: Decision, impl: DecodeAttention, backend: str) -> None:
        self.decision = decision
        self.impl = impl
        self.backend = backend
        self.count = 0


@dataclass
class _Step:
    """What the selector keeps on a DecodeBatch (one step, every layer)."""

    number: int
    key: SelectorKey
    slots: list  # per-layer _Slot | None, shared by every step with this cache key
    slabs: int | None = None  # exact slabs touched, computed only for the trace


class Selector:
    """Chooses and runs the decode path.  One per model runner (its
    ``AttentionRuntime``); tests and benchmarks build their own.

    ``override``: True forces native, False forces gather, None = auto;
    ``profile``: a loaded calibration profile or None; ``trace``: JSONL path or None;
    ``natives``: backend -> native path, to replace the lazily imported ones."""

    def __init__(self, override: bool | None = None, profile: Profile | None = None,
                 trace: FsPath | None = None, natives: dict | None = None) -> None:
        self.override = override
        self.profile = profile
        self.gather = GatherSDPA()
        self._natives: dict[str, DecodeAttention] = dict(natives or {})
        self._cache: dict[tuple, list] = {}
        self._retired: Counter = Counter()  # counts of slots dropped from the cache
        self._counts_lock = threading.Lock()  # path_counts vs _clear_cache, not the hot path
        self.misses = 0
        self._logged: set[tuple[str, str]] = set()
        self._steps = 0
        self._trace_path = trace
        self._trace = None

    # ---- configuration -------------------------------------------------------------
    def set_profile(self, profile: Profile | None) -> None:
        self.profile = profile
        self._clear_cache()

    def set_override(self, value: bool | None) -> bool | None:
        """Force native (True), force gather (False) or go back to auto (None) from the
        next decode step on; returns the previous override.  Clears the per-layer cache
        (counts so far are kept), so every layer decides afresh with the new reason.  Call
        it between steps, on the thread that runs them: a step in flight keeps the slots
        it already holds (``scheduler.loop.ThreadedServingLoop.set_attention_path`` does)."""
        if not (value is None or isinstance(value, bool)):
            raise ValueError(f"override must be True, False or None, not {value!r}")
        previous, self.override = self.override, value
        self._clear_cache()
        return previous

    def native(self, backend: str) -> DecodeAttention:
        impl = self._natives.get(backend)
        if impl is None:
            impl = self._natives[backend] = load_native(backend)
        return impl

    # ---- deciding --------------------------------------------------------------------
    def _new_step(self, q, pool: SlabPool, batch: DecodeBatch) -> _Step:
        key = make_key(q, pool, batch, current_backend())
        slots = self._cache.get((key, pool.num_slabs))
        if slots is None:
            slots = self._cache[(key, pool.num_slabs)] = []
        self._steps += 1
        st = batch._cache[self] = _Step(self._steps, key, slots)
        return st

    def fresh(self, q, pool: SlabPool, batch: DecodeBatch, key: SelectorKey) -> Decision:
        """Decide without the cache (also used by benchmarks to show the choice)."""
        override = self.override
        if override is False:
            return Decision(Path.GATHER, Reason.ENV_GATHER)
        if override is True:
            want = Decision(Path.NATIVE, Reason.ENV_NATIVE)
        else:
            want = self._auto(key)
        if want.path is Path.NATIVE:
            why = self.native(key.backend).decline(q, pool, batch)
            if why is not None:
                return Decision(Path.GATHER, Reason.DECLINED, str(getattr(why, "value", why)))
        return want

    def _auto(self, key: SelectorKey) -> Decision:
        if self.profile is not None:
            path = self.profile.choose(key)
            if path is not None:
                return Decision(Path(path), Reason.PROFILE)
        rule = RULES.get(key.backend)
        if rule is None:
            return Decision(Path.GATHER, Reason.RULE, "unknown_backend")
        path, name = rule(key)
        return Decision(path, Reason.RULE, name)

    def decide(self, q, pool: SlabPool, layer: int, batch: DecodeBatch) -> Decision:
        """The decision for ``layer`` this step: counted, logged once, traced."""
        return self._slot(q, pool, layer, batch).decision

    def _slot(self, q, pool, layer, batch) -> _Slot:
        st = batch._cache.get(self) or self._new_step(q, pool, batch)
        slots = st.slots
        slot = slots[layer] if layer < len(slots) else None
        if slot is None:
            slot = self._miss(q, pool, layer, batch, st)
        slot.count += 1
        if self._trace_path is not None:
            self._write_trace(st, layer, batch, slot.decision.label)
        return slot

    def _miss(self, q, pool, layer, batch, st: _Step) -> _Slot:
        d = self.fresh(q, pool, batch, st.key)
        impl = self.native(st.key.backend) if d.path is Path.NATIVE else self.gather
        slot = _Slot(d, impl, st.key.backend)
        st.slots.extend([None] * (layer + 1 - len(st.slots)))
        st.slots[layer] = slot
        self.misses += 1
        if d.label not in self._logged:
            self._log_once(d.label, st.key)
        return slot

    def plan_layers(self, q, pool: SlabPool, batch: DecodeBatch, layers: int) -> list | None:
        """Every layer's slot for this step at once, not yet counted (``count_layers``
        counts them; a step that then runs layer by layer through ``run`` is counted
        there instead), for a caller that runs the chosen paths inside one compiled step
        (engine/step_graph.py).  ``q`` needs only ``shape`` and ``dtype``.  None while a
        trace file is written (its records are per layer run)."""
        if self._trace_path is not None:
            return None
        st = batch._cache.get(self) or self._new_step(q, pool, batch)
        slots = st.slots
        if len(slots) >= layers and None not in slots[:layers]:
            return slots[:layers]
        return [slots[i] if i < len(slots) and slots[i] is not None
                else self._miss(q, pool, i, batch, st) for i in range(layers)]

    @staticmethod
    def count_layers(slots: list) -> None:
        """Count one layer-step for each slot ``plan_layers`` gave."""
        for slot in slots:
            slot.count += 1

    def run(self, q, pool: SlabPool, layer: int, batch: DecodeBatch, scale: float):
        """Decide, then run the chosen path (a native failure falls back to gather)."""
        slot = self._slot(q, pool, layer, batch)
        if slot.impl is self.gather:
            return self.gather(q, pool, layer, batch, scale)
        try:
            return slot.impl(q, pool, layer, batch, scale)
        except Exception as exc:
            slot.count -= 1
            self._native_failed(slot.backend, exc)
        return self.gather(q, pool, layer, batch, scale)

    def _native_failed(self, backend: str, exc) -> None:
        log.warning("native attention failed on %s, falling back to gather: %r", backend, exc)
        self._natives[backend] = _Missing("native_failed")
        self._clear_cache()
        with self._counts_lock:
            self._retired[Decision(Path.GATHER, Reason.DECLINED, "native_failed").label] += 1

    def _clear_cache(self) -> None:
        with self._counts_lock:  # a reader sees the counts before or after, never twice
            self._retired.update(self._cached_counts())
            self._cache.clear()
        # steps in flight keep their own slot lists; their counts are no longer seen

    # ---- reporting -----------------------------------------------------------------
    def path_counts(self) -> dict[tuple[str, str], int]:
        """(path, reason label) -> layer-steps decided, since this selector was built."""
        with self._counts_lock:
            counts = self._cached_counts()
            counts.update(self._retired)
        return dict(counts)

    def _cached_counts(self) -> Counter:
        counts: Counter = Counter()
        # snapshots: /metrics reads from another thread while steps add keys and slots
        for slots in list(self._cache.values()):
            for slot in list(slots):
                if slot is not None and slot.count:
                    counts[slot.decision.label] += slot.count
        return counts

    @property
    def hits(self) -> int:
        """Layer-steps answered by the per-layer cache."""
        return sum(self.path_counts().values()) - self.misses

    def _log_once(self, label: tuple[str, str], key: SelectorKey) -> None:
        self._logged.add(label)
        level = logging.WARNING if label[1].startswith("declined") else logging.INFO
        log.log(level, "decode attention: path=%s reason=%s (first seen at %s)",
                label[0], label[1], dict(key._asdict()))

    def _write_trace(self, st: _Step, layer: int, batch: DecodeBatch, label) -> None:
        if self._trace is None:
            self._trace_path.parent.mkdir(parents=True, exist_ok=True)
            self._trace = open(self._trace_path, "a", buffering=1)  # noqa: SIM115
        if st.slabs is None:
            sb = batch.geom.slab_blocks
            st.slabs = len({blk // sb for t in batch.tables for blk in t})
        rec = {"step": st.number, "layer": layer, "batch": batch.batch,
               "max_context": batch.max_len, "total_context": batch.total_len,
               "slabs": st.slabs, "path": label[0], "reason": label[1]}
        self._trace.write(json.dumps(rec) + "\n")

    def close(self) -> None:
        if self._trace is not None:
            self._trace.close()
            self._trace = None
