"""The model store: one directory per entry with safetensors weights and a JSON manifest.

Layout::

    model_store/<name>/manifest.json        # what the weights are, how they were made, metrics
    model_store/<name>/weights.safetensors  # the state dict (never pickle)
    model_store/<name>/versions/<version>/  # optional: more versions of <name>, same two files

``name`` alone means the entry's current version (the top-level files; without them, the
highest version under ``versions/``); ``name@version`` means that version, wherever it lives, so
several versions of one name can be served side by side.

The manifest records the sha256 of the weights; :func:`load_entry` recomputes it and refuses a
mismatch, so a tampered or truncated checkpoint never serves. Names are validated (no path
separators, no traversal) because they arrive from HTTP requests.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import re
import subprocess
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from deqguard.configs import ModelConfig, SolverConfig
from deqguard.models.inference import prepare_for_inference
from deqguard.models.mdeq import MDEQClassifier

__all__ = [
    "FORMAT_VERSION",
    "LoadedEntry",
    "Manifest",
    "StoreError",
    "StoreIntegrityError",
    "StoreNotFoundError",
    "default_store_root",
    "list_entries",
    "list_versions",
    "load_entry",
    "manifest_stamp",
    "parse_ref",
    "read_manifest",
    "save_entry",
    "update_metrics",
    "validate_name",
]

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
WEIGHTS = "weights.safetensors"
VERSIONS = "versions"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class StoreError(Exception):
    """Any problem with a model store entry; the message names the entry and the problem."""


class StoreNotFoundError(StoreError, FileNotFoundError):
    """The entry (or the requested version of it) does not exist."""


class StoreIntegrityError(StoreError):
    """The weights do not match the manifest's sha256, or the files are malformed."""


def default_store_root() -> Path:
    """``DEQGUARD_MODEL_STORE`` if set, else ``model_store/`` at the repository root."""
    env = os.environ.get("DEQGUARD_MODEL_STORE")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[1] / "model_store"


def validate_name(name: str) -> str:
    """Entry names: 1-64 of letters, digits, '.', '_', '-', starting alphanumeric; no '..'."""
    if not isinstance(name, str) or not _NAME.match(name) or ".." in name:
        raise StoreError(
            f"invalid model name {name!r}: use 1-64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return name


def parse_ref(ref: str) -> tuple[str, str | None]:
    """``name`` or ``name@version`` -> (name, version or None), both validated."""
    name, _, version = ref.partition("@")
    validate_name(name)
    if _ and not version:
        raise StoreError(f"invalid model reference {ref!r}: empty version after '@'")
    if version:
        validate_name(version)
    return name, version or None


@dataclass
class Manifest:
    """Everything known about one entry. ``metrics`` maps names to measured numbers, each
    ideally with the protocol that produced it (e.g. ``{"clean_acc": 0.61, "n": 1000}``)."""

    name: str
    version: str
    model_config: dict[str, Any]
    sha256: str
    size_bytes: int
    created: str
    solver_config: dict[str, Any] = field(default_factory=dict)
    training_args: dict[str, Any] = field(default_factory=dict)
    dataset_fingerprint: str | None = None
    git_commit: str | None = None
    device: str | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    notes: str = ""
    weights_file: str = WEIGHTS
    format_version: int = FORMAT_VERSION

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "manifest") -> Manifest:
        known = {f for f in cls.__dataclass_fields__}
        missing = [k for k in ("name", "version", "model_config", "sha256") if k not in d]
        if missing:
            raise StoreIntegrityError(f"{where}: missing fields {missing}")
        if d.get("format_version", FORMAT_VERSION) > FORMAT_VERSION:
            raise StoreIntegrityError(
                f"{where}: format_version {d['format_version']} is newer than this deqguard "
                f"understands ({FORMAT_VERSION})"
            )
        extra = {k: v for k, v in d.items() if k not in known}
        base = {k: v for k, v in d.items() if k in known}
        base.setdefault("size_bytes", -1)
        base.setdefault("created", "")
        m = cls(**base)
        if extra:
            m.metrics.setdefault("_extra_manifest_fields", extra)
        return m

    @property
    def config(self) -> ModelConfig:
        return ModelConfig.from_dict(self.model_config)

    @property
    def solver(self) -> SolverConfig:
        return SolverConfig(**self.solver_config) if self.solver_config else SolverConfig()

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"


