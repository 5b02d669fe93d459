"""Tiny inputs shared by the prior's test files (extract_latents, train_diffusion), built once per pytest session.

The toy records take ~20 s on the shared CPU, so they are written once under the session's base temp directory and
reused by every test module that asks (the module-scoped fixtures call these helpers; a second call finds the files).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable

# The tiny transmitter needs >= 1024 points and >= 4 encoder views of 64².
PREPARE_ARGS = [
    "data=toy", "n=4", "resolution=64", "views=4", "targets=4", "pc_resolution=32", "pc_views=4", "n_points=1024",
    "sdf_uniform=256", "sdf_near=256", "progress=false",
]
TINY_LATENT_SHAPE = (128, 64)  # the tiny transmitter's latent [n_ctx, d_latent]


def one_torch_thread():
    """Generator for a module-scoped autouse fixture: one intra-op thread while the module runs, then restored.

    On the shared 2-core test machine, torch's default 2 OpenMP threads make the tiny models ~100× slower (measured:
    0.30 s vs 0.003 s per tiny denoiser call) because the cores are busy with other work.
    """
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def run_script(script: str, *overrides: str, env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    """``python scripts/<script> overrides...`` from the repo root, offline; output captured."""
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1", **(env or {})}
    proc = subprocess.run(
        [PYTHON, str(REPO / "scripts" / script), *overrides], cwd=REPO, env=full_env, capture_output=True, text=True,
        timeout=600,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} {overrides} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def tiny_records(base: Path) -> Path:
    """4 toy records at 64² (4 views, 1024 points) under ``base/tiny_records``; prepared once."""
    out = base / "tiny_records"
    manifest = out / "manifest.jsonl"
    if not (manifest.is_file() and len(manifest.read_text().splitlines()) >= 4):
        run_script("prepare_data.py", f"out={out}", *PREPARE_ARGS)
    return out


def tiny_transmitter_config() -> dict:
    """The tiny transmitter's model config as ``train_encoder.py experiment=tiny_nerf`` composes and resolves it
    (what its snapshots store)."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        cfg = compose(config_name="train_encoder", overrides=["experiment=tiny_nerf", "data.root=unused"])
    return OmegaConf.to_container(cfg.model, resolve=True)


def tiny_transmitter_snapshot(base: Path) -> Path:
    """A snapshot of a tiny transmitter (random weights, seed 0) written by ``shapee.io.save``; made once."""
    import torch

    import shapee.io
    from shapee.models import Transmitter

    path = base / "tiny_transmitter.pt"
    if not path.is_file():
        cfg = tiny_transmitter_config()
        kwargs = {k: v for k, v in cfg.items() if k != "_target_"}
        with torch.random.fork_rng():
            torch.manual_seed(0)
            model = Transmitter(**kwargs)
        shapee.io.save(path, model, cfg)
    return path


def tiny_latents(base: Path, cond: str = "text") -> Path:
    """Latents of :func:`tiny_records` encoded by :func:`tiny_transmitter_snapshot` (``cond`` text or image)."""
    from shapee.train.extract import extract_latents

    out = base / f"tiny_latents_{cond}"
    manifest = out / "manifest.jsonl"
    if not (manifest.is_file() and len(manifest.read_text().splitlines()) >= 4):
        extract_latents(extract_config(tiny_records(base), tiny_transmitter_snapshot(base), out, cond=cond))
    return out


def extract_config(records: Path, encoder: Path, out: Path, **overrides) -> dict:
    """The composed ``configs/extract_latents.yaml`` with these inputs (CPU, no progress bar)."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    args = [f"records={records}", f"transmitter={encoder}", f"out={out}", "device=cpu", "progress=false", "num_workers=0"]
    args += [f"{k}={v}" for k, v in overrides.items()]
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        cfg = compose(config_name="extract_latents", overrides=args)
    return OmegaConf.to_container(cfg, resolve=True)
