"""Benchmark of data preparation: seconds per asset, split by step (load, render, point cloud, SDF, write).

Runs :func:`shapee.data.prepare.prepare_asset` on real mesh files at the default settings (20 encoder + 20 target
+ 40 point-cloud views of 256², 16,384 points, 2¹⁴ + 2¹⁴ SDF samples) in this process, after ``warmup`` untimed
runs that pay one-time costs (imports, kernel compilation, allocator growth).
"""

from __future__ import annotations

import os
import platform
import statistics
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch

from shapee.data.mesh import load_mesh
from shapee.data.prepare import PrepareSettings, prepare_asset

STEPS = ("load", "render", "pointcloud", "sdf", "write", "total")

# The benchmark asset: a 10,200-face textured OBJ (+ .mtl + .jpg).
DEFAULT_ASSET = Path(__file__).resolve().parents[2].parent / "shared" / "assets" / "good" / "capsule.obj"


def bench_prepare_data(
    assets: list[str | os.PathLike] | None = None,
    *,
    repeats: int = 3,
    warmup: int = 1,
    settings: dict | None = None,
) -> dict:
    """Time ``prepare_asset`` on each of ``assets`` ``repeats`` times; returns a JSON-ready dict.

    ``settings``: overrides of :class:`shapee.data.prepare.PrepareSettings` (defaults = the official sizes).
    Result keys: ``rows`` (one per asset: median wall seconds per step, ``cpu``: median process CPU seconds per
    step, faces), ``mean`` / ``mean_cpu`` (means over assets of the medians), ``dominant`` (the slowest step by
    wall time), ``settings``, ``machine``. CPU seconds (all threads) are the figure to trust on a shared machine.
    """
    assets = [Path(a) for a in (assets or [DEFAULT_ASSET])]
    for a in assets:
        if not a.is_file():
            raise FileNotFoundError(f"benchmark asset {a}: no such file")
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats must be >= 1 and warmup >= 0, got {repeats}, {warmup}")
    s = PrepareSettings.from_config(settings or {})
    rows = []
    with tempfile.TemporaryDirectory(prefix="shapee-bench-") as tmp:
        for path in assets:
            runs = []
            for i in range(warmup + repeats):
                rec = prepare_asset(path, tmp, s)
                if i >= warmup:
                    runs.append(rec.timings)
            n_faces = len(load_mesh(path).faces)
            size = os.path.getsize(Path(tmp) / rec.record)
            row = {"asset": path.name, "faces": n_faces, "record_mb": round(size / 2**20, 2)}
            row.update({k: round(statistics.median(r.get(k, 0.0) for r in runs), 3) for k in STEPS})
            row["cpu"] = {k: round(statistics.median(r.get(f"{k}_cpu", 0.0) for r in runs), 3) for k in STEPS}
            rows.append(row)
    mean = {k: round(statistics.fmean(r[k] for r in rows), 3) for k in STEPS}
    mean_cpu = {k: round(statistics.fmean(r["cpu"][k] for r in rows), 3) for k in STEPS}
    dominant = max((k for k in STEPS if k != "total"), key=lambda k: mean[k])
    return {
        "benchmark": "prepare_data",
        "rows": rows,
        "mean": mean,
        "mean_cpu": mean_cpu,
        "dominant": dominant,
        "settings": asdict(s),
        "repeats": repeats,
        "warmup": warmup,
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        },
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def format_table(result: dict) -> str:
    """A fixed-width table: one row per asset plus the mean, seconds per step."""
    cols = ("asset", "faces", "clock") + STEPS
    lines = ["  ".join(f"{c:>12}" for c in cols)]
    table = []
    for r in result["rows"]:
        table += [{**r, "clock": "wall"}, {**r, **r["cpu"], "asset": "", "faces": "", "clock": "cpu"}]
    table += [{"asset": "mean", "faces": "", "clock": "wall", **result["mean"]},
              {"asset": "", "faces": "", "clock": "cpu", **result["mean_cpu"]}]
    for r in table:
        lines.append("  ".join(f"{r[c]:>12}" if not isinstance(r[c], float) else f"{r[c]:>12.3f}" for c in cols))
    s = result["settings"]
    lines.append(
        f"seconds per asset; {s['views']}+{s['targets']} views of {s['resolution']}², {s['pc_views']} point-cloud "
        f"views of {s['pc_resolution']}², {s['n_points']} points, {s['sdf_uniform']}+{s['sdf_near']} SDF samples, "
        f"backend {s['backend']}, {result['machine']['torch_threads']} torch threads; dominant step: "
        f"{result['dominant']}; wall = elapsed, cpu = process CPU seconds (all threads)"
    )
    return "\n".join(lines)
