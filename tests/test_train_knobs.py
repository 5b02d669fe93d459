"""Training settings stay out of the model's saved config; the trainers build their model as the loaders do.

The Transmitter's loss settings (``teacher``, ``teacher_checkpoint``, ``distill_points``, ``stf_views``,
``stf_resolution``, ``stf_sigma``) belong to the stage config: the encoder trainer hands them to the model as
``model.loss_settings`` and a snapshot's model config holds only what rebuilds the network. Files written before
that still carry them in their model config and still load (the known keys are dropped; unknown keys stay refused).
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from hydra import compose, initialize_config_dir

import shapee.io
from _tiny_data import REPO, one_torch_thread, tiny_records, tiny_transmitter_config
from shapee.io import CheckpointError, instantiate_model
from shapee.io.checkpoint import load_snapshot, save_checkpoint
from shapee.io.safe import RETIRED_KEYS
from shapee.models import LossSettings, Transmitter

_one_thread = pytest.fixture(scope="module", autouse=True)(one_torch_thread)

KNOBS = set(RETIRED_KEYS[("shapee.models.transmitter", "Transmitter")])
# What a model config held before the loss settings moved (configs/model/transmitter_tiny.yaml, stage finetune).
OLD_KNOBS = dict(teacher="mesh", teacher_checkpoint=None, distill_points=4096, stf_views=2, stf_resolution=None,
                 stf_sigma=1e-3)


def _compose(*overrides: str):
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        return compose(config_name="train_encoder", overrides=list(overrides))


def test_the_knobs_are_the_loss_settings_and_the_model_configs_hold_none_of_them():
    from dataclasses import fields

    assert KNOBS == {f.name for f in fields(LossSettings)} | {"teacher_checkpoint"}
    for stage in ("nerf", "distill", "finetune"):
        cfg = _compose("data.root=/x", f"stage={stage}")
        assert not KNOBS & set(cfg.model), stage
    assert not KNOBS & set(tiny_transmitter_config())


def test_a_snapshot_written_by_training_holds_no_training_setting(tmp_path_factory, tmp_path, monkeypatch):
    import shapee.train.encoder as encoder_trainer

    seen = {}
    real_train = encoder_trainer.train

    def spying_train(trainer_cfg, *, model, **kwargs):
        seen["settings"] = model.loss_settings
        return real_train(trainer_cfg, model=model, **kwargs)

    monkeypatch.setattr(encoder_trainer, "train", spying_train)
    records = tiny_records(tmp_path_factory.getbasetemp())
    run_dir = tmp_path / "run"
    cfg = _compose("experiment=tiny_finetune", f"data.root={records}", f"run_dir={run_dir}", "resume=never",
                   "trainer.max_steps=1", "eval.n_assets=0", "stage.stf_resolution=16", "stage.stf_sigma=1e-3")
    final = encoder_trainer.train_encoder(cfg)
    assert final["finished"] == 1
    # The stage's settings reached the losses ...
    assert seen["settings"] == LossSettings(stf_views=2, stf_resolution=16, stf_sigma=1e-3)
    # ... and neither the snapshot nor the full checkpoint's model config holds them: architecture only, exactly the
    # model config that built the trained model.
    snapshot = load_snapshot(run_dir / "checkpoints" / "snapshot.pt")
    config = snapshot["model_config"]
    assert config == tiny_transmitter_config() | {"stage": "finetune", "stf_grid_size": 32}
    assert not KNOBS & set(config)
    full = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    assert full["config"]["model"] == config
    assert full["config"]["stage"]["stf_sigma"] == 1e-3  # the run config still records how it was trained
    # A loaded snapshot trains with the default recipe until a trainer says otherwise.
    assert shapee.io.load(run_dir / "checkpoints" / "snapshot.pt").loss_settings == LossSettings()


def test_an_old_snapshot_or_checkpoint_carrying_the_knobs_still_loads(tmp_path):
    config = tiny_transmitter_config()
    torch.manual_seed(0)
    model = Transmitter(**{k: v for k, v in config.items() if k != "_target_"})
    old_config = {**config, **OLD_KNOBS}
    shapee.io.save(tmp_path / "old_snapshot.pt", model, old_config)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    save_checkpoint(tmp_path / "old_last.pt", {"model": weights, "ema": weights, "config": {"model": old_config}})
    for name in ("old_snapshot.pt", "old_last.pt"):
        for loaded in (shapee.io.load(tmp_path / name),
                       shapee.io.load_model(tmp_path / name, expect="transmitter")):
            assert isinstance(loaded, Transmitter), name
            assert all(torch.equal(loaded.state_dict()[k], v) for k, v in weights.items()), name
            assert loaded.loss_settings == LossSettings()  # the old settings were training settings: dropped
    # A key that never was a Transmitter setting is still refused, naming it.
    shapee.io.save(tmp_path / "odd.pt", model, {**old_config, "stf_sigmas": 1e-3})
    with pytest.raises(CheckpointError, match="stf_sigmas"):
        shapee.io.load(tmp_path / "odd.pt")


def test_training_builds_through_the_allow_list_and_refuses_the_old_keys():
    config = tiny_transmitter_config()
    torch.manual_seed(0)
    built = instantiate_model(config, source="model", expected="shapee.models.Transmitter")
    assert isinstance(built, Transmitter) and built.training and built.stf_grid_size == config["stf_grid_size"]
    # A training config that still sets a moved key says where it lives now instead of silently dropping it.
    with pytest.raises(CheckpointError, match=r"model\.stf_sigma is not a model setting any more: set stage\.stf_sigma"):
        instantiate_model({**config, "stf_sigma": 1e-3}, source="model")
    with pytest.raises(CheckpointError, match="builtins.open.*is not a shapee model class"):
        instantiate_model({**config, "_target_": "builtins.open"}, source="model")
    with pytest.raises(ValueError, match="not a shapee.models.LatentDiffusion"):
        instantiate_model(config, source="model", expected="shapee.models.LatentDiffusion", error=ValueError)
    # The encoder trainer refuses an unbuilt model config (here: a prior's) before touching any data.
    from shapee.train.encoder import train_encoder

    with pytest.raises(ValueError, match="train_encoder: model holds a model with _target_='shapee.models.LatentDiffusion'"):
        train_encoder(_compose("experiment=tiny_nerf", "data.root=/nonexistent", "model=prior_text_tiny"))


def test_the_stage_config_gives_the_loss_settings_and_a_pointe_teacher_needs_its_file():
    from shapee.train.encoder import stage_loss_settings, train_encoder

    assert stage_loss_settings(_compose("data.root=/x", "stage=nerf").stage) == LossSettings()
    distill = _compose("data.root=/x", "experiment=tiny_distill").stage
    assert stage_loss_settings(distill) == LossSettings(distill_points=1024)
    finetune = _compose("data.root=/x", "experiment=tiny_finetune", "stage.stf_sigma=1e-3").stage
    assert stage_loss_settings(finetune) == replace(LossSettings(), stf_views=2, stf_sigma=1e-3)
    with pytest.raises(ValueError, match="stage.teacher=pointe needs stage.teacher_checkpoint"):
        train_encoder(_compose("experiment=tiny_distill", "data.root=/nonexistent", "stage.teacher=pointe"))
