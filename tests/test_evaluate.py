"""``scripts/evaluate.py`` end to end on tiny inputs (task=encoder on a tiny transmitter snapshot and toy records,
task=generation on a tiny text prior), and the evaluation pipeline on cases with a known answer: an oracle
transmitter that renders the records' own target views (PSNR = the cap), a known per-pixel error (PSNR by the
formula), the source mesh itself (Chamfer ≈ 0, F-score 1), identical renders (R-Precision = 1/P), renders whose
CLIP embeddings are their prompts' own (R-Precision = 100 %)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from PIL import Image

import shapee.io
from _tiny_data import REPO, one_torch_thread, run_script, tiny_records, tiny_transmitter_snapshot
from shapee.conditioning.clip import TINY_CLIP_CFG
from shapee.data.dataset import AssetDataset
from shapee.data.toy import toy_assets
from shapee.eval.config import register_configs
from shapee.eval.encoder import SourceMeshes, evaluate_checkpoint, metric_keys
from shapee.eval.generation import build_eval_clip, clip_r_precision, read_prompts, same_clip
from shapee.eval.run import evaluate
from shapee.models import LatentDiffusion, Transmitter

_one_thread = pytest.fixture(scope="module", autouse=True)(one_torch_thread)

PROMPTS = ["a red sphere", "a green cube", "a blue cone"]
# An evaluation CLIP that is not the tiny prior's conditioning CLIP (TINY_CLIP_CFG): another width and depth.
EVAL_CLIP_CFG = {
    "embed_dim": 24,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    "quick_gelu": True,
}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    base = tmp_path_factory.getbasetemp()
    return {"records": tiny_records(base), "transmitter": tiny_transmitter_snapshot(base)}


def _compose(*overrides: str):
    register_configs()
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        return compose(config_name="evaluate", overrides=list(overrides))


# ------------------------------------------------------------------------------------------------- task=encoder
def test_script_evaluates_the_encoder_end_to_end(data, tmp_path):
    out = tmp_path / "eval"
    proc = run_script(
        "evaluate.py", "task=encoder", f"transmitter=[{data['transmitter']},{data['transmitter']}]", "labels=[nerf,again]",
        f"data.root={data['records']}", f"out={out}", "max_assets=2", "views=holdout", "grid_size=32",
        "n_points=1024", "grid_views=2", "device=cpu",
    )
    results = json.loads((out / "results.json").read_text())
    assert "| stage / checkpoint |" in proc.stdout and (out / "results.md").read_text() == results["markdown"]
    rows = results["rows"]
    assert [r["label"] for r in rows] == ["nerf", "again"]
    for row in rows:
        assert row["n_assets"] == 2 and row["resolution"] == 64
        assert 0 < row["nerf_psnr"] < 100 and 0 < row["stf_psnr"] < 100
        assert len(row["assets"]) == 2
        for asset in row["assets"]:  # an empty mesh has no Chamfer and F-score 0; a mesh has both
            assert (asset["chamfer"] is None) == asset["empty_mesh"]
            assert asset["empty_mesh"] or (asset["chamfer"] > 0 and 0 <= asset["f_score"] <= 1)
        assert row["n_empty_meshes"] == sum(a["empty_mesh"] for a in row["assets"])
        # the grid: per asset target / NeRF / STF rows of 64² views, 2 views wide
        assert Image.open(row["grid"]).size == (2 * 64, 2 * 3 * 64)
    # same checkpoint, same seed → the same numbers (fixed cameras, deterministic sampling, seeded encoder shuffle)
    assert rows[0]["nerf_psnr"] == rows[1]["nerf_psnr"] and rows[0]["stf_psnr"] == rows[1]["stf_psnr"]
    assert results["settings"]["fscore_threshold"] == 0.02 and results["settings"]["background"] == "black"


class OracleTransmitter(Transmitter):
    """Test double with a known answer: "encodes" an asset to its index, "renders" the record's own target views for
    the cameras that took them (NeRF optionally off by exactly ±σ per channel), and "meshes" the source mesh."""

    def __init__(self, dataset: AssetDataset, sources: list, nerf_error: float = 0.0, **kwargs):
        super().__init__(**kwargs)
        items = [dataset[i] for i in range(len(dataset))]
        self.ids = [item["asset_id"] for item in items]
        self.origins = [item["target_cameras"][:, 0] for item in items]  # [T, 3] per asset
        self.images = [item["target_rgb"] for item in items]  # [T, H, W, 3] per asset
        self.sources = sources
        self.nerf_error = nerf_error

    def encode(self, batch, *, generator=None):
        index = torch.tensor([self.ids.index(i) for i in batch["asset_id"]], dtype=torch.float32)
        return index[:, None, None].expand(-1, self.encoder.latent_ctx, self.encoder.d_latent).clone()

    def _views(self, latent, cameras):
        out = []
        for b, cams in enumerate(cameras):
            a = int(latent[b, 0, 0])
            match = (cams.origin[:, None] - self.origins[a][None]).norm(dim=-1).argmin(dim=1)  # [n] view of each camera
            assert torch.allclose(self.origins[a][match], cams.origin)
            out.append(self.images[a][match])
        return torch.stack(out)  # [B, n, H, W, 3]

    def render_nerf(self, latent, cameras, *, deterministic=False, generator=None):
        rgb = self._views(latent, cameras)
        sigma = self.nerf_error  # every value moved by exactly σ, towards the middle so nothing is clipped
        return {"rgb": torch.where(rgb < 0.5, rgb + sigma, rgb - sigma)}

    def render_stf(self, latent, cameras, *, grid_size=None):
        meshes = [self.sources[int(latent[b, 0, 0])] for b in range(latent.shape[0])]
        return {
            "rgb": self._views(latent, cameras),
            "verts": [torch.from_numpy(m.vertices) for m in meshes],
            "faces": [torch.from_numpy(m.faces) for m in meshes],
        }


def test_encoder_metrics_on_an_oracle_have_the_known_answers(data):
    dataset = AssetDataset(data["records"], load_sdf=False, n_points=1024, n_views=4)
    dataset = AssetDataset(data["records"], load_sdf=False, n_points=1024, n_views=4, asset_ids=dataset.asset_ids[:2])
    toys = {a.asset_id: a.mesh for a in toy_assets(4)}  # the records are data=toy (seed 0)
    sigma = 0.1
    model = OracleTransmitter(dataset, [toys[i] for i in dataset.asset_ids], nerf_error=sigma,
                              **{k: v for k, v in _tiny_kwargs().items()})
    row, grid = evaluate_checkpoint(model, dataset, views="holdout", n_points=4096, fscore_threshold=0.1,
                                    psnr_cap=90.0, batch_size=2, grid_assets=1, grid_views=2)
    assert row["n_assets"] == 2 and row["n_empty_meshes"] == 0
    assert row["stf_psnr"] == 90.0  # identical to the targets → the cap
    assert row["nerf_psnr"] == pytest.approx(20 * math.log10(1 / sigma), abs=1e-4)  # MSE = σ² exactly → 20 dB
    # Two independent 4096-point samplings of the same mesh (area up to 24): Chamfer ≈ half the mean point spacing
    # (~0.03 here), every point within τ = 0.1 of the other set.
    assert 0 < row["chamfer"] < 0.05
    assert row["f_score"] == 1.0
    assert grid.shape == (3 * 64, 2 * 64, 3) and grid.dtype == np.uint8
    # the oracle with views="all" sees every target view; still exact
    row_all, _ = evaluate_checkpoint(model, dataset, views="all", n_points=256, psnr_cap=90.0, fscore_threshold=0.1)
    assert row_all["stf_psnr"] == 90.0


def _tiny_kwargs() -> dict:
    from _tiny_data import tiny_transmitter_config

    return {k: v for k, v in tiny_transmitter_config().items() if k != "_target_"}


def test_source_meshes_are_checked_against_the_record(data):
    dataset = AssetDataset(data["records"], load_targets=False, load_sdf=False)
    record = dataset.records[1]
    mesh = SourceMeshes(toy_seed=0).get(record)
    expected = toy_assets(2)[1].mesh
    assert np.array_equal(mesh.vertices, expected.vertices) and np.array_equal(mesh.faces, expected.faces)
    with pytest.raises(ValueError, match="toy_seed"):
        SourceMeshes(toy_seed=7).get(record)


def test_encoder_evaluation_errors_are_clear(data, tmp_path):
    with pytest.raises(ValueError, match="data.root"):
        evaluate(OmegaConf.to_container(_compose("task=encoder", f"transmitter={data['transmitter']}")))
    with pytest.raises(ValueError, match="task must be one of"):
        evaluate({"task": "encoders", "transmitter": "x"})
    with pytest.raises(ValueError, match="labels has 1 names for 2"):
        evaluate(OmegaConf.to_container(_compose(
            "task=encoder", f"transmitter=[{data['transmitter']},{data['transmitter']}]", "labels=[a]",
            f"data.root={data['records']}", "out=null")))


def _same(a: float, b: float) -> bool:
    return a == b or (math.isnan(a) and math.isnan(b))


def test_trainer_and_evaluate_py_give_the_same_numbers(data, tmp_path):
    # Issue 19, "one metric gives one number": the trainer's eval/* numbers and evaluate.py's on the run's snapshot
    # come from one function with one set of defaults. A tiny nerf run (2 steps, evaluated at its last step on the
    # first 2 assets, geometry on) against evaluate.py with its own defaults, told only the run's asset count and the
    # mesh grid the trainer's key names (the tiny model's 32³).
    from shapee.train.encoder import train_encoder

    run_dir = tmp_path / "run"
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        cfg = compose(config_name="train_encoder", overrides=[
            "experiment=tiny_nerf", f"data.root={data['records']}", f"run_dir={run_dir}", "resume=never",
            "trainer.max_steps=2", "eval.n_assets=2", "eval.geometry=true", "+eval.n_points=2048"])
    final = train_encoder(cfg)
    # the cheaper in-training mesh grid is in the mesh metrics' keys; the full (128³) keys are never logged
    assert {"eval/nerf_psnr", "eval/nerf_transmittance_l1", "eval/stf_psnr@32", "eval/chamfer@32",
            "eval/f_score@32", "eval/n_assets"} <= set(final)
    assert "eval/stf_psnr" not in final and "eval/chamfer" not in final
    assert final["eval/n_assets"] == 2

    results = evaluate(OmegaConf.to_container(_compose(
        "task=encoder", f"transmitter={run_dir / 'checkpoints' / 'snapshot.pt'}", f"data.root={data['records']}",
        "max_assets=2", "grid_size=32", "n_points=2048", "out=null", "device=cpu")))
    row = results["rows"][0]
    assert row["views"] == "holdout" and row["n_assets"] == 2  # auto: the 2 held-out target views of the tiny model
    pairs = {"nerf_psnr": "nerf_psnr", "nerf_transmittance_l1": "nerf_transmittance_l1", "stf_psnr": "stf_psnr@32",
             "chamfer": "chamfer@32", "f_score": "f_score@32", "n_empty_meshes": "n_empty_meshes@32"}
    # (after 2 steps the tiny model's meshes may be empty: then the counts and the NaN Chamfer must agree; the oracle
    # test above checks Chamfer / F-score values)
    for name, key in pairs.items():
        assert _same(row[name], final[f"eval/{key}"]), (name, row[name], final[f"eval/{key}"])
    assert 5 < row["nerf_psnr"] < 100  # a real number, not a default
    # the trainer's last logged row holds the same values (what a reader of metrics.jsonl sees)
    logged = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    last = [r for r in logged if "eval/nerf_psnr" in r][-1]
    assert last["step"] == 2 and last["eval/nerf_psnr"] == row["nerf_psnr"]


def test_metric_keys_name_cheaper_settings():
    row = {"nerf_psnr": 20.0, "nerf_transmittance_l1": 0.1, "stf_psnr": 18.0, "chamfer": 0.05, "f_score": 0.3,
           "n_empty_meshes": 0, "n_assets": 4, "assets": []}
    assert metric_keys(row, grid_size=128, resolution=None) == {
        "nerf_psnr": 20.0, "nerf_transmittance_l1": 0.1, "stf_psnr": 18.0, "chamfer": 0.05, "f_score": 0.3,
        "n_empty_meshes": 0.0, "n_assets": 4.0}
    keys = metric_keys(row, grid_size=32, resolution=16)
    assert set(keys) == {"nerf_psnr@16px", "nerf_transmittance_l1@16px", "stf_psnr@32@16px", "chamfer@32",
                         "f_score@32", "n_empty_meshes@32", "n_assets"}


# ---------------------------------------------------------------------------------------------- task=generation
@pytest.fixture(scope="module")
def prior(tmp_path_factory):
    """A tiny text prior with random weights (latents [128, 64] like the tiny transmitter), saved as a snapshot."""
    cfg = OmegaConf.to_container(OmegaConf.load(REPO / "configs" / "model" / "prior_text_tiny.yaml"), resolve=True)
    kwargs = {k: v for k, v in cfg.items() if k != "_target_"}
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = LatentDiffusion(**kwargs)
    path = tmp_path_factory.mktemp("prior") / "prior.pt"
    shapee.io.save(path, model, cfg)
    return path


@pytest.fixture(scope="module")
def eval_clip_file(tmp_path_factory):
    """A local open_clip checkpoint (another tiny architecture, random weights): the evaluation CLIP."""
    import open_clip

    with torch.random.fork_rng():
        torch.manual_seed(3)
        model = open_clip.model.CLIP(**EVAL_CLIP_CFG)
    path = tmp_path_factory.mktemp("clip") / "eval_clip.pt"
    torch.save(model.state_dict(), path)
    return path


def _generation_cfg(prior, decoder, prompts, out, eval_clip, *extra: str) -> dict:
    cfg = _compose("task=generation", f"prior={prior}", f"transmitter={decoder}", f"prompts={prompts}", f"out={out}",
                   "steps=2", "render_views=2", "render_resolution=32", "grid_size=16", "n_per_prompt=2",
                   "batch_prompts=2", "device=cpu", *extra)
    cfg = OmegaConf.to_container(cfg, resolve=True)
    cfg["eval_clip"] = eval_clip
    return cfg


def test_generation_evaluation_end_to_end(data, prior, eval_clip_file, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# evaluation prompts\n" + "\n".join(PROMPTS) + "\n\n")
    eval_clip = {"model_cfg": EVAL_CLIP_CFG, "pretrained": str(eval_clip_file)}
    cfg = _generation_cfg(prior, data["transmitter"], prompts, tmp_path / "gen", eval_clip)
    overrides = [f"{k}={v}" for k, v in cfg.items() if k in ("task", "prior", "transmitter", "prompts", "out", "steps",
                 "render_views", "render_resolution", "grid_size", "n_per_prompt", "batch_prompts", "device")]
    model_cfg = json.dumps(EVAL_CLIP_CFG).replace('"', "").replace(" ", "")  # Hydra's dict override grammar
    proc = run_script("evaluate.py", *overrides, f"eval_clip.model_cfg={model_cfg}", f"eval_clip.pretrained={eval_clip_file}")
    results = json.loads((tmp_path / "gen" / "results.json").read_text())
    assert "CLIP R-Precision" in proc.stdout and results["markdown"] == (tmp_path / "gen" / "results.md").read_text()
    row = results["rows"][0]
    P, n, V = 3, 2, 2
    assert (row["n_prompts"], row["n_samples"], row["n_renders"]) == (P, P * n, P * n * V)
    # R-Precision is a fraction of the P·n·V renders, and the mean of the per-prompt values
    assert row["r_precision"] * P * n * V == pytest.approx(round(row["r_precision"] * P * n * V))
    assert row["r_precision"] == pytest.approx(np.mean([p["r_precision"] for p in row["prompts"]]))
    assert [p["prompt"] for p in row["prompts"]] == PROMPTS
    assert row["sample_seconds_per_sample"] > 0 and row["render_seconds_per_sample"] > 0
    assert row["seconds_per_sample"] == pytest.approx(row["sample_seconds_per_sample"] + row["render_seconds_per_sample"])
    assert row["same_clip_as_conditioning"] is False
    settings = results["settings"]
    assert settings["eval_clip"]["pretrained"] == str(eval_clip_file) and settings["n_per_prompt"] == 2
    assert settings["eval_clip"]["model_cfg"] == EVAL_CLIP_CFG
    assert "elevation 30°" in settings["cameras"]
    assert Image.open(row["grid"]).size == (V * 32, P * 32)  # each prompt's first sample, all views
    # seeded: the same run in-process (from the same composed config) gives the same retrieval
    again = evaluate({**cfg, "out": None})
    assert [p["mean_rank"] for p in again["rows"][0]["prompts"]] == [p["mean_rank"] for p in row["prompts"]]


@pytest.mark.filterwarnings("ignore:the evaluation CLIP has random weights")
def test_generation_refuses_the_conditioning_clip(data, prior, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("\n".join(PROMPTS))
    same = {"model_cfg": TINY_CLIP_CFG, "pretrained": None}  # the tiny prior's own conditioning CLIP
    with pytest.raises(ValueError, match="conditioning CLIP"), pytest.warns(UserWarning, match="random weights"):
        evaluate(_generation_cfg(prior, data["transmitter"], prompts, tmp_path / "a", same))
    with pytest.warns(UserWarning, match="own conditioning CLIP"):
        results = evaluate(_generation_cfg(prior, data["transmitter"], prompts, tmp_path / "b", same,
                                           "allow_same_clip=true", "n_per_prompt=1"))
    assert results["rows"][0]["same_clip_as_conditioning"] is True and "WARNING" in results["markdown"]
    assert same_clip({"model_name": "ViT-L-14-quickgelu", "pretrained": "openai"},
                     {"model_name": "ViT-L-14", "pretrained": "openai"})
    assert not same_clip({"model_name": "ViT-B-32", "pretrained": "openai"},
                         {"model_name": "ViT-L-14-quickgelu", "pretrained": "openai"})


class OwnMatchCLIP:
    """Test double: a render's embedding is its prompt's own CLIP text embedding (the prompt index is in its pixels)."""

    def __init__(self, clip, prompts):
        self.clip, self.text = clip, clip.embed_text(prompts)

    def embed_text(self, prompts):
        return self.clip.embed_text(prompts)

    def embed_image(self, images):  # [Q, H, W, 3], every pixel = prompt index / 10
        return self.text[(images[:, 0, 0, 0] * 10).round().long()]


def test_r_precision_pipeline_known_answers(eval_clip_file):
    clip, _ = build_eval_clip({"model_cfg": EVAL_CLIP_CFG, "pretrained": str(eval_clip_file)}, torch.device("cpu"))
    views = 4
    true_index = torch.arange(len(PROMPTS)).repeat_interleave(2 * views)  # 2 samples × 4 views per prompt
    # renders whose embeddings are the prompts' own text embeddings: 100 %
    images = (true_index.float() / 10)[:, None, None, None].expand(-1, 8, 8, 3)
    own = clip_r_precision(OwnMatchCLIP(clip, PROMPTS), images, PROMPTS, true_index, views=views)
    assert own["r_precision"] == 1.0 and own["r_precision_view_mean"] == 1.0
    # identical renders (the real CLIP): every render retrieves the same prompt, so exactly 1/P of them are right
    black = torch.zeros(len(true_index), 32, 32, 3)
    same = clip_r_precision(clip, black, PROMPTS, true_index, views=views)
    assert same["r_precision"] == pytest.approx(1 / len(PROMPTS))
    assert sorted(set(same["ranks"])) == [0, 1, 2]


def test_prompt_sets_are_checked(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("a chair\n# a comment\n\n  a table  \n")
    assert read_prompts(path) == ["a chair", "a table"]
    (tmp_path / "p.json").write_text(json.dumps(["x", "y"]))
    assert read_prompts(tmp_path / "p.json") == ["x", "y"]
    with pytest.raises(ValueError, match="duplicates"):
        read_prompts(["a chair", "a chair"])
    with pytest.raises(ValueError, match="at least 2 prompts"):
        read_prompts(["a chair"])
    with pytest.raises(FileNotFoundError, match="no such file"):
        read_prompts(tmp_path / "missing.txt")
