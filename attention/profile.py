"""Calibration profiles: both decode paths timed on this device, stored as JSON under
``<cache_dir>/profiles/<device id>.json`` and read by the selector.

File format (version 1)::

    {"version": 1, "device": "cpu-AMD-EPYC-2cores", "mlx": "0.32.4",
     "entries": [{"backend": "cpu", "dtype": "float16", "head_dim": 64, "q_heads": 32,
                  "kv_heads": 8, "block_size": 16, "batch": 8, "ctx": 4096,
                  "slabs": "1", "gather_ms": 9.1, "native_ms": 4.2}, ...]}

``native_ms`` is null where native declined.  ``batch`` and ``ctx`` are the measured
points; a lookup takes the entry of the same geometry nearest in (log2 batch, log2 ctx),
preferring the same slab bucket, and answers only when one path beat the other by more
than ``TIE`` there (otherwise the built-in rules decide).
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path

TIE = 1.05  # paths closer than this are a tie: measurement noise, left to the rules
GEOMETRY = ("backend", "dtype", "head_dim", "q_heads", "kv_heads", "block_size")


@dataclass(frozen=True)
class ProfileEntry:
    backend: str
    dtype: str
    head_dim: int
    q_heads: int
    kv_heads: int
    block_size: int
    batch: int
    ctx: int
    slabs: str
    gather_ms: float
    native_ms: float | None

    @property
    def faster(self) -> str:
        if self.native_ms is not None and self.native_ms <= self.gather_ms:
            return "native"
        return "gather"

    @property
    def margin(self) -> float:
        """slower / faster time (inf when native declined)."""
        if self.native_ms is None:
            return float("inf")
        return max(self.native_ms, self.gather_ms) / min(self.native_ms, self.gather_ms)


def device_id() -> str:
    """A file-name-safe id of the default device: backend, model name, and (on CPU) the
    number of cores, e.g. ``cpu-AMD-EPYC-2cores`` or ``cuda-NVIDIA-H100-80GB-HBM3``."""
    import mlx.core as mx

    from slabserve.attention.selector_rules import current_backend

    backend = current_backend()
    info = mx.device_info() if hasattr(mx, "device_info") else {}
    name = str(info.get("device_name") or info.get("architecture") or "unknown")
    if backend == "cpu":
        name += f"-{os.cpu_count()}cores"
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", f"{backend}-{name}").strip("-")


def profile_path(cache_dir: Path, device: str | None = None) -> Path:
    return cache_dir / "profiles" / f"{device or device_id()}.json"


@dataclass
class Profile:
    device: str
    mlx: str
    entries: list[ProfileEntry]

    def choose(self, key, tie: float = TIE) -> str | None:
        """"native"/"gather" for a ``SelectorKey``; None when no entry has its geometry
        or the nearest entry is a tie (paths within ``tie``): the rules decide then, and
        following them there costs at most that much."""
        want = tuple(getattr(key, f) for f in GEOMETRY)
        same = [e for e in self.entries if tuple(getattr(e, f) for f in GEOMETRY) == want]
        if not same:
            return None

        def distance(e: ProfileEntry) -> tuple:
            d = abs(math.log2(e.batch) - math.log2(key.batch_bucket))
            d += abs(math.log2(e.ctx) - math.log2(key.ctx_bucket))
            return (e.slabs != key.slabs_bucket, d)

        best = min(same, key=distance)
        return best.faster if best.margin > tie else None

    def to_json(self) -> str:
        body = {"version": 1, "device": self.device, "mlx": self.mlx,
                "entries": [asdict(e) for e in self.entries]}
        return json.dumps(body, indent=1)

    def save(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(self.to_json())
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: Path) -> Profile:
        body = json.loads(path.read_text())
        if body.get("version") != 1:
            raise ValueError(f"{path}: unsupported profile version {body.get('version')!r}")
        return cls(body["device"], body.get("mlx", ""),
                   [ProfileEntry(**e) for e in body["entries"]])


def load_for_device(cache_dir: Path) -> Profile | None:
    """This device's profile, or None when there is none (or it cannot be read)."""
    path = profile_path(cache_dir)
    if not path.is_file():
        return None
    try:
        return Profile.load(path)
    except (OSError, ValueError, KeyError, TypeError):
        return None
