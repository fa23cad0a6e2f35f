"""The device side: loaded models and the batched, defended forward.

Everything in this module runs on the device worker's single thread (see
:mod:`service.batcher`), which is the only code that touches the model or the accelerator.
"""

from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from deqguard.configs import SolverConfig
from deqguard.defense import DefenseParams, defended_forward, get_preset
from deqguard.store import (
    LoadedEntry,
    Manifest,
    StoreError,
    StoreIntegrityError,
    StoreNotFoundError,
    load_entry,
    manifest_stamp,
    read_manifest,
)
from service.errors import InvalidParameter, ModelLoadFailed, ModelNotFound

__all__ = [
    "ImageOutput",
    "ModelPool",
    "ServedModel",
    "resolve_device",
    "resolve_params",
    "run_batch",
]

DEFAULT_STEPS = 8


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when present, else CPU; a named CUDA device must exist."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"DEQGUARD_DEVICE={name}: CUDA is not available on this machine")
    return dev


@dataclass
class ServedModel:
    """A loaded store entry plus what the forward needs (solver and steps)."""

    entry: LoadedEntry
    solver: SolverConfig
    steps: int
    loaded_at: float

    @property
    def name(self) -> str:
        return self.entry.name

    @property
    def version(self) -> str:
        return self.entry.version

    @property
    def sha256(self) -> str:
        return self.entry.sha256

    @property
    def manifest(self) -> Manifest:
        return self.entry.manifest


@dataclass
class ImageOutput:
    """One image's answer, as plain numpy/python values ready for any protocol."""

    probabilities: np.ndarray  # [C] float32
    class_index: int
    step_entropy: np.ndarray  # [N] float32
    acted: np.ndarray  # [N] bool
    post_entropy: np.ndarray  # [N] float32, NaN where the defense did not act
    state_index: int
    final_residual: float
    nfe: int
    grad_steps: int

    @property
    def entropy(self) -> float:
        p = self.probabilities.astype(np.float64)
        return float(-(p * np.log(np.clip(p, 1e-30, None))).sum())


def _steps_for(manifest: Manifest, override: int | None) -> tuple[SolverConfig, int]:
    solver = manifest.solver
    steps = override or solver.max_steps or DEFAULT_STEPS
    return solver, steps


class ModelPool:
    """Models by name, loaded on the device thread, LRU-evicted beyond ``capacity``.

    The default model stays resident. Look-ups of manifests (cheap file reads) may run on any
    thread; loading weights only runs on the device thread.
    """

    def __init__(
        self,
        root: Path,
        default_ref: str,
        device: torch.device,
        *,
        capacity: int = 4,
        steps: int | None = None,
    ) -> None:
        self.root = root
        self.default_ref = default_ref
        self.device = device
        self.capacity = capacity
        self.steps_override = steps
        self._models: OrderedDict[str, ServedModel] = OrderedDict()
        self._manifests: dict[str, tuple[tuple[int, int, int], Manifest]] = {}
        self._lock = threading.Lock()
        self.default_name = default_ref.partition("@")[0]

    def manifest(self, ref: str | None) -> Manifest:
        """The manifest a request's ``model`` names (404 / 422 otherwise).

        Cached per ref and re-read only when the file changes (a stat instead of a read, a
        JSON parse and a validation per request: that work holds the GIL the device thread
        needs between its ops)."""
        ref = ref or self.default_ref
        stamp = manifest_stamp(self.root, ref)
        cached = self._manifests.get(ref)
        if stamp is not None and cached is not None and cached[0] == stamp:
            return cached[1]
        try:
            manifest = read_manifest(self.root, ref)
            if stamp is not None:
                if len(self._manifests) >= 64:  # bounded: refs come from requests
                    self._manifests.clear()
                self._manifests[ref] = (stamp, manifest)
            return manifest
        except StoreNotFoundError as exc:
            raise ModelNotFound(str(exc), field="model") from None
        except StoreIntegrityError as exc:
            raise ModelLoadFailed(str(exc), field="model") from None
        except StoreError as exc:
            raise InvalidParameter(str(exc), field="model") from None

    def steps_of(self, manifest: Manifest) -> int:
        return _steps_for(manifest, self.steps_override)[1]

    def loaded(self) -> list[ServedModel]:
        with self._lock:
            return list(self._models.values())

    def peek(self, name: str) -> ServedModel | None:
        with self._lock:
            return self._models.get(name)

    def install(self, served: ServedModel) -> ServedModel | None:
        """Put a loaded model in place of its name's entry in one step (hot reload); batches
        already running keep the old one. Returns the replaced entry, if any."""
        with self._lock:
            old = self._models.get(served.name)
            self._models[served.name] = served
            self._models.move_to_end(served.name)
        return old

    def get(self, name: str, version: str | None = None) -> ServedModel:
        """The served model ``name`` (device thread only: may load weights)."""
        with self._lock:
            served = self._models.get(name)
            if served is not None and (version is None or served.version == version):
                self._models.move_to_end(name)
                return served
        ref = name if version is None else f"{name}@{version}"
        try:
            entry = load_entry(self.root, ref, device=self.device, inference=True)
        except StoreNotFoundError as exc:
            raise ModelNotFound(str(exc), field="model") from None
        except StoreError as exc:
            raise ModelLoadFailed(str(exc), field="model") from None
        solver, steps = _steps_for(entry.manifest, self.steps_override)
        served = ServedModel(entry, solver, steps, time.time())
        with self._lock:
            self._models[name] = served
            self._models.move_to_end(name)
            while len(self._models) > self.capacity:
                victim = next(k for k in self._models if k != self.default_name)
                del self._models[victim]
        return served


