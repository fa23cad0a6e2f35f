"""A training run's resumable state as safetensors + JSON (no pickle anywhere).

Layout of a run directory (``<out_dir>/<name>/``)::

    state.safetensors   model weights ("model.*") and Adam moments ("optim.<i>.<key>")
    state.json          step, elapsed time, schedule position, validation history, Adam's
                        param groups, the RNG states (hex) and the config; names the weights'
                        sha256 so a half-copied pair is refused
    best.safetensors    the weights selected on validation PGD (model only)
    best.json           their step and validation metrics

Each file is written to a temp name and renamed, the JSON last, so a crash (or a ``git add``
mid-write) leaves either the old pair or the new one. The run resumes from these two files alone,
which is what makes it portable across sessions and machines: they are committed to the repository.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import Tensor

__all__ = [
    "BEST_JSON",
    "BEST_WEIGHTS",
    "STATE_JSON",
    "STATE_WEIGHTS",
    "CheckpointError",
    "read_best",
    "read_state",
    "write_best",
    "write_state",
]

STATE_WEIGHTS = "state.safetensors"
STATE_JSON = "state.json"
BEST_WEIGHTS = "best.safetensors"
BEST_JSON = "best.json"
FORMAT = "deqguard-train-state/1"


class CheckpointError(RuntimeError):
    """A missing, mismatched or corrupt checkpoint pair; the message names the file."""


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _flatten_optimizer(opt_state: dict[str, Any]) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Adam's state dict -> (tensors keyed "optim.<param>.<key>", the JSON-able rest)."""
    tensors: dict[str, Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, entry in opt_state["state"].items():
        for key, value in entry.items():
            if isinstance(value, Tensor):
                tensors[f"optim.{idx}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(idx), {})[key] = value
    return tensors, {"param_groups": opt_state["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        _, idx, key = name.split(".", 2)
        state.setdefault(int(idx), {})[key] = value
    for idx, extra in meta.get("scalars", {}).items():
        state.setdefault(int(idx), {}).update(extra)
    return {"state": state, "param_groups": meta["param_groups"]}


def _rng_hex(state: Tensor) -> str:
    return bytes(state.numpy().tobytes()).hex()


def write_state(
    run_dir: Path,
    *,
    model_state: dict[str, Tensor],
    optimizer_state: dict[str, Any],
    meta: dict[str, Any],
) -> Path:
    """Write ``state.safetensors`` then ``state.json``; returns the JSON path."""
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model_state.items()}
    opt_tensors, opt_meta = _flatten_optimizer(optimizer_state)
    tensors.update(opt_tensors)
    blob = save_safetensors(tensors)
    _atomic_write(run_dir / STATE_WEIGHTS, blob)
    doc = {
        "format": FORMAT,
        "weights_sha256": hashlib.sha256(blob).hexdigest(),
        "optimizer": opt_meta,
        "rng_cpu": _rng_hex(torch.get_rng_state()),
        **meta,
    }
    path = run_dir / STATE_JSON
    _atomic_write(path, (json.dumps(doc, indent=1, sort_keys=True) + "\n").encode())
    return path


def _read_pair(run_dir: Path, weights: str, meta: str) -> tuple[dict[str, Tensor], dict[str, Any]]:
    wpath, jpath = run_dir / weights, run_dir / meta
    if not jpath.exists() or not wpath.exists():
        raise CheckpointError(f"no checkpoint pair '{wpath.name}' + '{jpath.name}' in '{run_dir}'")
    try:
        doc = json.loads(jpath.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"'{jpath}' is not valid JSON: {exc}") from exc
    blob = wpath.read_bytes()
    if doc.get("weights_sha256") != hashlib.sha256(blob).hexdigest():
        raise CheckpointError(f"'{wpath}' does not match the sha256 recorded in '{jpath}'")
    return load_safetensors(blob), doc


def read_state(run_dir: Path) -> tuple[dict[str, Tensor], dict[str, Any], dict[str, Any]]:
    """(model state dict, optimizer state dict, metadata) of the last written state."""
    tensors, doc = _read_pair(run_dir, STATE_WEIGHTS, STATE_JSON)
    if doc.get("format") != FORMAT:
        raise CheckpointError(f"'{run_dir / STATE_JSON}' has format {doc.get('format')!r}")
    model = {k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")}
    opt = {k: v for k, v in tensors.items() if k.startswith("optim.")}
    return model, _unflatten_optimizer(opt, doc["optimizer"]), doc


def write_best(run_dir: Path, model_state: dict[str, Tensor], meta: dict[str, Any]) -> None:
    blob = save_safetensors({k: v.detach().cpu().contiguous() for k, v in model_state.items()})
    _atomic_write(run_dir / BEST_WEIGHTS, blob)
    doc = {"weights_sha256": hashlib.sha256(blob).hexdigest(), **meta}
    _atomic_write(run_dir / BEST_JSON, (json.dumps(doc, indent=1, sort_keys=True) + "\n").encode())


def read_best(run_dir: Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """(model state dict, metadata) of the validation-selected weights."""
    return _read_pair(run_dir, BEST_WEIGHTS, BEST_JSON)
