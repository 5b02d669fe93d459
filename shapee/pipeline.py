"""Text/image → 3D: the public sampling pipeline (DESIGN.md "Public API"); :mod:`shapee.sample` writes its results
to files for ``scripts/sample.py``.

    pipe = TextTo3D.from_checkpoints(prior="runs/prior_text/checkpoints/snapshot.pt",
                                     transmitter="runs/encoder_finetune/checkpoints/snapshot.pt")
    meshes = pipe("a red cube", n=2, seed=0)                   # list[trimesh.Trimesh], sRGB vertex colours
    result = pipe.generate("a red cube", render_views=20)       # + latents, turntable frames, timings

    pipe = TextTo3D.from_checkpoints(official=True)            # released text300M + transmitter (downloaded)

Steps (reference Appendix A): CLIP embedding of the prompts (or image patch grids) → Karras/Heun sampling with
classifier-free guidance in x₀ space (:meth:`LatentDiffusion.sample_from_cond`) → latents ``[S, n_ctx, d_latent]``
→ the transmitter decodes each latent into implicit-MLP weights → a mesh per latent:

* ``head="stf"`` (default, as the official ``decode_latent_mesh``): Marching Cubes 33 on the SDF head's 0 level,
  STF colour head at the vertices; turntables are renders of that mesh with the dataset lighting.
* ``head="nerf"``: Marching Cubes on the NeRF (fine) density at ``nerf_density_level``, NeRF colour head at the
  vertices; turntables are NeRF volume renders. Useful for an encoder trained only with the NeRF stage, whose SDF
  head is untrained.

The prior and the transmitter must agree on the latent shape (released: ``[1024, 1024]``; tiny presets ``[128, 64]``):
checked when the pipeline is built.
"""

from __future__ import annotations

import os
import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from shapee.cameras import orbit_cameras
from shapee.cli import refuse_renamed_kwargs
from shapee.data.mesh import Mesh, to_data_mesh
from shapee.data.render import render_views
from shapee.io.download import fetch_official
from shapee.runtime import resolve_device, sync  # noqa: F401  (resolve_device: re-exported, its old home)
from shapee.io.loading import load_model, load_prior  # noqa: F401  (load_prior: re-exported, its old home)
from shapee.models import meshing
from shapee.render.grid import DEFAULT_GRID_SIZE
from shapee.render.mesh import TensorMesh
from shapee.render.texture import bake_mesh

__all__ = [
    "Generation",
    "HEADS",
    "ImageTo3D",
    "TextTo3D",
    "load_prior",
    "resolve_device",
]

HEADS = meshing.HEADS  # the stf|nerf heads a mesh (and its turntable) can come from
# ``decoder=`` meant both the transmitter checkpoint and the stf|nerf head; the two names now say which.
DECODER_RENAMED = "use transmitter= for the checkpoint / head= for stf|nerf"
NERF_DENSITY_LEVEL = meshing.NERF_DENSITY_LEVEL  # iso-level of the NeRF density mesh (see shapee.models.meshing)


# ------------------------------------------------------------------------------------------------- loading
def _load_transmitter(path: str | os.PathLike, device: torch.device):
    if not Path(path).exists():
        raise FileNotFoundError(f"transmitter checkpoint {str(path)!r} does not exist")
    return load_model(path, expect="transmitter", device=device)


# ------------------------------------------------------------------------------------------------- results
@dataclass
class Generation:
    """What :meth:`TextTo3D.generate` / :meth:`ImageTo3D.generate` return, one entry per sample (prompt-major:
    the ``n`` samples of input 0 first)."""

    latents: Tensor  # [S, n_ctx, d_latent], S = inputs · n
    meshes: list  # S trimesh.Trimesh with sRGB vertex colours (empty mesh: no surface)
    sources: list[str]  # the prompt (text) or image label of each sample
    frames: Tensor | None = None  # [S, V, H, W, 3] uint8 sRGB turntable renders (render_views > 0)
    timings: dict[str, float] = field(default_factory=dict)  # seconds: clip, sampling, mesh, render


