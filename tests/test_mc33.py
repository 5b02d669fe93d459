"""Marching Cubes 33: tables derived from the trilinear interpolant, watertight oriented meshes, gradients.

The ground truth for topology is the trilinear interpolant itself, sampled densely (``_trilinear_truth``): MC33's
promise is a surface with the interpolant's topology. scikit-image's ``method="lewiner"`` is compared too; it departs
from that truth on some ambiguous cubes (see ``test_differences_from_skimage_are_skimage_errors``).
"""

from __future__ import annotations

import collections
import time

import numpy as np
import pytest
import scipy.sparse as sp
import torch
import torch.nn.functional as F
from scipy import ndimage
from scipy.sparse.csgraph import connected_components

from shapee.render.mc33 import cube_keys, marching_cubes
from shapee.render.mc33_tables import (
    FACES,
    _face_segments,
    _may_join,
    cube_topology,
    generate_tables,
)

skimage_measure = pytest.importorskip("skimage.measure")


# ----------------------------------------------------------------------------------------------------------- helpers


def _mesh_stats(faces: np.ndarray, n_verts: int) -> dict:
    """Euler characteristic, connected components, watertight (each edge in 2 faces), consistently oriented."""
    faces = np.asarray(faces, dtype=np.int64).reshape(-1, 3)
    if len(faces) == 0:
        return {"chi": 0, "components": 0, "watertight": True, "oriented": True}
    directed = np.concatenate([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]])  # [3F, 2]
    undirected, counts = np.unique(np.sort(directed, axis=1), axis=0, return_counts=True)
    # Oriented: every directed edge appears once and its reverse once.
    d_unique, d_counts = np.unique(directed, axis=0, return_counts=True)
    reverse = {tuple(e) for e in d_unique}
    oriented = bool((d_counts == 1).all()) and all((b, a) in reverse for a, b in d_unique)
    used = np.unique(faces)
    graph = sp.coo_matrix((np.ones(len(undirected)), (undirected[:, 0], undirected[:, 1])), shape=(n_verts, n_verts))
    _, labels = connected_components(graph, directed=False)
    return {
        "chi": int(len(used) - len(undirected) + len(faces)),
        "components": int(len(np.unique(labels[used]))),
        "watertight": bool((counts == 2).all()),
        "oriented": oriented,
    }


def _topology(verts: torch.Tensor, faces: torch.Tensor) -> tuple[int, int]:
    s = _mesh_stats(faces.numpy(), verts.shape[0])
    return s["chi"], s["components"]


def _skimage_topology(field: np.ndarray) -> tuple[int, int]:
    if field.max() <= 0:
        return 0, 0
    verts, faces, _, _ = skimage_measure.marching_cubes(field, 0.0, method="lewiner")
    s = _mesh_stats(faces, len(verts))
    return s["chi"], s["components"]


def _trilinear_truth(field: np.ndarray, upsample: int = 8) -> tuple[int, int] | None:
    """(χ, components) of the 0 level set of the field's trilinear interpolant, by dense sampling.

    χ(∂P) = 2·χ(P) for the positive region P; surface components = #P + #N − 1 (each closed surface separates).
    Returns None where 6- and 26-connectivity disagree (a feature thinner than the sampling step).
    """
    t = torch.as_tensor(field, dtype=torch.float64)[None, None]
    size = tuple((n - 1) * upsample + 1 for n in field.shape)
    dense = F.interpolate(t, size=size, mode="trilinear", align_corners=True)[0, 0].numpy()
    out = []
    for conn in (1, 3):
        structure = ndimage.generate_binary_structure(3, conn)
        _, n_pos = ndimage.label(dense > 0, structure)
        _, n_neg = ndimage.label(dense <= 0, structure)
        out.append((2 * int(skimage_measure.euler_number(dense > 0, connectivity=conn)), n_pos + n_neg - 1))
    return out[0] if out[0] == out[1] else None


