"""``slabserve`` console script: sub-commands dispatch lazily to their packages.

Commands that run MLX first set MLX's CUDA graph budget (``slabserve.mlxgraphs``: before
MLX is imported, since MLX reads it then) and then pass through
``slabserve.blas.prepare_process`` (OpenBLAS preload on Linux CPU, which may re-execute the
process once, keeping the environment)."""

from __future__ import annotations

import importlib
import os
import sys

# command -> (module, function taking argv list, returns exit code), whether it runs MLX
COMMANDS: dict[str, tuple[str, str, bool]] = {
    "serve": ("slabserve.serve", "main", True),
    "bench": ("slabserve.bench.__main__", "main", True),
    "calibrate": ("slabserve.calibrate", "main", True),
    "loadtest": ("slabserve.loadtest.__main__", "main", True),
    "info": ("slabserve.info", "main", True),
}


def _usage() -> str:
    return "usage: slabserve {" + ",".join(COMMANDS) + "} [args] | --version"


def prepare_mlx_env() -> None:
    """Set what MLX reads from the environment when it is imported (slabserve.mlxgraphs),
    unless the user set it. Call it before anything imports MLX."""
    from slabserve import env
    from slabserve.mlxgraphs import graph_env

    os.environ.update(graph_env(env.mlx_max_mb_per_buffer(), sys.platform))


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    if argv[0] == "--version":
        argv = ["info", "--short"]
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"slabserve: unknown command {name!r}\n{_usage()}", file=sys.stderr)
        return 2
    module, func, uses_mlx = COMMANDS[name]
    if uses_mlx:
        prepare_mlx_env()
        from slabserve import blas

        blas.prepare_process()
    return int(getattr(importlib.import_module(module), func)(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
