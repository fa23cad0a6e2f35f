"""benchmarks/device_check.py, dry-run on the CPU: the GPU check must not rot between the
sessions that are lent a GPU (it runs there once, in a few minutes, with no second chance)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np

from deqguard.data import load_test

ROOT = Path(__file__).resolve().parents[2]


def _module():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location(
        "device_check", ROOT / "benchmarks" / "device_check.py"
    )
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _dry_run(tmp_path: Path, images, labels, *args: str) -> tuple[int, dict]:  # type: ignore[no-untyped-def]
    """device_check on the CPU, small, on these images: (exit code, its JSON results)."""
    npz = tmp_path / "images.npz"
    np.savez(npz, images=images, labels=labels)
    out = tmp_path / "out"
    argv = ["--out", str(out), "--device", "cpu", "--small", "--images", str(npz), *args]
    rc = _module().main(argv)
    return rc, json.loads((out / "device_check.json").read_text())


def test_dry_run_on_cpu_records_every_section_it_ran(tmp_path: Path) -> None:
    split = load_test(n=16)
    rc, results = _dry_run(
        tmp_path,
        split.images.numpy(),
        split.labels.numpy(),
        "--sections",
        "env,parity,bf16",
        "--models",
        "micro-trades-ri",
    )
    assert rc == 0, results
    assert set(results) == {"env", "parity", "bf16"}
    assert results["bf16"]["skipped"].startswith("bf16 autocast is checked on CUDA only")
    assert "micro-trades" not in results["parity"]  # --models: only the one named
    for name in ("micro-trades-ri",):
        par = results["parity"][name]
        # CPU against CPU: the same numbers, and Algorithm 1's schedule for `paper`
        assert par["undefended_max_abs_logit_diff"] == 0.0
        assert par["paper_decisions_agree"] == results["parity"]["images"]
        assert par["paper_acted_steps_cuda"] == [2, 4, 6, 8]
    assert "# Device check" in (tmp_path / "out" / "device_check.md").read_text()


def test_a_failing_section_is_recorded_and_the_run_fails(tmp_path: Path) -> None:
    split = load_test(n=4)
    bad = split.images.numpy()[:, :1]  # 1 channel
    rc, results = _dry_run(tmp_path, bad, split.labels.numpy(), "--sections", "env,parity")
    assert rc == 1
    assert "error" in results["parity"] and "env" in results and "error" not in results["env"]