def _negative_boundary(field: torch.Tensor, value: float = -1.0) -> torch.Tensor:
    """Set the outer layer of each grid ``[..., X, Y, Z]`` to ``value`` (so every mesh is closed)."""
    field = field.clone()
    field[..., 0, :, :] = field[..., -1, :, :] = value
    field[..., :, 0, :] = field[..., :, -1, :] = value
    field[..., :, :, 0] = field[..., :, :, -1] = value
    return field


def _noise_fields(n: int, size: int, seed: int) -> torch.Tensor:
    """``[n, size, size, size]`` float64 Gaussian noise, −1 on the boundary."""
    g = torch.Generator().manual_seed(seed)
    return _negative_boundary(torch.randn(n, size, size, size, generator=g, dtype=torch.float64))


def _smooth_fields(n: int, size: int, seed: int) -> torch.Tensor:
    """``[n, size, size, size]`` float64 smooth random SDF-like fields (blurred noise), −1 on the boundary."""
    rng = np.random.default_rng(seed)
    x = np.linspace(-1, 1, size)
    box = np.max(np.abs(np.stack(np.meshgrid(x, x, x, indexing="ij"))), axis=0)  # [S, S, S]
    out = []
    for _ in range(n):
        noise = ndimage.gaussian_filter(rng.standard_normal((size,) * 3), sigma=rng.uniform(1.0, 2.5))
        out.append(noise / noise.std() + 0.3 - 10.0 * np.clip(box - 0.7, 0, None))
    return _negative_boundary(torch.tensor(np.stack(out)))


def _sphere(size: int, radius: float = 0.5, bounds=(-1.0, 1.0), center=(0.0, 0.0, 0.0)) -> torch.Tensor:
    x = torch.linspace(bounds[0], bounds[1], size, dtype=torch.float64)
    px, py, pz = torch.meshgrid(x, x, x, indexing="ij")
    return radius - torch.sqrt((px - center[0]) ** 2 + (py - center[1]) ** 2 + (pz - center[2]) ** 2)


def _check_against_truth(fields: torch.Tensor, meshes, upsample: int) -> tuple[int, int, int]:
    """Assert every mesh is watertight and oriented and has the interpolant's topology where that is determinate.

    Returns (#fields compared with the truth, #fields equal to skimage, #fields).
    """
    compared = same_as_skimage = 0
    for i, (field, (verts, faces)) in enumerate(zip(fields, meshes)):
        stats = _mesh_stats(faces.numpy(), verts.shape[0])
        assert stats["watertight"], f"field {i}: an edge is not in exactly two faces"
        assert stats["oriented"], f"field {i}: inconsistent orientation"
        ours = (stats["chi"], stats["components"])
        theirs = _skimage_topology(field.numpy())
        same_as_skimage += ours == theirs
        if ours != theirs:  # settle the difference with the interpolant itself
            truth = _trilinear_truth(field.numpy(), upsample)
            if truth is not None and truth != ours:
                # Sampling can miss a tunnel thinner than its step: the truth must hold at twice the resolution.
                finer = _trilinear_truth(field.numpy(), 2 * upsample)
                truth = finer if finer == ours or finer == truth else None
            if truth is not None:
                compared += 1
                assert ours == truth, f"field {i}: ours {ours}, trilinear truth {truth}, skimage {theirs}"
    return compared, same_as_skimage, len(fields)


# ------------------------------------------------------------------------------------------------------------ tables