@dataclass
class LoadedEntry:
    """A verified, loaded entry: the model (eval mode, on ``device``) and its manifest."""

    model: MDEQClassifier
    manifest: Manifest
    path: Path

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def version(self) -> str:
        return self.manifest.version

    @property
    def sha256(self) -> str:
        return self.manifest.sha256


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).resolve().parents[1],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        )
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _entry_dir(root: str | os.PathLike[str], name: str) -> Path:
    return Path(root) / validate_name(name)


def save_entry(
    root: str | os.PathLike[str],
    name: str,
    model: MDEQClassifier,
    *,
    version: str = "1",
    solver_config: SolverConfig | None = None,
    training_args: dict[str, Any] | None = None,
    metrics: dict[str, Any] | None = None,
    dataset_fingerprint: str | None = None,
    device: str | None = None,
    notes: str = "",
    as_version: bool = False,
) -> Path:
    """Write ``<root>/<name>/`` (weights first, manifest last, each atomically). Returns the dir.

    ``as_version``: write ``<root>/<name>/versions/<version>/`` instead, beside the current
    version rather than in its place (both stay servable as ``name@version``)."""
    validate_name(version)
    entry = _entry_dir(root, name)
    if as_version:
        entry = entry / VERSIONS / version
    entry.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    blob = save_safetensors(state, metadata={"name": name, "version": version})
    digest = hashlib.sha256(blob).hexdigest()
    _atomic_write(entry / WEIGHTS, blob)
    manifest = Manifest(
        name=name,
        version=version,
        model_config=model.config.to_dict(),
        sha256=digest,
        size_bytes=len(blob),
        created=_dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        solver_config=asdict(solver_config) if solver_config else {},
        training_args=dict(training_args or {}),
        dataset_fingerprint=dataset_fingerprint,
        git_commit=_git_commit(),
        device=device,
        metrics=dict(metrics or {}),
        notes=notes,
    )
    _write_manifest(entry, manifest)
    return entry


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _write_manifest(entry: Path, manifest: Manifest) -> None:
    text = json.dumps(manifest.to_dict(), indent=2, sort_keys=True) + "\n"
    _atomic_write(entry / MANIFEST, text.encode())


def _version_key(version: str) -> tuple[int, int, str]:
    """Numeric versions in numeric order, before other names (Triton's "latest" policy)."""
    return (0, int(version), "") if version.isdigit() else (1, 0, version)


def _version_dirs(entry: Path) -> list[Path]:
    base = entry / VERSIONS
    if not base.is_dir():
        return []
    found = [d for d in base.iterdir() if _NAME.match(d.name) and (d / MANIFEST).is_file()]
    return sorted(found, key=lambda d: _version_key(d.name))


def _manifest_path(root: str | os.PathLike[str], ref: str) -> tuple[Path, bool]:
    """The manifest file ``ref`` names, and whether that choice is stable (False: ``name``
    alone with no top-level manifest, where a new version directory changes the answer)."""
    name, version = parse_ref(ref)
    entry = _entry_dir(root, name)
    if version is not None:
        side = entry / VERSIONS / version / MANIFEST
        return (side if side.is_file() else entry / MANIFEST), True
    top = entry / MANIFEST
    if top.is_file():
        return top, True
    versions = _version_dirs(entry)
    return (versions[-1] / MANIFEST if versions else top), False


def manifest_stamp(root: str | os.PathLike[str], ref: str) -> tuple[int, int, int] | None:
    """(mtime ns, size, inode) of the manifest file ``ref`` names, or None if it cannot be
    stat-ed (or the choice of file may change): a cheap change detector for callers that cache
    :func:`read_manifest`'s result. Writes are atomic renames, so any rewrite changes the inode."""
    try:
        path, stable = _manifest_path(root, ref)
        st = path.stat()
    except (OSError, StoreError):
        return None
    if not stable:
        return None
    return st.st_mtime_ns, st.st_size, st.st_ino


