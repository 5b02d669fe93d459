"""Latent extraction end to end on tiny toy records: latents equal the eval-mode encoder's, sharding by rank,
resume, conditioning views, the official-layout encoder, the latent record format, and clear errors."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch

import shapee.io
from _tiny_data import (
    extract_config,
    one_torch_thread,
    run_script,
    tiny_records,
    tiny_transmitter_config,
    tiny_transmitter_snapshot,
)
from shapee.data.dataset import AssetDataset, collate_assets
from shapee.data.latents import (
    LatentDataset,
    LatentRecordError,
    collate_latents,
    read_latent_manifests,
    read_latent_record,
    write_latent_record,
)
from shapee.data.records import read_record
from shapee.io.loading import EncoderLoadError, load_transmitter
from shapee.train.extract import extract_latents

FP16_BOUND = 2.0**-12  # float16 rounding error in (−1, 1)


_one_thread = pytest.fixture(scope="module", autouse=True)(one_torch_thread)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    base = tmp_path_factory.getbasetemp()
    return tiny_records(base), tiny_transmitter_snapshot(base)


@pytest.fixture(scope="module")
def text_out(inputs, tmp_path_factory):
    """Text latents of all 4 records (float32, one batch): shared by the tests that compare against them."""
    records, encoder = inputs
    out = tmp_path_factory.mktemp("text_latents")
    summary = extract_latents(extract_config(records, encoder, out, batch_size=4, latent_dtype="float32"))
    assert summary["extracted"] == 4 and summary["skipped_done"] == 0
    return out


def _expected_latents(records, encoder_path, seed=0):
    """The eval-mode encoder on all records as one batch, with the generator extraction seeds (rank 0)."""
    model = load_transmitter(encoder_path)
    assert not model.training and not model.encoder.bottleneck.training
    enc = model.encoder  # what extraction feeds the encoder: its own number of points and views
    dataset = AssetDataset(records, load_targets=False, load_sdf=False, n_points=enc.n_points, n_views=enc.n_views)
    batch = collate_assets([dataset[i] for i in range(len(dataset))])
    with torch.no_grad():
        latent = model.encoder(batch, generator=torch.Generator().manual_seed(seed))
    return dict(zip(batch["asset_id"], latent)), batch


def test_extracts_eval_mode_latents_with_captions(inputs, text_out):
    records, encoder = inputs
    out = text_out
    expected, batch = _expected_latents(records, encoder)
    entries = read_latent_manifests(out)
    assert sorted(entries) == sorted(expected)
    for b, asset_id in enumerate(batch["asset_id"]):
        meta, tensors = read_latent_record(out / entries[asset_id]["record"])
        assert set(tensors) == {"latent"} and tensors["latent"].dtype == torch.float32
        assert tensors["latent"].shape == (128, 64)
        # eval mode: tanh only, no bottleneck noise (training mode would noise 10 % of the latents)
        torch.testing.assert_close(tensors["latent"], expected[asset_id], atol=1e-6, rtol=1e-5)
        assert meta["captions"] == batch["captions"][b] == entries[asset_id]["captions"]
        assert meta["asset_id"] == asset_id and meta["encoder"] == str(encoder)
    dataset = LatentDataset(out, cond="text")
    item = dataset[0]
    assert item["latent"].dtype == torch.float32 and item["captions"]
    with pytest.raises(ValueError, match="neither clip_grid nor cond_image"):
        LatentDataset(out, cond="image")


def test_sharded_by_rank_and_resumes_from_what_is_on_disk(inputs, tmp_path, monkeypatch):
    records, encoder = inputs
    out = tmp_path / "latents"
    ids = sorted(AssetDataset(records, load_targets=False, load_sdf=False).asset_ids)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    s1 = extract_latents(extract_config(records, encoder, out, batch_size=2))
    assert (s1["assigned"], s1["extracted"]) == (2, 2)
    assert sorted(read_latent_manifests(out)) == ids[1::2]
    assert (out / "manifest-1-of-2.jsonl").is_file()
    mtimes = {p.name: p.stat().st_mtime_ns for p in (out / "latents").iterdir()}
    # A single process later: only rank 0's share is left to do.
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("RANK", "0")
    s2 = extract_latents(extract_config(records, encoder, out, batch_size=2))
    assert (s2["assigned"], s2["skipped_done"], s2["extracted"]) == (4, 2, 2)
    assert sorted(read_latent_manifests(out)) == ids
    assert all((out / "latents" / n).stat().st_mtime_ns == t for n, t in mtimes.items())  # not rewritten
    s3 = extract_latents(extract_config(records, encoder, out, batch_size=2))
    assert (s3["skipped_done"], s3["extracted"]) == (4, 0)
    # A record whose file was lost is redone; a torn manifest line is ignored.
    lost = out / read_latent_manifests(out)[ids[0]]["record"]
    lost.unlink()
    with open(out / "manifest.jsonl", "a") as f:
        f.write('{"asset_id": "torn", "rec')
    s4 = extract_latents(extract_config(records, encoder, out, batch_size=2))
    assert s4["extracted"] == 1 and lost.is_file()
    assert len(LatentDataset(out)) == 4


def test_image_conditioning_stores_the_encoder_view(inputs, tmp_path):
    records, encoder = inputs
    out = tmp_path / "latents"
    extract_latents(extract_config(records, encoder, out, batch_size=4, cond="text"))
    # Text-only records on disk are redone: they lack the conditioning view.
    summary = extract_latents(extract_config(records, encoder, out, batch_size=4, cond="image", cond_view=1))
    assert (summary["skipped_done"], summary["extracted"]) == (0, 4)
    dataset = LatentDataset(out, cond="image")
    item = dataset[0]
    _, arrays = read_record(records / "records" / f"{item['asset_id']}.npz", ["views"])
    assert item["cond_image"].shape == (64, 64, 3)
    np.testing.assert_array_equal((item["cond_image"] * 255).round().byte().numpy(), arrays["views"][1])
    batch = collate_latents([dataset[i] for i in range(2)])
    assert batch["cond_image"].shape == (2, 64, 64, 3) and batch["latent"].shape == (2, 128, 64)
    assert isinstance(batch["captions"][0], list)


def test_image_conditioning_can_store_clip_grids(inputs, tmp_path):
    from shapee.conditioning import TINY_CLIP_CFG
    from shapee.models import LatentDiffusion

    records, encoder = inputs
    out = tmp_path / "latents"
    cfg = extract_config(records, encoder, out, batch_size=4, cond="image", image_cond="grid")
    cfg["clip"] = dict(model_cfg=TINY_CLIP_CFG, pretrained=None)
    extract_latents(cfg)
    item = LatentDataset(out, cond="image")[0]
    assert "cond_image" not in item and item["clip_grid"].shape == (16, 48)
    # The grid is what a prior configured with the same (random-weight) CLIP computes itself.
    denoiser = dict(d_latent=64, n_ctx=128, width=8, layers=1, heads=1, cond_dim=48, cond_tokens=16)
    prior = LatentDiffusion(cond_mode="image", clip=cfg["clip"], denoiser=denoiser)
    clip = prior.clip
    _, arrays = read_record(records / "records" / f"{item['asset_id']}.npz", ["views"])
    want = clip.embed_image_grid(torch.from_numpy(arrays["views"][:1]).float() / 255)[0]
    torch.testing.assert_close(item["clip_grid"], want.half().float())


def test_official_layout_encoder_gives_the_same_latents(inputs, text_out, tmp_path):
    from shapee.io.official import save_official_transmitter

    records, encoder = inputs
    model = load_transmitter(encoder)
    official_path = tmp_path / "transmitter.pt"
    save_official_transmitter(model, official_path)
    cfg_kw = tiny_transmitter_config()
    official = dict(encoder_kwargs=cfg_kw["encoder"], mlp_kwargs=cfg_kw["mlp"], params_proj_kwargs=cfg_kw["params_proj"])
    ours_out, official_out = text_out, tmp_path / "official"
    cfg = extract_config(records, official_path, official_out, batch_size=4, latent_dtype="float32")
    cfg["official"] = official
    extract_latents(cfg)
    a, b = LatentDataset(ours_out), LatentDataset(official_out)
    for i in range(len(a)):
        assert torch.equal(a[i]["latent"], b[i]["latent"])
    # Forcing the wrong format is refused, naming the file.
    with pytest.raises(EncoderLoadError, match="not a shapee snapshot"):
        load_transmitter(official_path, encoder_format="shapee", official=official)
    with pytest.raises(EncoderLoadError, match="is a shapee 'shapee.snapshot' file"):
        load_transmitter(encoder, encoder_format="official")
    # Without sizes, the weights' shapes give them (any size loads with one call) ...
    inferred = load_transmitter(official_path)
    assert all(torch.equal(inferred.state_dict()[k], v) for k, v in model.state_dict().items())
    # ... and sizes passed that contradict the file list the mismatched keys.
    wrong = dict(official, encoder_kwargs=dict(official["encoder_kwargs"] or {}, mv_hidden=7))
    with pytest.raises(EncoderLoadError, match=r"(?s)transmitter.pt.*shape mismatch"):
        load_transmitter(official_path, official=wrong)


def test_bad_encoders_and_inputs_raise_errors_that_name_them(inputs, tmp_path):
    from shapee.conditioning import TINY_CLIP_CFG
    from shapee.models import LatentDiffusion

    records, encoder = inputs
    with pytest.raises(EncoderLoadError, match="nope.pt.*does not exist"):
        load_transmitter(tmp_path / "nope.pt")
    prior = LatentDiffusion(cond_mode="text", denoiser=dict(d_latent=8, n_ctx=4, width=8, layers=1, heads=1, cond_dim=32),
                            clip=dict(model_cfg=TINY_CLIP_CFG, pretrained=None))
    prior_path = tmp_path / "prior.pt"
    shapee.io.save(prior_path, prior, {"_target_": "shapee.models.LatentDiffusion"})
    with pytest.raises(EncoderLoadError, match=r"prior.pt.*_target_='shapee.models.LatentDiffusion'.*not a shapee"):
        load_transmitter(prior_path)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(EncoderLoadError, match="garbage.pt.*cannot be read"):
        load_transmitter(garbage)
    with pytest.raises(FileNotFoundError, match="no_records"):
        extract_latents(extract_config(tmp_path / "no_records", encoder, tmp_path / "o"))
    with pytest.raises(ValueError, match="cond_view=7"):
        extract_latents(extract_config(records, encoder, tmp_path / "o2", cond="image", cond_view=7))
    # The script reports the problem and exits 2 instead of a traceback.
    proc = run_script("extract_latents.py", f"records={records}", f"transmitter={tmp_path / 'nope.pt'}",
                      f"out={tmp_path / 'o3'}", "progress=false", check=False)
    assert proc.returncode == 2 and "nope.pt" in proc.stderr and "Traceback" not in proc.stderr


def test_latent_records_are_float16_within_bound_or_exact_float32(tmp_path):
    latent = torch.tanh(torch.randn(64, 64) * 3)
    write_latent_record(tmp_path, asset_id="a", latent=latent, captions=["x"])
    write_latent_record(tmp_path, asset_id="b", latent=latent, captions=[], latent_dtype="float32")
    items = {it["asset_id"]: it for it in LatentDataset(tmp_path)}
    assert 0 < (items["a"]["latent"] - latent).abs().max() <= FP16_BOUND
    assert torch.equal(items["b"]["latent"], latent) and items["b"]["captions"] == []
    assert not list(tmp_path.rglob("*.tmp"))  # atomic writes leave nothing behind
    size = {n: os.path.getsize(tmp_path / "latents" / f"{n}.safetensors") for n in "ab"}
    assert size["b"] > 1.8 * size["a"]  # float16 halves the storage
    with pytest.raises(ValueError, match="non-finite"):
        write_latent_record(tmp_path, asset_id="c", latent=torch.full((2, 2), float("nan")))
    bad = tmp_path / "latents" / "a.safetensors"
    bad.write_bytes(bad.read_bytes()[:40])  # truncated
    with pytest.raises(LatentRecordError, match="a.safetensors"):
        LatentDataset(tmp_path)[0]
    with pytest.raises(ValueError, match="different shapes"):
        collate_latents([{"latent": torch.zeros(2, 2)}, {"latent": torch.zeros(3, 2)}])
    lines = (tmp_path / "manifest.jsonl").read_text().splitlines()
    assert [json.loads(line)["asset_id"] for line in lines] == ["a", "b"]


def _records_copy(records, dest):
    """A private copy of the tiny records folder (tests corrupt its files) and its sorted asset ids."""
    import shutil

    shutil.copytree(records, dest)
    return dest, sorted(AssetDataset(dest, load_targets=False, load_sdf=False).asset_ids)


def test_a_corrupt_record_is_skipped_recorded_and_not_redone(inputs, tmp_path):
    records, encoder = inputs
    records, ids = _records_copy(records, tmp_path / "records")
    bad = records / "records" / f"{ids[1]}.npz"
    good_bytes = bad.read_bytes()
    bad.write_bytes(good_bytes[: len(good_bytes) // 3])  # a truncated record
    out = tmp_path / "latents"
    proc = run_script("extract_latents.py", f"records={records}", f"transmitter={encoder}", f"out={out}", "device=cpu",
                      "progress=false", "num_workers=0", "batch_size=2", check=False)
    assert proc.returncode == 0, proc.stderr
    assert "1 of 4 records failed" in proc.stderr and "failures.jsonl" in proc.stderr
    summary = json.loads(proc.stdout[proc.stdout.index("{"):])
    assert (summary["extracted"], summary["failed"], summary["skipped_failed"]) == (3, 1, 0)
    assert sorted(read_latent_manifests(out)) == [ids[0], ids[2], ids[3]]
    assert len(LatentDataset(out)) == 3
    failures = [json.loads(line) for line in (out / "failures.jsonl").read_text().splitlines()]
    assert len(failures) == 1
    (failure,) = failures
    assert failure["asset"] == ids[1] and failure["source"] == str(bad) and failure["stage"] == "read"
    assert str(bad) in failure["error"] and "unreadable" in failure["error"]
    # A rerun is a no-op: nothing re-encoded, the failure stays on record and is not retried (prepare_data's rule).
    log = (out / "failures.jsonl").read_bytes()
    mtimes = {p.name: p.stat().st_mtime_ns for p in (out / "latents").iterdir()}
    again = extract_latents(extract_config(records, encoder, out, batch_size=2))
    assert (again["extracted"], again["failed"], again["skipped_done"], again["skipped_failed"]) == (0, 0, 3, 1)
    assert (out / "failures.jsonl").read_bytes() == log
    assert {p.name: p.stat().st_mtime_ns for p in (out / "latents").iterdir()} == mtimes
    # Once the record is repaired, retry_failed=true encodes it and drops its failure line.
    bad.write_bytes(good_bytes)
    retried = extract_latents(extract_config(records, encoder, out, batch_size=2, retry_failed=True))
    assert (retried["extracted"], retried["failed"], retried["skipped_done"]) == (1, 0, 3)
    assert sorted(read_latent_manifests(out)) == ids and (out / "failures.jsonl").read_text() == ""


def _rewrite(path, **changes):
    """Rewrite the record at ``path`` with some arrays replaced (write_record checks dtypes, not shapes)."""
    from shapee.data.records import write_record

    meta, arrays = read_record(path)
    write_record(path, {**arrays, **{k: v(arrays[k]) for k, v in changes.items()}}, meta)


def test_records_of_wrong_shape_fail_with_clear_errors_in_training_and_are_skipped_by_extraction(inputs, tmp_path):
    from shapee.data.records import RecordError

    records, encoder = inputs
    records, ids = _records_copy(records, tmp_path / "records")
    rec = {i: records / "records" / f"{i}.npz" for i in ids}
    _rewrite(rec[ids[0]], points_xyz=lambda a: np.ascontiguousarray(a[:, :2]))  # [P, 2]: not xyz
    _rewrite(rec[ids[2]], view_depth=lambda a: a[:2])  # 2 depth maps for 4 views
    half = {k: (lambda a: np.ascontiguousarray(a[:, ::2, ::2])) for k in ("views", "view_alpha", "view_depth")}
    _rewrite(rec[ids[3]], **half)  # consistent, but 32² views for a 64² encoder
    # Training reads fail loudly, naming the record, the array and the problem (RecordError is a ValueError).
    train = AssetDataset(records)
    with pytest.raises(RecordError, match=re.escape(f"{rec[ids[0]]}: array 'points_xyz' has shape (1024, 2), expe")):
        train[0]
    with pytest.raises(ValueError, match=re.escape(f"{rec[ids[2]]}: array 'view_depth' has shape (2, 64, 64)")) as err:
        train[2]
    assert "but 'views' has V=4" in str(err.value)
    assert train[1]["points"].shape == (1024, 6)
    # Extraction (in DataLoader workers) skips all three with their reasons and encodes the good one.
    out = tmp_path / "latents"
    summary = extract_latents(extract_config(records, encoder, out, batch_size=4, num_workers=2))
    assert (summary["extracted"], summary["failed"]) == (1, 3)
    assert sorted(read_latent_manifests(out)) == [ids[1]]
    failures = {e["asset"]: e for e in map(json.loads, (out / "failures.jsonl").read_text().splitlines())}
    assert sorted(failures) == [ids[0], ids[2], ids[3]]
    assert "'points_xyz' has shape (1024, 2)" in failures[ids[0]]["error"]
    assert "'view_depth' has shape (2, 64, 64)" in failures[ids[2]]["error"]
    assert f"record {rec[ids[3]]}: views are 32x32, the encoder takes 64x64" == failures[ids[3]]["error"]


def test_an_asset_that_encodes_to_nan_is_skipped_and_recorded(inputs, tmp_path):
    # A record with a NaN among its point values passes the shape/dtype checks; its latent is NaN, which must not
    # reach the latent set (write_latent_record refuses it) nor stop the run.
    records, encoder = inputs
    records, ids = _records_copy(records, tmp_path / "records")
    bad = records / "records" / f"{ids[2]}.npz"

    def poison(a):
        a = a.copy()
        a[5, 0] = np.nan
        return a

    _rewrite(bad, points_xyz=poison)
    out = tmp_path / "latents"
    summary = extract_latents(extract_config(records, encoder, out, batch_size=4))
    assert (summary["extracted"], summary["failed"]) == (3, 1)
    assert sorted(read_latent_manifests(out)) == [ids[0], ids[1], ids[3]]
    (failure,) = map(json.loads, (out / "failures.jsonl").read_text().splitlines())
    assert failure["asset"] == ids[2] and failure["stage"] == "encode" and failure["source"] == str(bad)
    assert "non-finite" in failure["error"]
    entries = read_latent_manifests(out)
    for asset_id in (ids[0], ids[1], ids[3]):
        _, tensors = read_latent_record(out / entries[asset_id]["record"])
        assert torch.isfinite(tensors["latent"].float()).all()


def test_a_batch_whose_forward_raises_is_retried_asset_by_asset():
    from shapee.train.extract import _encode_guarded

    class Picky(torch.nn.Module):  # raises whenever asset "b" is in the batch, like an out-of-memory on one asset
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(()))

        def forward(self, batch, generator=None):
            if "b" in batch["asset_id"]:
                raise RuntimeError("CUDA out of memory (pretend)")
            return batch["x"][:, None, None] * self.w

    batch = {"asset_id": ["a", "b", "c"], "x": torch.tensor([1.0, 2.0, 3.0]), "captions": [["A"], ["B"], ["C"]]}
    latent, failures = _encode_guarded(Picky(), batch, torch.Generator(), torch.float32, {"b": Path("r/b.npz")})
    assert [f["asset"] for f in failures] == ["b"] and failures[0]["stage"] == "encode"
    assert "RuntimeError: CUDA out of memory (pretend)" == failures[0]["error"] and failures[0]["source"] == "r/b.npz"
    assert latent.shape == (3, 1, 1) and latent[0].item() == 1.0 and latent[2].item() == 3.0
    alone, fails = _encode_guarded(Picky(), {"asset_id": ["b"], "x": torch.tensor([2.0])}, None, torch.float32, {})
    assert alone is None and [f["asset"] for f in fails] == ["b"]