def test_tables_generate_quickly_and_each_case_is_a_closed_oriented_piece_of_surface():
    start = time.perf_counter()
    tables = generate_tables.__wrapped__()  # uncached run (the face-segment cache may be warm)
    elapsed = time.perf_counter() - start
    assert elapsed < 10.0, f"table generation took {elapsed:.1f} s"
    keys = np.nonzero(tables.case_of_key >= 0)[0]
    assert len(keys) > 4000
    for key in keys:
        config, face_bits, interior_bits = int(key) & 255, (int(key) >> 8) & 63, int(key) >> 14
        case = tables.case_of_key[key]
        tris = tables.triangles[case, : tables.n_triangles[case]]
        directed = collections.Counter((int(t[i]), int(t[(i + 1) % 3])) for t in tris for i in range(3))
        assert max(directed.values()) == 1, f"key {key}: a directed edge used twice"
        boundary = {e for e in directed if (e[1], e[0]) not in directed}
        # The triangles' boundary is exactly the oriented contour on the cube faces: cubes glue into a closed surface.
        assert boundary == set(_face_segments(config, face_bits)), f"key {key}: boundary is not the face contour"
        # No interior edge between two crossings of one face (it would be shared with the neighbouring cube).
        for a, b in directed:
            if (a, b) not in boundary and (b, a) not in boundary:
                assert _may_join(a, b), f"key {key}: edge {a}-{b} joins two crossings of one face"
        topo = cube_topology(config, face_bits, interior_bits)
        if topo.supported:
            # Pieces of surface in the cube = interior components − 1 (each piece splits the cube once more).
            verts = sorted({v for t in tris for v in t})
            index = {v: i for i, v in enumerate(verts)}
            rows = [index[t[i]] for t in tris for i in range(3)]
            cols = [index[t[(i + 1) % 3]] for t in tris for i in range(3)]
            graph = sp.coo_matrix((np.ones(len(rows)), (rows, cols)), shape=(len(verts), len(verts)))
            n_pieces, _ = connected_components(graph, directed=False)
            assert n_pieces == len(set(topo.class_of_corner)) - 1, f"key {key}"
    assert len(FACES) == 6


def test_interior_and_face_tests_match_the_sampled_trilinear_interpolant():
    # Random cubes with heavy-tailed values hit every interior-ambiguous case (tubes of MC33 cases 4, 6, 7, 10, 12, 13).
    rng = np.random.default_rng(0)
    values = rng.standard_normal((200_000, 8)) ** 3  # [A, 8]
    keys = cube_keys(torch.from_numpy(values)).numpy()
    tables = generate_tables()
    assert not np.isin(keys, tables.unsupported_keys).any(), "a real cube formed a key with no surface"
    # One cube per distinct key whose interior bits change the topology, plus random ordinary cubes.
    by_key: dict[int, int] = {}
    for i, key in enumerate(keys.tolist()):
        if key >> 14 and key not in by_key:
            by_key[key] = i
    picked = [
        i
        for key, i in by_key.items()
        if len(set(cube_topology(key & 255, (key >> 8) & 63, key >> 14).class_of_corner))
        != len(set(cube_topology(key & 255, (key >> 8) & 63, 0).class_of_corner))
    ]
    assert len(picked) > 60, "the sample should contain many interior-ambiguous cases"
    picked += list(range(100))
    s = np.linspace(0, 1, 41)
    px, py, pz = np.meshgrid(s, s, s, indexing="ij")
    weights = np.stack(
        [(px if k & 1 else 1 - px) * (py if k & 2 else 1 - py) * (pz if k & 4 else 1 - pz) for k in range(8)], -1
    )  # [R, R, R, 8] trilinear weights of the corners
    corner_at = [(-1 if k & 1 else 0, -1 if k & 2 else 0, -1 if k & 4 else 0) for k in range(8)]
    checked = 0
    for i in picked:
        key = int(keys[i])
        if key & 255 in (0, 255):
            continue
        topo = cube_topology(key & 255, (key >> 8) & 63, key >> 14)
        dense = weights @ values[i]  # [R, R, R]
        labels = []
        for conn in (1, 3):
            structure = ndimage.generate_binary_structure(3, conn)
            pos, _ = ndimage.label(dense > 0, structure)
            neg, _ = ndimage.label(dense <= 0, structure)
            labels.append([pos[corner_at[k]] if values[i, k] > 0 else -neg[corner_at[k]] for k in range(8)])
        if labels[0] != labels[1]:
            continue  # a connection thinner than the sampling step: undecidable here
        same = lambda lab, a, b: lab[a] == lab[b]  # noqa: E731
        for a in range(8):
            for b in range(8):
                if (values[i, a] > 0) == (values[i, b] > 0):
                    assert same(labels[0], a, b) == same(topo.class_of_corner, a, b), (
                        f"key {key}: corners {a}, {b} connectivity differs from the interpolant"
                    )
        checked += 1
    assert checked > 150


