"""The `deqguard` console script: dispatch to subcommands, clear message when one is missing."""

from __future__ import annotations

import subprocess
import sys
import types

import pytest

from deqguard import cli


def test_missing_subcommand_module(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.setitem(cli.COMMANDS, "train", ("deqguard_no_such_pkg.cli", "main", "x"))
    assert cli.main(["train", "--epochs", "1"]) == cli.EXIT_UNAVAILABLE
    err = capsys.readouterr().err
    assert "`deqguard train` is not available yet: deqguard_no_such_pkg.cli missing" in err


def test_dispatch_passes_argv_unparsed(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[list[str]] = []
    fake = types.ModuleType("fake_bench_impl")
    fake.main = lambda argv: seen.append(argv) or 3  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "fake_bench_impl", fake)
    monkeypatch.setitem(cli.COMMANDS, "bench", ("fake_bench_impl", "main", "x"))
    assert cli.main(["bench", "x", "--help", "-n", "2", "--", "y"]) == 3
    assert seen == [["x", "--help", "-n", "2", "--", "y"]]


def test_unknown_command_exits_2() -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(["nope"])
    assert info.value.code == 2


def test_core_does_not_import_training_or_service() -> None:
    """Importing the CLI and data modules must not pull in training/ or service/ (fresh process)."""
    code = (
        "import sys, deqguard.cli, deqguard.data; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('training', 'service')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
