"""The `deqguard` console script: one entry point, one subcommand per tool.

Each subcommand lives in its own module and owns its own argument parser; this module only
dispatches. Implementations are imported lazily, inside `main`, so that `deqguard` (the core
library) never imports `training` or `service` at import time and a missing piece fails with a
clear message instead of an ImportError.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence

# subcommand -> (module, function, one-line help). Each function takes argv (list[str]) and
# returns an exit code (int) or None.
COMMANDS: dict[str, tuple[str, str, str]] = {
    "train": ("training.cli", "main", "train a model (clean, PGD-AT, TRADES) into the model store"),
    "audit": ("deqguard.audit.cli", "main", "audit a model and defense against attacks"),
    "audit-table": (
        "deqguard.audit.ablation",
        "main",
        "combine audits per sample into an ablation table (Markdown, JSON)",
    ),
    "audit-status": (
        "deqguard.audit.progress",
        "main",
        "how far resumable audits have got (batches, compute, time to go)",
    ),
    "serve": ("service.cli", "main", "start the HTTP inference service"),
    "bench": ("deqguard.bench", "main", "run the throughput and memory benchmarks"),
}

EXIT_UNAVAILABLE = 2


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="deqguard",
        description="Robust CIFAR-10 classification with deep equilibrium models.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (_module, _func, help_text) in COMMANDS.items():
        # No options here: everything after the subcommand (--help included) is left unparsed
        # by parse_known_args and handed, in order, to the subcommand's own parser.
        sub.add_parser(name, help=help_text, add_help=False, prefix_chars="\0")
    return parser


def _load(command: str) -> Callable[[list[str]], int | None] | None:
    """Import the implementation of `command`, or return None when its module does not exist yet."""
    module_name, func_name, _ = COMMANDS[command]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        # Only "this module (or its package) is missing" means not available; a missing
        # dependency inside an existing module is a real error and must surface.
        parts = module_name.split(".")
        prefixes = {".".join(parts[: i + 1]) for i in range(len(parts))}
        if exc.name in prefixes:
            return None
        raise
    func = getattr(module, func_name, None)
    return func if callable(func) else None


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the subcommand and hand the remaining arguments to its implementation."""
    args, rest = _build_parser().parse_known_args(list(sys.argv[1:] if argv is None else argv))
    func = _load(args.command)
    if func is None:
        module_name, func_name, _ = COMMANDS[args.command]
        print(
            f"`deqguard {args.command}` is not available yet: {module_name} missing "
            f"(expected {module_name}:{func_name}(argv)).",
            file=sys.stderr,
        )
        return EXIT_UNAVAILABLE
    result = func(rest)
    return int(result or 0)


if __name__ == "__main__":
    raise SystemExit(main())
