"""Point-E SDF regressor (reference §9): shapes, gradients, frame conversion, official key layout (meta device),
strict load + round trip, learning on analytic spheres, and the train_pointe_sdf script end to end."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from shapee.io.official import OfficialCheckpointError, load_official
from shapee.io.official_pointe import (
    load_official_pointe_sdf,
    official_pointe_sdf_keys,
    pointe_sdf_from_state_dict,
    save_official_pointe_sdf,
)
from shapee.models.pointe_sdf import PointESDF

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
TINY = dict(width=16, encoder_layers=2, encoder_heads=2, decoder_layers=2, decoder_heads=2, n_ctx=32, n_query=64)


@pytest.fixture
def one_thread():
    """Tiny matrices: thread hand-offs cost more than they save, and a shared 2-core CPU makes them thrash."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ------------------------------------------------------------------------------------------------ the module
def test_shapes_and_gradients_reach_every_parameter_and_the_queries():
    model = PointESDF(**TINY)
    cloud = torch.rand(2, 40, 3) - 0.5
    points = (torch.rand(2, 17, 3) - 0.5).requires_grad_()
    sdf = model(points, cloud)
    assert sdf.shape == (2, 17)
    sdf.square().sum().backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert no_grad == []
    assert points.grad is not None and points.grad.abs().sum() > 0


def test_queries_do_not_attend_to_each_other_and_batches_are_independent():
    model = PointESDF(**TINY).eval()
    cloud = torch.rand(2, 32, 3) - 0.5
    points = torch.rand(2, 10, 3) - 0.5
    full = model(points, cloud)
    # The SDF of the first 3 queries does not change when the other queries are dropped ...
    torch.testing.assert_close(model(points[:, :3], cloud), full[:, :3], rtol=1e-5, atol=1e-6)
    # ... and asset 1's SDF does not depend on asset 0's cloud, but does depend on its own.
    other = cloud.clone()
    other[0] = torch.rand(32, 3) - 0.5
    out = model(points, other)
    torch.testing.assert_close(out[1], full[1], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(out[0], full[0])


def test_world_sdf_is_pointe_frame_halved_in_and_doubled_out_and_chunking_is_exact():
    model = PointESDF(**TINY).eval()
    cloud = torch.rand(2, 32, 3) * 2 - 1  # world frame [-1, 1]^3
    points = torch.rand(2, 50, 3) * 2 - 1
    with torch.no_grad():
        world = model.world_sdf(points, cloud, chunk_size=None)
        torch.testing.assert_close(world, 2.0 * model(0.5 * points, 0.5 * cloud))
        torch.testing.assert_close(model.world_sdf(points, cloud, chunk_size=7), world, rtol=1e-5, atol=1e-6)


def test_bad_inputs_raise_clear_errors():
    model = PointESDF(**TINY)
    with pytest.raises(ValueError, match="cloud"):
        model(torch.rand(1, 5, 3), torch.rand(1, 32, 6))
    with pytest.raises(ValueError, match="points .*batch size"):
        model(torch.rand(2, 5, 3), torch.rand(1, 32, 3))
    with pytest.raises(ValueError, match="n_ctx=32"):
        model.cloud_from_batch({"points": torch.rand(1, 20, 6)})
    with pytest.raises(ValueError, match="loss"):
        PointESDF(**{**TINY, "loss": "huber"})
    with pytest.raises(KeyError, match="sdf_points"):
        model.loss_dict({"points": torch.rand(1, 40, 6)})


def test_pointe_meshing_recipe_implies_positive_inside():
    """Reference §9: Point-E meshes level 0 with skimage's default (descent) marching cubes, then swaps two vertices
    per face. Outward (positive-volume) faces come out of that recipe only for a field that is positive inside."""
    import skimage.measure
    import trimesh

    g = np.linspace(-1, 1, 24)
    x, y, z = np.meshgrid(g, g, g, indexing="ij")
    field = 0.6 - np.sqrt(x**2 + y**2 + z**2)  # positive inside
    verts, faces, _, _ = skimage.measure.marching_cubes(field, level=0)
    faces = faces[:, [1, 0, 2]]
    assert trimesh.Trimesh(verts, faces, process=False).volume > 0


# ------------------------------------------------------------------------------------------------ official layout
def _reference_layout(width=256, encoder_layers=8, decoder_layers=4) -> dict[str, tuple[int, ...]]:
    """The layout written out by hand from reference §9 (Point-E ``CrossAttentionPointCloudSDFModel``)."""
    w = width
    keys = {"encoder_input_proj.weight": (w, 3), "encoder_input_proj.bias": (w,)}
    mlp = {"mlp.c_fc.weight": (4 * w, w), "mlp.c_fc.bias": (4 * w,), "mlp.c_proj.weight": (w, 4 * w), "mlp.c_proj.bias": (w,)}
    for i in range(encoder_layers):
        block = {
            "attn.c_qkv.weight": (3 * w, w), "attn.c_qkv.bias": (3 * w,),
            "attn.c_proj.weight": (w, w), "attn.c_proj.bias": (w,),
            "ln_1.weight": (w,), "ln_1.bias": (w,), "ln_2.weight": (w,), "ln_2.bias": (w,), **mlp,
        }
        keys.update({f"encoder.resblocks.{i}.{k}": v for k, v in block.items()})
    keys.update({"decoder_input_proj.weight": (w, 3), "decoder_input_proj.bias": (w,)})
    for i in range(decoder_layers):
        block = {
            "attn.c_q.weight": (w, w), "attn.c_q.bias": (w,),
            "attn.c_kv.weight": (2 * w, w), "attn.c_kv.bias": (2 * w,),
            "attn.c_proj.weight": (w, w), "attn.c_proj.bias": (w,),
            "ln_1.weight": (w,), "ln_1.bias": (w,), "ln_2.weight": (w,), "ln_2.bias": (w,),
            "ln_3.weight": (w,), "ln_3.bias": (w,), **mlp,
        }
        keys.update({f"decoder.resblocks.{i}.{k}": v for k, v in block.items()})
    keys.update({"ln_post.weight": (w,), "ln_post.bias": (w,), "output_proj.weight": (1, w), "output_proj.bias": (1,)})
    return keys


def test_full_size_key_layout_equals_reference_and_parameter_count():
    ours = official_pointe_sdf_keys()  # built on the meta device
    reference = _reference_layout()
    assert set(ours) == set(reference)
    assert {k: v for k, v in ours.items() if reference[k] != v} == {}
    n_params = sum(math.prod(s) for s in ours.values())
    assert n_params == 9_481_985
    assert n_params / 1e6 == pytest.approx(9.48, abs=0.005)  # reference §9: ~9.48 M


def _random_state_dict(seed=0, **kwargs):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=g) for k, s in official_pointe_sdf_keys(**kwargs).items()}


