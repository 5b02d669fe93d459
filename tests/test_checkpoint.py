"""shapee.io.checkpoint: atomic writes, weights_only loads, clear errors; RNG state round trip."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

import shapee
from shapee.io import checkpoint as ckpt_mod
from shapee.io.checkpoint import (
    CheckpointError,
    atomic_torch_save,
    code_version,
    load_checkpoint,
    load_snapshot,
    load_weights,
    save_checkpoint,
    save_snapshot,
)
from shapee.train.rng import capture_rng_state, restore_rng_state


class NotAWeight:
    """An arbitrary picklable object: weights_only loading must refuse it."""

    def __init__(self) -> None:
        self.payload = "anything"


def _weights() -> dict[str, torch.Tensor]:
    return {"layer.weight": torch.arange(6.0).reshape(2, 3), "layer.bias": torch.tensor([1.0, -1.0])}


def test_checkpoint_round_trip_keeps_tensors_and_plain_values(tmp_path):
    state = {
        "model": _weights(),
        "optimizer": {"state": {0: {"step": torch.tensor(3.0)}}, "param_groups": [{"lr": 0.1, "betas": (0.9, 0.99)}]},
        "step": 7,
        "config": {"trainer": {"lr": 1e-4, "tags": ["a"]}, "model": None},
    }
    path = save_checkpoint(tmp_path / "sub" / "last.pt", state)
    loaded = load_checkpoint(path)
    assert loaded["format"] == "shapee.checkpoint" and loaded["step"] == 7
    assert torch.equal(loaded["model"]["layer.weight"], state["model"]["layer.weight"])
    assert loaded["optimizer"]["param_groups"][0]["betas"] == (0.9, 0.99)
    assert loaded["config"] == state["config"]
    with pytest.raises(ValueError, match="reserved keys"):
        save_checkpoint(tmp_path / "x.pt", {"format": "mine"})


def test_snapshot_round_trip_and_load_weights_from_both_kinds(tmp_path):
    snap = save_snapshot(tmp_path / "snap.pt", weights=_weights(), model_config={"_target_": "m.M", "width": 8}, step=5)
    loaded = load_snapshot(snap)
    assert loaded["model_config"] == {"_target_": "m.M", "width": 8} and loaded["step"] == 5
    assert torch.equal(load_weights(snap)["layer.bias"], _weights()["layer.bias"])

    ema = {k: v + 1 for k, v in _weights().items()}
    full = save_checkpoint(tmp_path / "full.pt", {"model": _weights(), "ema": ema})
    assert torch.equal(load_weights(full)["layer.weight"], ema["layer.weight"])  # the EMA, not the raw model

    with pytest.raises(CheckpointError, match=r"snap.pt.*not a 'shapee.checkpoint' file.*'shapee.snapshot'"):
        load_checkpoint(snap)
    torch.save(_weights(), tmp_path / "raw.pt")
    with pytest.raises(CheckpointError, match="raw.pt.*neither"):
        load_weights(tmp_path / "raw.pt")


def test_pickled_arbitrary_object_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"format": "shapee.checkpoint", "format_version": 1, "obj": NotAWeight()}, path)
    with pytest.raises(CheckpointError, match=r"evil.pt.*weights_only=True"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="evil.pt"):
        load_weights(path)


def test_missing_corrupt_and_wrong_version_files_name_the_file(tmp_path):
    with pytest.raises(CheckpointError, match=r"absent.pt.*does not exist"):
        load_checkpoint(tmp_path / "absent.pt")
    good = save_checkpoint(tmp_path / "good.pt", {"model": _weights()})
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"truncated.pt.*corrupt or truncated"):
        load_checkpoint(truncated)
    torch.save({"format": "shapee.checkpoint", "format_version": 99}, tmp_path / "future.pt")
    with pytest.raises(CheckpointError, match=r"future.pt.*version 99"):
        load_checkpoint(tmp_path / "future.pt")


def test_atomic_write_leaves_no_partial_file_when_the_write_raises(tmp_path, monkeypatch):
    path = save_checkpoint(tmp_path / "last.pt", {"step": 1})
    before = path.read_bytes()

    def failing_save(obj, f):
        f.write(b"partial bytes")  # some bytes reach the temporary file, then the write fails
        raise OSError("disk full")

    monkeypatch.setattr(ckpt_mod.torch, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, {"step": 2})
    with pytest.raises(OSError, match="disk full"):
        atomic_torch_save({"x": 1}, tmp_path / "new.pt")
    monkeypatch.undo()
    assert path.read_bytes() == before and load_checkpoint(path)["step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]  # no temp file, no new.pt


def test_rng_state_round_trips_through_a_weights_only_checkpoint(tmp_path):
    torch.manual_seed(1)
    np.random.seed(2)
    random.seed(3)
    np.random.randn()  # leaves a cached Gaussian in NumPy's state
    save_checkpoint(tmp_path / "rng.pt", {"rng": capture_rng_state()})
    expected = (torch.rand(4), np.random.randn(3), [random.random() for _ in range(3)], random.gauss(0, 1))

    torch.manual_seed(99)
    np.random.seed(99)
    random.seed(99)
    restore_rng_state(load_checkpoint(tmp_path / "rng.pt")["rng"])
    got = (torch.rand(4), np.random.randn(3), [random.random() for _ in range(3)], random.gauss(0, 1))
    assert torch.equal(got[0], expected[0])
    assert np.array_equal(got[1], expected[1])
    assert got[2] == expected[2] and got[3] == expected[3]


def test_code_version_names_the_package_version():
    version = code_version()
    assert version["package"] == shapee.__version__
    assert version["git_commit"] is None or len(version["git_commit"]) == 40
