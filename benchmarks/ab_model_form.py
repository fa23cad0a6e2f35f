"""A/B of the two model copies an audit can attack (``--model-form``): the module as trained
and the service's eval-only copy (``prepare_for_inference``), through the solver-gradient
surrogate an audit step runs.

    python benchmarks/ab_model_form.py off 128     # undefended, first 128 test images
    python benchmarks/ab_model_form.py paper 64    # through the paper defense (BPDA)

One thread; pause other jobs (SIGSTOP). Prints the largest logit difference between the two
copies, how many decisions agree, the lowest cosine of their input gradients, and the wall
seconds of one forward + backward of each (3 alternating repeats after a warm-up).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from deqguard.attacks.apgd import SolverGradSurrogate
from deqguard.cpu_memory import retain_freed_memory
from deqguard.data import load_test
from deqguard.defense import DefenseParams, get_preset
from deqguard.store import default_store_root, load_entry

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks._common import alternating_wall_s, input_gradient  # noqa: E402

MODEL = "micro-trades-ri@2"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("defense", help="preset (off: undefended)")
    p.add_argument("n", type=int, help="first n test images (one batch)")
    args = p.parse_args()
    torch.set_num_threads(1)
    retain_freed_memory()
    params = DefenseParams(R=0) if args.defense == "off" else get_preset(args.defense)
    split = load_test(n=args.n)
    x, y = split.float_images("cpu"), split.labels
    root = default_store_root()
    surrogates = {}
    for form, inference in (("training", False), ("served", True)):
        entry = load_entry(root, MODEL, "cpu", inference=inference)
        surrogates[form] = SolverGradSurrogate(
            entry.model.eval(), entry.manifest.solver, params=params
        )

    (la, ga), (lb, gb) = (input_gradient(surrogates[f], x, y) for f in ("training", "served"))
    cos = torch.nn.functional.cosine_similarity(ga.flatten(1), gb.flatten(1))
    runs = {form: (lambda s=s: input_gradient(s, x, y)) for form, s in surrogates.items()}
    times = alternating_wall_s(runs, 3)
    print(
        json.dumps(
            {
                "model": MODEL,
                "defense": args.defense,
                "n": args.n,
                "logit_max_abs_diff": float((la - lb).abs().max()),
                "decisions_agree": int((la.argmax(1) == lb.argmax(1)).sum()),
                "grad_cos_min": float(cos.min()),
                "wall_s": times,
            }
        )
    )


if __name__ == "__main__":
    main()