def test_strict_load_and_round_trip(tmp_path):
    shape = dict(width=16, encoder_layers=2, encoder_heads=2, decoder_layers=1, decoder_heads=2)
    sd = _random_state_dict(**shape)
    path = tmp_path / "sdf.pt"
    torch.save(sd, path)

    model = load_official_pointe_sdf(path, n_ctx=32, **shape)
    assert not model.training
    loaded = model.state_dict()
    assert set(loaded) == set(sd) and all(torch.equal(loaded[k], sd[k]) for k in sd)

    again = tmp_path / "again.pt"
    save_official_pointe_sdf(model, again)
    back = torch.load(again, weights_only=True)
    assert set(back) == set(sd) and all(torch.equal(back[k], sd[k]) for k in sd)

    # The same through shapee.io.load_official, and the numbers follow the weights.
    twin = load_official("pointe_sdf", again, **shape)
    x, c = torch.rand(1, 5, 3), torch.rand(1, 32, 3)
    with torch.no_grad():
        torch.testing.assert_close(twin(x, c), model(x, c))


def test_strict_load_names_every_offending_key(tmp_path):
    shape = dict(width=16, encoder_layers=1, encoder_heads=2, decoder_layers=1, decoder_heads=2)
    sd = _random_state_dict(**shape)
    broken = dict(sd)
    del broken["ln_post.weight"]
    broken["extra.weight"] = torch.zeros(1)
    broken["output_proj.weight"] = torch.zeros(2, 16)
    with pytest.raises(OfficialCheckpointError) as err:
        pointe_sdf_from_state_dict(broken, **shape)
    message = str(err.value)
    assert "ln_post.weight" in message and "extra.weight" in message and "output_proj.weight" in message
    # Full-size defaults refuse a tiny file.
    with pytest.raises(OfficialCheckpointError, match="shape mismatch"):
        pointe_sdf_from_state_dict(sd)
    # A file with pickled code is refused by weights_only loading.
    evil = tmp_path / "evil.pt"
    torch.save({"w": torch.zeros(1), "obj": _Opaque()}, evil)
    with pytest.raises(OfficialCheckpointError, match=r"Point-E SDF checkpoint .*evil\.pt.*never executed"):
        load_official_pointe_sdf(evil, **shape)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(OfficialCheckpointError, match=r"garbage\.pt.*cannot be read"):
        load_official_pointe_sdf(garbage, **shape)
    with pytest.raises(FileNotFoundError):
        load_official_pointe_sdf(tmp_path / "missing.pt")