def read_manifest(root: str | os.PathLike[str], ref: str) -> Manifest:
    """The manifest of ``name`` or ``name@version`` (the version must exist)."""
    name, version = parse_ref(ref)
    path, _ = _manifest_path(root, ref)
    if not path.is_file():
        raise StoreNotFoundError(f"model {name!r} not found: no {path}")
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise StoreIntegrityError(f"model {name!r}: unreadable manifest {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise StoreIntegrityError(f"model {name!r}: manifest {path} is not a JSON object")
    manifest = Manifest.from_dict(data, where=str(path))
    if manifest.name != name:
        raise StoreIntegrityError(
            f"model {name!r}: manifest {path} names {manifest.name!r} instead"
        )
    if path.parent.parent.name == VERSIONS and manifest.version != path.parent.name:
        raise StoreIntegrityError(
            f"model {name!r}: manifest {path} says version {manifest.version!r}"
        )
    if version is not None and manifest.version != version:
        have = [m.version for m in list_versions(root, name)]
        raise StoreNotFoundError(
            f"model {name!r} has versions {have}, not the requested {version!r}"
        )
    return manifest


def list_versions(root: str | os.PathLike[str], name: str) -> list[Manifest]:
    """Every readable version of entry ``name`` (current and ``versions/``), lowest first."""
    entry = _entry_dir(root, name)
    refs = [name] if (entry / MANIFEST).is_file() else []
    refs += [f"{name}@{d.name}" for d in _version_dirs(entry)]
    found: dict[str, Manifest] = {}
    for ref in refs:
        try:
            m = read_manifest(root, ref)
        except StoreError:
            continue
        found.setdefault(m.version, m)
    return [found[v] for v in sorted(found, key=_version_key)]


def load_entry(
    root: str | os.PathLike[str],
    ref: str,
    device: str | torch.device = "cpu",
    *,
    inference: bool = False,
) -> LoadedEntry:
    """Verify and load an entry; the model comes back in eval mode on ``device``.

    ``inference=True`` returns :func:`~deqguard.models.prepare_for_inference`'s folded, eval-only
    copy instead (what the service runs): same outputs to float rounding, less work, no training.
    """
    manifest = read_manifest(root, ref)
    entry = _manifest_path(root, ref)[0].parent
    wpath = entry / manifest.weights_file
    if Path(manifest.weights_file).name != manifest.weights_file or not wpath.is_file():
        raise StoreNotFoundError(f"model {manifest.name!r}: weights file {wpath} is missing")
    blob = wpath.read_bytes()
    digest = hashlib.sha256(blob).hexdigest()
    if digest != manifest.sha256:
        raise StoreIntegrityError(
            f"model {manifest.name!r}: sha256 of {wpath} is {digest}, but the manifest says "
            f"{manifest.sha256}; refusing to load a modified or corrupted checkpoint"
        )
    try:
        state = load_safetensors(blob)
        config = manifest.config
        model = MDEQClassifier(config)
        model.load_state_dict(state, strict=True)
    except (ValueError, RuntimeError, TypeError, KeyError) as exc:
        raise StoreIntegrityError(
            f"model {manifest.name!r}: weights do not fit its config: {exc}"
        ) from exc
    model.eval().to(device)
    if inference:
        model = prepare_for_inference(model)
    return LoadedEntry(model=model, manifest=manifest, path=entry)


def list_entries(root: str | os.PathLike[str]) -> list[Manifest]:
    """Manifests of every readable entry under root, sorted by name (unreadable ones skipped)."""
    base = Path(root)
    out = []
    if not base.is_dir():
        return out
    for child in sorted(base.iterdir()):
        has = (child / MANIFEST).is_file() or (child / VERSIONS).is_dir()
        if child.is_dir() and has and _NAME.match(child.name):
            try:
                out.append(read_manifest(base, child.name))
            except StoreError:
                continue
    return out


def update_metrics(root: str | os.PathLike[str], name: str, metrics: dict[str, Any]) -> Manifest:
    """Merge measured metrics into an entry's manifest (weights untouched)."""
    manifest = read_manifest(root, name)
    manifest.metrics.update(metrics)
    _write_manifest(_manifest_path(root, name)[0].parent, manifest)
    return manifest
