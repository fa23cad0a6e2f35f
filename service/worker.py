"""The device side: loaded models and the batched, defended forward.

Everything here runs on a device thread (see :mod:`service.batcher`), the only code that touches
a model or the accelerator, except :meth:`DeviceWorker.load`, which verifies, loads and warms a
model off the device thread for a hot swap. The routes never import this module: they reach the
device only through :meth:`service.context.ServiceContext.infer`, and this module never calls
back into the request side (it publishes which models are loaded straight to the metrics).
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from deqguard.configs import SolverConfig, solver_steps
from deqguard.defense import DefenseParams, DefenseStopped, Preset, defended_forward, get_preset
from deqguard.store import LoadedEntry, Manifest, StoreError, load_entry
from service.errors import SERVE_ERRORS, ShuttingDown, as_service_error
from service.hold import wait_while_held
from service.metrics import ServiceMetrics
from service.outputs import ImageOutput
from service.settings import ServiceSettings

__all__ = ["DeviceWorker", "ModelPool", "ServedModel", "run_batch"]


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


def _served(entry: LoadedEntry, steps_override: int | None) -> ServedModel:
    solver = entry.manifest.solver
    return ServedModel(entry, solver, solver_steps(solver, steps_override), time.time())


class ModelPool:
    """Models by ``name@version``, loaded on the device thread, LRU-evicted beyond ``capacity``.

    Several versions of one name are served side by side: ``name@version`` selects that
    version, ``name`` alone the name's current one (the first loaded, or the last installed).
    The default model's current version stays resident; :meth:`install` swaps a name's current
    version in one step (hot reload).
    """

    def __init__(
        self,
        root: Path,
        default_name: str,
        device: torch.device,
        *,
        capacity: int = 4,
        steps: int | None = None,
    ) -> None:
        self.root = root
        self.default_name = default_name
        self.device = device
        self.capacity = capacity
        self.steps_override = steps
        self._models: OrderedDict[str, ServedModel] = OrderedDict()  # by name@version
        self._current: dict[str, str] = {}  # name -> the version ``name`` alone serves
        self._lock = threading.Lock()

    def loaded(self) -> list[ServedModel]:
        with self._lock:
            return list(self._models.values())

    def _key(self, ref: str) -> str | None:
        name, _, version = ref.partition("@")
        version = version or self._current.get(name, "")
        return f"{name}@{version}" if version else None

    def peek(self, ref: str) -> ServedModel | None:
        """The loaded model ``ref`` (``name`` or ``name@version``) selects, if any."""
        with self._lock:
            key = self._key(ref)
            return self._models.get(key) if key else None

    def current_version(self, name: str) -> str | None:
        """The version ``name`` alone serves now, if it is loaded."""
        with self._lock:
            return self._current.get(name)

    def install(self, served: ServedModel) -> ServedModel | None:
        """Make a loaded model its name's current version in one step (hot reload); batches
        already running keep the old one. Returns the replaced current version, if any."""
        key = f"{served.name}@{served.version}"
        with self._lock:
            old_key = self._key(served.name)
            old = self._models.get(old_key) if old_key else None
            if old_key is not None and old_key != key:
                self._models.pop(old_key, None)
            self._models[key] = served
            self._models.move_to_end(key)
            self._current[served.name] = served.version
            self._evict()
        return old

    def _evict(self) -> None:
        keep = self._key(self.default_name)
        while len(self._models) > self.capacity:
            victim = next(k for k in self._models if k != keep)
            gone = self._models.pop(victim)
            if self._current.get(gone.name) == gone.version:
                del self._current[gone.name]

    def get(self, name: str, version: str | None = None) -> ServedModel:
        """The served model ``name`` (its current version) or ``name@version`` (device thread
        only: may load weights). ``name`` may itself be a ``name@version`` reference."""
        if version is None and "@" in name:
            name, _, version = name.partition("@")
        ref = name if version is None else f"{name}@{version}"
        with self._lock:
            key = self._key(ref)
            served = self._models.get(key) if key else None
            if served is not None:
                self._models.move_to_end(key)  # type: ignore[arg-type]
                return served
        try:
            entry = load_entry(self.root, ref, device=self.device, inference=True)
        except StoreError as exc:  # found but not servable: the server's fault, not the client's
            raise as_service_error(exc, SERVE_ERRORS) from None
        served = _served(entry, self.steps_override)
        key = f"{served.name}@{served.version}"
        with self._lock:
            self._models[key] = served
            self._models.move_to_end(key)
            if version is None:
                self._current.setdefault(name, served.version)
            self._evict()
        return served


def run_batch(
    served: ServedModel,
    images: torch.Tensor,
    params: Sequence[DefenseParams],
    *,
    chunk: int,
    should_stop: Callable[[], bool] | None = None,
) -> list[ImageOutput]:
    """float [B, 3, 32, 32] in [0, 1] with one DefenseParams per image -> one ImageOutput each.

    ``should_stop`` goes to the defended forward (checked before every f-evaluation and
    input-gradient step; :class:`~deqguard.defense.DefenseStopped` when it turns true)."""
    outs: list[ImageOutput] = []
    model = served.entry.model
    dev = next(model.parameters()).device
    for start in range(0, images.shape[0], chunk):
        x = images[start : start + chunk].to(dev, dtype=torch.float32, non_blocking=True)
        res = defended_forward(
            model,
            x,
            list(params[start : start + chunk]),
            served.solver,
            steps=served.steps,
            should_stop=should_stop,
        )
        probs = torch.softmax(res.logits.float(), dim=1).cpu().numpy()
        entropy = res.entropy.float().cpu().tolist()
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
                    entropy=float(entropy[i]),
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


class DeviceWorker:
    """What the batcher calls on a device thread: the model pool and the batched forward."""

    def __init__(
        self, settings: ServiceSettings, device: torch.device, metrics: ServiceMetrics
    ) -> None:
        self.settings = settings
        self.device = device
        self.metrics = metrics
        self.pool = ModelPool(
            settings.model_store,
            settings.model.partition("@")[0],
            device,
            capacity=settings.max_loaded_models,
            steps=settings.solver_steps,
        )
        self._stop = threading.Event()

    def stop_compute(self) -> None:
        """From any thread, at shutdown: the batches computing now stop at their next solver
        or input-gradient step and later ones do not start; their requests get 503."""
        self._stop.set()

    @property
    def default_name(self) -> str:
        return self.pool.default_name

    def loaded(self) -> list[ServedModel]:
        return self.pool.loaded()

    def is_loaded(self, name: str, version: str) -> bool:
        return self.pool.peek(f"{name}@{version}") is not None

    def current_version(self, name: str) -> str | None:
        """The version requests naming ``name`` alone are served by now, if it is loaded."""
        return self.pool.current_version(name)

    def run(
        self, model: str, images: torch.Tensor, params: Sequence[DefenseParams]
    ) -> tuple[list[ImageOutput], ServedModel]:
        """Device thread: look up (maybe load) the model and run one batch (503
        :class:`ShuttingDown` once :meth:`stop_compute` was called)."""
        stopping = self._stop.is_set
        wait_while_held(self.settings.device_hold_file, stopping)
        if stopping():
            raise ShuttingDown("the server is shutting down; the batch was not started")
        before = self.pool.peek(model)
        served = self.pool.get(model)
        if before is not served:
            self.publish_models()
        try:
            outputs = run_batch(
                served, images, params, chunk=self.settings.max_batch_size, should_stop=stopping
            )
        except DefenseStopped:
            raise ShuttingDown(
                "the server is shutting down: the drain grace ran out before this request's "
                "computation finished, and it was stopped; retry elsewhere"
            ) from None
        return outputs, served

    def load_default(self) -> ServedModel:
        """Device thread, at start: the default model (``DEQGUARD_MODEL``, maybe a version)."""
        served = self.pool.get(self.settings.model)
        self.pool.install(served)  # the default name serves this version
        self.publish_models()
        return served

    def warm(self, served: ServedModel, x: torch.Tensor) -> None:
        """One forward with one input-gradient step: touches every kernel a request can use."""
        params = DefenseParams(R=1, Tf=max(1, served.steps // 2))
        run_batch(served, x, [params] * x.shape[0], chunk=x.shape[0])

    def load(self, ref: str) -> tuple[ServedModel, float, float]:
        """Off the device thread: verify and load the entry, then one warm-up batch, so that
        predict traffic keeps flowing on the current model meanwhile. Returns (model, load
        seconds, warm-up seconds); store errors propagate."""
        t0 = time.perf_counter()
        entry = load_entry(self.settings.model_store, ref, device=self.device, inference=True)
        served = _served(entry, self.settings.solver_steps)
        t1 = time.perf_counter()
        x = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
        with torch.inference_mode(False):
            run_batch(served, x, [get_preset(Preset.PAPER)], chunk=1)
        return served, t1 - t0, time.perf_counter() - t1

    def install(self, served: ServedModel) -> ServedModel | None:
        """Swap a loaded model in (batches already running keep the old one)."""
        old = self.pool.install(served)
        self.publish_models()
        return old

    def publish_models(self) -> None:
        """``deqguard_model_info``: one series per loaded model (the metrics are thread-safe)."""
        info = self.metrics.model_info
        info.clear()
        for served in self.pool.loaded():
            info.labels(
                name=served.name,
                version=served.version,
                sha256=served.sha256,
                device=str(self.device),
                default=str(
                    served.name == self.default_name
                    and self.pool.current_version(served.name) == served.version
                ).lower(),
            ).set(1)
