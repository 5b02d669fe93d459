"""README's notebook snippet runs as written: the ``python`` block after "In a notebook:" is executed verbatim in a
fresh interpreter, in a folder whose ``runs/encoder_finetune`` and ``runs/prior_text`` hold tiny snapshots (the tiny
presets: a random-weight prior, a transmitter whose SDF is the box of its grid, so that every latent has a surface),
and what it leaves behind is checked (a list of one mesh, a textured mesh, the GLB file, the NeRF frames)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from _tiny_data import REPO
from test_pipeline import save_box_decoder, save_prior

CHECKS = """
import json
print("RESULT " + json.dumps({
    "meshes": [type(m).__name__ for m in meshes],
    "asset": type(asset).__name__, "asset_visual": asset.visual.kind, "asset_faces": len(asset.faces),
    "glb_bytes": __import__("os").path.getsize("chair.glb"), "frames": list(frames.shape),
}))
"""


def notebook_snippet() -> str:
    """The README's ``python`` block that follows the line "In a notebook:"."""
    text = (REPO / "README.md").read_text()
    match = re.search(r"In a notebook:\s*```python\n(.*?)```", text, re.S)
    assert match, "README has no ```python block after 'In a notebook:'"
    return match.group(1)


@pytest.mark.slow
def test_readme_notebook_snippet_runs_as_written(tmp_path):
    snippet = notebook_snippet()
    assert 'shapee.io.load("runs/encoder_finetune/checkpoints/snapshot.pt")' in snippet
    assert 'shapee.io.load("runs/prior_text/checkpoints/snapshot.pt")' in snippet
    for run in ("encoder_finetune", "prior_text"):
        (tmp_path / "runs" / run / "checkpoints").mkdir(parents=True)
    save_box_decoder(tmp_path / "runs" / "encoder_finetune" / "checkpoints" / "snapshot.pt")
    save_prior(tmp_path / "runs" / "prior_text" / "checkpoints" / "snapshot.pt")

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", snippet + CHECKS], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, f"the README snippet failed:\n{proc.stderr[-3000:]}"
    result = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))[7:])
    assert result["meshes"] == ["Trimesh"]  # a batched latent [1, n_ctx, d] gives a list of one mesh
    assert result["asset"] == "Trimesh" and result["asset_visual"] == "texture" and result["asset_faces"] > 0
    assert result["glb_bytes"] > 1000
    assert result["frames"] == [1, 20, 64, 64, 3]
