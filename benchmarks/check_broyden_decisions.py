"""Served decisions on the first 1,000 CIFAR-10 test images with Broyden's old coefficient layout
(bmm(V, x)) and the current one (bmm(x^T, V^T)): both shipped models, presets off and paper.

Usage: python benchmarks/check_broyden_decisions.py   (one thread; quoted in docs/BENCHMARKS.md)
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import deqguard.solvers.broyden as br  # noqa: E402
from benchmarks.ab_broyden_layout import _old_matvec, _old_rmatvec  # noqa: E402
from deqguard.cpu_memory import retain_freed_memory  # noqa: E402
from deqguard.data import load_test  # noqa: E402
from deqguard.defense import Preset, get_preset  # noqa: E402
from deqguard.store import load_entry  # noqa: E402
from service.worker import _served, run_batch  # noqa: E402


def main() -> None:
    torch.set_num_threads(1)
    retain_freed_memory()
    layouts = {"old": (_old_matvec, _old_rmatvec), "new": (br._matvec, br._rmatvec)}
    x = load_test(n=1000).float_images()
    for model in ("micro-trades-ri", "micro-trades"):
        served = _served(load_entry("model_store", model, "cpu", inference=True), None)
        for preset in (Preset.OFF, Preset.PAPER):
            p = get_preset(preset)
            preds = {}
            for tag, (m, r) in layouts.items():
                br._matvec, br._rmatvec = m, r
                with torch.inference_mode(False):
                    outs = run_batch(served, x, [p] * x.shape[0], chunk=64)
                preds[tag] = torch.tensor([o.class_index for o in outs])
            same = int((preds["old"] == preds["new"]).sum())
            print(model, preset.value, f"identical decisions {same}/1000", flush=True)
    br._matvec, br._rmatvec = layouts["new"]


if __name__ == "__main__":
    main()
