"""`deqguard audit`: audit a store entry and a defense; writes report.json, plots, summary.md.

Example::

    deqguard audit micro-trades --defense paper --suite quick -n 64 --out docs/audits/x
    torchrun --nproc_per_node 2 -m deqguard.audit.cli micro-trades --suite paper -n 1000 --out ...
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from deqguard.audit.config import GRAD_PATHS, MODEL_FORMS, SUITES, AuditConfig
from deqguard.audit.engine import AuditCancelled, AuditRunner
from deqguard.audit.plots import write_plots
from deqguard.audit.report import markdown_summary
from deqguard.configs import DEFAULT_SOLVER_STEPS
from deqguard.cpu_memory import retain_freed_memory
from deqguard.defense import DefenseParams, defense_from_spec, list_presets


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="deqguard audit", description=__doc__.splitlines()[0])
    p.add_argument("model", help="model store reference name[@version]")
    p.add_argument("--store", default=None, help="model store root (default: model_store/)")
    p.add_argument(
        "--defense",
        default="paper",
        help=f"preset ({', '.join(list_presets())}) or JSON of DefenseParams fields, optionally"
        " with `preset` as the base (default paper)",
    )
    p.add_argument("--suite", default="quick", choices=SUITES)
    p.add_argument("-n", type=int, default=1000, help="first n test images (official order)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=DEFAULT_SOLVER_STEPS, help="solver steps N")
    p.add_argument("--pgd-steps", type=int, default=10)
    p.add_argument("--pgd-restarts", type=int, default=1)
    p.add_argument(
        "--pgd-last-iterate",
        action="store_true",
        help="judge PGD on its last iterate only (the paper's protocol; non-standard)",
    )
    p.add_argument("--apgd-iters", type=int, default=100, help="APGD iterations (standard: 100)")
    p.add_argument("--apgd-targets", type=int, default=3, help="APGD-T target classes")
    p.add_argument(
        "--bpda-targets", type=int, default=3, help="target classes of quick's BPDA APGD-T"
    )
    p.add_argument("--adaptive-restarts", type=int, default=3, help="APGD-CE restarts (adaptive)")
    p.add_argument(
        "--adaptive-pgd-steps",
        type=int,
        default=50,
        help="steps of the PGD through the defense, BPDA and exact (adaptive; 0: not run)",
    )
    p.add_argument(
        "--adaptive-pgd-restarts", type=int, default=5, help="restarts of that PGD (adaptive)"
    )
    p.add_argument(
        "--sanity-images",
        type=int,
        default=32,
        help="sanity checks on the attacked images among the first N (0: off, non-standard)",
    )
    p.add_argument(
        "--grid",
        default="full",
        help="Eq. 11 subset for the paper suite (full, half, states, sweep, quick)",
    )
    p.add_argument("--no-autoattack", action="store_true", help="paper suite without AutoAttack")
    p.add_argument(
        "--aa-attacks",
        default="",
        help="comma-separated custom AutoAttack list (default: standard)",
    )
    p.add_argument("--aa-apgd-iters", type=int, default=None)
    p.add_argument("--square-queries", type=int, default=5000)
    p.add_argument("--transfer-from", default=None, help="store entry to craft transfer attacks on")
    p.add_argument(
        "--attack-misclassified",
        action="store_true",
        help="also attack images the defended model gets wrong (default: skip, as AutoAttack does)",
    )
    p.add_argument(
        "--cascade",
        action="store_true",
        help="run each attack only on the images every earlier attack of its family left"
        " correct, as AutoAttack does (fewer images per attack; per-attack figures become"
        " cumulative within a family; the per-sample worst case is unchanged)",
    )
    p.add_argument(
        "--undefended-grad",
        default="unrolled",
        choices=GRAD_PATHS,
        help="gradient of the attacks on the undefended served prediction: unrolled (Ka damped"
        " steps from the served state; default) or solver (backpropagated through the N solver"
        " steps: the prediction's own gradient, for dynamics that do not converge)",
    )
    p.add_argument(
        "--defended-grad",
        default="unrolled",
        choices=GRAD_PATHS,
        help="the same for the attacks through the defense (BPDA, exact): unrolled (Ka steps"
        " from the defended state; default) or solver (every step of the defended dynamics)",
    )
    p.add_argument(
        "--model-form",
        default="served",
        choices=MODEL_FORMS,
        help="the model copy attacked and judged: served (the service's eval-only copy,"
        " BatchNorm folded; default) or training (the module as trained: what audits begun"
        " before this option ran, so they resume only with it)",
    )
    p.add_argument(
        "--attacks",
        default="",
        help="comma-separated names: run only these attacks of the suite (each with the seed it"
        " has in the whole suite; non-standard alone, combine with `deqguard audit-table`)",
    )
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument(
        "--partial",
        action="store_true",
        help="do not run: write the report of the batches already saved in OUT/state.json",
    )
    p.add_argument("--quiet", action="store_true")
    return p


def _defense(text: str) -> str | DefenseParams:
    """A preset name, or JSON fields (optionally with ``preset``) resolved by the core."""
    return defense_from_spec(json.loads(text) if text.lstrip().startswith("{") else text)


def config_from_args(args: argparse.Namespace) -> AuditConfig:
    """The AuditConfig of parsed arguments (ValueError / JSONDecodeError on a bad value)."""
    aa = tuple(a for a in args.aa_attacks.split(",") if a)
    return AuditConfig(
        model=args.model,
        store_root=args.store,
        defense=_defense(args.defense),
        suite=args.suite,
        n=args.n,
        batch_size=args.batch_size,
        seed=args.seed,
        steps=args.steps,
        pgd_steps=args.pgd_steps,
        pgd_restarts=args.pgd_restarts,
        pgd_every_iterate=not args.pgd_last_iterate,
        apgd_iters=args.apgd_iters,
        apgd_targets=args.apgd_targets,
        bpda_targets=args.bpda_targets,
        adaptive_restarts=args.adaptive_restarts,
        attacks=tuple(a for a in args.attacks.split(",") if a),
        adaptive_pgd_steps=args.adaptive_pgd_steps,
        adaptive_pgd_restarts=args.adaptive_pgd_restarts,
        sanity_images=args.sanity_images,
        grid=args.grid,
        autoattack=not args.no_autoattack,
        aa_version="custom" if aa else "standard",
        aa_attacks=aa,
        aa_apgd_iters=args.aa_apgd_iters,
        square_queries=args.square_queries,
        transfer_from=args.transfer_from,
        attack_misclassified=args.attack_misclassified,
        device=args.device,
        cascade=args.cascade,
        undefended_grad=args.undefended_grad,
        defended_grad=args.defended_grad,
        model_form=args.model_form,
    )


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = _parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    except SystemExit as exc:  # --help (0) or a usage error (2): an exit code, not an exit
        return int(exc.code or 0)
    retain_freed_memory()  # attacks run thousands of forwards: reuse pages (cpu_memory)
    try:
        cfg = config_from_args(args)
    except (ValueError, json.JSONDecodeError) as exc:
        print(f"deqguard audit: {exc}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runner = AuditRunner(cfg)

    def progress(info: dict[str, Any]) -> None:
        if not args.quiet:
            print(
                f"batch {info['batch']}: {info['done']}/{info['total']} done, {info['elapsed_s']:.0f} s",
                file=sys.stderr,
                flush=True,
            )

    try:
        if args.partial:
            done, elapsed = runner.state_file(out / "state.json").load()
            if not done:
                print(f"deqguard audit: no saved batches in {out / 'state.json'}", file=sys.stderr)
                return 2
            previous = out / "report.json"  # a state file from before it kept compute time
            if not elapsed and previous.exists():
                elapsed = json.loads(previous.read_text())["elapsed_s"]
            report = runner.report(list(done.values()), elapsed_s=elapsed)
        else:
            report = runner.run(
                progress=progress, state_path=out / "state.json", checkpoint_attacks=True
            )
    except AuditCancelled as exc:
        print(f"deqguard audit: {exc}", file=sys.stderr)
        return 3
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        # every rank has its records gathered: leave the group explicitly (left to interpreter
        # teardown, gloo's threads sometimes abort a rank: "terminate called without an active
        # exception", exit code -6)
        rank = dist.get_rank()
        dist.destroy_process_group()
        if rank != 0:
            return 0
    (out / "report.json").write_text(json.dumps(report, indent=1))
    plots = write_plots(report, out)
    (out / "summary.md").write_text(markdown_summary(report, plots))
    if not args.quiet:
        print(markdown_summary(report), file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
