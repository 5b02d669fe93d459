"""The procedural toy world: determinism, valid closed meshes, normalisation, combinations, captions."""

from __future__ import annotations

import numpy as np
import pytest
import trimesh

from shapee.data.toy import PALETTE, SHAPE_SYNONYMS, TOY_SHAPES, make_toy_mesh, toy_assets, toy_captions


@pytest.fixture(scope="module")
def world():
    return toy_assets(len(TOY_SHAPES) * len(PALETTE), seed=0)  # one full cycle of combinations


def test_deterministic_under_seed_and_prefix_stable(world):
    again = toy_assets(10, seed=0)
    other = toy_assets(10, seed=1)
    for a, b in zip(world[:10], again):
        assert a.asset_id == b.asset_id and a.captions == b.captions
        np.testing.assert_array_equal(a.mesh.vertices, b.mesh.vertices)
        np.testing.assert_array_equal(a.mesh.faces, b.mesh.faces)
    # another seed: the same combinations, other proportions / rotations
    assert [a.asset_id for a in other] == [a.asset_id for a in again]
    assert not any(np.allclose(a.mesh.vertices, b.mesh.vertices) for a, b in zip(again, other) if a.shape != "sphere")


def test_meshes_watertight_outward_normalised(world):
    for asset in world:
        mesh = asset.mesh
        tm = trimesh.Trimesh(mesh.vertices, mesh.faces, process=False)
        assert tm.is_watertight and tm.is_winding_consistent, asset.asset_id
        assert tm.volume > 0.1, asset.asset_id  # signed volume: positive = outward-oriented
        lo, hi = mesh.vertices.min(axis=0), mesh.vertices.max(axis=0)
        np.testing.assert_allclose((lo + hi) / 2, 0.0, atol=1e-5)
        assert (hi - lo).max() == pytest.approx(2.0, abs=1e-5)
        assert 12 <= len(mesh.faces) <= 3000
        assert mesh.color_source == "material" and mesh.source == f"toy:{asset.asset_id}"
        expected = np.broadcast_to(PALETTE[asset.color_name], mesh.corner_colors.shape)
        np.testing.assert_allclose(mesh.corner_colors, expected, rtol=1e-6)


def test_first_cycle_covers_every_combination_and_neighbours_differ(world):
    combos = [(a.shape, a.color_name) for a in world]
    assert len(set(combos)) == len(TOY_SHAPES) * len(PALETTE)
    assert all(a[0] != b[0] and a[1] != b[1] for a, b in zip(combos, combos[1:]))
    # also for sizes whose gcd is not 1 or equal to one of them (here 4 shapes × 6 colours, gcd 2)
    small = toy_assets(24, shapes=TOY_SHAPES[:4], colors=list(PALETTE)[:6], random_rotation=False)
    assert len({(a.shape, a.color_name) for a in small}) == 24


def test_asset_ids_and_captions(world):
    assert world[3].asset_id == f"toy_0003_{world[3].color_name}_{world[3].shape}"
    assert len({a.asset_id for a in world}) == len(world)
    for asset in world:
        assert len(asset.captions) >= 3
        for caption in asset.captions:
            assert asset.color_name in caption
            assert any(word in caption for word in SHAPE_SYNONYMS[asset.shape])
    assert toy_captions("cube", "red") == ["a red cube", "a red box", "a cube that is red"]
    assert toy_captions("torus", "orange")[0] == "an orange torus"


def test_palette_colours_are_distinct():
    colors = np.array(list(PALETTE.values()))
    distance = np.linalg.norm(colors[:, None] - colors[None], axis=-1)
    assert distance[np.triu_indices(len(colors), 1)].min() > 0.3
    assert {"red", "green", "blue", "yellow", "orange", "purple", "white", "black"} <= set(PALETTE)


def test_proportions_follow_aspect_and_rotation():
    tall = make_toy_mesh("cylinder", (1, 0, 0), aspect=2.0)  # height 2 × diameter → z spans 2, x/y span 1
    np.testing.assert_allclose(tall.vertices.max(axis=0), [0.5, 0.5, 1.0], atol=1e-3)
    quarter_turn = np.array([[0.0, 0.0, 1.0], [0.0, 1.0, 0.0], [-1.0, 0.0, 0.0]])  # maps +z to +x
    lying = make_toy_mesh("cylinder", (1, 0, 0), aspect=2.0, rotation=quarter_turn)
    np.testing.assert_allclose(lying.vertices.max(axis=0), [1.0, 0.5, 0.5], atol=1e-3)
    thin_ring = make_toy_mesh("torus", (1, 0, 0), aspect=0.25)  # tube / ring radius → z span 0.25/1.25 of x span
    assert thin_ring.vertices[:, 2].max() == pytest.approx(0.2, abs=1e-3)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(shape="pyramid", rgb=(1, 0, 0)), "shape"),
        (dict(shape="cube", rgb=(1, 0)), "rgb"),
        (dict(shape="cube", rgb=(2, 0, 0)), "rgb"),
        (dict(shape="cube", rgb=(1, 0, 0), aspect=0.0), "aspect"),
        (dict(shape="torus", rgb=(1, 0, 0), aspect=1.5), "aspect"),
        (dict(shape="cube", rgb=(1, 0, 0), rotation=np.diag([1.0, 1.0, -1.0])), "rotation"),
    ],
)
def test_bad_arguments_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_toy_mesh(**kwargs)


def test_bad_world_arguments_raise():
    with pytest.raises(ValueError, match="colors"):
        toy_assets(2, colors=["red", "chartreuse"])
    with pytest.raises(ValueError, match="shapes"):
        toy_assets(2, shapes=("sphere", "teapot"))
    with pytest.raises(ValueError, match="n must be"):
        toy_assets(-1)
    custom = toy_assets(2, colors={"teal": (0.0, 0.5, 0.5)})
    assert [a.color_name for a in custom] == ["teal", "teal"] and custom[1].captions[0] == "a teal cube"
