"""prepare_data.py on an Objaverse-style tree (glbs/<shard>/<uid>.glb) or a list file: uids as asset ids, captions
joined by uid from Cap3D's headerless CSV or a {uid: caption} JSON, duplicates, and shards covering every uid once."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import shapee.data.prepare as prepare_mod
from shapee.data.prepare import PrepareError, load_captions, prepare_dataset
from shapee.data.records import read_jsonl, read_record, record_relpath

REPO = Path(__file__).resolve().parents[1]
TINY = [
    "views=2", "targets=1", "resolution=24", "pc_views=3", "pc_resolution=24", "n_points=256", "pc_candidates=1024",
    "sdf_uniform=128", "sdf_near=128", "progress=false",
]
UIDS = {  # uid → (shard folder, source mesh)
    "8476c4170df24cf5bbe6967222d1a42d": ("000-023", "BoxTextured.glb"),
    "0a1b2c3d4e5f40718293a4b5c6d7e8f9": ("000-023", "monkey.glb"),
    "f00dfeed00000000000000000000beef": ("000-150", "BoxTextured.glb"),
}
CAPTIONS = {
    "8476c4170df24cf5bbe6967222d1a42d": "A textured box, brown and white",
    "0a1b2c3d4e5f40718293a4b5c6d7e8f9": "a monkey head",
    "f00dfeed00000000000000000000beef": "a small crate",
}


def cfg(*overrides: str) -> dict:
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        composed = compose(config_name="prepare_data", overrides=TINY + list(overrides))
    return OmegaConf.to_container(composed, resolve=True)


@pytest.fixture()
def tree(tmp_path, assets_good):
    """objaverse/glbs/<shard>/<uid>.glb plus a duplicate of one uid in another shard and a non-mesh file."""
    root = tmp_path / "objaverse"
    for uid, (shard, source) in UIDS.items():
        (root / "glbs" / shard).mkdir(parents=True, exist_ok=True)
        shutil.copy(assets_good / source, root / "glbs" / shard / f"{uid}.glb")
    (root / "glbs" / "000-999").mkdir()
    shutil.copy(assets_good / "monkey.glb", root / "glbs" / "000-999" / "8476c4170df24cf5bbe6967222d1a42d.glb")
    (root / "object-paths.json.gz").write_bytes(b"\x1f\x8b not a mesh")
    return root


def write_captions(tmp_path: Path) -> tuple[Path, Path]:
    csv_file = tmp_path / "Cap3D_automated_Objaverse_full.csv"  # Cap3D's format: no header, uid,caption
    csv_file.write_text("".join(f'{uid},"{text}"\n' for uid, text in CAPTIONS.items()) + "someotheruid,a tree\n")
    json_file = tmp_path / "captions.json"
    json_file.write_text(json.dumps(CAPTIONS))
    return csv_file, json_file


def test_tree_ids_are_uids_and_duplicates_keep_the_first(tree, tmp_path):
    dropped: list[dict] = []
    sources = prepare_mod._make_sources(cfg("data=objaverse", f"input={tree}", "out=x"), dropped)
    assert [s.asset_id for s in sources] == sorted(UIDS, key=lambda u: (UIDS[u][0], u))  # sorted by path
    box = next(s for s in sources if s.asset_id == "8476c4170df24cf5bbe6967222d1a42d")
    assert Path(box.path).parent.name == "000-023"  # the first by sorted path, not the 000-999 copy
    assert dropped == [{"asset_id": "8476c4170df24cf5bbe6967222d1a42d",
                        "kept": "glbs/000-023/8476c4170df24cf5bbe6967222d1a42d.glb",
                        "dropped": "glbs/000-999/8476c4170df24cf5bbe6967222d1a42d.glb"}]
    # The default ids stay paths (existing record folders keep their ids).
    paths = prepare_mod._make_sources(cfg(f"input={tree}", "out=x"))
    assert len(paths) == 4 and paths[0].asset_id == "glbs__000-023__0a1b2c3d4e5f40718293a4b5c6d7e8f9.glb"
    with pytest.raises(PrepareError, match="data.ids='uid'"):
        prepare_mod._make_sources(cfg(f"input={tree}", "out=x", "data.ids=uid"))


def test_captions_join_by_uid_from_cap3d_csv_and_from_json(tree, tmp_path):
    csv_file, json_file = write_captions(tmp_path)
    assert load_captions(csv_file)["8476c4170df24cf5bbe6967222d1a42d"] == ["A textured box, brown and white"]
    for captions in (csv_file, json_file):
        sources = prepare_mod._make_sources(cfg("data=objaverse", f"input={tree}", "out=x", f"captions={captions}"))
        assert {s.asset_id: s.captions for s in sources} == {u: [t] for u, t in CAPTIONS.items()}, captions
    listed = tmp_path / "list.json"  # a JSON object mapping uid → a list of captions
    listed.write_text(json.dumps({"f00dfeed00000000000000000000beef": ["a crate", "a box"]}))
    sources = prepare_mod._make_sources(cfg("data=objaverse", f"input={tree}", "out=x", f"captions={listed}"))
    assert {s.asset_id: s.captions for s in sources}["f00dfeed00000000000000000000beef"] == ["a crate", "a box"]


def test_list_file_input(tree, tmp_path):
    listing = tree / "paths.txt"
    uids = sorted(UIDS)
    lines = ["# objects to prepare", f"glbs/{UIDS[uids[0]][0]}/{uids[0]}.glb", "",
             str(tree / "glbs" / UIDS[uids[1]][0] / f"{uids[1]}.glb")]  # relative to the list file, and absolute
    listing.write_text("\n".join(lines) + "\n")
    sources = prepare_mod._make_sources(cfg("data=objaverse", f"input={listing}", "out=x"))
    assert sorted(s.asset_id for s in sources) == uids[:2]
    assert all(Path(s.path).is_file() for s in sources)
    (tree / "bad.txt").write_text("glbs/000-023/notes.json\n")
    with pytest.raises(PrepareError, match="not mesh files"):
        prepare_mod._make_sources(cfg("data=objaverse", f"input={tree / 'bad.txt'}", "out=x"))
    (tree / "empty.txt").write_text("# nothing\n")
    with pytest.raises(PrepareError, match="names no files"):
        prepare_mod._make_sources(cfg("data=objaverse", f"input={tree / 'empty.txt'}", "out=x"))


def test_two_shards_cover_every_uid_once_with_captions(tree, tmp_path):
    csv_file, _ = write_captions(tmp_path)
    listing = tmp_path / "all.txt"
    listing.write_text("".join(f"{p}\n" for p in sorted(tree.rglob("*.glb"))))
    out = tmp_path / "out"
    # Shard 1/2 through the script (the README's command), shard 0/2 in process.
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "prepare_data.py"), "data=objaverse", f"input={listing}",
         f"captions={csv_file}", f"out={out}", "shard=1/2", *TINY],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    s1 = json.loads(proc.stdout[proc.stdout.index("{"):])
    s0 = prepare_dataset(cfg("data=objaverse", f"input={listing}", f"captions={csv_file}", f"out={out}", "shard=0/2"))
    assert (s0["total"], s1["total"]) == (3, 3) and s0["assigned"] + s1["assigned"] == 3
    assert s0["duplicates"] == s1["duplicates"] == 1 and "duplicate ids" in proc.stderr
    a = [e["asset_id"] for e in read_jsonl(out / "manifest-0-of-2.jsonl")]
    b = [e["asset_id"] for e in read_jsonl(out / "manifest-1-of-2.jsonl")]
    assert sorted(a + b) == sorted(UIDS) and not set(a) & set(b)
    for uid in UIDS:
        meta, _ = read_record(out / record_relpath(uid), keys=[])
        assert meta["captions"] == [CAPTIONS[uid]] and meta["source"].endswith(f"{uid}.glb")
