"""``deqguard bench <name> [args]``: run ``benchmarks/bench_<name>.py`` from a source checkout."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    bench_dir = Path(__file__).resolve().parents[1] / "benchmarks"
    available = sorted(p.stem.removeprefix("bench_") for p in bench_dir.glob("bench_*.py"))
    if not argv or argv[0] in ("-h", "--help"):
        print(f"usage: deqguard bench NAME [ARGS...]; NAME is one of {available}")
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    script = bench_dir / f"bench_{name}.py"
    if not script.is_file():
        print(f"unknown benchmark {name!r}; choose one of {available}", file=sys.stderr)
        return 2
    sys.argv = [str(script), *rest]
    runpy.run_path(str(script), run_name="__main__")
    return 0
