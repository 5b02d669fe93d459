"""Structured configs: the settings of ``scripts/sample.py`` (:func:`shapee.sample.sample_assets`), each default
stated here once, and the helpers that merge a caller's settings onto such a dataclass (:func:`merge_settings`).

``configs/sample.yaml`` extends :class:`SampleConfig` (registered with Hydra's ConfigStore by
:func:`register_sample_config`) and holds no values of its own; ``sample_assets`` merges whatever it is given onto the
same dataclass, so the script and a Python caller see the same defaults, and a typo'd key or a wrong type fails naming
the key.
:class:`SamplingConfig` is the part ``evaluate.py task=generation`` shares (:class:`shapee.eval.config.GenerationEval`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, ValidationError


@dataclass
class SamplingConfig:
    """Prior sampling, decoding and turntable renders: what sample.py and evaluate.py task=generation both do."""

    seed: int = 0
    guidance_scale: Optional[float] = None  # null: the prior's (15 text, 3 image for the released ones)
    steps: int = 64  # sampler steps (Karras/Heun: 2·steps − 1 denoiser calls)
    sampler: str = "karras"  # karras | ddim | ancestral
    head: str = "stf"  # stf: SDF mesh + mesh-render turntable | nerf: NeRF-density mesh + volume-render turntable
    grid_size: int = 128  # marching-cubes grid
    render_views: int = 20  # turntable frames per sample
    render_resolution: int = 64  # turntable frame size
    device: str = "auto"  # auto: cuda if available, else cpu


@dataclass
class ExportConfig:
    """Mesh export options of sample.py (``export.*``)."""

    texture: int = 0  # 0: vertex colours | S: UV atlas + an S×S texture baked from the colour field (glb, obj+mtl+png)
    faces: Optional[int] = None  # null: the marching-cubes mesh as it is | N: decimate to about N faces first
    texture_head: Optional[str] = None  # colour head queried: stf | nerf | null = head=


@dataclass
class SampleConfig(SamplingConfig):
    """``scripts/sample.py``: prompts or images → meshes, turntable GIFs and latents under ``out``."""

    prompt: Any = None  # text prior: a prompt or a list of prompts
    image: Any = None  # image prior: an image path or a list of them (exactly one of prompt / image)
    n: int = 1  # samples per prompt / image
    # ours: prior= and transmitter= are our snapshots | official: the released weights | <folder>: a diffusers Shap-E
    # folder (prior/ + shap_e_renderer/), e.g. exported by scripts/export.py
    checkpoint: str = "ours"
    prior: Optional[str] = None  # ours: prior snapshot; official: null = text_cond.pt / image_cond.pt from the cache
    transmitter: Optional[str] = None  # ours: encoder snapshot (the prior's latents came from it); official: null
    cache_dir: Optional[str] = None  # official weights folder; null = $SHAPEE_CACHE or ~/.cache/shapee
    clip: Any = None  # override the prior's CLIP (open_clip kwargs: model_name, pretrained=<name or local file>, ...)
    out: Optional[str] = "samples"  # output folder
    formats: list[str] = field(default_factory=lambda: ["glb", "ply"])  # mesh files per sample (glb | ply | obj)
    export: ExportConfig = field(default_factory=ExportConfig)
    gif_fps: float = 10.0  # turntable GIF frame rate (render_views=0: no GIF)
    # sampler-step bar; null: scripts/sample.py shows it when stderr is a terminal (SHAPEE_PROGRESS=0/1: never/always),
    # sample_assets() does not | true | false
    progress: Optional[bool] = None
    cuda_graph: Optional[bool] = None  # replay the sampler's denoiser calls from a CUDA graph; null: on CUDA


def register_sample_config() -> None:
    """Store :class:`SampleConfig` with Hydra's ConfigStore as ``sample_schema``, the first entry of
    ``configs/sample.yaml``'s defaults list. Call before composing that config (the script and the tests do)."""
    ConfigStore.instance().store(name="sample_schema", node=SampleConfig)


def defaults(schema: type) -> dict[str, Any]:
    """The defaults of ``schema`` as a plain dict (nested dataclasses as dicts; ``???`` where a value is required)."""
    return OmegaConf.to_container(OmegaConf.structured(schema))


def setting_names(schema: type) -> list[str]:
    """The top-level keys of ``schema``."""
    return [f.name for f in fields(schema)]


def merge_settings(schema: type, cfg: Mapping[str, Any] | DictConfig | None = None):
    """``cfg`` merged onto ``schema`` (a structured-config dataclass): defaults filled, types checked. An unknown key,
    a wrong type or a required key left unset raises ``ValueError`` naming the key. Returns the dataclass instance
    (nested settings as dataclasses, the values of ``Any`` fields as plain containers)."""
    name = schema.__name__
    if OmegaConf.is_config(cfg):  # a composed config of the same type would carry keys added with +key= through
        cfg = OmegaConf.to_container(cfg, resolve=True)
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), cfg or {})
    except ConfigKeyError as e:
        raise ValueError(f"{name}: unknown setting {e.full_key!r}; known: {', '.join(setting_names(schema))}") from None
    except ValidationError as e:
        raise ValueError(f"{name}: {e.full_key}: {str(e).splitlines()[0]}") from None
    missing = sorted(OmegaConf.missing_keys(merged))
    if missing:
        where = f" for task={merged.task}" if "task" in merged else ""
        raise ValueError(f"{missing[0]}=<...> is required{where}")
    return OmegaConf.to_object(merged)
