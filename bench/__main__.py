"""``slabserve bench NAME [args]`` (or ``python -m slabserve.bench NAME``): run the module
``slabserve.bench.NAME`` (dashes become underscores).  Every module of bench/ is a command,
except this one and helpers whose names start with an underscore; kernel-work tools live
in experiments/ instead.
Benchmarks write their results under out/ (git-ignored) or --out; docs/benchmarks/ keeps
the latest tables."""

from __future__ import annotations

import importlib
import pkgutil

from slabserve import bench


def available() -> list[str]:
    """The benchmark names, dashed, sorted."""
    return sorted(m.name.replace("_", "-") for m in pkgutil.iter_modules(bench.__path__)
                  if not m.name.startswith("_"))


def main(argv: list[str]) -> int:
    """Run ``argv[0]``'s ``main(argv[1:])``; usage and 2 for an unknown name."""
    if not argv or argv[0] not in available():
        print("usage: slabserve bench {" + ",".join(available()) + "} [args]")
        return 2
    mod = importlib.import_module(f"{bench.__name__}.{argv[0].replace('-', '_')}")
    return int(mod.main(argv[1:]) or 0)


if __name__ == "__main__":
    import sys

    sys.exit(main(sys.argv[1:]))
