"""Loading never runs code a file names: tampered snapshots/checkpoints are refused before anything is called.

Each legitimate file is written by the project's own save helpers, then its saved model config is tampered with
targets that have side effects (``builtins.open(<file>, "w")``, ``io.open``, ``os.makedirs``, ``pathlib.Path.touch``,
``shutil.copyfile``), at the top level, nested in a dict and nested in a list. Every public loader and every script
that takes a checkpoint must refuse it with a :class:`CheckpointError` naming the file, the key path and the target,
and the side effect must not have happened. A control test shows that each payload does have its side effect when
handed to ``hydra.utils.instantiate``, so "nothing happened" is a real result.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

import shapee.io
from _tiny_data import one_torch_thread, run_script, tiny_transmitter_config
from shapee.io import ALLOWED_MODELS, CheckpointError, build_model, check_model_config
from shapee.io.checkpoint import SNAPSHOT_FORMAT, atomic_torch_save, save_checkpoint, save_snapshot
from shapee.models import LatentDiffusion, Transmitter
from shapee.models.pointe_sdf import PointESDF
from shapee.io.loading import load_prior, load_sdf_teacher, load_transmitter
from shapee.pipeline import TextTo3D
from test_pipeline import prior_config, save_box_decoder, save_prior

_one_thread = pytest.fixture(scope="module", autouse=True)(one_torch_thread)

POINTE_TINY = dict(_target_="shapee.models.pointe_sdf.PointESDF", width=32, encoder_layers=2, encoder_heads=2,
                   decoder_layers=1, decoder_heads=2, n_ctx=256, init_scale=0.25, n_query=256, loss="l1",
                   checkpoint=False)


# ------------------------------------------------------------------------------------------------ payloads
class Victims:
    """Files and folders the payloads would create, change or copy, and checks that they did not."""

    def __init__(self, root: Path):
        root.mkdir(parents=True, exist_ok=True)
        self.file = root / "precious.txt"
        self.file.write_text("precious data")
        self.made_dir = root / "made_dir"
        self.touched = root / "touched"
        self.copy = root / "copied.txt"

    def payloads(self) -> dict[str, dict]:
        return {
            "open": {"_target_": "builtins.open", "_args_": [str(self.file), "w"]},
            "io.open": {"_target_": "io.open", "file": str(self.file), "mode": "w"},
            "makedirs": {"_target_": "os.makedirs", "name": str(self.made_dir)},
            "touch": {"_target_": "pathlib.Path.touch",
                      "self": {"_target_": "pathlib.Path", "_args_": [str(self.touched)]}},
            "copyfile": {"_target_": "shutil.copyfile", "src": str(self.file), "dst": str(self.copy)},
        }

    def untouched(self) -> bool:
        return (
            self.file.read_text() == "precious data"
            and not self.made_dir.exists()
            and not self.touched.exists()
            and not self.copy.exists()
        )


PAYLOADS = ["open", "io.open", "makedirs", "touch", "copyfile"]


@pytest.mark.parametrize("name", PAYLOADS)
def test_control_each_payload_has_its_side_effect_when_hydra_instantiates_it(tmp_path, name):
    from hydra.utils import instantiate

    victims = Victims(tmp_path)
    result = instantiate(victims.payloads()[name])
    if hasattr(result, "close"):
        result.close()
    assert not victims.untouched()  # the payload is live: refusing it below is what keeps the victims intact


# ------------------------------------------------------------------------------------------------ files
@pytest.fixture(scope="module")
def legit(tmp_path_factory):
    """Legitimate snapshots and full checkpoints of the three model kinds, written by the project's save helpers."""
    base = tmp_path_factory.mktemp("legit")
    files = {"prior": save_prior(base / "prior.pt"), "transmitter": save_box_decoder(base / "transmitter.pt")}
    torch.manual_seed(0)
    pointe = PointESDF(**{k: v for k, v in POINTE_TINY.items() if k != "_target_"})
    shapee.io.save(base / "pointe.pt", pointe, POINTE_TINY)
    files["pointe"] = base / "pointe.pt"
    for kind, path in list(files.items()):  # a full checkpoint as the training loop writes it: EMA + run config
        snap = torch.load(path, weights_only=True)
        save_checkpoint(base / f"{kind}_ckpt.pt", {"model": snap["weights"], "ema": snap["weights"], "step": 3,
                                                  "config": {"model": snap["model_config"], "run_dir": "x"}})
        files[f"{kind}_ckpt"] = base / f"{kind}_ckpt.pt"
    return files


