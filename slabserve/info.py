"""``slabserve info`` and ``slabserve --version``: versions, MLX device, and which BLAS
serves MLX's matrix products in this process (and why).

Runs after ``slabserve.blas.prepare_process`` like every MLX command, so what it reports
is what ``slabserve serve`` started the same way would use.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys

import slabserve
from slabserve import blas, env


def collect() -> dict:
    """Everything ``info`` prints, as plain data (imports mlx)."""
    out: dict = {
        "slabserve": slabserve.__version__,
        "python": platform.python_version(),
        "platform": f"{sys.platform}-{platform.machine()}",
    }
    try:
        import mlx.core as mx
    except ImportError as e:
        return {**out, "mlx": None, "mlx_error": str(e), "blas": blas.status()}
    import importlib.metadata as md

    try:
        mlx_lm_version = md.version("mlx-lm")
    except md.PackageNotFoundError:
        mlx_lm_version = None
    dev = mx.default_device()
    return {
        **out,
        "mlx": mx.__version__,
        "mlx_lm": mlx_lm_version,
        "device": str(dev).removeprefix("Device(").removesuffix(")").replace(", ", ":"),
        "device_info": _device_info(mx),
        "memory_limit_bytes": mx.get_memory_limit(),
        "mlx_max_mb_per_buffer": env.mlx_max_mb_per_buffer(),
        "blas": blas.status(),
    }


def _device_info(mx) -> dict:
    try:
        return {k: v for k, v in mx.device_info().items() if isinstance(v, (str, int, float))}
    except (AttributeError, RuntimeError):
        return {}


def short_line(info: dict) -> str:
    """One line for ``--version``: ``slabserve 0.1.0 (mlx 0.32.4, cpu:0, blas openblas)``."""
    b = info["blas"]
    mlx_part = f"mlx {info['mlx']}, {info.get('device')}" if info.get("mlx") else "mlx missing"
    return f"slabserve {info['slabserve']} ({mlx_part}, blas {b['blas']})"


def report(info: dict) -> str:
    """The multi-line human report of ``slabserve info``."""
    b = info["blas"]
    lines = [
        f"slabserve   {info['slabserve']}",
        f"python      {info['python']} ({info['platform']})",
        f"mlx         {info.get('mlx') or 'not installed'}"
        + (f" (mlx-lm {info['mlx_lm']})" if info.get("mlx_lm") else ""),
    ]
    if info.get("mlx"):
        di = info.get("device_info") or {}
        name = di.get("device_name") or di.get("architecture") or ""
        lines.append(f"device      {info['device']} {name}".rstrip())
        lines.append(f"mlx memory  limit {info['memory_limit_bytes'] / 2**30:.1f} GiB")
        budget = info.get("mlx_max_mb_per_buffer")
        lines.append(f"mlx graphs  MLX_MAX_MB_PER_BUFFER={budget or 'unset (MLX default)'}")
    lines.append(f"blas        {b['blas']} ({b['backend']} backend)")
    lines.append(f"  library   {b['library'] or '-'}")
    if b.get("config"):
        lines.append(f"  config    {b['config']} threads={b['threads']}")
    lines.append(f"  why       {b['reason']} [{b['code']}]")
    if b["code"] == "NOT_FOUND":
        lines.append(f"  hint      {blas.INSTALL_HINT}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="slabserve info", description=__doc__.split("\n")[0])
    ap.add_argument("--short", action="store_true", help="one line (slabserve --version)")
    ap.add_argument("--json", action="store_true", help="machine-readable")
    args = ap.parse_args([] if argv is None else argv)
    info = collect()
    if args.json:
        print(json.dumps(info, indent=1, sort_keys=True))
    elif args.short:
        print(short_line(info))
    else:
        print(report(info))
    return 0