# ---------------------------------------------------------------------------------------------------------- geometry


def test_sphere_vertices_on_the_radius_outward_and_no_shrink():
    verts, faces = marching_cubes(_sphere(64).float())
    radius = verts.double().norm(dim=-1)
    assert (radius - 0.5).abs().max() < 1e-3
    assert abs(verts[:, 0].max().item() - 0.5) < 2e-3 and abs(verts[:, 0].min().item() + 0.5) < 2e-3  # no shrink
    tri = verts[faces]  # [F, 3, 3]
    normal = torch.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0], dim=-1)
    assert (normal * tri.mean(1)).sum(-1).gt(0).all(), "faces must be counter-clockwise seen from outside"
    stats = _mesh_stats(faces.numpy(), verts.shape[0])
    assert stats["watertight"] and stats["oriented"] and (stats["chi"], stats["components"]) == (2, 1)
    assert faces.dtype == torch.int64 and verts.dtype == torch.float32


def test_bounds_and_non_cubic_grids_map_indices_onto_the_box():
    x = torch.linspace(0.0, 2.0, 41, dtype=torch.float64)
    y = torch.linspace(0.0, 2.0, 33, dtype=torch.float64)
    z = torch.linspace(0.0, 2.0, 25, dtype=torch.float64)
    px, py, pz = torch.meshgrid(x, y, z, indexing="ij")
    field = 0.6 - torch.sqrt((px - 1.1) ** 2 + (py - 0.9) ** 2 + (pz - 1.0) ** 2)
    verts, _ = marching_cubes(field, bounds=(0.0, 2.0))
    assert torch.allclose(verts.mean(0), torch.tensor([1.1, 0.9, 1.0], dtype=torch.float64), atol=0.01)
    radius = (verts - torch.tensor([1.1, 0.9, 1.0], dtype=torch.float64)).norm(dim=-1)
    assert (radius - 0.6).abs().max() < 0.01  # coarse, anisotropic grid: linear interpolation error only


def test_same_topology_and_face_count_as_skimage_on_unambiguous_shapes():
    x = torch.linspace(-1, 1, 48, dtype=torch.float64)
    px, py, pz = torch.meshgrid(x, x, x, indexing="ij")
    torus = 0.15 - torch.sqrt((torch.sqrt(px**2 + py**2) - 0.5) ** 2 + pz**2)
    left = 0.3 - torch.sqrt((px + 0.4) ** 2 + py**2 + pz**2)
    spheres = torch.maximum(0.3 - torch.sqrt((px - 0.4) ** 2 + py**2 + pz**2), left)
    for field, expected in ((torus, (0, 1)), (spheres, (4, 2)), (_sphere(48), (2, 1))):
        verts, faces = marching_cubes(field)
        sk_verts, sk_faces, _, _ = skimage_measure.marching_cubes(field.numpy(), 0.0, method="lewiner")
        assert _topology(verts, faces) == expected == _skimage_topology(field.numpy())
        assert faces.shape[0] == sk_faces.shape[0] and verts.shape[0] == sk_verts.shape[0]


# ---------------------------------------------------------------------------------------------- random fields, topology


def test_random_fields_watertight_oriented_with_the_interpolant_topology():
    fields = [_noise_fields(30, 8, seed=1), _smooth_fields(30, 12, seed=2)]
    for batch in fields:
        meshes = marching_cubes(batch)  # one batched call
        compared, _, _ = _check_against_truth(batch, meshes, upsample=8)
        if batch.shape[-1] == 8:
            assert compared > 0, "8³ noise should contain fields where skimage and the truth differ"
    # Batched == one grid at a time.
    batch = fields[0][:5]
    for field, (verts, faces) in zip(batch, marching_cubes(batch)):
        v1, f1 = marching_cubes(field)
        assert torch.equal(f1, faces) and torch.equal(v1, verts)


