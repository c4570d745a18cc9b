"""``slabserve bench NAME [args]``: run the benchmark module ``bench.NAME`` (dashes become
underscores).  Benchmarks write their results under docs/benchmarks/ or --out."""

from __future__ import annotations

import importlib
import pkgutil

from slabserve import bench


def available() -> list[str]:
    return sorted(
        m.name.replace("_", "-") for m in pkgutil.iter_modules(bench.__path__) if m.name != "cli"
    )


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in available():
        print("usage: slabserve bench {" + ",".join(available()) + "} [args]")
        return 2
    mod = importlib.import_module("bench." + argv[0].replace("-", "_"))
    return int(mod.main(argv[1:]) or 0)