def tamper(src: Path, dst: Path, place: str, payload: dict) -> tuple[Path, str]:
    """Copy of ``src`` whose saved model config carries ``payload`` at ``place``; returns it and the key path the
    refusal must name."""
    obj = torch.load(src, weights_only=True)
    cfg = obj["model_config"] if obj["format"] == SNAPSHOT_FORMAT else obj["config"]["model"]
    if place == "top":  # the model itself is the payload
        cfg.clear()
        cfg.update(payload)
        key = "model._target_"
    elif place == "dict":  # a payload inside one of the model's keyword dicts
        name = next((k for k in ("denoiser", "encoder") if k in cfg), None)
        if name is None:
            cfg["extra"] = {}
            name = "extra"
        cfg[name]["clip"] = payload
        key = f"model.{name}.clip._target_"
    else:  # in a list, two levels down
        cfg.setdefault("encoder", {})["pointconv_hidden"] = [64, {"inner": payload}]
        key = "model.encoder.pointconv_hidden[1].inner._target_"
    atomic_torch_save(obj, dst)
    return dst, key


def assert_refused(excinfo, path: Path, key: str, payload: dict, victims: Victims) -> None:
    message = str(excinfo.value)
    assert str(path) in message and key in message and payload["_target_"] in message, message
    assert "\n" not in message
    assert victims.untouched()


LOADERS = {
    "shapee.io.load": ("prior", lambda p: shapee.io.load(p)),
    "load_prior": ("prior", lambda p: load_prior(p)),
    "TextTo3D.from_checkpoints": ("prior", None),  # with a legitimate decoder, below
    "load_transmitter": ("transmitter", lambda p: load_transmitter(p)),
    "load_transmitter(shapee)": ("transmitter", lambda p: load_transmitter(p, encoder_format="shapee")),
    "load_sdf_teacher": ("pointe", lambda p: load_sdf_teacher(str(p))),
    "shapee.io.load(pointe)": ("pointe", lambda p: shapee.io.load(p)),
}


@pytest.mark.parametrize("kind", ["snapshot", "checkpoint"])
@pytest.mark.parametrize("place", ["top", "dict", "list"])
@pytest.mark.parametrize("payload_name", PAYLOADS)
@pytest.mark.parametrize("loader", list(LOADERS))
def test_every_loader_refuses_side_effect_targets_at_every_depth(legit, tmp_path, loader, payload_name, place, kind):
    model_kind, load = LOADERS[loader]
    victims = Victims(tmp_path / "victims")
    payload = victims.payloads()[payload_name]
    src = legit[model_kind if kind == "snapshot" else f"{model_kind}_ckpt"]
    path, key = tamper(src, tmp_path / "evil.pt", place, payload)
    with pytest.raises(CheckpointError) as excinfo:
        if load is None:
            TextTo3D.from_checkpoints(prior=path, transmitter=legit["transmitter"], device="cpu")
        else:
            load(path)
    assert_refused(excinfo, path, key, payload, victims)


@pytest.mark.parametrize(
    "extra, key, shown",
    [
        ({"_partial_": True}, "model._partial_", "True"),
        ({"_args_": [{"_target_": "os.makedirs", "name": "X"}]}, "model._args_", "list"),
        ({"_recursive_": True}, "model._recursive_", "True"),
        ({"_convert_": "all"}, "model._convert_", "all"),
        ({"n_query": {"_target_": "builtins.eval", "_args_": ["1"]}}, "model.n_query._target_", "builtins.eval"),
    ],
)
def test_construction_keys_beside_an_allowed_target_are_refused(legit, tmp_path, extra, key, shown):
    obj = torch.load(legit["pointe"], weights_only=True)
    obj["model_config"].update(extra)
    atomic_torch_save(obj, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="evil.pt") as excinfo:
        shapee.io.load(tmp_path / "evil.pt")
    assert key in str(excinfo.value) and shown in str(excinfo.value)


