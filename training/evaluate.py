"""Evaluation of a trained run on the test set, and its export into the model store.

Attacks (l_inf, eps 8/255, PGD with a uniform random start, step 2/255, sign gradient, projection
and clamp after each step), all judged on the model's undefended decision, the head at z[N]
(the last raw iterate of the N-step Broyden run, k = N also for Sec. 3.3 models):

- final state: the gradient of the Eq. 11 surrogate at i = N with one plain f step and
  ``final_ka`` damped steps (the authors' evaluation unrolls 1 + 9 steps); it runs last and
  reports after every batch, with the number of images done;
- intermediate states (Eq. 11): z[i] from the solver, one plain f step, then Ka steps
  z <- (1 - lambda) z + lambda f(z), CE on the head. A grid of (i, Ka, lambda) is screened on the
  first ``screen`` test images; the strongest (lowest accuracy) is rerun on all ``n_test``.

- the served prediction's own gradient (``pgd10_solver_*``): PGD-10 with the gradient
  backpropagated through all N solver steps (``deqguard.attacks.SolverGradSurrogate``), which
  the unrolled surrogates above equal only near a fixed point (docs/DEFENSE.md); it runs last.

The first two surrogates are the core's ``IntermediateSurrogate`` with the authors' extra plain step
(``plain_first=True``), named as the core names them (``z4-plain-Ka1-lam1``: not the audits'
``z4-Ka1-lam1``, which has no plain step). The PGD is the core's model-selection PGD
(:func:`deqguard.attacks.pgd_at_attack`: last iterate, as the training recipes validate).

Usage: ``python -m training.evaluate --run runs/micro-trades --store model_store``.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from deqguard.attacks import (
    IntermediateSpec,
    IntermediateSurrogate,
    SolverGradSurrogate,
    pgd_at_attack,
)
from deqguard.configs import SolverConfig
from deqguard.data import dataset_fingerprint, load_test
from deqguard.dynamics import deq_forward
from deqguard.models import MDEQClassifier, build_model
from training.checkpoint import read_best, read_state
from training.selection import read_selection
from training.snapshots import state_at

__all__ = ["eq11_surrogate", "robust_correct", "main"]


def eq11_surrogate(
    model: MDEQClassifier, solver: SolverConfig, spec: IntermediateSpec
) -> IntermediateSurrogate:
    """logits(x) through the Eq. 11 surrogate with the authors' plain step; x gets its gradient
    through the stem and the 1 + Ka unrolled steps (the solver's z[i] is a constant)."""
    return IntermediateSurrogate(model, spec, solver, plain_first=True)


@torch.no_grad()
def decide(model: MDEQClassifier, x: Tensor, solver: SolverConfig) -> Tensor:
    """The model's undefended prediction: the head at z[N]. [B] int64."""
    return deq_forward(model, x, solver, record=False).logits.argmax(1)


def robust_correct(
    model: MDEQClassifier,
    images: Tensor,
    labels: Tensor,
    forward: Callable[[Tensor], Tensor] | None,
    solver: SolverConfig,
    *,
    eps: float = 8 / 255,
    step_size: float = 2 / 255,
    steps: int = 10,
    batch_size: int = 100,
    seed: int = 0,
    on_batch: Callable[[Tensor], None] | None = None,
) -> Tensor:
    """Per-sample correctness [N] bool under PGD with ``forward`` (None: clean).

    ``on_batch`` gets the correctness of the images done so far after every batch (progressive
    reporting: an interrupted evaluation still yields a result on the first n images)."""
    model.eval()
    gen = torch.Generator(device=images.device).manual_seed(seed)
    out = []
    for start in range(0, len(labels), batch_size):
        x = images[start : start + batch_size]
        y = labels[start : start + batch_size]
        if forward is not None:
            x = pgd_at_attack(
                forward, x, y, eps=eps, step_size=step_size, steps=steps, generator=gen
            )
        out.append(decide(model, x, solver) == y)
        if on_batch is not None:
            on_batch(torch.cat(out))
    return torch.cat(out)


def load_run_model(run_dir: Path, which: str = "best") -> tuple[MDEQClassifier, dict[str, Any]]:
    """The model of a run and the metadata written beside its weights. ``which``: ``best``
    (the trainer's selection on val PGD), ``last`` (the latest state), ``rev:<commit>`` (the
    state committed at that commit) or ``selection`` (what ``training.selection`` wrote)."""
    cfg = json.loads((run_dir / "config.json").read_text())
    overrides = {} if cfg.get("dropout") is None else {"dropout": cfg["dropout"]}
    model = build_model(cfg["model"], **overrides)
    if which == "selection":
        which = read_selection(run_dir)["weights"]
    if which == "best":
        weights, meta = read_best(run_dir)
    elif which.startswith("rev:"):
        with tempfile.TemporaryDirectory(prefix="deqguard-snapshot-") as into:
            weights, _, meta = read_state(state_at(run_dir, which.removeprefix("rev:"), Path(into)))
    elif which == "last":
        weights, _, meta = read_state(run_dir)
    else:
        raise ValueError(f"weights must be best, last, selection or rev:<commit>, got {which!r}")
    model.load_state_dict(weights)
    return model.eval(), meta


def parse_grid(text: str) -> list[IntermediateSpec]:
    """'i:ka:lam,...' -> specs."""
    specs = []
    for item in text.split(","):
        i, ka, lam = item.split(":")
        specs.append(IntermediateSpec(int(i), int(ka), float(lam)))
    return specs


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.evaluate", description=__doc__)
    p.add_argument("--run", required=True, help="run directory (runs/<name>)")
    p.add_argument("--store", default=None, help="model store root to export into")
    p.add_argument("--name", default=None, help="store entry name (default: the run's name)")
    p.add_argument("--version", default="1")
    p.add_argument(
        "--weights",
        default="best",
        help="best (the trainer's selection), last, rev:<commit> (a committed state) or"
        " selection (<run>/selection.json, from python -m training.selection)",
    )
    p.add_argument("--n-test", type=int, default=1000)
    p.add_argument("--screen", type=int, default=200, help="test images for the grid screen")
    p.add_argument("--grid", default="1:1:1,2:1:1,1:4:0.5,3:4:0.5")
    p.add_argument("--final-ka", type=int, default=9)
    p.add_argument("--final-n", type=int, default=None, help="images for the final-state attack")
    p.add_argument(
        "--extra-final-ka",
        type=int,
        default=None,
        help="only run one more final-state attack with this Ka and merge it into the existing "
        "entry as pgd10_final_ka<Ka>_acc",
    )
    p.add_argument(
        "--extra-solver",
        action="store_true",
        help="only run the PGD-10 on the solver's gradient and merge it into the existing entry"
        " (pgd10_solver_*)",
    )
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--out", default=None, help="write the metrics JSON here too")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    run_dir = Path(args.run)
    model, ckpt = load_run_model(run_dir, args.weights)
    cfg = json.loads((run_dir / "config.json").read_text())
    solver = SolverConfig(name=cfg["solver"], max_steps=cfg["solver_steps"])
    n = cfg["solver_steps"]
    test = load_test(cfg.get("data_root"), n=args.n_test)
    x, y = test.float_images(), test.labels
    t0 = time.monotonic()
    metrics: dict[str, Any] = {
        "eval_set": f"CIFAR-10 test, first {args.n_test} images (official order)",
        "attack": "l_inf eps 8/255, 10 steps of 2/255, uniform random start, seed 0",
        "decision": f"undefended, head at z[{n}] (Broyden, {n} steps)",
        "eval_machine": f"{platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} thread(s), torch {torch.__version__}",
    }
    metrics.update(_validation_metrics(args.weights, run_dir, ckpt))
    name = args.name or cfg["name"]
    if args.extra_final_ka is not None:
        # one more final-state attack (e.g. the authors' 1 + 9 unroll)
        spec = IntermediateSpec(n, args.extra_final_ka, 0.5)
        surrogate = eq11_surrogate(model, solver, spec)
        return _extra_attack(args, model, solver, x, y, f"pgd10_final_ka{spec.Ka}", surrogate)
    if args.extra_solver:
        described = {"pgd10_solver_attack": _SOLVER_ATTACK.format(n=n, solver=solver.name)}
        surrogate = SolverGradSurrogate(model, solver, steps=n)
        return _extra_attack(args, model, solver, x, y, "pgd10_solver", surrogate, described)
    if args.store:
        # Write the entry first, then merge each metric as it is measured: an interrupted
        # evaluation still leaves a valid entry holding exactly what was measured.
        _export(args, run_dir, cfg, ckpt, model, solver, name, metrics)

    def report(key: str, value: Any) -> None:
        metrics[key] = value
        metrics["eval_seconds"] = round(time.monotonic() - t0, 1)
        print(json.dumps({key: value, "t_s": metrics["eval_seconds"]}), flush=True)
        if args.store:
            from deqguard.store import update_metrics

            update_metrics(args.store, name, {key: value, "eval_seconds": metrics["eval_seconds"]})
        if args.out:
            Path(args.out).write_text(json.dumps(metrics, indent=2))

    kw = dict(steps=args.steps, batch_size=args.batch_size)
    clean = robust_correct(model, x, y, None, solver, **kw)
    report("clean_acc", float(clean.float().mean()))
    # Cheap intermediate-state attacks first (screened on the first --screen images, the
    # strongest rerun on all), the expensive final-state attack last, reported per batch.
    screen: dict[str, float] = {}
    xs, ys = x[: args.screen], y[: args.screen]
    grid = parse_grid(args.grid)
    surrogates = [eq11_surrogate(model, solver, spec) for spec in grid]
    for sur in surrogates:
        c = robust_correct(model, xs, ys, sur, solver, **kw)
        screen[sur.name] = float(c.float().mean())
        report("pgd10_intermediate_screen", {"n_images": args.screen, "accuracy": screen})
    worst = min(surrogates, key=lambda s: screen[s.name])
    report("pgd10_intermediate_attack", f"Eq. 11 {worst.name} (strongest of the screen)")
    inter = robust_correct(model, x, y, worst, solver, **kw)
    report("pgd10_intermediate_acc", float(inter.float().mean()))
    final_spec = IntermediateSpec(n, args.final_ka, 0.5)
    report("pgd10_final_attack", f"Eq. 11 surrogate i={n}, 1 plain + {args.final_ka} damped (0.5)")
    n_final = min(args.final_n or args.n_test, args.n_test)

    def final_progress(c: Tensor) -> None:
        report("pgd10_final_n_images", len(c))
        report("pgd10_final_acc", float(c.float().mean()))
        k = len(c)
        report("pgd10_min_acc", min(float(c.float().mean()), float(inter[:k].float().mean())))
        report("pgd10_per_sample_worst_acc", float((clean[:k] & inter[:k] & c).float().mean()))

    final = robust_correct(
        model,
        x[:n_final],
        y[:n_final],
        eq11_surrogate(model, solver, final_spec),
        solver,
        on_batch=final_progress,
        **kw,
    )
    report("pgd10_solver_attack", _SOLVER_ATTACK.format(n=n, solver=solver.name))

    def solver_progress(c: Tensor) -> None:
        k = len(c)
        report("pgd10_solver_n_images", k)
        report("pgd10_solver_acc", float(c.float().mean()))
        worst = clean[:k] & inter[:k] & final[:k] & c
        report("pgd10_per_sample_worst_acc", float(worst.float().mean()))

    surrogate = SolverGradSurrogate(model, solver, steps=n)
    robust_correct(
        model, x[:n_final], y[:n_final], surrogate, solver, on_batch=solver_progress, **kw
    )
    return 0


_SOLVER_ATTACK = (
    "the served prediction's own gradient, backpropagated through the {n} {solver} steps"
)


def _extra_attack(
    args: argparse.Namespace,
    model: MDEQClassifier,
    solver: SolverConfig,
    x: Tensor,
    y: Tensor,
    key: str,
    surrogate: Callable[[Tensor], Tensor],
    described: dict[str, Any] | None = None,
) -> int:
    """One more PGD attack on an exported entry, merged into its metrics after every batch as
    ``{key}_acc``, ``{key}_n_images`` and ``{key}_seconds`` (with ``described`` besides)."""
    from deqguard.store import update_metrics

    t0 = time.monotonic()
    name = args.name or json.loads((Path(args.run) / "config.json").read_text())["name"]

    def progress(c: Tensor) -> None:
        vals: dict[str, Any] = {f"{key}_acc": float(c.float().mean()), f"{key}_n_images": len(c)}
        vals[f"{key}_seconds"] = round(time.monotonic() - t0, 1)
        print(json.dumps(vals), flush=True)
        if args.store:
            update_metrics(args.store, name, {**(described or {}), **vals})

    robust_correct(
        model,
        x,
        y,
        surrogate,
        solver,
        steps=args.steps,
        batch_size=args.batch_size,
        on_batch=progress,
    )
    return 0


def _export(
    args: argparse.Namespace,
    run_dir: Path,
    cfg: dict[str, Any],
    ckpt: dict[str, Any],
    model: MDEQClassifier,
    solver: SolverConfig,
    name: str,
    metrics: dict[str, Any],
) -> None:
    from deqguard.store import save_entry

    _, _, last = read_state(run_dir)
    training_args = {
        **cfg,
        "selected_step": int(ckpt.get("step", -1)),
        "steps_done": int(last["step"]),
        "pretrain_steps_done": int(last.get("pretrain_end", -1)),
        "training_minutes": round(float(last["elapsed_s"]) / 60, 1),
        "finished": bool(last["finished"]),
        "selection": _selection_text(args.weights, run_dir, cfg),
        "validation_history": last["history"],
        "hardware": "CPU, 1 thread per run (2-core shared machines, several sessions)",
    }
    entry = save_entry(
        args.store,
        name,
        model,
        version=args.version,
        solver_config=solver,
        training_args=training_args,
        metrics=metrics,
        dataset_fingerprint=dataset_fingerprint(cfg.get("data_root")),
        device="cpu",
        notes="CPU-budget recipe; see docs/TRAINING.md and docs/MODEL_CARD.md",
    )
    print(f"wrote {entry}", flush=True)


def _validation_metrics(weights: str, run_dir: Path, ckpt: dict[str, Any]) -> dict[str, Any]:
    """The exported weights' validation figures: the trainer's (``val_*`` beside its selected
    weights), or with ``selection`` the robustness history's it was chosen on (PGD-10 with both
    gradients); none for a snapshot without them (no NaN in a manifest)."""
    if weights == "selection":
        sel = read_selection(run_dir)
        return {
            "val_clean_acc": sel["clean"],
            "val_pgd10_acc": sel["pgd10_unrolled"],
            "val_pgd10_solver_acc": sel["pgd10_solver"],
            "val_n_images": sel["n"],
        }
    out = {}
    if "val_pgd" in ckpt:
        out["val_pgd10_acc"] = float(ckpt["val_pgd"])
    if "val_clean" in ckpt:
        out["val_clean_acc"] = float(ckpt["val_clean"])
    return out


def _selection_text(weights: str, run_dir: Path, cfg: dict[str, Any]) -> str:
    """How the exported weights were chosen (the manifest's ``training_args.selection``)."""
    trainer = (
        f"best val PGD-10 on the first {cfg['val_samples']} images of the held-out validation"
        " split (the trainer's selection)"
    )
    if weights == "best":
        return trainer
    if weights == "selection":
        sel = read_selection(run_dir)
        return f"{sel['rule']}: {sel['reason']} (weights {sel['weights']})"
    return f"weights {weights}, chosen by hand (not a validation selection)"


if __name__ == "__main__":
    raise SystemExit(main())
