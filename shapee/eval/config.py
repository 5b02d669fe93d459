"""The settings of ``scripts/evaluate.py``, one dataclass per task, each default stated here and nowhere else.

``python scripts/evaluate.py task=encoder ...`` selects ``configs/task/encoder.yaml``, whose defaults list pulls in
:class:`EncoderEval` (registered with Hydra's ConfigStore by :func:`register_configs`); ``task=generation`` the same
with :class:`GenerationEval`. The YAML files hold no values of their own, so the defaults a task sees on the command
line are the ones :func:`~shapee.eval.evaluate_encoder` / :func:`~shapee.eval.evaluate_generation` apply when called
from Python (:func:`merge_settings` merges a caller's mapping onto the same dataclass). A key that is not a field of
the task's dataclass, or a value of the wrong type, fails when the config is composed, naming the key, before any
model is built (``scripts/evaluate.py`` composes the command line against these schemas first).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from shapee.settings import SamplingConfig, defaults, merge_settings, setting_names  # noqa: F401  (re-exported)


@dataclass
class RecordsConfig:
    """The records an encoder is evaluated on (the same ``data.root`` key as ``train_encoder.py``)."""

    root: Optional[str] = None  # folder of prepared records (scripts/prepare_data.py)


@dataclass
class EncoderEval:
    """``task=encoder``: the paper's Table 1 (NeRF PSNR, STF PSNR, Chamfer-L1, F-score) for transmitter checkpoints
    on held-out assets, one row per checkpoint. The encoder trainer's ``eval/*`` numbers come from the same function
    with these defaults (``train_encoder.yaml`` ``eval:``), except where a cheaper setting is named in the logged key
    (``eval/stf_psnr@32``: a 32³ mesh grid)."""

    task: str = "encoder"
    transmitter: Any = MISSING  # transmitter snapshot / checkpoint / released transmitter.pt, or a list (a row each)
    data: RecordsConfig = field(default_factory=RecordsConfig)
    labels: Optional[list[str]] = None  # row names, one per checkpoint (default: "<stage> (<file>)")
    out: Optional[str] = "runs/eval_encoder"  # results.json, results.md, grids/; null writes nothing
    holdout: Optional[int] = None  # null: every asset of data.root (a separate test set) | N: AssetDataset.split(N)
    split_seed: int = 0  # seed of AssetDataset.split
    max_assets: Optional[int] = None  # at most this many assets (the first by id)
    views: str = "auto"  # auto: holdout if the model holds views out, else all | all | holdout (never trained on)
    resolution: Optional[int] = None  # null: the records' target resolution | R: R² renders vs area-averaged targets
    grid_size: Optional[int] = 128  # SDF grid of the mesh (STF render, Chamfer, F-score); null: model.stf_grid_size
    stf: bool = True  # the mesh metrics (false: NeRF PSNR only)
    geometry: bool = True  # Chamfer / F-score against the source meshes (false: the source files are not needed)
    n_points: int = 16384  # surface samples per mesh for Chamfer / F-score
    fscore_threshold: float = 0.02  # world units of the normalised [-1, 1]³ frame: 1 % of the box side
    psnr_cap: Optional[float] = 100.0  # dB; identical images would be infinite
    batch_size: int = 1  # assets per encoder / render call (the seeded encoder shuffle's draws depend on it)
    toy_seed: int = 0  # toy records: the data.seed they were prepared with (checked against the content hash)
    grid_assets: int = 4  # image grid: assets (rows target | NeRF | STF)
    grid_views: int = 4  # image grid: views per asset
    seed: int = 0  # encoder point-conv shuffle and surface samples: reruns give the same numbers
    device: str = "auto"  # auto: cuda if available, else cpu


@dataclass
class EvalClipConfig:
    """The evaluation CLIP: any open_clip name + pretrained tag or local checkpoint file. It must differ from the
    prior's conditioning CLIP (ViT-L/14 for the released priors), hence ViT-B/32 with the OpenAI weights."""

    model_name: str = "ViT-B-32"
    pretrained: Optional[str] = "openai"  # a tag, a local file, or null (random weights: a pipeline check only)
    # An explicit open_clip architecture dict (random weights unless pretrained is a file). Typed Any, not
    # Optional[dict]: OmegaConf cannot assign a dict override onto a typed dict node that holds null.
    model_cfg: Any = None
    dtype: str = "auto"
    cache_dir: Optional[str] = None  # where open_clip keeps downloaded weights; null: its default


@dataclass
class GenerationEval(SamplingConfig):
    """``task=generation``: CLIP R-Precision of a text prior's samples with an evaluation CLIP that is not the
    conditioning one, and the time per sample. The sampling and render settings (``seed``, ``guidance_scale``,
    ``steps``, ``sampler``, ``head``, ``grid_size``, ``render_views``, ``device``) are ``sample.py``'s
    (:class:`shapee.settings.SamplingConfig`), with the same defaults except ``render_resolution``."""

    task: str = "generation"
    prior: Any = MISSING  # text prior snapshot (LatentDiffusion)
    transmitter: Any = MISSING  # the transmitter that decodes the prior's latents (our snapshot or transmitter.pt)
    prompts: Any = MISSING  # .txt (one prompt per line, # comments) or .json list, or a list; at least 2 distinct
    out: Optional[str] = "runs/eval_generation"  # results.json, results.md, grids/; null writes nothing
    n_per_prompt: int = 1  # samples per prompt
    batch_prompts: int = 8  # prompts per sampling call
    render_resolution: int = 128  # turntable render size (square): CLIP sees 128² renders, not sample.py's 64² GIF
    elevation_deg: float = 30.0  # camera elevation above the horizon
    fov: float = 0.7  # radians (the notebooks' pan cameras)
    eval_clip: EvalClipConfig = field(default_factory=EvalClipConfig)
    allow_same_clip: bool = False  # true: evaluate with the conditioning CLIP anyway (loud warning, marked in results)
    warmup: bool = True  # an untimed 2-step sample + render before timing
    grid_views: int = 4  # image grid: views per prompt (each prompt's first sample)


# task name → its settings; the names are the files of configs/task/.
TASKS: dict[str, type] = {"encoder": EncoderEval, "generation": GenerationEval}


def register_configs() -> None:
    """Store the task schemas with Hydra's ConfigStore as ``evaluate_schema/<task>``, which ``configs/task/*.yaml``
    name in their defaults lists. Call before composing ``configs/evaluate.yaml`` (the script and the tests do)."""
    store = ConfigStore.instance()
    for name, schema in TASKS.items():
        store.store(group="evaluate_schema", name=name, node=schema)
