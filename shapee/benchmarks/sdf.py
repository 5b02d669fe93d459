"""Timing of the SDF targets (``shapee.data.sdf``): ``python -m shapee.benchmarks.sdf``.

Times tree construction, the fast winding number, the candidate distance and the certified distance for points
half uniform in [-1, 1]³ and half near the surface (σ = 0.02), against an icosphere (default 20,480 faces).
Wall-clock numbers on a shared machine are noisy; CPU time is reported beside them.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import trimesh

from shapee.data.sdf import MeshSDF
from shapee.runtime import timed_call


def time_sdf(
    n_points: int = 100_000, subdivisions: int = 5, device: str = "cpu", seed: int = 0
) -> dict[str, float]:
    """Seconds (wall and CPU) per stage for ``n_points`` queries against a radius-0.5 icosphere, and the number of
    sign errors against the analytic sphere for points farther than 0.01 from it (expected 0)."""
    rng = np.random.default_rng(seed)
    sphere = trimesh.creation.icosphere(subdivisions=subdivisions, radius=0.5)
    half = n_points // 2
    surface = sphere.sample(n_points - half, seed=seed)  # [P/2, 3]
    points = np.concatenate([rng.uniform(-1, 1, (half, 3)), surface + rng.normal(size=surface.shape) * 0.02])
    points = torch.from_numpy(points.astype(np.float32)).to(device)  # [P, 3]

    result: dict[str, float] = {"faces": float(len(sphere.faces)), "points": float(n_points)}

    def timed(name, fn):
        cpu = time.process_time()
        out, result[f"{name}_s"] = timed_call(fn, device)
        result[f"{name}_cpu_s"] = time.process_time() - cpu
        return out

    sdf = timed("build", lambda: MeshSDF(sphere.vertices, sphere.faces, device=device))
    w = timed("winding", lambda: sdf.winding_number(points))
    timed("distance", lambda: sdf.unsigned_distance(points))
    timed("distance_certified", lambda: sdf.unsigned_distance(points, certify=True))
    timed("signed_distance", lambda: sdf.signed_distance(points))
    radius = points.norm(dim=-1)  # [P]
    clear = (radius - 0.5).abs() > 0.01
    result["sign_errors"] = float(((w > 0.5) != (radius < 0.5))[clear].sum())
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--points", type=int, default=100_000)
    parser.add_argument("--subdivisions", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    for key, value in time_sdf(args.points, args.subdivisions, args.device).items():
        print(f"{key:>26s}: {value:.3f}")
