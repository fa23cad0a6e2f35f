"""Model store: round trip, integrity check, name validation."""

from __future__ import annotations

import json

import pytest
import torch

from deqguard.configs import SolverConfig
from deqguard.models import build_model
from deqguard.store import (
    StoreError,
    StoreIntegrityError,
    StoreNotFoundError,
    list_entries,
    load_entry,
    parse_ref,
    save_entry,
    update_metrics,
)


@pytest.fixture()
def entry(tmp_path):
    torch.manual_seed(0)
    model = build_model("micro").eval()
    save_entry(
        tmp_path,
        "m1",
        model,
        version="3",
        solver_config=SolverConfig(max_steps=6),
        training_args={"method": "trades"},
        metrics={"clean_acc": 0.5},
    )
    return tmp_path, model


def test_round_trip_gives_identical_model(entry):
    root, model = entry
    loaded = load_entry(root, "m1@3")
    assert loaded.name == "m1" and loaded.version == "3"
    assert loaded.manifest.training_args == {"method": "trades"}
    assert loaded.manifest.solver.max_steps == 6
    assert len(loaded.sha256) == 64
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        inj_a, inj_b = model.inject(x), loaded.model.inject(x)
        z = model.zero_state(2, x.device, x.dtype)
        torch.testing.assert_close(model.cell(z, inj_a), loaded.model.cell(z, inj_b))
    assert not loaded.model.training


def test_tampered_weights_are_refused(entry):
    root, _ = entry
    wpath = root / "m1" / "weights.safetensors"
    data = bytearray(wpath.read_bytes())
    data[-1] ^= 0xFF
    wpath.write_bytes(bytes(data))
    with pytest.raises(StoreIntegrityError, match="sha256"):
        load_entry(root, "m1")


def test_manifest_round_trips_and_metrics_update(entry):
    root, _ = entry
    update_metrics(root, "m1", {"pgd10_acc": 0.3})
    raw = json.loads((root / "m1" / "manifest.json").read_text())
    assert raw["metrics"] == {"clean_acc": 0.5, "pgd10_acc": 0.3}
    assert [m.name for m in list_entries(root)] == ["m1"]


@pytest.mark.parametrize("ref", ["../etc", "a/b", "", "..", "x@", "@1", "a\\b", ".hidden"])
def test_bad_names_are_refused(tmp_path, ref):
    with pytest.raises(StoreError):
        load_entry(tmp_path, ref)


def test_missing_entry_and_wrong_version(entry):
    root, _ = entry
    with pytest.raises(StoreNotFoundError, match="nope"):
        load_entry(root, "nope")
    with pytest.raises(StoreNotFoundError, match="version"):
        load_entry(root, "m1@9")
    assert parse_ref("m1@3") == ("m1", "3")


def test_versions_side_by_side(entry):
    """``versions/<v>/`` holds more versions of a name; ``name`` alone stays the current one."""
    from deqguard.store import list_versions, manifest_stamp, read_manifest

    root, model = entry
    torch.manual_seed(1)
    other = build_model("micro").eval()
    path = save_entry(root, "m1", other, version="10", as_version=True)
    assert path == root / "m1" / "versions" / "10"
    assert read_manifest(root, "m1").version == "3"  # the current version is untouched
    v10 = load_entry(root, "m1@10")
    v3 = load_entry(root, "m1@3")
    assert v10.version == "10" and v3.version == "3" and v10.sha256 != v3.sha256
    assert [m.version for m in list_versions(root, "m1")] == ["3", "10"]
    assert [m.ref for m in list_entries(root)] == ["m1@3"]
    with pytest.raises(StoreNotFoundError, match=r"versions \['3', '10'\]"):
        read_manifest(root, "m1@7")
    assert manifest_stamp(root, "m1@10") != manifest_stamp(root, "m1@3")
    # without top-level files, the name alone is the highest version (numeric order)
    save_entry(root, "m2", other, version="9", as_version=True)
    save_entry(root, "m2", model, version="10", as_version=True)
    assert read_manifest(root, "m2").version == "10" and manifest_stamp(root, "m2") is None
    assert load_entry(root, "m2").sha256 == load_entry(root, "m2@10").sha256
    # a version directory whose manifest names another version is refused
    manifest = root / "m2" / "versions" / "9" / "manifest.json"
    manifest.write_text(manifest.read_text().replace('"version": "9"', '"version": "8"'))
    with pytest.raises(StoreIntegrityError, match="version"):
        read_manifest(root, "m2@9")
