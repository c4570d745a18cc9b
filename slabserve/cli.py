"""``slabserve`` console script: sub-commands dispatch lazily to their packages.

Commands that run MLX first pass through ``slabserve.blas.prepare_process`` (OpenBLAS
preload on Linux CPU, which may re-execute the process once)."""

from __future__ import annotations

import importlib
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
        from slabserve import blas

        blas.prepare_process()
    return int(getattr(importlib.import_module(module), func)(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
