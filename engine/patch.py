"""Route mlx-lm's attention call to the paged cache, without forking model files.

mlx-lm model modules import ``scaled_dot_product_attention`` from ``mlx_lm.models.base``
by name.  ``install`` replaces that name in the modules a model is built from with a
dispatcher that sends paged caches to ``PagedLayerCache.attend`` and everything else to
the original function, so plain mlx-lm use in the same process is unchanged.

The same modules' ``swiglu`` (imported by name from ``mlx_lm.models.activations``) is
replaced too: the running forward's ``HostMath.silu_mul`` when the host path applies
(float32 on CPU, large enough), the original otherwise, so a call the host path does not
take runs exactly mlx-lm's compiled function.  Which ``HostMath`` is running is per
thread, held by the patched function itself (``host_math_scope``): outside a runner's
forward there is none and mlx-lm's function runs.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import mlx.nn as nn

from slabserve.attention import HostMath
from slabserve.engine.paged_cache import PagedLayerCache

_ATTR = "scaled_dot_product_attention"
_SWIGLU = "swiglu"


def _dispatcher(original):
    def scaled_dot_product_attention(queries, keys, values, cache, scale, mask, sinks=None):
        if isinstance(cache, PagedLayerCache):
            if sinks is not None:
                raise NotImplementedError("attention sinks are not supported by paged attention")
            return cache.attend(queries, keys, values, scale)
        return original(queries, keys, values, cache=cache, scale=scale, mask=mask, sinks=sinks)

    scaled_dot_product_attention.__slabserve_original__ = original
    return scaled_dot_product_attention


def swiglu_dispatcher(original):
    """``swiglu(gate, x)`` that takes this thread's ``HostMath.silu_mul`` (set by
    ``host_math_scope``) when it applies."""
    scope = threading.local()

    def swiglu(gate, x):
        host = getattr(scope, "host", None)
        if host is not None and host.silu_applies(gate, x):
            return host.silu_mul(gate, x)
        return original(gate, x)

    swiglu.__slabserve_original__ = original
    swiglu.__slabserve_scope__ = scope
    return swiglu


@contextmanager
def host_math_scope(modules: list[str], host: HostMath) -> Iterator[None]:
    """Within this block, on this thread, the patched ``swiglu`` of ``modules`` (names
    ``install`` returned) may take ``host``'s numpy path.  Nests."""
    scopes = [fn.__slabserve_scope__ for fn in
              (getattr(sys.modules.get(m), _SWIGLU, None) for m in modules)
              if hasattr(fn, "__slabserve_scope__")]
    previous = [getattr(s, "host", None) for s in scopes]
    for s in scopes:
        s.host = host
    try:
        yield
    finally:
        for s, old in zip(scopes, previous, strict=True):
            s.host = old


def _patch_swiglu(mod) -> None:
    fn = getattr(mod, _SWIGLU, None)
    if callable(fn) and not hasattr(fn, "__slabserve_original__"):
        setattr(mod, _SWIGLU, swiglu_dispatcher(fn))


def install(model: nn.Module) -> list[str]:
    """Patch every module the model's classes come from; return the names of those that
    call mlx-lm's SDPA (their ``swiglu``, where they have one, is patched as well).

    Raises ValueError when no module of the model calls mlx-lm's SDPA by name (the
    architecture computes attention some other way and cannot be paged)."""
    names = {type(m).__module__ for _, m in model.named_modules()} | {type(model).__module__}
    patched = []
    for name in sorted(names):
        mod = sys.modules.get(name)
        fn = getattr(mod, _ATTR, None)
        if fn is None or not callable(fn):
            continue
        if not hasattr(fn, "__slabserve_original__"):
            setattr(mod, _ATTR, _dispatcher(fn))
        _patch_swiglu(mod)
        patched.append(name)
    if not patched:
        raise ValueError(
            f"{type(model).__module__}: the model does not call mlx-lm's "
            "scaled_dot_product_attention; paged attention cannot hook it"
        )
    return patched
