"""Shape-and-colour matching of sampled meshes against the toy world (shapee.eval.toy_match), on known answers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import trimesh

from shapee.data.toy import PALETTE, make_toy_mesh, toy_assets
from shapee.eval.toy_match import ToyReferences, format_toy_match, match_sample, mean_vertex_color, toy_match_rate


# 2 shapes × 2 colours, one asset per combination (random proportions and rotations): a 2 × 2 toy world.
WORLD = toy_assets(4, shapes=["sphere", "cube"], colors=["red", "blue"])


@pytest.fixture(scope="module")
def refs() -> ToyReferences:
    return ToyReferences.from_assets(WORLD, n_points=1024)


def _trimesh(shape: str, rgb, *, scale: float = 1.0, noise: float = 0.0, seed: int = 0) -> trimesh.Trimesh:
    """The world's first ``shape`` as a sampled mesh would come: trimesh with 8-bit sRGB vertex colours ``rgb``,
    optionally smaller (as a decoder's 0-level surface can be) and with jittered vertices."""
    mesh = next(a.mesh for a in WORLD if a.shape == shape)
    verts = mesh.vertices * scale  # [V, 3]
    if noise:
        verts = verts + np.random.default_rng(seed).normal(0, noise, verts.shape)
    colors = np.broadcast_to((np.asarray(rgb) * 255).round().astype(np.uint8), (len(verts), 3))  # [V, 3]
    return trimesh.Trimesh(verts, mesh.faces, vertex_colors=colors, process=False)


def test_references_from_assets(refs):
    assert set(refs.shapes) == {"sphere", "cube"} and all(len(v) == 2 for v in refs.shapes.values())
    assert refs.shapes["cube"][0].shape == (1024, 3)
    assert np.allclose(refs.colors["red"], PALETTE["red"]) and np.allclose(refs.colors["blue"], PALETTE["blue"])
    assert refs.targets["a red cube"] == ("cube", "red") and refs.targets["a cube that is red"] == ("cube", "red")
    assert refs.targets["a blue ball"] == ("sphere", "blue") and len(refs.targets) == 4 * 3  # 3 captions each


def test_right_shape_and_colour_matches(refs):
    # Smaller and jittered: normalisation removes the scale, the jitter stays well below the shape difference.
    mesh = _trimesh("cube", PALETTE["red"], scale=0.8, noise=0.01)
    out = match_sample(mesh, ("cube", "red"), refs, generator=torch.Generator().manual_seed(0))
    assert out["match"] and out["shape_ok"] and out["color_ok"] and not out["empty"]
    assert out["nearest_shape"] == "cube" and out["nearest_color"] == "red"
    assert out["chamfer"]["cube"] < 0.08 and out["chamfer"]["sphere"] > 1.5 * out["chamfer"]["cube"]
    assert out["color_distance"]["red"] <= 3 ** 0.5 * 0.5 / 255  # 8-bit rounding only
    assert out["color_distance"]["blue"] == pytest.approx(np.linalg.norm(np.subtract(PALETTE["red"], PALETTE["blue"])),
                                                          abs=3e-3)


def test_unseen_proportions_and_rotations_still_match_their_shape(refs):
    # The references hold one cube and one sphere; a cube of other proportions, turned, is still nearest the cube.
    g = torch.Generator().manual_seed(0)
    rng = np.random.default_rng(1)
    for aspect in (0.8, 1.25):
        q = rng.standard_normal(4)
        rotation = trimesh.transformations.quaternion_matrix(q / np.linalg.norm(q))[:3, :3]
        mesh = make_toy_mesh("cube", PALETTE["blue"], aspect=aspect, rotation=rotation)
        colors = np.full((len(mesh.vertices), 3), 200, np.uint8)
        sample = trimesh.Trimesh(mesh.vertices, mesh.faces, vertex_colors=colors, process=False)
        out = match_sample(sample, ("cube", "blue"), refs, generator=g)
        assert out["nearest_shape"] == "cube" and out["chamfer"]["sphere"] > 1.3 * out["chamfer"]["cube"]


def test_wrong_shape_or_colour_is_a_miss_and_says_which(refs):
    g = torch.Generator().manual_seed(0)
    wrong_shape = match_sample(_trimesh("sphere", PALETTE["red"]), ("cube", "red"), refs, generator=g)
    assert not wrong_shape["match"] and not wrong_shape["shape_ok"] and wrong_shape["color_ok"]
    assert wrong_shape["nearest_shape"] == "sphere"
    wrong_colour = match_sample(_trimesh("cube", PALETTE["blue"]), ("cube", "red"), refs, generator=g)
    assert not wrong_colour["match"] and wrong_colour["shape_ok"] and not wrong_colour["color_ok"]
    assert wrong_colour["nearest_color"] == "blue"


def test_without_normalisation_scale_counts(refs):
    small = _trimesh("cube", PALETTE["red"], scale=0.5)
    g = torch.Generator().manual_seed(0)
    raw = match_sample(small, ("cube", "red"), refs, generator=g, normalize=False)
    normalised = match_sample(small, ("cube", "red"), refs, generator=g, normalize=True)
    assert raw["chamfer"]["cube"] > 0.2 > 0.02 > normalised["chamfer"]["cube"]


def test_rate_per_prompt_and_overall_with_an_empty_mesh(refs):
    meshes = [
        _trimesh("cube", PALETTE["red"]),  # match
        _trimesh("sphere", PALETTE["red"]),  # wrong shape
        trimesh.Trimesh(),  # no surface: a miss
        _trimesh("sphere", PALETTE["blue"], noise=0.01),  # match
    ]
    prompts = ["a red cube", "a red cube", "a red cube", "a blue ball"]
    out = toy_match_rate(meshes, prompts, refs)
    assert out["per_prompt"] == pytest.approx({"a red cube": 1 / 3, "a blue ball": 1.0})
    assert out["rate"] == pytest.approx(0.5) and out["n_samples"] == 4 and out["n_empty"] == 1
    empty = out["samples"][2]
    assert empty["empty"] and not empty["match"] and empty["chamfer"] == {} and empty["nearest_shape"] is None
    assert [s["match"] for s in out["samples"]] == [True, False, False, True]
    assert out["color_space"] == "sRGB"
    text = format_toy_match(out)
    assert "50.0 %" in text and "1 empty" in text and "1 shape" in text
    # Deterministic: the same seed gives the same distances.
    again = toy_match_rate(meshes, prompts, refs)
    assert again["samples"][0]["chamfer"] == out["samples"][0]["chamfer"]


def test_a_tie_is_a_miss(refs):
    # Two colour names with the same sRGB value: no sample can be strictly closer to one of them.
    tied = ToyReferences(shapes=refs.shapes, colors={"red": PALETTE["red"], "crimson": PALETTE["red"]},
                         targets={"a red cube": ("cube", "red")}, n_points=refs.n_points)
    out = toy_match_rate([_trimesh("cube", PALETTE["red"])], ["a red cube"], tied)
    assert out["samples"][0]["shape_ok"] and not out["samples"][0]["color_ok"] and out["rate"] == 0.0


def test_mean_vertex_color():
    mesh = trimesh.Trimesh(np.eye(3), [[0, 1, 2]], vertex_colors=[[255, 0, 0], [0, 255, 0], [0, 0, 255]], process=False)
    assert np.allclose(mean_vertex_color(mesh), [1 / 3, 1 / 3, 1 / 3])


def test_bad_input_raises_clear_errors(refs):
    cube = _trimesh("cube", PALETTE["red"])
    with pytest.raises(ValueError, match="same length"):
        toy_match_rate([cube, cube], ["a red cube"], refs)
    with pytest.raises(ValueError, match="meshes is empty"):
        toy_match_rate([], [], refs)
    with pytest.raises(ValueError, match=r"a green cone.*no target"):
        toy_match_rate([cube], ["a green cone"], refs)
    uncoloured = trimesh.Trimesh(cube.vertices, cube.faces, process=False)
    with pytest.raises(ValueError, match="vertex colours"):
        toy_match_rate([uncoloured], ["a red cube"], refs)
    with pytest.raises(ValueError, match="at least 2 shapes"):
        ToyReferences(shapes={"cube": refs.shapes["cube"]}, colors=refs.colors)
    with pytest.raises(ValueError, match="not among the reference shapes"):
        ToyReferences(shapes=refs.shapes, colors=refs.colors, targets={"a red cone": ("cone", "red")})
    with pytest.raises(ValueError, match="sRGB values in"):
        ToyReferences(shapes=refs.shapes, colors={"red": (2.0, 0.0, 0.0), "blue": (0.0, 0.0, 1.0)})


def test_prepare_data_builds_a_smaller_toy_world():
    # scripts/prepare_data.py data=toy data.shapes=[...] data.colors=[...]: the world the prior's learning test uses.
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from shapee.data.prepare import _make_sources

    with initialize_config_dir(config_dir=str(Path(__file__).resolve().parents[1] / "configs"), version_base="1.3"):
        cfg = compose(config_name="prepare_data", overrides=[
            "out=x", "data=toy", "n=4", "data.shapes=[sphere,cube]", "data.colors=[red,blue]",
            "data.random_rotation=false"])
    sources = _make_sources(OmegaConf.to_container(cfg, resolve=True))
    assert [s.asset_id for s in sources] == [a.asset_id for a in toy_assets(
        4, shapes=["sphere", "cube"], colors=["red", "blue"])]
    assert {s.asset_id.split("_", 2)[2] for s in sources} == {"red_sphere", "blue_cube", "blue_sphere", "red_cube"}
    upright = toy_assets(4, shapes=["sphere", "cube"], colors=["red", "blue"], random_rotation=False)
    assert all(np.array_equal(s.mesh.vertices, a.mesh.vertices) for s, a in zip(sources, upright))