@pytest.mark.slow
def test_one_thousand_random_fields_watertight_oriented_with_the_interpolant_topology():
    noise = _noise_fields(500, 16, seed=3)
    smooth = _smooth_fields(500, 16, seed=4)
    # Smooth fields: every mesh closed and oriented; where skimage differs, the interpolant sides with us.
    compared, same, total = _check_against_truth(smooth, marching_cubes(smooth), upsample=8)
    assert same >= 0.8 * total  # skimage errs only on a few ambiguous cubes of smooth fields
    # 16³ noise: skimage differs on most fields (many ambiguous cubes each), so settle only the first few exactly.
    meshes = marching_cubes(noise)
    for i, (verts, faces) in enumerate(meshes):
        stats = _mesh_stats(faces.numpy(), verts.shape[0])
        assert stats["watertight"] and stats["oriented"], f"noise field {i}"
    compared, _, _ = _check_against_truth(noise[:6], meshes[:6], upsample=8)
    assert compared >= 1  # many 16³ noise fields hold features too thin to settle by sampling


def test_differences_from_skimage_are_skimage_errors():
    # A 4³ grid with one free 2³ block: the two negative corners (0,1,1) and (1,0,0) of the middle cube are body-
    # diagonally opposite (MC33 case 4). The interpolant's negative set does not join them inside the cube (checked
    # below at 121³), so the surface is a sphere; skimage's Lewiner port puts a tunnel there (a torus, χ = 0).
    block = torch.tensor(
        [0.8737, 0.0960, 1.2563, -0.9318, -1.0370, 2.4599, 0.6100, 0.1817], dtype=torch.float64
    ).reshape(2, 2, 2)
    field = torch.full((4, 4, 4), -1.0, dtype=torch.float64)
    field[1:3, 1:3, 1:3] = block
    s = np.linspace(0, 1, 121)
    px, py, pz = np.meshgrid(s, s, s, indexing="ij")
    b = block.numpy()
    cube = sum(
        b[i, j, k] * (px if i else 1 - px) * (py if j else 1 - py) * (pz if k else 1 - pz)
        for i in range(2)
        for j in range(2)
        for k in range(2)
    )
    _, n_negative = ndimage.label(cube <= 0)
    assert n_negative == 2  # the two negative corners are not connected inside the cube
    verts, faces = marching_cubes(field)
    assert _topology(verts, faces) == (2, 1) == _trilinear_truth(field.numpy(), 16)
    assert _skimage_topology(field.numpy()) == (0, 1)  # documents skimage's departure (update if skimage changes)


def test_ties_with_exact_zeros_stay_watertight():
    g = torch.Generator().manual_seed(5)
    fields = _negative_boundary(torch.randint(-2, 3, (60, 8, 8, 8), generator=g).double())
    for i, (verts, faces) in enumerate(marching_cubes(fields)):
        stats = _mesh_stats(faces.numpy(), verts.shape[0])
        assert stats["watertight"] and stats["oriented"], f"field {i}"


# ------------------------------------------------------------------------------------------------------- gradients


def test_gradcheck_vertex_positions_including_interior_vertices():
    for seed in range(200):  # a small field whose mesh has interior (cube-centre) vertices
        field = torch.randn(4, 4, 4, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        inside = field > 0
        n_cross = sum(int((inside.narrow(a, 0, 3) != inside.narrow(a, 1, 3)).sum()) for a in range(3))
        verts, _ = marching_cubes(field)
        if verts.shape[0] > n_cross:
            break
    else:
        raise AssertionError("no 4³ test field with interior vertices found")
    field.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda f: marching_cubes(f)[0], (field,), eps=1e-6, atol=1e-5)


def test_gradient_reaches_only_the_samples_next_to_the_surface():
    field = _sphere(16).requires_grad_(True)
    verts, _ = marching_cubes(field)
    verts.norm(dim=-1).sum().backward()
    touched = field.grad != 0
    assert touched.any()
    near = (field.detach().abs() < 2 * 2 / 15)  # within two grid steps of the surface
    assert not (touched & ~near).any()


# ---------------------------------------------------------------------------------------------------- API and errors