def test_check_model_config_walks_dictconfigs_and_refuses_cycles_and_objects():
    nested = OmegaConf.create({"_target_": "shapee.models.LatentDiffusion",
                               "denoiser": {"layers": [1, {"_target_": "os.system", "_args_": ["true"]}]}})
    with pytest.raises(CheckpointError, match=r"^x: .*model\.denoiser\.layers\[1\]\._target_ = 'os\.system'"):
        check_model_config(nested, source="x")
    # Interpolations are resolvers, i.e. code: they are not resolved (the value stays a literal string).
    cls, kwargs = check_model_config(OmegaConf.create({**POINTE_TINY, "loss": "${oc.env:HOME}"}), source="x")
    assert cls is PointESDF and kwargs["loss"] == "${oc.env:HOME}"
    looped: dict = {"_target_": "shapee.models.pointe_sdf.PointESDF"}
    looped["self"] = looped
    with pytest.raises(CheckpointError, match=r"model\.self .*refers to itself"):
        check_model_config(looped, source="x")
    with pytest.raises(CheckpointError, match=r"model\.width is a Tensor"):
        check_model_config({**POINTE_TINY, "width": torch.tensor(3)}, source="x")
    with pytest.raises(CheckpointError, match=r"does not fit shapee.models.pointe_sdf.PointESDF.*nonsense"):
        check_model_config({**POINTE_TINY, "nonsense": 1}, source="x")
    with pytest.raises(CheckpointError, match=r"model\._target_ = 'list' is not a shapee model class"):
        check_model_config({"_target_": ["builtins.open"]}, source="x")
    with pytest.raises(CheckpointError, match="no _target_"):
        check_model_config({"width": 3}, source="x")


def test_the_allow_list_is_the_three_shapee_models():
    classes = {getattr(__import__(m, fromlist=[n]), n) for m, n in ALLOWED_MODELS.values()}
    assert classes == {Transmitter, LatentDiffusion, PointESDF}
    # The trainers write these targets, and every shipped model preset names one of them.
    for preset in Path(__file__).resolve().parents[1].joinpath("configs", "model").glob("*.yaml"):
        assert OmegaConf.load(preset)["_target_"] in ALLOWED_MODELS, preset


# ------------------------------------------------------------------------------------------------ legitimate files
@pytest.mark.parametrize("kind", ["pointe", "pointe_ckpt", "prior", "prior_ckpt", "transmitter", "transmitter_ckpt"])
def test_legitimate_snapshots_and_checkpoints_still_load(legit, kind):
    model = shapee.io.load(legit[kind])
    obj = torch.load(legit[kind], weights_only=True)
    weights = obj.get("weights") or obj["ema"]
    assert not model.training and set(model.state_dict()) == set(weights)
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, weights[name], rtol=0, atol=0)
    loaders = {"pointe": load_sdf_teacher, "prior": load_prior, "transmitter": load_transmitter}
    again = loaders[kind.removesuffix("_ckpt")](str(legit[kind]))
    assert type(again) is type(model)


def test_wrong_model_kind_keeps_each_loaders_own_error(legit):
    from shapee.io.loading import EncoderLoadError

    with pytest.raises(CheckpointError, match=r"prior=.*transmitter.pt.* not a shapee.models.LatentDiffusion"):
        load_prior(legit["transmitter"])
    with pytest.raises(EncoderLoadError, match=r"transmitter=.*prior.pt.* not a shapee.models.Transmitter"):
        load_transmitter(legit["prior"])
    with pytest.raises(CheckpointError, match=r"teacher_checkpoint=.*prior.pt.* not a shapee.models.pointe_sdf"):
        load_sdf_teacher(str(legit["prior"]))
    with pytest.raises(CheckpointError, match="neither"):
        build_model({"format": "other"}, source="x")
    obj = torch.load(legit["transmitter"], weights_only=True)
    obj["model_config"]["stage"] = "bogus"  # an allowed class refusing a value: the loader's error, naming the file
    with pytest.raises(EncoderLoadError, match=r"transmitter='x.pt': its model config does not build .*'bogus'"):
        build_model(obj, source="transmitter='x.pt'", error=EncoderLoadError)


