"""Record files, manifest / failure logs and asset ids (shapee.data.records)."""

import json
import os

import numpy as np
import pytest

from shapee.data.records import (
    FORMAT_VERSION,
    RECORD_ARRAYS,
    AssetRecord,
    RecordError,
    append_jsonl,
    failures_name,
    manifest_name,
    read_jsonl,
    read_manifests,
    read_record,
    record_relpath,
    remove_stale_temp_files,
    sanitise_id,
    unique_ids,
    write_record,
)


def fake_arrays(rng: np.random.Generator, v: int = 2, t: int = 1, res: int = 4, p: int = 8, s: int = 5) -> dict:
    return {
        "views": rng.integers(0, 256, (v, res, res, 3), dtype=np.uint8),
        "view_alpha": rng.integers(0, 2, (v, res, res), dtype=np.uint8) * 255,
        "view_depth": np.where(rng.random((v, res, res)) < 0.5, np.inf, 3.0).astype(np.float32),
        "view_cameras": rng.standard_normal((v, 4, 3)).astype(np.float32),
        "target_rgb": rng.integers(0, 256, (t, res, res, 3), dtype=np.uint8),
        "target_alpha": rng.integers(0, 2, (t, res, res), dtype=np.uint8) * 255,
        "target_depth": rng.random((t, res, res)).astype(np.float32),
        "target_cameras": rng.standard_normal((t, 4, 3)).astype(np.float32),
        "points_xyz": rng.standard_normal((p, 3)).astype(np.float32),
        "points_rgb": rng.integers(0, 256, (p, 3), dtype=np.uint8),
        "sdf_points": rng.standard_normal((s, 3)).astype(np.float32),
        "sdf": rng.standard_normal(s).astype(np.float32),
    }


def test_record_roundtrip_is_exact_and_leaves_no_temp_file(tmp_path):
    arrays = fake_arrays(np.random.default_rng(0))
    path = tmp_path / record_relpath("a.obj")
    write_record(path, arrays, {"asset_id": "a.obj", "fov": 0.69, "captions": ["a red cube"]})
    meta, back = read_record(path)
    assert meta["asset_id"] == "a.obj" and meta["captions"] == ["a red cube"]
    assert meta["format_version"] == FORMAT_VERSION
    for name in RECORD_ARRAYS:
        assert back[name].dtype == arrays[name].dtype
        np.testing.assert_array_equal(back[name], arrays[name])  # inf depth survives
    assert sorted(os.listdir(path.parent)) == ["a.obj.npz"]  # no temp file left behind


def test_write_record_rejects_wrong_dtype_and_missing_arrays(tmp_path):
    arrays = fake_arrays(np.random.default_rng(0))
    bad = dict(arrays, views=arrays["views"].astype(np.float32))
    with pytest.raises(ValueError, match="'views' must be uint8"):
        write_record(tmp_path / "x.npz", bad, {})
    with pytest.raises(ValueError, match="missing arrays.*sdf"):
        write_record(tmp_path / "x.npz", {k: v for k, v in arrays.items() if k != "sdf"}, {})
    assert not (tmp_path / "x.npz").exists()


def test_read_record_names_truncated_files_and_other_versions(tmp_path):
    path = tmp_path / "r.npz"
    write_record(path, fake_arrays(np.random.default_rng(0)), {})
    data = path.read_bytes()
    (tmp_path / "torn.npz").write_bytes(data[: len(data) // 2])
    with pytest.raises(RecordError, match="torn.npz: unreadable"):
        read_record(tmp_path / "torn.npz")
    with pytest.raises(RecordError, match="file not found"):
        read_record(tmp_path / "missing.npz")
    # A record written by another format version is refused, not misread.
    with np.load(path, allow_pickle=False) as npz:
        content = {k: npz[k] for k in npz.files}
    meta = json.loads(str(content["meta"]))
    meta["format_version"] = FORMAT_VERSION + 1
    content["meta"] = np.array(json.dumps(meta))
    np.savez(tmp_path / "future.npz", **content)
    with pytest.raises(RecordError, match="format version"):
        read_record(tmp_path / "future.npz")


def test_asset_ids_are_safe_stable_and_unique():
    assert sanitise_id("chairs/a b.obj") == "chairs__a_b.obj"
    assert sanitise_id("./sub/.hidden.off") == "sub__.hidden.off"
    paths = ["a b.obj", "a_b.obj", "c.obj", "c.ply"]
    ids = unique_ids(paths)
    assert len(set(ids)) == 4 and ids[2:] == ["c.obj", "c.ply"]
    assert all("/" not in i and " " not in i for i in ids)
    # Independent of list order (every shard must compute the same ids).
    assert dict(zip(paths, ids)) == dict(zip(paths[::-1], unique_ids(paths[::-1])))


def test_append_after_torn_line_starts_a_fresh_line(tmp_path):
    path = tmp_path / "manifest.jsonl"
    append_jsonl(path, {"asset_id": "a", "n": 1})
    with open(path, "a") as f:
        f.write('{"asset_id": "b", "n"')  # a writer killed mid-line
    append_jsonl(path, {"asset_id": "c", "n": 3})
    entries = read_jsonl(path)
    assert [e["asset_id"] for e in entries] == ["a", "c"]
    assert path.read_text().count("\n") == 3


def test_read_manifests_keeps_entries_with_records_last_line_wins(tmp_path):
    rng = np.random.default_rng(0)
    for aid in ("a", "b"):
        write_record(tmp_path / record_relpath(aid), fake_arrays(rng), {"asset_id": aid})

    def entry(aid: str, n_views: int) -> dict:
        rec = AssetRecord(aid, record_relpath(aid), f"/src/{aid}", "h", n_views, 1, 8, 5)
        return json.loads(rec.to_json())

    append_jsonl(tmp_path / manifest_name(), entry("a", 2))
    append_jsonl(tmp_path / manifest_name(), entry("a", 3))  # redone later: the later line wins
    append_jsonl(tmp_path / manifest_name((0, 2)), entry("b", 2))
    append_jsonl(tmp_path / manifest_name(), entry("gone", 2))  # its record was never written
    records = read_manifests(tmp_path)
    assert sorted(records) == ["a", "b"]
    assert records["a"].n_views == 3
    assert manifest_name((1, 2)) == "manifest-1-of-2.jsonl" and failures_name((0, 4)) == "failures-0-of-4.jsonl"
    assert manifest_name((0, 1)) == "manifest.jsonl"


def test_read_record_can_read_a_subset(tmp_path):
    arrays = fake_arrays(np.random.default_rng(1))
    write_record(tmp_path / "r.npz", arrays, {"asset_id": "r"})
    meta, part = read_record(tmp_path / "r.npz", ["sdf", "views"])
    assert sorted(part) == ["sdf", "views"] and meta["asset_id"] == "r"
    np.testing.assert_array_equal(part["sdf"], arrays["sdf"])
    with pytest.raises(ValueError, match="unknown array names.*'nope'"):
        read_record(tmp_path / "r.npz", ["nope"])


def test_stale_temp_files_are_removed_fresh_ones_kept(tmp_path):
    old, fresh = tmp_path / "a.npz.1-x.tmp", tmp_path / "b.npz.2-y.tmp"
    old.write_bytes(b"x")
    fresh.write_bytes(b"y")
    os.utime(old, (0, 0))
    assert remove_stale_temp_files(tmp_path) == 1
    assert not old.exists() and fresh.exists()
