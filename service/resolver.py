"""The request side of a predict: which model a request names and which defense it gets.

Runs on the event loop (or the decode pool), never on the device thread: it reads manifests
(cached, re-read only when the file changes) and resolves the defense settings with the core's
:func:`deqguard.defense.resolve_defense`. Store and parameter errors propagate as they are; the
app's one error handler (:mod:`service.errors`) gives them their status codes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from deqguard.configs import solver_steps
from deqguard.defense import DEFENSE_FIELDS, DefenseLimits, DefenseParams, resolve_defense
from deqguard.store import Manifest, manifest_stamp, read_manifest
from service.errors import InvalidParameter, PayloadTooLarge
from service.schemas import DefenseFields
from service.settings import ServiceSettings

__all__ = ["RequestResolver", "Resolved"]

_MAX_CACHED = 64  # bounded: refs come from requests


@dataclass(frozen=True)
class Resolved:
    """What a request asks the device for: the model (``name``, or ``name@version`` when the
    request names a version), the defense, and the settings applied (the ``defense`` block of
    the answer)."""

    model: str
    params: DefenseParams
    applied: dict[str, Any]


class RequestResolver:
    """Manifests by model reference, and the defense settings of a request."""

    def __init__(self, settings: ServiceSettings) -> None:
        self.settings = settings
        self.root = settings.model_store
        self.default_ref = settings.model
        self.default_name = settings.model.partition("@")[0]
        self._manifests: dict[str, tuple[tuple[int, int, int], Manifest]] = {}

    def manifest(self, ref: str | None) -> Manifest:
        """The manifest ``ref`` names (the server's model when None); store errors propagate.

        Cached per ref and re-read only when the file changes (a stat instead of a read, a
        JSON parse and a validation per request: that work holds the GIL the device thread
        needs between its ops)."""
        ref = ref or self.default_ref
        stamp = manifest_stamp(self.root, ref)
        cached = self._manifests.get(ref)
        if stamp is not None and cached is not None and cached[0] == stamp:
            return cached[1]
        manifest = read_manifest(self.root, ref)
        if stamp is not None:
            if len(self._manifests) >= _MAX_CACHED:
                self._manifests.clear()
            self._manifests[ref] = (stamp, manifest)
        return manifest

    def steps_of(self, manifest: Manifest) -> int:
        """The solver steps N a forward of this model runs on this server."""
        return solver_steps(manifest.solver, self.settings.solver_steps)

    def _check_work(self, n_images: int, per_image: int) -> None:
        """One request's device work (images x gradient steps) under the server's bound."""
        cap = self.settings.max_request_grad_steps
        work = n_images * per_image
        if cap and work > cap:
            raise PayloadTooLarge(
                f"images x gradient steps: {n_images} x {per_image} = {work}, over the limit of "
                f"{cap} per request (DEQGUARD_MAX_REQUEST_GRAD_STEPS); send fewer images per "
                "request or a cheaper defense (smaller R, larger Tf)",
                field="images",
            )

    def resolve(self, fields: DefenseFields, n_images: int) -> Resolved:
        """Check the image count and the model, and resolve the defense settings."""
        limit = self.settings.max_images_per_request
        if n_images > limit:
            raise PayloadTooLarge(
                f"images: {n_images} images in one request, limit {limit}", field="images"
            )
        if n_images == 0:
            raise InvalidParameter("images: at least one image is required", field="images")
        manifest = self.manifest(fields.model)
        steps = self.steps_of(manifest)
        preset = fields.preset or self.settings.default_preset
        overrides = {k: v for k in DEFENSE_FIELDS if (v := getattr(fields, k)) is not None}
        limits = DefenseLimits(steps=steps, max_R=self.settings.max_defense_steps, unit_box=True)
        params = resolve_defense(preset, overrides, limits)
        self._check_work(n_images, params.grad_steps(steps))
        applied = {"preset": str(preset), **params.to_dict(), "steps": steps}
        # a version named in the request selects that version on the device, beside others
        versioned = "@" in (fields.model or self.default_ref)
        return Resolved(manifest.ref if versioned else manifest.name, params, applied)
