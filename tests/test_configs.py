"""Every Hydra config composes (lightning-hydra-template style), and the composed values are what scripts expect."""

import inspect
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from shapee.cli import UserError, check_overrides
from shapee.eval.config import TASKS, defaults, merge_settings, register_configs
from shapee.settings import register_sample_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"

# Primary config → (overrides every composition needs, groups whose every option must compose with it).
PRIMARY = {
    "prepare_data": (["out=/tmp/x"], ["data"]),
    "train_encoder": (["data.root=/tmp/records"], ["stage", "trainer"]),
    "train_pointe_sdf": (["data.root=/tmp/records"], ["trainer"]),
    "train_diffusion": (["data.root=/tmp/latents"], ["cond", "trainer"]),
    "extract_latents": (["records=/tmp/r", "transmitter=/tmp/e.pt", "out=/tmp/o"], ["cond"]),
    "evaluate": ([], ["task"]),
    "sample": (["prompt=a chair"], []),
    "export": (["prior=/tmp/p.pt", "out=/tmp/o"], []),
}


# Primary configs whose group has no default (the command line must pick one): composed only with each option.
NO_DEFAULT_GROUP = {"evaluate": "task"}


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIGS / group).glob("*.yaml"))


def _compose(name: str, overrides: list[str]):
    register_configs()  # the structured configs that configs/task/*.yaml (shapee/eval/config.py) and
    register_sample_config()  # configs/sample.yaml (shapee/settings.py) extend
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose(config_name=name, overrides=overrides)
    OmegaConf.resolve(cfg)  # every interpolation must resolve too
    return cfg


def _cases():
    for name, (base, groups) in PRIMARY.items():
        if name not in NO_DEFAULT_GROUP:
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


# ------------------------------------------------------------------------------------------------- evaluate tasks
def test_every_evaluate_task_has_a_schema():
    assert _options("task") == sorted(TASKS)


@pytest.mark.parametrize("task", _options("task"))
def test_evaluate_task_sees_the_dataclass_defaults(task):
    # configs/task/<task>.yaml adds and changes nothing: the composed config is the dataclass, typed, with its defaults,
    # and the evaluation function (merge_settings, as evaluate_encoder / evaluate_generation call it) sees the same.
    cfg = _compose("evaluate", [f"task={task}"])
    assert OmegaConf.get_type(cfg) is TASKS[task]
    assert OmegaConf.to_container(cfg) == defaults(TASKS[task])
    assert cfg.task == task
    required = {k: "/tmp/x" for k in OmegaConf.missing_keys(cfg)}
    assert required, "each task names the weights it evaluates"
    seen = merge_settings(TASKS[task], OmegaConf.merge(cfg, required))
    assert seen == merge_settings(TASKS[task], required)
    assert seen == TASKS[task](**required)
    # a command-line value reaches the task with the dataclass's type
    assert _compose("evaluate", [f"task={task}", "grid_views=2", "seed=3"]).grid_views == 2


def test_evaluate_defaults_that_once_drifted():
    encoder, generation = _compose("evaluate", ["task=encoder"]), _compose("evaluate", ["task=generation"])
    assert encoder.grid_views == generation.grid_views == 4  # was 8 in Python, 4 in the YAML
    assert (generation.render_views, generation.render_resolution) == (20, 128)  # no longer renamed on the way in
    assert encoder.fscore_threshold == 0.02 and generation.eval_clip.model_name == "ViT-B-32"


def test_evaluate_library_defaults_are_the_dataclass():
    import inspect

    from shapee.eval.config import EncoderEval
    from shapee.eval.encoder import CHECKPOINT_SETTINGS, ENCODER_DEFAULTS, evaluate_checkpoint
    from shapee.eval.metrics import DEFAULT_FSCORE_THRESHOLD

    signature = inspect.signature(evaluate_checkpoint).parameters
    assert {k: signature[k].default for k in CHECKPOINT_SETTINGS} == {k: getattr(EncoderEval, k)
                                                                        for k in CHECKPOINT_SETTINGS}
    assert ENCODER_DEFAULTS == defaults(EncoderEval) and DEFAULT_FSCORE_THRESHOLD == EncoderEval.fscore_threshold


@pytest.mark.parametrize("overrides, message", [
    (["task=encoder", "max_asets=2"], "max_asets= is not a setting of task=encoder; did you mean max_assets=?"),
    (["task=encoder", "data.rot=x"], "data.rot= is not a setting of task=encoder; did you mean data.root=?"),
    (["task=generation", "views=holdout"], "views= is not a setting of task=generation; did you mean"),
    (["task=encoder", "max_assets=many"], "max_assets=many: Value 'many' of type 'str' could not be converted"),
    (["max_assets=2"], "task is not set: pass task=encoder|generation"),
    (["task=encoders"], "task=encoders: no such option; pass task=encoder|generation"),
])
def test_evaluate_command_line_mistakes_name_the_key(overrides, message):
    register_configs()
    with pytest.raises(UserError) as e:
        check_overrides(CONFIGS, "evaluate", overrides)
    assert str(e.value).startswith(message) and "\n" not in str(e.value)
    check_overrides(CONFIGS, "evaluate", ["task=encoder", "max_assets=2", "data.root=/tmp/r"])  # a good one passes


def test_evaluate_functions_refuse_unknown_settings():
    from shapee.eval.run import evaluate

    with pytest.raises(ValueError, match="unknown setting 'max_asets'"):
        evaluate({"task": "encoder", "transmitter": "x.pt", "data": {"root": "r"}, "max_asets": 2})
    with pytest.raises(ValueError, match="unknown setting 'ckpt'"):
        evaluate({"task": "generation", "ckpt": "p.pt", "transmitter": "t.pt", "prompts": ["a", "b"]})
    with pytest.raises(ValueError, match="prior=<...> is required for task=generation"):
        evaluate({"task": "generation", "transmitter": "t.pt", "prompts": ["a", "b"]})


def test_sample_config_is_the_dataclass_and_shares_the_sampling_defaults():
    from shapee.eval.config import GenerationEval
    from shapee.settings import SampleConfig, SamplingConfig

    cfg = _compose("sample", [])
    assert OmegaConf.get_type(cfg) is SampleConfig and OmegaConf.to_container(cfg) == defaults(SampleConfig)
    # sample_assets and evaluate.py task=generation sample and render with the same defaults, stated once
    generation = defaults(GenerationEval)
    shared = {k: v for k, v in defaults(SamplingConfig).items() if k != "render_resolution"}
    assert {k: generation[k] for k in shared} == shared == {k: cfg[k] for k in shared}
    with pytest.raises(ValueError, match="unknown setting 'stepz'"):
        from shapee.sample import sample_assets

        sample_assets({"prompt": "a chair", "stepz": 3})


def test_every_grid_size_default_is_the_one_marching_cubes_default():
    """The settings dataclasses sit below render/ (they cannot import it), so their literal 128 is checked here
    against render.grid.DEFAULT_GRID_SIZE, which the model and the mesh path use."""
    from shapee.eval.config import EncoderEval
    from shapee.models import Transmitter
    from shapee.render.grid import DEFAULT_GRID_SIZE
    from shapee.settings import SamplingConfig

    assert SamplingConfig().grid_size == DEFAULT_GRID_SIZE
    assert EncoderEval().grid_size == DEFAULT_GRID_SIZE
    assert inspect.signature(Transmitter).parameters["stf_grid_size"].default == DEFAULT_GRID_SIZE
    assert _compose("sample", []).grid_size == DEFAULT_GRID_SIZE
    assert _compose("evaluate", ["task=encoder"]).grid_size == DEFAULT_GRID_SIZE
