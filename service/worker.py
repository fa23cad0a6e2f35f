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
    """Models by name, loaded on the device thread, LRU-evicted beyond ``capacity``.

    The default model stays resident; :meth:`install` swaps an entry in one step (hot reload).
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
        self._models: OrderedDict[str, ServedModel] = OrderedDict()
        self._lock = threading.Lock()

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
        except StoreError as exc:  # found but not servable: the server's fault, not the client's
            raise as_service_error(exc, SERVE_ERRORS) from None
        served = _served(entry, self.steps_override)
        with self._lock:
            self._models[name] = served
            self._models.move_to_end(name)
            while len(self._models) > self.capacity:
                victim = next(k for k in self._models if k != self.default_name)
                del self._models[victim]
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
        served = self.pool.peek(name)
        return served is not None and served.version == version

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
        """Device thread, at start: the default model."""
        served = self.pool.get(self.default_name)
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
                default=str(served.name == self.default_name).lower(),
            ).set(1)
