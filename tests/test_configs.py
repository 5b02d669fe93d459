"""Every Hydra config composes (lightning-hydra-template style), and the composed values are what scripts expect."""

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

CONFIGS = Path(__file__).resolve().parents[1] / "configs"

# Primary config → (overrides every composition needs, groups whose every option must compose with it).
PRIMARY = {
    "prepare_data": (["out=/tmp/x"], ["data"]),
    "train_encoder": (["data.root=/tmp/records"], ["stage", "trainer"]),
    "train_pointe_sdf": (["data.root=/tmp/records"], ["trainer"]),
    "train_diffusion": (["data.root=/tmp/latents"], ["cond", "trainer"]),
    "extract_latents": (["records=/tmp/r", "transmitter=/tmp/e.pt", "out=/tmp/o"], ["cond"]),
    "evaluate": (["task=encoder", "ckpt=/tmp/c.pt"], []),
    "sample": (["prompt=a chair"], []),
    "export": (["prior=/tmp/p.pt", "out=/tmp/o"], []),
}


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIGS / group).glob("*.yaml"))


def _compose(name: str, overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose(config_name=name, overrides=overrides)
    OmegaConf.resolve(cfg)  # every interpolation must resolve too
    return cfg


def _cases():
    for name, (base, groups) in PRIMARY.items():
        yield name, base
        for group in groups:
            for option in _options(group):
                yield name, base + [f"{group}={option}"]


def test_every_primary_config_is_covered():
    assert sorted(p.stem for p in CONFIGS.glob("*.yaml")) == sorted(PRIMARY)


@pytest.mark.parametrize("name, overrides", list(_cases()), ids=lambda v: str(v))
def test_config_composes(name, overrides):
    if name == "prepare_data" and any(o.startswith("data=") for o in overrides):
        overrides = overrides + ["input=/tmp"]
    cfg = _compose(name, overrides)
    assert cfg is not None


def _experiment_primary(path: Path) -> str | None:
    """Experiment presets say which script they are for on a line ``# for: scripts/<name>.py``."""
    for line in path.read_text().splitlines():
        if line.startswith("# for: scripts/"):
            return line.removeprefix("# for: scripts/").removesuffix(".py").strip()
    return None


@pytest.mark.parametrize("preset", _options("experiment"))
def test_every_experiment_preset_composes(preset):
    primary = _experiment_primary(CONFIGS / "experiment" / f"{preset}.yaml")
    assert primary in PRIMARY, f"experiment/{preset}.yaml must say '# for: scripts/<name>.py' (one of {list(PRIMARY)})"
    cfg = _compose(primary, PRIMARY[primary][0] + [f"experiment={preset}"])
    assert cfg.trainer.max_steps <= 1000, "tiny presets must train in seconds"


def test_train_encoder_defaults_are_the_official_model():
    cfg = _compose("train_encoder", ["data.root=/tmp/records"])
    assert cfg.model._target_ == "shapee.models.Transmitter"
    assert (cfg.model.encoder.width, cfg.model.encoder.layers, cfg.model.encoder.heads) == (1024, 12, 8)
    assert cfg.model.stage == cfg.stage.name == "nerf"
    assert cfg.trainer.loss_weights == cfg.stage.loss_weights


def test_tiny_nerf_preset_overrides_model_and_trainer():
    cfg = _compose("train_encoder", ["data.root=/tmp/records", "experiment=tiny_nerf", "init_from=/tmp/a.pt"])
    assert cfg.model.encoder.width == 64 and cfg.trainer.precision == "fp32"
    assert cfg.trainer.init_from == "/tmp/a.pt"
