"""Settings are read at the edge: no module of the stack below the server reads the
process environment (import-linter's contracts in pyproject.toml keep the imports; this
keeps ``os.environ`` / ``os.getenv`` out, which an import contract cannot see)."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LAYERS = ("attention", "engine", "kvcache", "scheduler")
READS_ENV = re.compile(r"\bos\.(environ|getenv|putenv)\b|from os import .*\b(environ|getenv)\b")


def test_stack_below_the_server_reads_no_environment():
    files = [p for layer in LAYERS for p in sorted((ROOT / layer).rglob("*.py"))]
    assert len(files) > 20, "the layers were not found"
    offenders = [f"{p.relative_to(ROOT)}:{i}" for p in files
                 for i, line in enumerate(p.read_text().splitlines(), 1)
                 if READS_ENV.search(line)]
    assert offenders == []


def test_wheel_layout_is_one_package():
    """pyproject maps every top-level part under slabserve.* (the wheel holds slabserve/
    only)."""
    import tomllib

    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert all(p == "slabserve" or p.startswith("slabserve.") for p in cfg["packages"])
    assert set(cfg["package-dir"]) == set(cfg["packages"])
    for name, folder in cfg["package-dir"].items():
        assert (ROOT / folder / "__init__.py").is_file(), name
