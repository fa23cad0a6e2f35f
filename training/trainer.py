"""The training loop: clean unrolled pretraining, then PGD-AT or TRADES with the phantom gradient,
optionally on the random intermediate states of Sec. 3.3.

Design choices that make the run resumable and reproducible:

- Every step reseeds from ``(seed, step, rank)``: the data order is a permutation per epoch, the
  augmentation, attack noise, random depths and dropout masks come from per-step generators. A
  resumed run therefore draws exactly the numbers the uninterrupted run would have drawn,
  independent of when the checkpoint was written. (The RNG states are saved too, for inspection.)
- Checkpoints are written atomically (temp file + rename) every few minutes and at the end.
- Under ``torchrun`` the per-step graph runs inside one ``DistributedDataParallel`` forward
  (:class:`StepModule`), so gradients are all-reduced by DDP (gloo on CPU, NCCL on GPU).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from deqguard.attacks.training import pgd_at_attack, trades_attack
from deqguard.configs import ModelConfig, SolverConfig
from deqguard.data import (
    CifarSplit,
    augment,
    dataset_fingerprint,
    load_cifar10,
    train_val_split,
)
from deqguard.device import resolve_device
from deqguard.dynamics import deq_forward
from deqguard.gradients import jacobian_penalty, sample_depth, train_forward
from deqguard.models import MDEQClassifier, build_model
from training.checkpoint import STATE_JSON, read_state, write_best, write_state
from training.config import TrainConfig
from training.losses import pgd_at_loss, trades_loss

__all__ = [
    "Dist",
    "StepModule",
    "Trainer",
    "evaluate_pgd",
    "lr_at",
]

SCHEDULE_KEYS = (
    "model",
    "dropout",
    "method",
    "random_intermediate",
    "solver",
    "solver_steps",
    "phantom_k",
    "phantom_lambda",
    "eps",
    "attack_steps",
    "attack_step_size",
    "attack_solver_steps",
    "attack_phantom_k",
    "trades_beta",
    "jac_weight",
    "jac_prob",
    "jac_stop_epoch",
    "lr",
    "lr_min",
    "weight_decay",
    "batch_size",
    "epochs",
    "total_steps",
    "pretrain_steps",
    "schedule",
    "pretrain_fraction",
    "seed",
    "n_val",
)


def lr_at(step: int, total: int, lr: float, lr_min: float) -> float:
    """Cosine schedule stepped per iteration, no warm-up: lr at step 0, lr_min at ``total``."""
    t = min(step, total) / max(total, 1)
    return lr_min + 0.5 * (lr - lr_min) * (1 + math.cos(math.pi * t))


@dataclass
class Dist:
    """Process-group facts; world 1 without torchrun."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls, device_name: str) -> Dist:
        """Initialise the process group when launched by torchrun (WORLD_SIZE > 1)."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        rank = int(os.environ["RANK"])
        local = int(os.environ.get("LOCAL_RANK", "0"))
        use_cuda = device_name == "cuda" or (device_name == "auto" and torch.cuda.is_available())
        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if use_cuda else "gloo")
        return cls(rank=rank, world=world, local_rank=local)

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


class StepModule(nn.Module):
    """The differentiable part of one training step as a single ``forward`` (what DDP wraps).

    ``forward(inputs)`` takes a list of ``(x, depth)`` and returns one ``(logits, z_leaf,
    f_leaf)`` per input: each input gets its own forward (batch statistics are not mixed between
    natural and adversarial batches, as in the authors' code).
    """

    def __init__(self, model: MDEQClassifier, cfg: TrainConfig, solver: SolverConfig) -> None:
        super().__init__()
        self.model = model
        self.cfg = cfg
        self.solver = solver

    def forward(
        self, inputs: list[tuple[Tensor, Tensor | None]], unrolled: bool = False
    ) -> list[tuple[Tensor, Tensor | None, Tensor | None]]:
        out = []
        for x, depth in inputs:
            tf = train_forward(
                self.model,
                x,
                self.solver,
                mode="unrolled" if unrolled else "phantom",
                depth=depth,
                damped_steps=self.cfg.phantom_k,
                lam=self.cfg.phantom_lambda,
            )
            out.append((tf.logits, tf.z_leaf, tf.f_leaf))
        return out


def _autocast(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager[Any]:
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def evaluate_pgd(
    model: MDEQClassifier,
    images: Tensor,
    labels: Tensor,
    *,
    solver: SolverConfig,
    eps: float = 8 / 255,
    step_size: float = 2 / 255,
    steps: int = 10,
    phantom_k: int = 5,
    phantom_lambda: float = 0.5,
    batch_size: int = 100,
    seed: int = 0,
    amp: bool = False,
) -> tuple[float, float]:
    """(clean, PGD) accuracy of ``model`` in eval mode (model selection; not the audit).

    The attack's gradient is the phantom gradient from the N-step solution (1 plain + K damped
    steps); the decision is the head at z[N], the last raw iterate, as the evaluation reports.
    """
    was_training = model.training
    model.eval()
    device = images.device
    clean = robust = 0
    gen = torch.Generator(device=device).manual_seed(seed)

    def fwd(x: Tensor) -> Tensor:
        with _autocast(device, amp):
            return train_forward(
                model, x, solver, mode="phantom", damped_steps=phantom_k, lam=phantom_lambda
            ).logits

    for start in range(0, len(labels), batch_size):
        x = images[start : start + batch_size]
        y = labels[start : start + batch_size]
        with _autocast(device, amp):
            clean += int((deq_forward(model, x, solver, record=False).logits.argmax(1) == y).sum())
        if steps > 0:
            x_adv = pgd_at_attack(
                fwd, x, y, eps=eps, step_size=step_size, steps=steps, generator=gen
            )
            with _autocast(device, amp):
                logits = deq_forward(model, x_adv, solver, record=False).logits
            robust += int((logits.argmax(1) == y).sum())
    model.train(was_training)
    n = max(len(labels), 1)
    return clean / n, robust / n


@dataclass
class RunState:
    """What a checkpoint holds besides the model and optimizer."""

    step: int = 0
    elapsed_s: float = 0.0
    best_score: float = -1.0
    best_step: int = -1
    finished: bool = False
    pretrain_end: int = -1  # first non-pretraining step, once known
    history: list[dict[str, Any]] = field(default_factory=list)


class Trainer:
    """One training run (one process of it under torchrun)."""

    def __init__(
        self,
        cfg: TrainConfig,
        *,
        data: CifarSplit | None = None,
        model_config: ModelConfig | None = None,
    ) -> None:
        """``data``: the training set to split (default: CIFAR-10 train); ``model_config``:
        an unregistered architecture (tests use a tiny one) instead of ``cfg.model``."""
        self.cfg = cfg
        self.dist = Dist.from_env(cfg.device)
        if cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available()):
            self.device = resolve_device("cuda")
            if self.dist.world > 1:
                self.device = torch.device("cuda", self.dist.local_rank)
                torch.cuda.set_device(self.device)
        else:
            self.device = torch.device("cpu")
        if cfg.threads is not None and self.device.type == "cpu":
            torch.set_num_threads(cfg.threads)
        self.amp = cfg.bf16 and self.device.type == "cuda"

        full = data if data is not None else load_cifar10(cfg.data_root, train=True)
        self.train_split, val = train_val_split(full, n_val=cfg.n_val, seed=0)
        self.val_split = val.head(cfg.val_samples)
        self.steps_per_epoch = len(self.train_split) // (cfg.batch_size * self.dist.world)
        if self.steps_per_epoch < 1:
            raise ValueError("batch_size * world exceeds the training split")
        if cfg.total_steps is not None:
            self.total_steps = cfg.total_steps
        else:
            assert cfg.epochs is not None
            self.total_steps = math.ceil(cfg.epochs * self.steps_per_epoch)
        self.jac_stop_step = int(cfg.jac_stop_epoch * self.steps_per_epoch)

        torch.manual_seed(cfg.seed)  # identical initial weights on every rank
        overrides = {} if cfg.dropout is None else {"dropout": cfg.dropout}
        arch: ModelConfig | str = model_config if model_config is not None else cfg.model
        self.model = build_model(arch, **overrides).to(self.device)
        self.solver = SolverConfig(name=cfg.solver, max_steps=cfg.solver_steps)
        self.attack_solver = SolverConfig(
            name=cfg.solver, max_steps=cfg.attack_solver_steps or cfg.solver_steps
        )
        self.step_module: nn.Module = StepModule(self.model, cfg, self.solver)
        if self.dist.world > 1:
            self.step_module = nn.parallel.DistributedDataParallel(
                self.step_module,
                device_ids=[self.device.index] if self.device.type == "cuda" else None,
            )
        self.optimizer = torch.optim.Adam(
            self.model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay
        )
        self.state = RunState()
        self.run_dir = cfg.run_dir
        self._images = self.train_split.images.to(self.device)
        self._labels = self.train_split.labels.to(self.device)
        self._perm_epoch = -1
        self._perm: Tensor | None = None
        self._writer: Any = None

    # ------------------------------------------------------------------ randomness and data
    def _seed_for(self, step: int, salt: int, rank: int | None = None) -> int:
        r = self.dist.rank if rank is None else rank
        return (self.cfg.seed * 1_000_003 + step * 1_009 + r * 97 + salt) % (2**63 - 1)

    def _generator(self, step: int, salt: int, rank: int | None = None) -> torch.Generator:
        return torch.Generator(device=self.device).manual_seed(self._seed_for(step, salt, rank))

    def batch(self, step: int) -> tuple[Tensor, Tensor]:
        """This rank's augmented batch of optimizer step ``step`` (a function of step only)."""
        epoch, pos = divmod(step, self.steps_per_epoch)
        if epoch != self._perm_epoch:
            g = torch.Generator().manual_seed(self.cfg.seed * 7_919 + epoch)
            self._perm = torch.randperm(len(self.train_split), generator=g).to(self.device)
            self._perm_epoch = epoch
        assert self._perm is not None
        bs, w = self.cfg.batch_size, self.dist.world
        start = (pos * w + self.dist.rank) * bs
        idx = self._perm[start : start + bs]
        x = self._images[idx].to(torch.float32).div_(255)
        x = augment(x, self._generator(step, 1))
        return x, self._labels[idx]

    def _depth(self, n: int, batch: int, gen: torch.Generator) -> Tensor | None:
        ri = self.cfg.random_intermediate
        if ri == "off":
            return None
        return sample_depth(n, batch, per_sample=ri == "sample", generator=gen).to(self.device)

    # ------------------------------------------------------------------ schedule
    def progress(self, step: int) -> float:
        """Fraction of the schedule done: over steps, or over the time budget ("time")."""
        cfg = self.cfg
        if cfg.schedule == "time":
            assert cfg.time_budget_min is not None
            return min(self.state.elapsed_s / (cfg.time_budget_min * 60), 1.0)
        return min(step / max(self.total_steps, 1), 1.0)

    def lr(self, step: int) -> float:
        cfg = self.cfg
        t = self.progress(step)
        return cfg.lr_min + 0.5 * (cfg.lr - cfg.lr_min) * (1 + math.cos(math.pi * t))

    def pretraining(self, step: int) -> bool:
        """Whether ``step`` is a clean unrolled pretraining step (records the phase switch)."""
        cfg = self.cfg
        if self.state.pretrain_end >= 0:
            return step < self.state.pretrain_end
        pre = step < cfg.pretrain_steps
        if cfg.schedule == "time":
            pre = pre and self.progress(step) < cfg.pretrain_fraction
        if not pre:
            self.state.pretrain_end = step
        return pre

    # ------------------------------------------------------------------ one step
    def train_step(self, step: int) -> dict[str, float]:
        """One optimizer step; returns its scalars (loss terms, batch accuracies)."""
        cfg = self.cfg
        torch.manual_seed(self._seed_for(step, 0))  # dropout masks, Hutchinson vectors
        x, y = self.batch(step)
        gen = torch.Generator().manual_seed(self._seed_for(step, 2))  # depths, attack noise
        dev_gen = self._generator(step, 3)
        unrolled = self.pretraining(step)
        pretrain = unrolled or cfg.method == "clean"
        stats: dict[str, float] = {}
        jac_gen = torch.Generator().manual_seed(self._seed_for(step, 4, rank=0))
        use_jac = (
            not pretrain
            and cfg.jac_weight > 0
            and step < self.jac_stop_step
            and float(torch.rand((), generator=jac_gen)) < cfg.jac_prob
        )
        lr = self.lr(step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr

        if pretrain:
            depth = None if unrolled else self._depth(cfg.solver_steps, len(y), gen)
            self.model.train()
            with _autocast(self.device, self.amp):
                ((logits, _, _),) = self.step_module([(x, depth)], unrolled=unrolled)
            loss = F.cross_entropy(logits.float(), y)
            stats["clean_acc"] = float((logits.argmax(1) == y).float().mean())
            adv_logits = None
            zf = None
        else:
            x_adv = self._attack(x, y, gen, dev_gen)
            self.model.train()
            d_adv = self._depth(cfg.solver_steps, len(y), gen)
            with _autocast(self.device, self.amp):
                if cfg.method == "trades":
                    d_nat = self._depth(cfg.solver_steps, len(y), gen)
                    (nat, zl, fl), (adv_logits, _, _) = self.step_module(
                        [(x, d_nat), (x_adv, d_adv)]
                    )
                    loss = trades_loss(nat, adv_logits, y, cfg.trades_beta)
                    stats["clean_acc"] = float((nat.argmax(1) == y).float().mean())
                else:
                    ((adv_logits, zl, fl),) = self.step_module([(x_adv, d_adv)])
                    loss = pgd_at_loss(adv_logits, y)
            zf = (zl, fl)
            stats["robust_acc"] = float((adv_logits.argmax(1) == y).float().mean())
        stats["task_loss"] = float(loss.detach())
        if use_jac and zf is not None and zf[0] is not None and zf[1] is not None:
            jac = jacobian_penalty(zf[1], zf[0], n_vectors=2)
            loss = loss + cfg.jac_weight * jac
            stats["jac"] = float(jac.detach())
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.dist.world > 1 and not isinstance(
            self.step_module, nn.parallel.DistributedDataParallel
        ):
            raise RuntimeError("distributed run without DDP")
        self.optimizer.step()
        if self.dist.world > 1:
            # DDP keeps parameters in step; BN running statistics are per rank: average them.
            for buf in self.model.buffers():
                if buf.is_floating_point():
                    dist.all_reduce(buf)
                    buf.div_(self.dist.world)
        stats["loss"] = float(loss.detach())
        stats["lr"] = lr
        return stats

    def _attack(
        self, x: Tensor, y: Tensor, gen: torch.Generator, dev_gen: torch.Generator
    ) -> Tensor:
        """Training examples, built in eval mode (as in the authors' code)."""
        cfg = self.cfg
        n_att = self.attack_solver.max_steps
        k_att = cfg.attack_phantom_k if cfg.attack_phantom_k is not None else cfg.phantom_k
        self.model.eval()

        def fwd(xa: Tensor) -> Tensor:
            with _autocast(self.device, self.amp):
                return train_forward(
                    self.model,
                    xa,
                    self.attack_solver,
                    mode="phantom",
                    depth=self._depth(n_att, len(xa), gen),  # a new draw per forward call
                    damped_steps=k_att,
                    lam=cfg.phantom_lambda,
                ).logits

        if cfg.method == "trades":
            with torch.no_grad():
                nat = fwd(x)
            return trades_attack(
                fwd,
                x,
                nat,
                eps=cfg.eps,
                step_size=cfg.attack_step_size,
                steps=cfg.attack_steps,
                generator=dev_gen,
            )
        return pgd_at_attack(
            fwd,
            x,
            y,
            eps=cfg.eps,
            step_size=cfg.attack_step_size,
            steps=cfg.attack_steps,
            generator=dev_gen,
        )

    # ------------------------------------------------------------------ validation
    def validate(self) -> dict[str, float]:
        """Clean and PGD-10 accuracy on the held-out validation subset (model selection)."""
        cfg = self.cfg
        xv = self.val_split.float_images(self.device)
        yv = self.val_split.labels.to(self.device)
        clean, rob = evaluate_pgd(
            self.model,
            xv,
            yv,
            solver=self.solver,
            eps=cfg.eps,
            step_size=2 / 255,
            steps=cfg.val_pgd_steps,
            seed=cfg.seed,
            amp=self.amp,
        )
        return {"val_clean": clean, "val_pgd": rob}

    # ------------------------------------------------------------------ checkpoints
    def checkpoint_meta(self) -> dict[str, Any]:
        """Everything of the run besides the tensors (goes into ``state.json``)."""
        s = self.state
        return {
            "config": self.cfg.to_dict(),
            "step": s.step,
            "total_steps": self.total_steps,
            "epoch": s.step / self.steps_per_epoch,
            "elapsed_s": s.elapsed_s,
            "best_score": s.best_score,
            "best_step": s.best_step,
            "finished": s.finished,
            "history": s.history,
            "lr": self.lr(s.step),
            "pretrain_end": s.pretrain_end,
        }

    def save_checkpoint(self) -> Path:
        path = self.run_dir / STATE_JSON
        if self.dist.main:
            write_state(
                self.run_dir,
                model_state=self.model.state_dict(),
                optimizer_state=self.optimizer.state_dict(),
                meta=self.checkpoint_meta(),
            )
        self.dist.barrier()
        return path

    def load_checkpoint(self, run_dir: Path | None = None) -> bool:
        """Restore from ``state.safetensors`` + ``state.json``; False when there is none.
        Refuses a state written with a different schedule."""
        run_dir = run_dir or self.run_dir
        if not (run_dir / STATE_JSON).exists():
            return False
        model_sd, optim_sd, meta = read_state(run_dir)
        saved = meta["config"]
        mine = self.cfg.to_dict()
        diff = [k for k in SCHEDULE_KEYS if saved.get(k) != mine.get(k)]
        if diff:
            raise ValueError(
                f"checkpoint in '{run_dir}' was written with a different schedule "
                f"({', '.join(diff)}); resume with the same options or start a new run name"
            )
        self.model.load_state_dict(model_sd)
        self.optimizer.load_state_dict(optim_sd)
        self.state = RunState(
            step=int(meta["step"]),
            elapsed_s=float(meta["elapsed_s"]),
            best_score=float(meta["best_score"]),
            best_step=int(meta["best_step"]),
            finished=bool(meta["finished"]),
            pretrain_end=int(meta.get("pretrain_end", -1)),
            history=list(meta["history"]),
        )
        return True

    # ------------------------------------------------------------------ logging
    def _log(self, record: dict[str, Any]) -> None:
        if not self.dist.main:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        with open(self.run_dir / "metrics.jsonl", "a") as fh:
            fh.write(json.dumps(record) + "\n")
        if self._writer is None:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._writer = SummaryWriter(str(self.run_dir / "tb"))
            except ImportError:  # tensorboard is optional at run time
                self._writer = False
        if self._writer:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k != "step":
                    self._writer.add_scalar(k, v, record["step"])
            self._writer.flush()

    # ------------------------------------------------------------------ the loop
    def fit(self, *, resume: bool = False, max_new_steps: int | None = None) -> RunState:
        """Train until the schedule ends, the time budget is spent or ``max_new_steps`` ran;
        validates every ``val_every`` steps and at the end, keeps the best (val PGD) weights."""
        cfg = self.cfg
        if resume:
            self.load_checkpoint()
        if self.dist.main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
        bar = self._progress()
        signals = _StopSignals.install()
        last_ckpt = time.monotonic()
        t_prev = time.monotonic()
        new_steps = 0
        budget_s = None if cfg.time_budget_min is None else cfg.time_budget_min * 60
        while self.state.step < self.total_steps and not self.state.finished:
            if budget_s is not None and self.state.elapsed_s >= budget_s:
                break
            if max_new_steps is not None and new_steps >= max_new_steps:
                break
            if signals.stop:
                break
            step = self.state.step
            stats = self.train_step(step)
            now = time.monotonic()
            dt = now - t_prev
            t_prev = now
            self.state.elapsed_s += dt
            self.state.step += 1
            new_steps += 1
            stats["samples_per_s"] = cfg.batch_size * self.dist.world / max(dt, 1e-9)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(
                    {k: f"{v:.3g}" for k, v in stats.items() if k != "lr"}, refresh=False
                )
            if self.state.step % cfg.log_every == 0 or self.state.step == 1:
                self._log({"step": self.state.step, "elapsed_s": self.state.elapsed_s, **stats})
            if (
                cfg.val_every
                and self.state.step % cfg.val_every == 0
                and 0 <= self.state.pretrain_end < self.state.step  # pretrained: no PGD signal
            ):
                self._validate_and_select()
                t_prev = time.monotonic()  # validation time is not training time
            if signals.save_now or time.monotonic() - last_ckpt >= cfg.checkpoint_every_min * 60:
                signals.save_now = False
                self.save_checkpoint()
                last_ckpt = time.monotonic()
                t_prev = time.monotonic()
        done = self.state.step >= self.total_steps or (
            budget_s is not None and self.state.elapsed_s >= budget_s
        )
        if done and not self.state.finished:
            if self.state.best_step != self.state.step:
                self._validate_and_select()
            self.state.finished = True
        self.save_checkpoint()
        signals.restore()
        if bar is not None:
            bar.close()
        return self.state

    def _validate_and_select(self) -> None:
        if self.dist.main and self.cfg.val_samples > 0:
            t0 = time.monotonic()
            metrics = self.validate()
            score = metrics["val_pgd"] if self.cfg.val_pgd_steps > 0 else metrics["val_clean"]
            rec = {"step": self.state.step, **metrics, "val_time_s": time.monotonic() - t0}
            self.state.history.append(rec)
            self._log(rec)
            if score >= self.state.best_score:
                self.state.best_score = score
                self.state.best_step = self.state.step
                write_best(
                    self.run_dir, self.model.state_dict(), {"step": self.state.step, **metrics}
                )
        self.dist.barrier()

    def _progress(self) -> Any:
        if not (self.cfg.progress and self.dist.main):
            return None
        from tqdm import tqdm

        return tqdm(
            total=self.total_steps,
            initial=self.state.step,
            desc=self.cfg.name,
            unit="step",
            mininterval=0.5 if sys.stderr.isatty() else 30.0,
            dynamic_ncols=True,
        )

    def close(self) -> None:
        if self._writer:
            self._writer.close()

    def fingerprint(self) -> str:
        return dataset_fingerprint(self.cfg.data_root)


class _StopSignals:
    """SIGTERM/SIGINT: finish the current step, write the state, return (what a session does
    before committing). SIGUSR1: write the state at the next step boundary and go on."""

    def __init__(self) -> None:
        self.stop = False
        self.save_now = False
        self._old: dict[int, Any] = {}

    @classmethod
    def install(cls) -> _StopSignals:
        me = cls()
        if threading.current_thread() is not threading.main_thread():
            return me  # signal handlers can only be set from the main thread
        for sig in (signal.SIGTERM, signal.SIGINT):
            me._old[sig] = signal.signal(sig, me._on_stop)
        if hasattr(signal, "SIGUSR1"):
            me._old[signal.SIGUSR1] = signal.signal(signal.SIGUSR1, me._on_save)
        return me

    def _on_stop(self, signum: int, frame: Any) -> None:
        self.stop = True

    def _on_save(self, signum: int, frame: Any) -> None:
        self.save_now = True

    def restore(self) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old.clear()


def iter_steps(trainer: Trainer, n: int) -> Iterator[dict[str, float]]:
    """Run ``n`` steps, yielding each step's scalars (for tests and benchmarks)."""
    for _ in range(n):
        stats = trainer.train_step(trainer.state.step)
        trainer.state.step += 1
        yield stats
