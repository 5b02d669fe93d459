"""Cap3D's released Shap-E latents (<uid>.pt, a flat tensor of n_ctx·d_latent floats) and its headerless uid,caption
CSV, read as they ship; bad files skipped and listed; the prior fine-tunes on them through train_diffusion.py."""

from __future__ import annotations

import json
import pickle

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from _tiny_data import REPO, one_torch_thread, run_script
from shapee.data.cap3d import Cap3DLatentDataset, load_cap3d_latent
from shapee.data.captions import read_captions
from shapee.data.latents import collate_latents

N_CTX, D = 128, 64  # the tiny prior's latent (configs/model/prior_text_tiny.yaml)

_one_thread = pytest.fixture(scope="module", autouse=True)(one_torch_thread)


class _Payload:
    """A pickle that would create ``marker`` when unpickled by a loader that runs code."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def flat_latent(seed: int) -> torch.Tensor:
    return torch.rand(N_CTX * D, generator=torch.Generator().manual_seed(seed)) * 2 - 1  # [n_ctx·d] in (−1, 1)


def write_cap3d(root, with_code_payload: bool = False):
    """A tiny folder in Cap3D's format: good uids (shapes [1, n] and [n], one in a nested folder), a wrong size,
    a garbage file, a NaN, a latent without caption, a caption without latent; a headerless uid,caption CSV."""
    lat = root / "latents"
    (lat / "part_1").mkdir(parents=True)
    torch.save(flat_latent(0)[None], lat / "good_a.pt")  # [1, n]: as the official encoder returns it
    torch.save(flat_latent(1), lat / "good_b.pt")  # [n]
    torch.save(flat_latent(2)[None], lat / "part_1" / "good_c.pt")  # nested (an unzipped shard)
    torch.save(torch.zeros(1, N_CTX * D // 2), lat / "wrong_size.pt")
    (lat / "garbage.pt").write_bytes(b"\x00not a torch file at all")
    nan = flat_latent(3)
    nan[5] = float("nan")
    torch.save(nan[None], lat / "has_nan.pt")
    torch.save(flat_latent(4)[None], lat / "no_caption.pt")
    if with_code_payload:
        (lat / "code.pt").write_bytes(pickle.dumps(_Payload(root / "marker"), protocol=2))
    rows = [
        'good_a,"A red chair, with four legs"',
        "good_b,a blue mug",
        "good_c,a lamp",
        "good_a,a wooden chair",  # a second caption for good_a
        "wrong_size,a tree",
        "garbage,a cat",
        "has_nan,a dog",
        "no_latent,a ghost",
    ] + (["code,evil"] if with_code_payload else [])
    captions = root / "Cap3D_automated_Objaverse_full.csv"
    captions.write_text("\n".join(rows) + "\n")
    return lat, captions


@pytest.fixture(scope="module")
def cap3d(tmp_path_factory):
    return write_cap3d(tmp_path_factory.mktemp("cap3d"))


def test_captions_csv_without_header_is_uid_caption(cap3d):
    table = read_captions(cap3d[1])
    assert table["good_a"] == ["A red chair, with four legs", "a wooden chair"]
    assert table["no_latent"] == ["a ghost"] and "uid" not in table and len(table) == 7


def test_flat_latent_is_read_row_major_as_the_official_view(cap3d, tmp_path):
    flat = torch.arange(N_CTX * D, dtype=torch.float32)
    torch.save(flat[None], tmp_path / "x.pt")
    latent = load_cap3d_latent(tmp_path / "x.pt", N_CTX, D)  # [n_ctx, d]
    assert latent.shape == (N_CTX, D)
    assert torch.equal(latent, flat.view(N_CTX, D))  # the official latent.view(latent_ctx, -1)
    assert latent[3, 5] == 3 * D + 5 and latent[N_CTX - 1, 0] == (N_CTX - 1) * D  # row r = token r
    assert torch.equal(load_cap3d_latent(cap3d[0] / "good_b.pt", N_CTX, D), flat_latent(1).view(N_CTX, D))


def test_dataset_keeps_good_latents_and_lists_every_skipped_one(cap3d, capfd):
    ds = Cap3DLatentDataset(*cap3d, n_ctx=N_CTX, d_latent=D)
    assert ds.asset_ids == ["good_a", "good_b", "good_c"] and len(ds) == 3
    kinds = {f["asset_id"]: f["kind"] for f in ds.failures}
    assert kinds == {
        "wrong_size": "wrong shape", "garbage": "unreadable", "has_nan": "non-finite",
        "no_caption": "latent without caption", "no_latent": "caption without latent",
    }
    reasons = {f["asset_id"]: f["reason"] for f in ds.failures}
    assert "[1, 4096]" in reasons["wrong_size"] and "8192 = 128·64" in reasons["wrong_size"]
    assert "1 non-finite" in reasons["has_nan"] and reasons["garbage"].startswith(str(cap3d[0] / "garbage.pt"))
    assert "3 used, 5 skipped" in capfd.readouterr().err  # the one log line
    item = ds[0]
    assert item["asset_id"] == "good_a" and item["captions"] == ["A red chair, with four legs", "a wooden chair"]
    assert torch.equal(item["latent"], flat_latent(0).view(N_CTX, D)) and item["latent"].dtype == torch.float32
    assert ds[2]["latent"].shape == (N_CTX, D)  # the nested one
    batch = collate_latents([ds[0], ds[1]])
    assert batch["latent"].shape == (2, N_CTX, D) and batch["captions"][1] == ["a blue mug"]


def test_lazy_check_skips_bad_files_when_met(cap3d):
    ds = Cap3DLatentDataset(*cap3d, n_ctx=N_CTX, d_latent=D, check="lazy", log=False)
    assert len(ds) == 6  # every uid with a latent file and a caption; files are only read by __getitem__
    seen = [ds[i]["asset_id"] for i in range(len(ds))]
    assert set(seen) == {"good_a", "good_b", "good_c"}
    assert {f["asset_id"] for f in ds.failures if f["kind"] in ("wrong shape", "unreadable", "non-finite")} == {
        "wrong_size", "garbage", "has_nan"}
    assert len(ds.failures) == 5  # each bad file recorded once, however often it is met


def test_pickled_code_is_never_run_and_empty_result_is_one_line_error(tmp_path):
    lat, captions = write_cap3d(tmp_path, with_code_payload=True)
    ds = Cap3DLatentDataset(lat, captions, n_ctx=N_CTX, d_latent=D, log=False)
    assert {f["asset_id"]: f["kind"] for f in ds.failures}["code"] == "unreadable"
    assert not (tmp_path / "marker").exists()  # weights_only: the payload's code did not run
    with pytest.raises(ValueError, match=r"no usable latent \(9 skipped; first: .*code.pt: unreadable") as info:
        Cap3DLatentDataset(lat, captions, n_ctx=32, d_latent=D, log=False)  # every file is the wrong size
    assert "\n" not in str(info.value)
    with pytest.raises(FileNotFoundError, match="no such folder"):
        Cap3DLatentDataset(tmp_path / "nope", captions)


def _cfg(*overrides: str):
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        return compose(config_name="train_diffusion", overrides=list(overrides))


def test_config_and_text_only(cap3d, tmp_path):
    from shapee.train.diffusion import build_latent_dataset, train_diffusion

    cfg = _cfg("experiment=tiny_prior", "data=cap3d", f"data.latents={cap3d[0]}", f"data.captions={cap3d[1]}")
    assert OmegaConf.to_container(cfg.data) == {"kind": "cap3d", "latents": str(cap3d[0]),
                                                "captions": str(cap3d[1]), "check": "full"}
    ds = build_latent_dataset(cfg.data, cond="text", latent_shape=(N_CTX, D))
    assert isinstance(ds, Cap3DLatentDataset) and len(ds) == 3
    with pytest.raises(ValueError, match="cond=text"):
        train_diffusion(_cfg("experiment=tiny_prior_image", "data=cap3d", f"data.latents={cap3d[0]}",
                             f"data.captions={cap3d[1]}", f"run_dir={tmp_path / 'run'}"))


def test_script_fine_tunes_the_released_layout_prior_on_cap3d(cap3d, tmp_path):
    """The README's command at the tiny size: data=cap3d + init_official=<released-layout text prior>."""
    import shapee.io
    from shapee.io.official_priors import save_official_prior
    from shapee.models import LatentDiffusion

    model_cfg = OmegaConf.to_container(_cfg("experiment=tiny_prior", "data.root=x").model, resolve=True)
    model_cfg.pop("_target_")
    torch.manual_seed(5)
    source = LatentDiffusion(**model_cfg)
    official = save_official_prior(source, tmp_path / "text_cond.pt")
    run_dir = tmp_path / "run"
    proc = run_script(
        "train_diffusion.py", "experiment=tiny_prior", "data=cap3d", f"data.latents={cap3d[0]}",
        f"data.captions={cap3d[1]}", f"init_official={official}", f"run_dir={run_dir}", "trainer.max_steps=2",
        "trainer.eval_every=0",
    )
    metrics = json.loads(proc.stdout[proc.stdout.index("{"):])
    assert metrics["step"] == 2 and metrics["nonfinite_steps"] == 0 and metrics["loss/mse"] > 0
    assert metrics["metric/uncond_frac"] == 0.0  # every Cap3D latent came with its caption
    assert "3 used, 5 skipped" in proc.stderr
    tuned = shapee.io.load(run_dir / "checkpoints" / "snapshot.pt").state_dict()
    start = source.state_dict()
    # Started from the released weights (a fresh init would differ everywhere) and moved by two steps.
    moved = [k for k in start if start[k].is_floating_point() and not torch.equal(tuned[k], start[k])]
    assert moved and max((tuned[k] - start[k]).abs().max().item() for k in moved) < 0.1