def resolve_params(
    preset: str,
    overrides: dict[str, object],
    steps: int,
    max_defense_steps: int,
) -> DefenseParams:
    """Preset plus per-request overrides -> validated DefenseParams (422 naming the field)."""
    try:
        base = get_preset(preset)
    except ValueError as exc:
        raise InvalidParameter(str(exc), field="preset") from None
    fields = base.to_dict()
    fields.update({k: v for k, v in overrides.items() if v is not None})
    try:
        params = DefenseParams(**fields)
    except ValueError as exc:
        msg = str(exc)
        name = msg.split(" ", 1)[0] if msg.split(" ", 1)[0] in fields else None
        raise InvalidParameter(msg, field=name) from None
    if params.R > max_defense_steps:
        raise InvalidParameter(
            f"R must be <= {max_defense_steps} on this server, got {params.R}", field="R"
        )
    if params.state is not None and params.state > steps:
        raise InvalidParameter(
            f"state must lie in 1..{steps} (the model's solver steps), got {params.state}",
            field="state",
        )
    if params.Tf > steps:
        raise InvalidParameter(
            f"Tf must lie in 1..{steps} (the model's solver steps), got {params.Tf}", field="Tf"
        )
    for key in ("beta", "eps"):
        value = getattr(params, key)
        if not math.isfinite(value) or value > 1.0:
            raise InvalidParameter(f"{key} must lie in [0, 1], got {value}", field=key)
    return params


def run_batch(
    served: ServedModel,
    images: torch.Tensor,
    params: Sequence[DefenseParams],
    *,
    chunk: int,
) -> list[ImageOutput]:
    """float [B, 3, 32, 32] in [0, 1] with one DefenseParams per image -> one ImageOutput each."""
    outs: list[ImageOutput] = []
    model = served.entry.model
    dev = next(model.parameters()).device
    for start in range(0, images.shape[0], chunk):
        x = images[start : start + chunk].to(dev, dtype=torch.float32, non_blocking=True)
        res = defended_forward(
            model, x, list(params[start : start + chunk]), served.solver, steps=served.steps
        )
        probs = torch.softmax(res.logits.float(), dim=1).cpu().numpy()
        ent = res.step_entropy.float().T.cpu().numpy()
        acted = res.acted.T.cpu().numpy()
        post = res.post_entropy.float().T.cpu().numpy()
        state = res.state_index.cpu().tolist()
        resid = res.final_residual.float().cpu().tolist()
        nfe = res.nfe.cpu().tolist()
        gsteps = res.grad_steps.cpu().tolist()
        for i in range(x.shape[0]):
            outs.append(
                ImageOutput(
                    probabilities=probs[i],
                    class_index=int(probs[i].argmax()),
                    step_entropy=ent[i],
                    acted=acted[i],
                    post_entropy=post[i],
                    state_index=int(state[i]),
                    final_residual=float(resid[i]),
                    nfe=int(nfe[i]),
                    grad_steps=int(gsteps[i]),
                )
            )
    return outs