class _To3D(ABC):
    """Shared machinery of :class:`TextTo3D` and :class:`ImageTo3D`: a prior + a transmitter on one device."""

    cond_mode = ""
    official_prior = ""

    @refuse_renamed_kwargs(decoder=DECODER_RENAMED)
    def __init__(self, prior, transmitter, *, device: str | torch.device | None = None,
                 nerf_density_level: float = NERF_DENSITY_LEVEL) -> None:
        if getattr(prior, "cond_mode", None) != self.cond_mode:
            other = {"text": "TextTo3D", "image": "ImageTo3D"}.get(getattr(prior, "cond_mode", None), "?")
            raise ValueError(
                f"{type(self).__name__} needs a {self.cond_mode}-conditional prior, got a "
                f"{getattr(prior, 'cond_mode', type(prior).__name__)!r} one (use {other})"
            )
        encoder = getattr(transmitter, "encoder", None)
        if encoder is None or not hasattr(transmitter, "decode_params"):
            raise ValueError(f"transmitter must be a shapee.models.Transmitter, got {type(transmitter).__name__}")
        decodes = (int(encoder.latent_ctx), int(encoder.d_latent))
        if tuple(prior.latent_shape) != decodes:
            raise ValueError(
                f"the prior makes latents {list(prior.latent_shape)} but the transmitter decodes latents "
                f"{list(decodes)}: use the transmitter whose latents the prior was trained on"
            )
        self.device = resolve_device(device) if device is not None else prior.device
        self.prior = prior.to(self.device).eval()
        self.transmitter = transmitter.to(self.device).eval()
        self.nerf_density_level = float(nerf_density_level)

    @classmethod
    @refuse_renamed_kwargs(decoder=DECODER_RENAMED)
    def from_checkpoints(
        cls,
        prior: str | os.PathLike | None = None,
        transmitter: str | os.PathLike | None = None,
        *,
        device: str | torch.device = "auto",
        official: bool = False,
        cache_dir: str | os.PathLike | None = None,
        offline: bool | None = None,
    ):
        """Build the pipeline from checkpoint files.

        Args:
            prior: our prior snapshot / full checkpoint, or (official) a released ``text_cond.pt`` / ``image_cond.pt``.
            transmitter: our transmitter snapshot / full checkpoint, or a released ``transmitter.pt`` (the weights
                that decode latents; ``decoder=`` before).
            device: ``auto`` (CUDA if available), ``cpu``, ``cuda:1``, ...
            official: with ``prior``/``transmitter`` left out, take the released files from the cache (downloaded with a
                checksum check when online; see :mod:`shapee.io.download`; ``cache_dir`` overrides
                ``$SHAPEE_CACHE``). The released prior needs the OpenAI CLIP ViT-L/14 weights (open_clip fetches them).

        Raises:
            ValueError: a checkpoint left out (ours), mismatched prior and transmitter, the wrong kind of prior.
            FileNotFoundError / CheckpointError / EncoderLoadError / OfficialDownloadError: naming the file.
        """
        dev = resolve_device(device)
        if official:
            if prior is None:
                prior = fetch_official(cls.official_prior, directory=cache_dir, offline=offline)
            if transmitter is None:
                transmitter = fetch_official("transmitter", directory=cache_dir, offline=offline)
        elif prior is None or transmitter is None:
            missing = " and ".join(n for n, v in (("prior", prior), ("transmitter", transmitter)) if v is None)
            raise ValueError(
                f"{cls.__name__}.from_checkpoints: {missing} not given: pass our snapshots (e.g. prior="
                f"runs/prior_{cls.cond_mode}/checkpoints/snapshot.pt, transmitter=runs/encoder_finetune/checkpoints/"
                "snapshot.pt) or official=True for the released weights"
            )
        prior_model = load_model(prior, expect="prior", official_name=cls.official_prior, device=dev)
        return cls(prior_model, _load_transmitter(transmitter, dev), device=dev)

    # ------------------------------------------------------------------------------------------------ inputs
    @abstractmethod
    def _inputs(self, inputs) -> tuple[list, list[str]]:
        """Validated inputs (a list) and a label per input (file names are made from it)."""

    @abstractmethod
    def _embed(self, inputs: list) -> Tensor:
        """CLIP conditioning of the inputs ``[P, *cond_shape]``."""

    # ------------------------------------------------------------------------------------------------- steps
    @torch.no_grad()
    @refuse_renamed_kwargs(decoder=DECODER_RENAMED)
    def generate(
        self,
        inputs,
        *,
        n: int = 1,
        seed: int = 0,
        guidance_scale: float | None = None,
        steps: int = 64,
        sampler: str = "karras",
        head: str = "stf",
        grid_size: int = DEFAULT_GRID_SIZE,
        render_views: int = 0,
        render_resolution: int = 64,
        progress: bool = False,
        cuda_graph: bool | None = None,
        texture: int = 0,
        faces: int | None = None,
        texture_head: str | None = None,
    ) -> Generation:
        """Sample ``n`` latents per input, decode each into a mesh, optionally render turntables; with timings.

        Args:
            inputs: a prompt or a list of prompts (:class:`TextTo3D`); an image or a list of images (:class:`ImageTo3D`).
            n: samples per input. ``seed``: seeds the sampler's noise (one generator for the whole batch, so a
                sample depends on the batch it is drawn in).
            guidance_scale: classifier-free guidance (default: the prior's, 15 text / 3 image for the released).
            steps: sampler steps (64 as the notebooks). ``sampler``: ``karras`` (Heun), ``ddim``, ``ancestral``.
            head: ``stf`` (SDF mesh, mesh renders) or ``nerf`` (density mesh, volume renders).
            grid_size: marching-cubes grid (128³ as released).
            render_views, render_resolution: turntable frames per sample (0: none) and their size.
            cuda_graph: replay the sampler's denoiser calls from a captured CUDA graph (``None``: on CUDA).
            texture, faces, texture_head: the export form of the meshes (:meth:`finish_meshes`): decimated to
                ``faces``, with a ``texture²`` texture baked from the colour head ``texture_head`` (``stf``/``nerf``;
                ``None``: ``head``); ``stf`` turntables then show these meshes. Default: MC vertex colours.
        """
        if head not in HEADS:
            raise ValueError(f"head must be one of {HEADS}, got {head!r}")
        for name, value, low in (("n", n, 1), ("steps", steps, 1), ("grid_size", grid_size, 2),
                                 ("render_views", render_views, 0), ("render_resolution", render_resolution, 2)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        items, labels = self._inputs(inputs)
        timings: dict[str, float] = {}

        t = time.perf_counter()
        cond = self._embed(items)  # [P, *cond_shape]
        sync(self.device)
        timings["clip"] = time.perf_counter() - t

        t = time.perf_counter()
        generator = torch.Generator(self.device).manual_seed(int(seed))
        latents = self.prior.sample_from_cond(
            cond, n=n, guidance_scale=guidance_scale, steps=steps, sampler=sampler, generator=generator,
            progress=progress, cuda_graph=cuda_graph,
        )  # [P·n, n_ctx, d_latent]
        sync(self.device)
        timings["sampling"] = time.perf_counter() - t

        t = time.perf_counter()
        raw = self.extract_meshes(latents, head=head, grid_size=grid_size)  # S × TensorMesh
        meshes = [m.to_trimesh() for m in raw]
        sync(self.device)
        timings["mesh"] = time.perf_counter() - t
        if texture or faces is not None:
            t = time.perf_counter()
            meshes = self.finish_meshes(latents, raw, head=head, texture=texture, faces=faces,
                                        texture_head=texture_head)
            raw = meshes  # the turntables show what is exported
            sync(self.device)
            timings["texture"] = time.perf_counter() - t

        frames = None
        if render_views > 0:
            t = time.perf_counter()
            frames = self.render_turntables(latents, raw, head=head, views=render_views,
                                            resolution=render_resolution)
            sync(self.device)
            timings["render"] = time.perf_counter() - t
        sources = [label for label in labels for _ in range(n)]
        return Generation(latents=latents, meshes=meshes, sources=sources, frames=frames, timings=timings)

    @refuse_renamed_kwargs(decoder=DECODER_RENAMED)
    def __call__(self, inputs, n: int = 1, seed: int = 0, guidance_scale: float | None = None, steps: int = 64,
                 head: str = "stf", **kwargs) -> list:
        """Meshes (``list[trimesh.Trimesh]``, ``n`` per input, prompt-major); see :meth:`generate`."""
        return self.generate(inputs, n=n, seed=seed, guidance_scale=guidance_scale, steps=steps, head=head,
                             **kwargs).meshes

    @torch.no_grad()
    @refuse_renamed_kwargs(decoder=DECODER_RENAMED)
    def extract_meshes(
        self, latents: Tensor, *, head: str = "stf", grid_size: int = DEFAULT_GRID_SIZE
    ) -> list[TensorMesh]:
        """Latents ``[S, n_ctx, d]`` → per sample a :class:`~shapee.render.mesh.TensorMesh` ``(verts [V, 3],
        faces [F, 3], sRGB colours [V, 3])`` (V = 0: no surface), by the transmitter's mesh path
        (:meth:`Transmitter.extract_meshes`). ``stf``: SDF 0-level + STF colours; ``nerf``: fine density at
        ``nerf_density_level`` + NeRF colours."""
        if head not in HEADS:
            raise ValueError(f"head must be one of {HEADS}, got {head!r}")
        return self.transmitter.extract_meshes(latents.to(self.device), head=head, grid_size=grid_size,
                                           density_level=self.nerf_density_level)

    @torch.no_grad()
    @refuse_renamed_kwargs(decoder=DECODER_RENAMED)
    def finish_meshes(self, latents: Tensor, meshes: Sequence[tuple[Tensor, Tensor, Tensor]], *, head: str = "stf",
                      texture: int = 0, faces: int | None = None, texture_head: str | None = None) -> list:
        """The meshes of :meth:`extract_meshes` in export form (:func:`shapee.render.texture.bake_mesh`): decimated to
        ``faces`` (None: as extracted), then a UV atlas + ``texture²`` texture baked from the colour head
        ``texture_head`` (``stf`` / ``nerf``; None: ``head``), or (``texture=0``) vertex colours re-queried
        at the decimated vertices. Returns ``trimesh.Trimesh`` per sample."""
        colour_head = texture_head or head
        latents = latents.to(self.device)
        return [bake_mesh(meshing.transmitter_colour_fn(self.transmitter, latents[s], colour_head), v, f, texture_size=texture,
                          target_faces=faces, device=self.device)
                for s, (v, f, _) in enumerate(meshes)]

    @torch.no_grad()
    @refuse_renamed_kwargs(decoder=DECODER_RENAMED)
    def render_turntables(self, latents: Tensor, meshes: Sequence[tuple[Tensor, Tensor, Tensor]], *,
                          head: str = "stf", views: int = 20, resolution: int = 64) -> Tensor:
        """Turntable frames ``[S, V, H, W, 3]`` uint8 sRGB on black, seen by the official notebooks' pan cameras
        (:func:`shapee.cameras.orbit_cameras`).

        ``stf``: the meshes of :meth:`extract_meshes` rendered with the dataset lighting by the data renderer
        (:func:`shapee.data.render.render_views`: Embree ray casting on CPU — PyTorch3D's CPU rasteriser is naive,
        ~500× slower on a 67k-face mesh — and PyTorch3D on CUDA); a mesh without surface gives black frames.
        ``nerf``: deterministic NeRF volume renders of the latents. ``meshes`` may also be ``trimesh.Trimesh``
        (vertex-coloured or textured, as :meth:`finish_meshes` makes them): those are rendered with their texture.
        """
        cameras = orbit_cameras(views, resolution=resolution, device=self.device)
        if head == "nerf":
            rgb = self.transmitter.render_nerf(latents.to(self.device), cameras, deterministic=True)["rgb"]
            return (rgb.clamp(0, 1) * 255).round().to(torch.uint8).cpu()  # [S, V, H, W, 3]
        frames = torch.zeros(len(meshes), views, resolution, resolution, 3, dtype=torch.uint8)  # [S, V, H, W, 3]
        for s, item in enumerate(meshes):  # a loop over samples, not pixels
            if not isinstance(item, tuple):  # a trimesh.Trimesh in export form
                if len(item.faces) == 0:
                    continue
                mesh = to_data_mesh(item)
            else:
                verts, faces, colors = item
                if faces.shape[0] == 0:
                    continue
                faces_np = faces.cpu().numpy()
                mesh = Mesh(vertices=verts.cpu().numpy(), faces=faces_np,
                            corner_colors=colors.cpu().numpy()[faces_np], color_source="vertex")  # [F, 3, 3] sRGB
            rgb = render_views(mesh, cameras, backend="auto", outputs=("rgb",))["rgb"]  # [V, H, W, 3] float32
            frames[s] = torch.from_numpy((rgb.clip(0, 1) * 255).round().astype("uint8"))
        return frames


class TextTo3D(_To3D):
    """Text → 3D: a text-conditional :class:`~shapee.models.LatentDiffusion` + a :class:`~shapee.models.Transmitter`.

    ``TextTo3D.from_checkpoints(prior=..., transmitter=...)("a red cube", n=2)`` → two ``trimesh.Trimesh``.
    """

    cond_mode = "text"
    official_prior = "text300M"

    def _inputs(self, inputs) -> tuple[list[str], list[str]]:
        prompts = [inputs] if isinstance(inputs, str) else list(inputs) if isinstance(inputs, Sequence) else None
        if not prompts:
            raise ValueError(f"prompt must be a non-empty string or a list of them, got {inputs!r}")
        for i, prompt in enumerate(prompts):
            if not isinstance(prompt, str) or not prompt.strip():
                raise ValueError(f"prompt {i} ({prompt!r}) is empty: give a description such as 'a red cube'")
        return prompts, prompts

    def _embed(self, prompts: list[str]) -> Tensor:
        return self.prior.embed_prompts(prompts)  # [P, cond_dim]


class ImageTo3D(_To3D):
    """Image → 3D: an image-conditional :class:`~shapee.models.LatentDiffusion` + a :class:`~shapee.models.Transmitter`.

    Inputs: an image or a list of them; each a file path, a PIL image, or a ``[H, W, 3]`` array/tensor.
    """

    cond_mode = "image"
    official_prior = "image300M"

    def _inputs(self, inputs) -> tuple[list, list[str]]:
        return _image_inputs(inputs)

    def _embed(self, images: list) -> Tensor:
        return self.prior.embed_images(images)  # [P, tokens, dim]


def _image_inputs(inputs) -> tuple[list, list[str]]:
    """Images → (list, labels); a path that does not exist raises ``FileNotFoundError`` naming it."""
    single = isinstance(inputs, (str, os.PathLike)) or hasattr(inputs, "convert") or (
        hasattr(inputs, "ndim") and inputs.ndim == 3)
    images = [inputs] if single else list(inputs) if inputs is not None else []
    if not images:
        raise ValueError("image must be an image (path, PIL image, [H, W, 3] array) or a non-empty list of them")
    labels = []
    for i, image in enumerate(images):
        if isinstance(image, (str, os.PathLike)):
            if not Path(image).is_file():
                raise FileNotFoundError(f"image {i}: image file {str(image)!r} does not exist")
            labels.append(Path(image).stem)
        else:
            labels.append(f"image{i}")
    return images, labels