class _Opaque:
    pass


# ------------------------------------------------------------------------------------------------ learning
def _sphere_batch(batch: int, n_cloud: int, n_query: int, generator: torch.Generator) -> dict:
    """Spheres of random radius r in [0.3, 0.8] at the origin: surface cloud, SDF r − |x| (positive inside) at
    queries whose radius is uniform in [0, 2r] (half inside, half outside: chance level for the sign is 0.5)."""
    r = torch.rand(batch, 1, generator=generator) * 0.5 + 0.3  # [B, 1]
    d = torch.randn(batch, n_cloud, 3, generator=generator)
    cloud = d / d.norm(dim=-1, keepdim=True) * r[..., None]  # [B, N, 3]
    q = torch.randn(batch, n_query, 3, generator=generator)
    points = q / q.norm(dim=-1, keepdim=True) * (torch.rand(batch, n_query, generator=generator) * 2 * r)[..., None]
    return {"points": torch.cat([cloud, torch.zeros_like(cloud)], -1), "sdf_points": points, "sdf": r - points.norm(dim=-1)}


def test_tiny_model_learns_sphere_sdfs(one_thread):
    torch.manual_seed(0)
    model = PointESDF(width=32, encoder_layers=2, encoder_heads=2, decoder_layers=2, decoder_heads=2, n_ctx=64, n_query=128)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(300):
        terms = model.loss_dict(_sphere_batch(8, 64, 128, g))
        optimizer.zero_grad()
        terms["sdf"].backward()
        optimizer.step()
        losses.append(terms["sdf"].item())
    held_out = _sphere_batch(16, 64, 1024, torch.Generator().manual_seed(99))
    with torch.no_grad():
        pred = model.world_sdf(held_out["sdf_points"], held_out["points"][..., :3])
    sign_acc = ((pred > 0) == (held_out["sdf"] > 0)).float().mean().item()
    assert np.mean(losses[-20:]) < 0.3 * np.mean(losses[:20])
    assert sign_acc > 0.9


# ------------------------------------------------------------------------------------------------ script
@pytest.fixture(scope="module")
def toy_records(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pointe_records")
    cmd = [
        PYTHON, "scripts/prepare_data.py", "data=toy", "n=4", f"out={out}", "resolution=32", "views=2", "targets=2",
        "pc_resolution=32", "pc_views=4", "n_points=512", "sdf_uniform=512", "sdf_near=512", "progress=false",
    ]
    subprocess.run(cmd, cwd=REPO, check=True, capture_output=True, text=True, timeout=600)
    return out


def test_config_defaults_are_the_released_model():
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        cfg = compose(config_name="train_pointe_sdf", overrides=["data.root=/tmp/records"])
        tiny = compose(config_name="train_pointe_sdf", overrides=["data.root=/tmp/r", "model=pointe_sdf_tiny", "trainer=tiny"])
    with torch.device("meta"):
        model = instantiate(cfg.model)
    assert isinstance(model, PointESDF) and model.n_ctx == 4096
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == official_pointe_sdf_keys()
    assert tiny.model.n_ctx <= 512 and tiny.trainer.max_steps <= 10


@pytest.mark.slow
def test_train_pointe_sdf_script_end_to_end(toy_records, tmp_path):
    run_dir = tmp_path / "run"
    cmd = [
        PYTHON, "scripts/train_pointe_sdf.py", f"data.root={toy_records}", f"run_dir={run_dir}",
        "model=pointe_sdf_tiny", "trainer=tiny", "trainer.max_steps=3", "trainer.eval_every=3", "eval.holdout=1",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads(proc.stdout[proc.stdout.index("{"):])
    assert metrics["step"] == 3
    assert 0.0 <= metrics["eval/sign_acc"] <= 1.0 and metrics["eval/sdf_l1"] > 0
    assert math.isfinite(metrics["loss/sdf"])

    # The snapshot rebuilds a PointESDF that serves as the distillation teacher on the same records.
    from shapee.data.dataset import AssetDataset, collate_assets
    from shapee.io import load
    from shapee.models.distill_losses import teacher_sdf

    teacher = load(run_dir / "checkpoints" / "snapshot.pt")
    assert isinstance(teacher, PointESDF)
    batch = collate_assets([AssetDataset(toy_records, load_targets=False)[i] for i in range(2)])
    points, sdf = teacher_sdf(batch, "pointe", pointe_model=teacher, n_points=100)
    assert points.shape == (2, 100, 3) and sdf.shape == (2, 100) and torch.isfinite(sdf).all()
