"""The library side of ``scripts/sample.py`` (``configs/sample.yaml``): sample with :mod:`shapee.pipeline`, export
meshes (.glb/.ply/.obj), turntable GIFs and latents, and the text report the script prints."""

from __future__ import annotations

import math
import os
import re
import tempfile
import time
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

from safetensors.torch import save_file
from torch import Tensor

from shapee.io.diffusers_format import is_diffusers_folder
from shapee.io.gif import write_gif
from shapee.io.mesh import MESH_FORMATS, export_mesh
from shapee.pipeline import HEADS, ImageTo3D, TextTo3D, _image_inputs
from shapee.settings import SampleConfig, merge_settings

__all__ = ["format_report", "sample_assets", "slugify"]


def slugify(text: str, max_len: int = 48) -> str:
    """A file-name-safe version of a prompt: ``"A red cube!"`` → ``"a_red_cube"`` (``"sample"`` if nothing is left)."""
    slug = re.sub(r"[^a-z0-9]+", "_", str(text).lower()).strip("_")[:max_len].strip("_")
    return slug or "sample"


def _as_list(value) -> list:
    if value is None:
        return []
    if isinstance(value, (str, os.PathLike)):
        return [value]
    return list(value)


def _atomic_save_latent(latent: Tensor, path: Path, metadata: dict[str, str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file({"latent": latent.detach().float().cpu().contiguous()}, tmp, metadata=metadata)
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(tmp, 0o666 & ~mask)  # mkstemp (and safetensors) leave 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _export_options(export: Mapping[str, Any] | None) -> dict[str, Any]:
    """``export.texture`` / ``export.faces`` / ``export.texture_head`` of ``configs/sample.yaml``, checked, as
    :meth:`TextTo3D.generate` keywords."""
    export = dict(export or {})
    unknown = set(export) - {"texture", "faces", "texture_head"}
    if unknown:
        raise ValueError(f"unknown export options {sorted(unknown)}; known: texture, faces, texture_head")
    texture, faces, head = export.get("texture") or 0, export.get("faces"), export.get("texture_head")
    if isinstance(texture, bool) or not isinstance(texture, int) or not (texture == 0 or texture >= 2):
        raise ValueError(f"export.texture must be 0 (vertex colours) or a texture size >= 2, got {texture!r}")
    if faces is not None and (isinstance(faces, bool) or not isinstance(faces, int) or faces < 4):
        raise ValueError(f"export.faces must be null (no decimation) or an integer >= 4, got {faces!r}")
    if head is not None and head not in HEADS:
        raise ValueError(f"export.texture_head must be one of {list(HEADS)} or null, got {head!r}")
    return {"texture": texture, "faces": faces, "texture_head": head}


def sample_assets(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """Sample, decode and export assets as ``scripts/sample.py`` does: ``cfg`` holds fields of
    :class:`shapee.settings.SampleConfig`, which states their defaults and meanings (an unknown key: ``ValueError``).

    Per sample ``i`` of an input: ``<out>/<slug>_<i>.glb`` / ``.ply`` (``formats``; with ``export.texture``: a
    textured GLB, and OBJ + ``.mtl`` + ``.png``), ``<slug>_<i>.gif`` (turntable,
    ``render_views > 0``) and ``<slug>_<i>_latent.safetensors`` (``latent`` ``[n_ctx, d_latent]`` float32 + the
    prompt, seed and settings as metadata); ``slug`` is the prompt's (or the image file's stem) in file-name form.

    Returns ``{"files": [per sample {"source", "mesh_files", "gif", "latent"}], "timings": {part: seconds},
    "out": folder}``.

    Raises:
        ValueError: no/both/empty prompt and image, bad options. FileNotFoundError: a missing image or checkpoint.
        CheckpointError / EncoderLoadError / OfficialDownloadError: a checkpoint that cannot be used, naming it.
    """
    s = merge_settings(SampleConfig, cfg)
    prompts, images = _as_list(s.prompt), _as_list(s.image)
    if bool(prompts) == bool(images):
        raise ValueError('give exactly one of prompt="a red cube" (or a list of prompts) and image=<path>')
    checkpoint = s.checkpoint
    if checkpoint not in ("ours", "official"):
        if not is_diffusers_folder(str(checkpoint)):
            raise ValueError(
                f"checkpoint must be 'ours', 'official' or a diffusers Shap-E folder (with prior/ and "
                f"shap_e_renderer/), got {checkpoint!r}"
            )
        # Both models from the folder, unless one is given on its own.
        s.prior = s.prior or str(checkpoint)
        s.transmitter = s.transmitter or str(checkpoint)
    formats = ["." + str(f).lower().lstrip(".") for f in s.formats]
    unknown = [f for f in formats if f not in MESH_FORMATS]
    if unknown:
        raise ValueError(f"formats {unknown} are not mesh formats; supported: {list(MESH_FORMATS)}")
    if s.out in (None, ""):
        raise ValueError("out=<folder> is required")
    export = _export_options(asdict(s.export))
    out = Path(s.out)
    pipeline_cls = TextTo3D if prompts else ImageTo3D
    inputs = prompts if prompts else images
    if images:
        _image_inputs(images)  # missing image files fail here, before minutes of model loading

    timings: dict[str, float] = {}
    t = time.perf_counter()
    pipe = pipeline_cls.from_checkpoints(
        prior=s.prior, transmitter=s.transmitter, device=s.device, official=checkpoint == "official",
        cache_dir=s.cache_dir,
    )
    if s.clip:
        pipe.prior.use_clip(dict(s.clip))
    timings["load"] = time.perf_counter() - t
    generation = pipe.generate(
        inputs, n=s.n, seed=s.seed, guidance_scale=s.guidance_scale, steps=s.steps, sampler=s.sampler,
        head=s.head, grid_size=s.grid_size, render_views=s.render_views, render_resolution=s.render_resolution,
        progress=bool(s.progress), cuda_graph=s.cuda_graph, **export,
    )
    timings.update(generation.timings)

    t = time.perf_counter()
    files, counters = [], {}
    for k, (source, mesh) in enumerate(zip(generation.sources, generation.meshes)):
        slug = slugify(source)
        i = counters[slug] = counters.get(slug, -1) + 1  # same slug twice (repeated prompt): numbering goes on
        stem = out / f"{slug}_{i}"
        entry: dict[str, Any] = {"source": str(source), "vertices": len(mesh.vertices), "faces": len(mesh.faces)}
        entry["mesh_files"] = [str(export_mesh(mesh, stem.with_suffix(fmt))) for fmt in formats]
        if ".obj" in formats and getattr(mesh.visual, "kind", None) == "texture":  # the OBJ's material and texture
            entry["mesh_files"] += [str(stem.with_suffix(".mtl")), str(stem.with_suffix(".png"))]
        if generation.frames is not None:
            entry["gif"] = str(write_gif(generation.frames[k].numpy(), stem.with_suffix(".gif"),
                                         fps=s.gif_fps))
        metadata = {"source": str(source), "seed": str(s.seed), "sample_index": str(k), "steps": str(s.steps),
                    "guidance_scale": str(s.guidance_scale), "checkpoint": str(checkpoint), "prior": str(s.prior),
                    "transmitter": str(s.transmitter)}
        entry["latent"] = str(_atomic_save_latent(generation.latents[k], out / f"{slug}_{i}_latent.safetensors",
                                                  metadata))
        files.append(entry)
    timings["export"] = time.perf_counter() - t
    return {"out": str(out), "files": files, "timings": timings, "device": str(pipe.device)}


def format_report(summary: Mapping[str, Any]) -> str:
    """The text ``scripts/sample.py`` prints: the files per sample and a timing table."""
    lines = []
    for entry in summary["files"]:
        lines.append(f"{entry['source']!r}: {entry['vertices']} vertices, {entry['faces']} faces")
        for path in [*entry["mesh_files"], entry.get("gif"), entry["latent"]]:
            if path:
                lines.append(f"  wrote {path}")
    names = {"load": "load checkpoints", "clip": "CLIP", "sampling": "sampling", "mesh": "decoding (mesh)",
             "texture": "decimate + texture", "render": "decoding (turntable)", "export": "export"}
    timings = summary["timings"]
    width = max(len(v) for v in names.values())
    lines.append(f"timings on {summary.get('device', '?')}:")
    for key, label in names.items():
        if key in timings:
            lines.append(f"  {label:<{width}}  {timings[key]:8.2f} s")
    total = sum(v for v in timings.values() if math.isfinite(v))
    lines.append(f"  {'total':<{width}}  {total:8.2f} s")
    return "\n".join(lines)