def test_empty_meshes_and_half_precision():
    verts, faces = marching_cubes(-torch.ones(5, 5, 5))
    assert verts.shape == (0, 3) and faces.shape == (0, 3)
    meshes = marching_cubes(torch.stack([-torch.ones(9, 9, 9), _sphere(9).float()]))
    assert meshes[0][1].shape == (0, 3) and meshes[1][1].shape[0] > 0
    verts, faces = marching_cubes(_sphere(9).half())
    assert verts.dtype == torch.float32 and faces.shape[0] == meshes[1][1].shape[0]


def test_one_vertex_per_sign_change_no_orphans_and_a_batch_equals_its_grids():
    fields = torch.cat([_noise_fields(3, 9, seed=11), -torch.ones(1, 9, 9, 9, dtype=torch.float64),
                        _smooth_fields(2, 9, seed=12)])
    n_interior = 0
    for field, (verts, faces) in zip(fields, marching_cubes(fields)):
        one_v, one_f = marching_cubes(field)
        assert torch.equal(verts, one_v) and torch.equal(faces, one_f)  # batching changes nothing
        assert torch.equal(faces.unique(), torch.arange(verts.shape[0]))  # every vertex is used, ids are dense
        inside = field > 0
        n_cross = sum(int((inside.narrow(a, 0, 8) != inside.narrow(a, 1, 8)).sum()) for a in range(3))
        idx = (verts + 1) * 4  # index units of the 9-sample grid on [-1, 1]
        on_line = ((idx - idx.round()).abs() < 1e-9).sum(-1) >= 2  # [V] on a grid edge (no exact zeros here)
        assert int(on_line.sum()) == n_cross  # one vertex per sign-changing grid edge, shared by its cubes
        assert torch.unique(verts[on_line], dim=0).shape[0] == n_cross
        n_interior += int((~on_line).sum())
    assert n_interior > 0  # the noise fields exercise the interior vertices too


@pytest.mark.parametrize(
    "field, bounds, match",
    [
        (np.zeros((4, 4, 4)), (-1, 1), "torch.Tensor"),
        (torch.zeros(4, 4), (-1, 1), "shape"),
        (torch.zeros(4, 1, 4), (-1, 1), "at least 2"),
        (torch.zeros(4, 4, 4, dtype=torch.int64), (-1, 1), "floating"),
        (torch.full((4, 4, 4), float("nan")), (-1, 1), "NaN"),
        (torch.zeros(4, 4, 4), (1, -1), "bounds"),
    ],
)
def test_bad_inputs_raise_clear_errors(field, bounds, match):
    with pytest.raises((TypeError, ValueError), match=match):
        marching_cubes(field, bounds=bounds)


@pytest.mark.gpu
def test_cuda_matches_cpu():
    for fields in (_noise_fields(4, 12, seed=6), _smooth_fields(4, 16, seed=7)):  # two batches of two sizes
        cpu, gpu = marching_cubes(fields), marching_cubes(fields.cuda())
        assert len(cpu) == len(gpu) == 4
        for (v_cpu, f_cpu), (v_gpu, f_gpu) in zip(cpu, gpu):
            assert f_cpu.shape[0] > 0 and torch.equal(f_cpu, f_gpu.cpu())
            assert torch.allclose(v_cpu, v_gpu.cpu(), atol=1e-12)


def test_benchmark_reports_both_timings():
    from shapee.benchmarks.marching_cubes import benchmark_marching_cubes

    result = benchmark_marching_cubes(grid_size=32, repeats=1, batch=3)
    assert result["ours_s"] > 0 and result["skimage_s"] > 0
    assert result["batch"] == 3 and result["ours_per_field_s"] == result["ours_batch_s"] / 3 > 0
    assert result["ours_faces"] == result["skimage_faces"]  # the smooth benchmark field has no ambiguous cube
    # The host-side work of one call: no sort, three nonzero (active cubes, interior test, output rows).
    assert 0 < result["ours_kernel_ops"] < 100 and result["ours_data_dependent_ops"] == 3
