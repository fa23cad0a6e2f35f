"""The audit engine: batch by batch, resumable, cancellable, shardable.

:class:`AuditRunner` computes one batch at a time (:meth:`AuditRunner.run_batch`) into a
JSON-serialisable record; :meth:`AuditRunner.run` is the one loop over the batches (the
command line's and the service's): it reports progress, checks a cancellation callback between
batches, saves the finished batches through an :class:`~deqguard.audit.store.AuditStore` after
each one (a JSON state file for ``state_path``; the service's job table) and skips them when
started again, so a cancelled or killed audit resumes to the uninterrupted result. Every random
draw is seeded by (seed, batch, attack). With a :class:`~deqguard.audit.gate.DeviceGate`, every
f-evaluation of the audited model passes the gate first, so the audit can share the device.
Under ``torchrun`` (or with ``shard=(rank, world)``) each process takes every world-th batch and
rank 0 gathers the records and writes the report.

With ``config.cascade`` each attack runs only on the batch's images that every earlier attack
of its family (:func:`~deqguard.audit.config.attack_family`) left correct, and its record says
which it ran on (``ran``); the others count as fooled, so its row is cumulative within the family.

Sanity checks (standard ones for evaluating a defense, Carlini et al. 2019): each batch also
attacks its images among the first ``sanity_images`` of the audit that are attacked at all (so
the subset, and each batch's record, depend only on (config, batch index)) with a white-box PGD
through the served pipeline (:class:`ServedSurrogate`: BPDA through the defense when it is on,
the undefended served prediction otherwise; every iterate judged by the served prediction, the
first fooling one kept), k = ``pgd_steps``:

- ``large_eps``: eps = ``sanity_eps`` (32/255), 2k steps of 2.5 eps / 2k, 1 restart;
- ``pgd``: the audit's eps, k steps of ``pgd_step_size``, 1 restart;
- ``pgd_more_steps``: 4k steps of half that step size, the same random start;
- ``pgd_more_restarts``: ``pgd`` plus 2 more random restarts on the images it left correct.

About 7-8k white-box steps on the subset. The report turns them into checks (see
:func:`deqguard.audit.report.sanity_checks`).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from deqguard.attacks import (
    AutoAttackConfig,
    IntermediateSpec,
    IntermediateSurrogate,
    PGDConfig,
    ServedSurrogate,
    SolverGradSurrogate,
    SurrogateDecision,
    apgd_attack,
    pgd_attack,
    run_autoattack,
    square_attack,
)
from deqguard.attacks.surrogates import DefenseGrad
from deqguard.audit.config import AttackPlan, AuditConfig, build_suite, full_suite
from deqguard.audit.gate import DeviceGate, gate_model
from deqguard.audit.report import build_report
from deqguard.audit.store import AuditStore, StateFile
from deqguard.configs import SolverConfig
from deqguard.defense import DefenseParams, DefenseResult, defended_forward, served_logits
from deqguard.dynamics import deq_forward
from deqguard.models.mdeq import MDEQClassifier

__all__ = ["AuditCancelled", "AuditRunner", "Progress", "sanity_runs"]

Progress = Callable[[dict[str, Any]], None]
"""Called after each batch with {"done", "total", "batch", "elapsed_s", "clean_correct", ...}."""


class AuditCancelled(Exception):
    """Raised by run() when should_cancel() said so between batches, or by a gate to stop
    mid-batch (finished batches are saved; the one in progress is discarded)."""


def _seed(*parts: int) -> int:
    h = 0x9E3779B9
    for p in parts:
        h = (h * 1_000_003 + int(p) + 1) % (2**31 - 1)
    return h


class _PartialSaver:
    """``run_batch``'s checkpoint: saves batch ``index``'s partial record with the others, at
    most every ``every_s`` (each save rewrites the whole state)."""

    def __init__(
        self, store: AuditStore, done: dict[int, Any], index: int, before_s: float, every_s: float
    ) -> None:
        self.store, self.done, self.index = store, done, index
        self.before_s, self.every_s = before_s, every_s
        self.start = self.last = time.perf_counter()

    def __call__(self, record: dict[str, Any]) -> None:
        now = time.perf_counter()
        if now - self.last >= self.every_s:
            self.done[self.index] = record
            self.store.save(self.done, self.before_s + now - self.start)
            self.last = now


def _grid_score(rec: dict[str, Any], cascade: bool) -> float | None:
    """How strong one grid attack was on its batch (lower: stronger): its robust count, or
    under a cascade its robust fraction among the images it ran on (None: it ran on none)."""
    if not cascade:
        return float(sum(rec["correct"]))
    ran = [i for i, r in enumerate(rec["ran"]) if r]
    return sum(bool(rec["correct"][i]) for i in ran) / len(ran) if ran else None


@dataclass
class AuditRunner:
    """One audit. Pass ``model`` (and optionally ``images``/``labels``) to skip the store and
    the dataset (tests, the service's private model copy); it is then the copy judged, whatever
    ``config.model_form`` says (from the store: ``model_form``'s copy). ``gate`` routes every f-evaluation
    of ``model`` through it (the object is changed: pass a private copy)."""

    config: AuditConfig
    model: MDEQClassifier | None = None
    images: Tensor | None = None  # [n, 3, 32, 32] float in [0, 1]
    labels: Tensor | None = None  # [n] int64
    solver: SolverConfig | None = None
    model_info: dict[str, Any] = field(default_factory=dict)
    transfer_model: MDEQClassifier | None = None
    gate: DeviceGate | None = None

    def __post_init__(self) -> None:
        cfg = self.config
        if self.model is None:
            from deqguard.store import default_store_root, load_entry

            root = cfg.store_root or default_store_root()
            entry = load_entry(root, cfg.model, cfg.device, inference=cfg.served_copy)
            self.model = entry.model
            self.solver = self.solver or entry.manifest.solver
            self.model_info = {
                "ref": entry.manifest.ref,
                "sha256": entry.sha256,
                "config": entry.manifest.model_config,
            }
        self.model.eval()
        if self.gate is not None:
            gate_model(self.model, self.gate.acquire)
        self.model_info.setdefault("ref", cfg.model)
        if self.images is None or self.labels is None:
            from deqguard.data import load_test

            split = load_test(n=cfg.n)
            self.images = split.float_images(cfg.device)
            self.labels = split.labels.to(cfg.device)
        self.images, self.labels = self.images[: cfg.n], self.labels[: cfg.n]
        if cfg.transfer_from and self.transfer_model is None:
            from deqguard.store import default_store_root, load_entry

            root = cfg.store_root or default_store_root()
            self.transfer_model = load_entry(
                root, cfg.transfer_from, cfg.device, inference=cfg.served_copy
            ).model
        self.plans: list[AttackPlan] = build_suite(cfg)
        # each attack's seed is its place in the whole suite, so a subset reproduces it
        self._seed_index = {p.name: i for i, p in enumerate(full_suite(cfg))}

    # ------------------------------------------------------------------ structure
    @property
    def total_batches(self) -> int:
        assert self.labels is not None
        return -(-len(self.labels) // self.config.batch_size)

    def batch(self, index: int) -> tuple[Tensor, Tensor]:
        assert self.images is not None and self.labels is not None
        bs = self.config.batch_size
        return self.images[index * bs : (index + 1) * bs], self.labels[
            index * bs : (index + 1) * bs
        ]

    def _defended(self, x: Tensor) -> DefenseResult:
        assert self.model is not None
        return defended_forward(
            self.model,
            x,
            self.config.defense_params,
            self.solver,
            steps=self.config.steps,
            trace=True,
        )

    # ------------------------------------------------------------------ one batch
    def _record(self, x_adv: Tensor, y: Tensor, clean_states: Tensor) -> dict[str, Any]:
        """Defended decision, entropies and state deviation on one attack's output.

        ``clean_states``: the defended trajectory on the clean images [N, b, D].
        """
        assert self.model is not None
        res = self._defended(x_adv)
        und = deq_forward(self.model, x_adv, self.solver, steps=self.config.steps).step_entropy
        assert res.trace is not None and und is not None
        zc, za = clean_states, res.trace.states  # [N, b, D]
        dev = (za - zc).flatten(2).norm(dim=2) / zc.flatten(2).norm(dim=2).clamp_min(1e-12)
        return {
            "correct": (res.prediction == y).tolist(),
            "entropy": res.entropy.tolist(),
            "step_entropy_sum": res.step_entropy.sum(1).tolist(),
            "undefended_step_entropy_sum": und.sum(1).tolist(),
            "state_dev_sum": dev.sum(1).tolist(),
        }

    @staticmethod
    def _scatter(sub: dict[str, Any], idx: list[int], base: dict[str, list[Any]]) -> dict[str, Any]:
        """The attacked subset's per-sample lists spread over the whole batch: an image that was
        not attacked keeps its clean value (its adversarial example is itself). The per-step
        sums stay sums over the attacked images."""
        out = dict(sub)
        for key, clean in base.items():
            full = list(clean)
            for j, i in enumerate(idx):
                full[i] = sub[key][j]
            out[key] = full
        return out

    def _served(self, grad: str) -> ServedSurrogate | SolverGradSurrogate:
        """The straight-through surrogate of the served prediction: undefended (R = 0, the same
        state) for ``grad == "undefended"`` (its gradient unrolled from the served state) and
        ``"solver"`` (backpropagated through the solver), else through the defense by
        ``grad``."""
        assert self.model is not None
        cfg = self.config
        params = cfg.defense_params
        if grad == "solver":
            return SolverGradSurrogate(self.model, self.solver, steps=cfg.steps, state=params.state)
        mode: DefenseGrad = "exact" if grad == "exact" else "bpda"
        if grad != "undefended" and cfg.defended_grad == "solver":
            return SolverGradSurrogate(
                self.model, self.solver, steps=cfg.steps, params=params, grad=mode
            )
        if grad == "undefended":  # nothing to differentiate through at R = 0
            params = DefenseParams(**{**params.to_dict(), "R": 0})
        return ServedSurrogate(
            self.model, params, self.solver, steps=cfg.steps, grad=mode, ka=cfg.adaptive_ka
        )

    def _white_box(self) -> ServedSurrogate | SolverGradSurrogate:
        """The sanity checks' white-box surrogate: through the defense (BPDA) when it is on,
        else the undefended one with the configured gradient."""
        cfg = self.config
        if cfg.defense_params.active:
            return self._served("bpda")
        return self._served("solver" if cfg.undefended_grad == "solver" else "undefended")

    def _attack(
        self,
        plan: AttackPlan,
        a: int,
        index: int,
        x: Tensor,
        y: Tensor,
        strongest: IntermediateSpec | None,
    ) -> Tensor:
        """The adversarial batch of one plan."""
        cfg, model = self.config, self.model
        assert model is not None
        seed = _seed(cfg.seed, index, a)
        gen = torch.Generator().manual_seed(seed)
        params = cfg.defense_params

        def decide(v: Tensor) -> Tensor:
            return served_logits(model, v, params, self.solver, steps=cfg.steps)

        if plan.kind == "pgd":
            pgd = PGDConfig(
                eps=cfg.eps,
                steps=plan.iters,
                step_size=cfg.pgd_step_size,
                restarts=plan.restarts,
                every_iterate=cfg.pgd_every_iterate,
            )
            if plan.grad == "eq11":  # judged by the defended prediction
                assert plan.spec is not None
                sur = IntermediateSurrogate(model, plan.spec, self.solver)
                return pgd_attack(sur, x, y, pgd, decider=decide, generator=gen).x_adv
            if plan.grad == "source-model":  # picked by the source model's own surrogate
                assert plan.spec is not None and self.transfer_model is not None
                sur = IntermediateSurrogate(self.transfer_model, plan.spec, self.solver)
                return pgd_attack(sur, x, y, pgd, generator=gen).x_adv
            # straight-through: judged by the served prediction at every iterate, for free
            return pgd_attack(self._served(plan.grad), x, y, pgd, generator=gen).x_adv
        if plan.kind in ("apgd-ce", "apgd-t"):
            x_adv, _ = apgd_attack(
                self._served(plan.grad),
                x,
                y,
                loss="ce" if plan.kind == "apgd-ce" else "targeted",
                eps=cfg.eps,
                n_iter=plan.iters,
                n_restarts=plan.restarts,
                n_target_classes=plan.targets,
                seed=seed,
            )
            return x_adv
        if plan.kind == "autoattack":
            spec = strongest or IntermediateSpec(max(1, cfg.steps // 2), 5, 0.5)
            sur = IntermediateSurrogate(model, spec, self.solver)
            aa = AutoAttackConfig(
                eps=cfg.eps,
                version=cfg.aa_version,
                attacks=cfg.aa_attacks,
                seed=seed,
                apgd_iters=cfg.aa_apgd_iters,
                square_queries=None if cfg.square_queries == 5000 else cfg.square_queries,
            )
            x_adv, _ = run_autoattack(SurrogateDecision(decide, sur), x, y, aa, batch_size=len(y))
            return x_adv
        if plan.kind == "square":
            x_adv, _ = square_attack(
                decide, x, y, eps=cfg.eps, queries=plan.iters, seed=seed, batch_size=len(y)
            )
            return x_adv
        raise ValueError(f"unknown attack kind {plan.kind!r}")

    def _sanity(self, index: int, x: Tensor, y: Tensor) -> dict[str, list[bool]]:
        """The sanity runs on x [b, ...] (see the module docstring): per run, correct [b]."""
        cfg = self.config
        wb = self._white_box()
        runs = sanity_runs(cfg)

        def gen(run: int) -> torch.Generator:
            return torch.Generator().manual_seed(_seed(cfg.seed, index, 100_000 + run))

        big, base, longer = runs["large_eps"], runs["pgd"], runs["pgd_more_steps"]
        out = {"large_eps": pgd_attack(wb, x, y, big, generator=gen(0)).correct}
        g1 = gen(1)
        short = pgd_attack(wb, x, y, base, generator=g1).correct
        out["pgd"] = short
        out["pgd_more_steps"] = pgd_attack(wb, x, y, longer, generator=gen(1)).correct
        more = short.clone()
        left = short.nonzero().squeeze(1)
        extra = runs["pgd_more_restarts"]
        if left.numel() and extra.restarts > 1:  # the further restarts: g1 continues after
            extra = replace(extra, restarts=extra.restarts - 1)  # restart 1's draw
            more[left] = pgd_attack(wb, x[left], y[left], extra, generator=g1).correct
        out["pgd_more_restarts"] = more
        return {name: c.tolist() for name, c in out.items()}

    def run_batch(
        self,
        index: int,
        should_cancel: Callable[[], bool] | None = None,
        *,
        resume: dict[str, Any] | None = None,
        checkpoint: Callable[[dict[str, Any]], None] | None = None,
    ) -> dict[str, Any]:
        """The record of batch ``index``: labels, clean results and one entry per plan.

        Only the images the defended model gets right are attacked unless
        ``config.attack_misclassified``; the others keep x_adv = x. ``should_cancel`` is also
        polled between attacks (a cancelled batch is discarded unless checkpointed).
        ``checkpoint`` is called after every attack but the last with the batch's record so
        far (``"partial": True``); passed back as ``resume``, such a record skips the attacks it
        holds (each attack's randomness is seeded by (seed, batch, attack), so the result is the
        uninterrupted one) and its sanity runs; one whose attacked images differ from this
        run's clean decisions (another machine's rounding) is discarded and the batch redone.
        """
        assert self.model is not None
        x, y = self.batch(index)
        clean_res = self._defended(x)
        und = deq_forward(self.model, x, self.solver, steps=self.config.steps).step_entropy
        assert und is not None and clean_res.trace is not None
        clean_ok = clean_res.prediction == y
        attacked = torch.ones_like(clean_ok) if self.config.attack_misclassified else clean_ok
        idx = attacked.nonzero().flatten()
        idx_list = idx.tolist()
        xs, ys, zc = x[idx], y[idx], clean_res.trace.states[:, idx]
        base: dict[str, list[Any]] = {
            "correct": clean_ok.tolist(),
            "entropy": clean_res.entropy.tolist(),
        }
        empty = {  # the per-step sums of a batch with nothing to attack
            "step_entropy_sum": [0.0] * clean_res.step_entropy.shape[0],
            "undefended_step_entropy_sum": [0.0] * und.shape[0],
            "state_dev_sum": [0.0] * clean_res.trace.states.shape[0],
        }
        if resume is not None and resume.get("attacked") != attacked.tolist():
            # another machine's rounding flipped a clean decision: start the batch over
            resume = None
        sanity: dict[str, Any] | None = None if resume is None else resume.get("sanity")
        start = index * self.config.batch_size
        sane = [j for j, i in enumerate(idx_list) if start + i < self.config.sanity_images]
        if sane and resume is None:
            t0 = time.perf_counter()
            sel = torch.tensor(sane, dtype=torch.long, device=xs.device)
            runs = self._sanity(index, xs[sel], ys[sel])
            sanity = {
                "rows": [idx_list[j] for j in sane],
                "runs": runs,
                "seconds": time.perf_counter() - t0,
            }
        records: list[dict[str, Any]] = [] if resume is None else list(resume["attacks"])
        strongest: IntermediateSpec | None = None
        best: float | None = None
        cascade = self.config.cascade
        alive: dict[str, Tensor] = {}  # cascade: family -> [len(idx)] bool, still robust

        def record_of(partial: bool) -> dict[str, Any]:
            return {
                "index": index,
                "labels": y.tolist(),
                "clean_correct": clean_ok.tolist(),
                "attacked": attacked.tolist(),
                "clean_entropy": clean_res.entropy.tolist(),
                "clean_step_entropy_sum": clean_res.step_entropy[:, idx].sum(1).tolist(),
                "clean_undefended_step_entropy_sum": und[:, idx].sum(1).tolist(),
                "attacks": list(records),
                **({} if sanity is None else {"sanity": sanity}),
                **({"partial": True} if partial else {}),
            }

        for a, plan in enumerate(self.plans):
            live = alive.setdefault(plan.family, torch.ones(len(idx_list), dtype=torch.bool))
            if a < len(records):  # done before a stop: only what the later attacks need
                rec = records[a]
            else:
                if should_cancel is not None and should_cancel():
                    raise AuditCancelled(f"cancelled during batch {index}")
                rec = self._attack_record(plan, a, index, xs, ys, zc, idx_list, live, base,
                                          empty, strongest, len(y))  # fmt: skip
                records.append(rec)
            if cascade:  # the family's survivors: robust to every attack of it so far
                live &= torch.tensor([bool(rec["correct"][i]) for i in idx_list], dtype=torch.bool)
            if plan.kind == "pgd" and plan.grad == "eq11":
                # the batch's strongest grid surrogate (AutoAttack's gradient): fewest robust;
                # under a cascade, the lowest robust fraction among the images it ran on
                score = _grid_score(rec, cascade)
                if score is not None and (best is None or score < best):
                    best, strongest = score, plan.spec
            if checkpoint is not None and a >= len(records) - 1 and a + 1 < len(self.plans):
                checkpoint(record_of(partial=True))
        return record_of(partial=False)

    def _attack_record(
        self,
        plan: AttackPlan,
        a: int,
        index: int,
        xs: Tensor,
        ys: Tensor,
        zc: Tensor,
        idx_list: list[int],
        live: Tensor,
        base: dict[str, list[Any]],
        empty: dict[str, list[float]],
        strongest: IntermediateSpec | None,
        batch: int,
    ) -> dict[str, Any]:
        """One attack's record over the batch (``batch`` images): on the attacked images
        (``xs``, ``ys``, clean states ``zc``; batch positions ``idx_list``), or under a cascade
        on those still ``live`` [len(idx_list)] in the attack's family."""
        t0 = time.perf_counter()
        cascade = self.config.cascade
        if cascade:  # only the images every earlier attack of the family left correct
            pos = live.nonzero().flatten()
            rows = [idx_list[j] for j in pos.tolist()]
            sel = pos.to(xs.device)
            xa, ya, za = xs[sel], ys[sel], zc[:, sel]
        else:
            rows, xa, ya, za = idx_list, xs, ys, zc
        if rows:
            seed_a = self._seed_index.get(plan.name, a)
            x_adv = self._attack(plan, seed_a, index, xa, ya, strongest)
            if (x_adv - xa).abs().max() > self.config.eps + 1e-6:  # never report invalid
                raise RuntimeError(f"{plan.name} left the eps-ball")
            sub = self._record(x_adv, ya, za)
        else:
            sub = {"correct": [], "entropy": [], **empty}
        sub["seconds"] = time.perf_counter() - t0
        rec = self._scatter(sub, rows, base)
        if cascade:
            ran = set(rows)
            for i in idx_list:  # fooled by an earlier attack of the family: not robust
                if i not in ran:
                    rec["correct"][i] = False
            rec["ran"] = [i in ran for i in range(batch)]
        return rec

    # ------------------------------------------------------------------ driving
    def _fingerprint(self) -> dict[str, Any]:
        return {
            "config": self.config.to_dict(),
            "model": self.model_info,
            "plans": [p.to_dict() for p in self.plans],
        }

    def state_file(self, path: str | os.PathLike[str]) -> StateFile:
        """The JSON store of this audit's records at ``path``."""
        return StateFile(path, self._fingerprint())

    def load_state(self, path: str | os.PathLike[str]) -> dict[int, dict[str, Any]]:
        """The batch records saved at ``path`` (empty when absent); refuses another audit's."""
        return self.state_file(path).load()[0]

    def run(
        self,
        *,
        progress: Progress | None = None,
        should_cancel: Callable[[], bool] | None = None,
        state_path: str | os.PathLike[str] | None = None,
        store: AuditStore | None = None,
        shard: tuple[int, int] | None = None,
        checkpoint_attacks: bool = False,
        checkpoint_every_s: float = 60.0,
    ) -> dict[str, Any]:
        """Run (or resume) the audit and return the report (rank 0 under sharding; other
        ranks return their partial report). Raises AuditCancelled after saving.

        Records persist through ``store``, or a :class:`StateFile` at ``state_path`` (one per
        rank under sharding); the report's ``elapsed_s`` is the compute time of every batch,
        earlier sessions included. With ``checkpoint_attacks`` the store also gets the batch
        in progress after an attack (a record marked ``partial``; at most every
        ``checkpoint_every_s``, since each save rewrites the whole state), so a stopped audit
        loses about that much and the attack it was running, not the batch; the report counts
        finished batches only."""
        rank, world = shard if shard is not None else _dist_shard()
        if store is None and state_path is not None:
            path = Path(state_path)
            if world > 1:
                path = path.with_name(f"{path.stem}.rank{rank}{path.suffix}")
            store = self.state_file(path)
        done, compute_s = store.load() if store is not None else ({}, 0.0)
        mine = [b for b in range(self.total_batches) if b % world == rank]
        start = time.perf_counter()
        try:
            for b in mine:
                resume = done.get(b)
                if resume is not None and not resume.get("partial"):
                    continue
                if should_cancel is not None and should_cancel():
                    raise AuditCancelled(f"cancelled before batch {b} ({len(done)} batches saved)")
                if self.gate is not None:
                    self.gate.acquire()
                t0 = time.perf_counter()
                checkpoint = (
                    _PartialSaver(store, done, b, compute_s, checkpoint_every_s)
                    if checkpoint_attacks and store is not None
                    else None
                )
                done[b] = self.run_batch(b, should_cancel, resume=resume, checkpoint=checkpoint)
                if self.gate is not None:
                    self.gate.release()  # no device work until the next acquire
                compute_s += time.perf_counter() - t0
                if store is not None:
                    store.save(done, compute_s)
                if progress is not None:
                    progress(
                        {
                            "done": len(done),
                            "total": len(mine),
                            "batch": b,
                            "elapsed_s": time.perf_counter() - start,
                            "clean_correct": sum(done[b]["clean_correct"]),
                            "batch_size": len(done[b]["labels"]),
                        }
                    )
        finally:
            if self.gate is not None:
                self.gate.release()  # whatever happened, free the device
        records = list(done.values())
        if world > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            gathered: list[Any] = [None] * world
            torch.distributed.all_gather_object(gathered, records)
            records = [r for part in gathered for r in part]
        return self.report(records, elapsed_s=compute_s)

    def non_standard(self) -> list[str]:
        """Why this audit is not the standard evaluation of its suite (empty: it is)."""
        cfg = self.config
        kinds = {p.kind for p in self.plans}
        out = []
        full = full_suite(cfg)
        if [p.to_dict() for p in self.plans] != [p.to_dict() for p in full]:
            ran = {p.name for p in self.plans}
            left = [p.name for p in full if p.name not in ran]
            out.append(
                f"only {len(self.plans)} of the suite's {len(full)} attacks were run"
                + (f" (left out: {', '.join(left)})" if left and len(left) <= 12 else "")
            )
        if cfg.suite == "paper" and not cfg.autoattack:
            out.append("AutoAttack not run (--no-autoattack): the Eq. 11 grid alone")
        if cfg.suite == "paper" and cfg.grid != "full":
            out.append(f"Eq. 11 grid subset `{cfg.grid}`, not the full 144 attacks")
        if "autoattack" in kinds and (
            cfg.aa_apgd_iters is not None
            or cfg.square_queries != 5000
            or cfg.aa_version != "standard"
        ):
            out.append("AutoAttack with non-standard budgets or attacks (see config)")
        if kinds & {"apgd-ce", "apgd-t"} and cfg.apgd_iters < 100:
            out.append(f"APGD with {cfg.apgd_iters} iterations (standard: 100)")
        if "apgd-t" in kinds and cfg.apgd_targets < 3:
            out.append(f"APGD-T on {cfg.apgd_targets} target class(es) (at least 3 expected)")
        if "square" in kinds and cfg.square_queries != 5000:
            out.append(f"Square with {cfg.square_queries} queries (standard: 5000)")
        if "pgd" in kinds and cfg.pgd_steps != 10:
            out.append(f"PGD-{cfg.pgd_steps} instead of PGD-10")
        if "pgd" in kinds and not cfg.pgd_every_iterate:
            out.append("PGD judged on its last iterate only (--pgd-last-iterate)")
        if cfg.sanity_images == 0:
            out.append("sanity checks not run (sanity_images = 0)")
        return out

    def report(self, records: list[dict[str, Any]], elapsed_s: float = 0.0) -> dict[str, Any]:
        records = [r for r in records if not r.get("partial")]  # a batch in progress: not yet
        cfg = self.config
        non_standard = self.non_standard()
        notes = list(non_standard)
        if not cfg.attack_misclassified:
            notes.append(
                "only images the defended model classifies correctly were attacked (the others"
                " count as non-robust); P, Delta H and the curves are over the attacked images"
            )
        if cfg.cascade:
            notes.append(
                "cascade: each attack ran only on the images every earlier attack of its family"
                " (adaptive, autoattack, intermediate, pgd) left correct (n_ran: how many), so"
                " its robust figure is cumulative within the family: robust to it and to every"
                " earlier one; a family's last row is its per-sample worst case, and the"
                " minimum over attacks is at most the strongest single attack's figure"
            )
        wb = "BPDA through the defense" if cfg.defense_params.active else "the undefended model"
        sanity_setup = {
            "images": min(cfg.sanity_images, cfg.n),
            "subset": f"the attacked images among the first {min(cfg.sanity_images, cfg.n)}",
            "attack": (
                f"white-box PGD on the served prediction ({wb}; straight-through, every"
                " iterate judged by the served prediction, the first fooling one kept)"
            ),
            "runs": {
                name: {"eps": r.eps, "steps": r.steps, "restarts": r.restarts,
                       "step_size": r.step_size}
                for name, r in sanity_runs(cfg).items()
            },
            "defense_active": cfg.defense_params.active,
        }  # fmt: skip
        return build_report(
            cfg.to_dict(),
            self.model_info,
            [p.to_dict() for p in self.plans],
            records,
            total_batches=self.total_batches,
            elapsed_s=elapsed_s,
            notes=notes,
            non_standard=non_standard,
            sanity_setup=sanity_setup,
        )


def sanity_runs(cfg: AuditConfig) -> dict[str, PGDConfig]:
    """The sanity checks' white-box PGD runs (k = ``pgd_steps``, at least 1; see the module
    docstring). ``pgd_more_restarts`` shares its first restart with ``pgd``."""
    k = max(1, cfg.pgd_steps)
    big = cfg.sanity_eps
    return {
        "large_eps": PGDConfig(eps=big, steps=2 * k, step_size=2.5 * big / (2 * k)),
        "pgd": PGDConfig(eps=cfg.eps, steps=k, step_size=cfg.pgd_step_size),
        "pgd_more_steps": PGDConfig(eps=cfg.eps, steps=4 * k, step_size=cfg.pgd_step_size / 2),
        "pgd_more_restarts": PGDConfig(
            eps=cfg.eps, steps=k, step_size=cfg.pgd_step_size, restarts=3
        ),
    }


def _dist_shard() -> tuple[int, int]:
    """(rank, world) from torchrun's environment; initialises a gloo group when world > 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("gloo")
    return torch.distributed.get_rank(), world