# ------------------------------------------------------------------------------------------------ file modes
@pytest.mark.skipif(os.name != "posix", reason="POSIX file modes")
@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_checkpoints_get_the_mode_the_umask_gives_new_files(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        snap = save_snapshot(tmp_path / "snap.pt", weights={"w": torch.zeros(2)}, model_config=POINTE_TINY)
        ckpt = save_checkpoint(tmp_path / "last.pt", {"step": 1})
        save_snapshot(snap, weights={"w": torch.ones(2)})  # replacing an existing file: same rule
    finally:
        os.umask(old)
    for path in (snap, ckpt):
        assert stat.S_IMODE(path.stat().st_mode) == mode
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt", "snap.pt"]  # atomic: no temporary left
    assert torch.equal(shapee.io.load_snapshot(snap)["weights"]["w"], torch.ones(2))


# ------------------------------------------------------------------------------------------------ scripts
def _script_case(legit, tmp_path, model_kind: str, payload_name: str, place: str):
    victims = Victims(tmp_path / "victims")
    payload = victims.payloads()[payload_name]
    path, key = tamper(legit[model_kind], tmp_path / "evil.pt", place, payload)
    return victims, payload, path, key


def _assert_script_refused(proc, path, key, payload, victims, rc=(2,)):
    assert proc.returncode in rc, proc.stderr[-3000:]
    assert str(path) in proc.stderr and key in proc.stderr and payload["_target_"] in proc.stderr, proc.stderr[-3000:]
    assert "CheckpointError" in proc.stderr or "error:" in proc.stderr
    assert victims.untouched()


def test_sample_script_refuses_a_tampered_prior_and_transmitter(legit, tmp_path):
    victims, payload, path, key = _script_case(legit, tmp_path, "prior", "open", "dict")
    proc = run_script("sample.py", "prompt=a cube", f"prior={path}", f"transmitter={legit['transmitter']}",
                      f"out={tmp_path / 'out'}", "device=cpu", check=False)
    _assert_script_refused(proc, path, key, payload, victims)
    assert "sample: error:" in proc.stderr and not (tmp_path / "out").exists()

    victims, payload, path, key = _script_case(legit, tmp_path / "t", "transmitter_ckpt", "makedirs",
                                               "list")
    proc = run_script("sample.py", "prompt=a cube", f"prior={legit['prior']}", f"transmitter={path}",
                      f"out={tmp_path / 'out'}", "device=cpu", check=False)
    _assert_script_refused(proc, path, key, payload, victims)


def test_extract_latents_script_refuses_a_tampered_encoder(legit, tmp_path):
    records = tmp_path / "records"  # one manifest line: the encoder is loaded before any record is read
    (records / "records").mkdir(parents=True)
    (records / "records" / "a.npz").write_bytes(b"")
    (records / "manifest.jsonl").write_text(
        '{"asset_id": "a", "record": "records/a.npz", "source": "toy:a", "content_hash": "0", "n_views": 4, '
        '"n_targets": 4, "n_points": 1024, "n_sdf": 0}\n'
    )
    victims, payload, path, key = _script_case(legit, tmp_path, "transmitter", "copyfile", "top")
    proc = run_script("extract_latents.py", f"records={records}", f"transmitter={path}", f"out={tmp_path / 'o'}",
                      "device=cpu", "progress=false", check=False)
    _assert_script_refused(proc, path, key, payload, victims)
    assert "Traceback" not in proc.stderr


def test_evaluate_script_refuses_tampered_checkpoints(legit, tmp_path):
    victims, payload, path, key = _script_case(legit, tmp_path, "transmitter", "touch", "dict")
    records = tmp_path / "records"
    records.mkdir()
    (records / "manifest.jsonl").write_text("")  # passes the script's early data.root check; the checkpoint is refused
    proc = run_script("evaluate.py", "task=encoder", f"transmitter={path}", f"data.root={records}",
                      f"out={tmp_path / 'e'}", "device=cpu", check=False)
    _assert_script_refused(proc, path, key, payload, victims)

    victims, payload, path, key = _script_case(legit, tmp_path / "g", "prior_ckpt", "io.open", "top")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cube\na blue ball\n")
    proc = run_script("evaluate.py", "task=generation", f"prior={path}", f"prompts={prompts}",
                      f"transmitter={legit['transmitter']}", f"out={tmp_path / 'g'}", "device=cpu", check=False)
    _assert_script_refused(proc, path, key, payload, victims)


def test_train_diffusion_script_refuses_a_tampered_decoder(legit, tmp_path):
    from shapee.data.latents import write_latent_record

    latents = tmp_path / "latents"
    write_latent_record(latents, asset_id="a", latent=torch.zeros(128, 64), captions=["a cube"])
    victims, payload, path, key = _script_case(legit, tmp_path, "transmitter", "open", "list")
    proc = run_script("train_diffusion.py", "experiment=tiny_prior", f"data.root={latents}",
                      f"run_dir={tmp_path / 'run'}", "trainer.max_steps=1", f"transmitter={path}", check=False)
    _assert_script_refused(proc, path, key, payload, victims)
    assert not (tmp_path / "run" / "checkpoints").exists()
