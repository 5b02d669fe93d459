"""Encoder evaluation (``scripts/evaluate.py task=encoder`` and the encoder trainer's periodic evaluation): the
paper's Table 1 for our checkpoints.

**One evaluation.** :func:`evaluate_checkpoint` is the only code that measures a transmitter: ``evaluate.py`` calls it
through :func:`evaluate_encoder`, the training loop through :func:`shapee.train.encoder.heldout_eval_fn`, both with
the defaults of :class:`~shapee.eval.config.EncoderEval` unless told otherwise, so the same weights on the same
records give the same numbers from both
(``tests/test_evaluate.py::test_trainer_and_evaluate_py_give_the_same_numbers``). A setting cheaper than these defaults
(the training-time mesh grid) is named in the logged key by :func:`metric_keys` (``eval/stf_psnr@32``).

For each transmitter checkpoint (one row per stage: nerf, distill, finetune, or a released ``transmitter.pt``) and
each held-out asset of a records folder:

1. **Encode** the asset's encoder views and point cloud (the point-conv shuffle is random even in eval mode,
   reference §8.3.1: a generator seeded with ``seed`` fixes it, so reruns give identical numbers; the draws depend
   on ``batch_size``, which is why it is one of the settings).
2. **NeRF PSNR**: render the record's target views (``views``: ``auto`` = the held-out ones, the last
   ``model.holdout_views``, when the model holds any out, else all) with the record's fixed cameras, deterministic
   stratified and importance sampling (§8.3.2 made deterministic; the model's ``n_coarse`` / ``n_fine``), black
   background, sRGB in [0, 1]; PSNR against the target views (sRGB on black, as prepared), over all pixels of the
   asset's evaluated views, capped at ``psnr_cap`` dB. Also the fine pass's transmittance L1 against ``1 − alpha``.
3. **STF PSNR**: the same views rendered from the mesh: SDF grid (``grid_size``³) → Marching Cubes 33 → STF
   vertex colours → PyTorch3D with the dataset lighting (the finetune stage's renderer).
4. **Chamfer / F-score** of that same mesh against the *source* mesh (the file named in the manifest, or the toy
   world regenerated from its id and checked against the record's content hash): ``n_points`` area-uniform surface
   samples on each, both in the normalised world frame [-1, 1]³; Chamfer-L1 in world units, F-score at
   ``fscore_threshold`` world units (see :mod:`shapee.eval.metrics`). An empty mesh gets no Chamfer (counted in
   ``n_empty_meshes``) and F-score 0.

Per-checkpoint numbers are means over assets of per-asset values (for PSNR: the mean of per-asset PSNRs, not the PSNR
of the pooled MSE, which reads lower whenever assets differ: Jensen's inequality). Output: a JSON dict (settings, one row per
checkpoint with per-asset values) and a markdown table, plus one image grid per checkpoint (target | NeRF | STF).
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from shapee.cli import progress_bar
from shapee.data.dataset import AssetDataset, collate_assets
from shapee.data.records import arrays_sha256
from shapee.eval.config import EncoderEval, defaults, merge_settings
from shapee.eval.metrics import point_set_metrics, psnr_per_item, sample_mesh_points
from shapee.eval.report import markdown_table, save_image_grid, write_results
from shapee.io.checkpoint import CHECKPOINT_FORMAT, SNAPSHOT_FORMAT
from shapee.io.loading import load_model
from shapee.models.transmitter import batch_cameras
from shapee.runtime import resolve_device

# EncoderEval's defaults as a dict (a view of the dataclass, not a second copy), for the trainer's evaluation.
ENCODER_DEFAULTS: dict[str, Any] = defaults(EncoderEval)
# The settings of evaluate_checkpoint (the rest of ENCODER_DEFAULTS selects checkpoints, assets and the device).
CHECKPOINT_SETTINGS = (
    "views", "resolution", "grid_size", "n_points", "fscore_threshold", "psnr_cap", "batch_size", "seed", "stf",
    "geometry", "grid_assets", "grid_views",
)



# -------------------------------------------------------------------------------------------- ground truth
class SourceMeshes:
    """The source meshes of records, loaded once: files via :func:`shapee.data.mesh.load_mesh` (normalised exactly
    as data preparation does), toy assets regenerated with ``toy_assets(seed=toy_seed)`` and checked against the
    record's ``content_hash`` so a wrong seed is an error, not a silently wrong Chamfer distance."""

    def __init__(self, toy_seed: int = 0) -> None:
        self.toy_seed = toy_seed
        self._cache: dict[str, Any] = {}

    def get(self, record) -> Any:
        if record.asset_id not in self._cache:
            self._cache[record.asset_id] = self._load(record)
        return self._cache[record.asset_id]

    def _load(self, record):
        source = record.source
        if source.startswith("toy:"):
            from shapee.data.toy import toy_assets  # here: it loads trimesh (~0.6 s), which shapee.train/eval skip

            toy_id = source.removeprefix("toy:")
            try:
                index = int(toy_id.split("_")[1])
            except (IndexError, ValueError):
                raise ValueError(
                    f"record {record.asset_id!r}: toy source {source!r} has no index (expected toy:toy_<i>_...)"
                ) from None
            asset = toy_assets(index + 1, seed=self.toy_seed)[index]
            mesh = asset.mesh
            digest = arrays_sha256(mesh.vertices, mesh.faces, mesh.corner_colors)
            if asset.asset_id != toy_id or digest != record.content_hash:
                raise ValueError(
                    f"record {record.asset_id!r}: the toy world of seed toy_seed={self.toy_seed} does not reproduce "
                    "its source mesh (content hash differs): give the data.seed the records were prepared with as "
                    "toy_seed="
                )
            return mesh
        from shapee.data.mesh import load_mesh  # here: it loads trimesh (~0.6 s), which shapee.train/eval skip

        if not Path(source).is_file():
            raise FileNotFoundError(
                f"record {record.asset_id!r}: source mesh {source!r} (from the manifest) does not exist on this "
                "machine; Chamfer/F-score need the source meshes"
            )
        return load_mesh(source)


def source_points(mesh, n: int, seed: int, device: torch.device) -> Tensor:
    """``n`` area-uniform surface samples ``[n, 3]`` of a :class:`shapee.data.mesh.Mesh` (seeded numpy RNG)."""
    points, _ = mesh.sample_surface(n, np.random.default_rng(seed))
    return torch.from_numpy(points).to(device)


# ------------------------------------------------------------------------------------------------ evaluation
def _area_resize(images: Tensor, size: int) -> Tensor:
    """``[..., H, W, C]`` → ``[..., size, size, C]`` by area averaging."""
    lead = images.shape[:-3]
    x = images.reshape(-1, *images.shape[-3:]).permute(0, 3, 1, 2)  # [n, C, H, W]
    x = torch.nn.functional.interpolate(x.float(), size=(size, size), mode="area")
    return x.permute(0, 2, 3, 1).reshape(*lead, size, size, images.shape[-1])


def _mean(values: Sequence[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return float(np.mean(finite)) if finite else math.nan


def _pooled_psnr(psnrs: Sequence[float]) -> float:
    """PSNR of the MSE pooled over assets (each asset's MSE = 10^(−PSNR/10), images in [0, 1]), the aggregate the
    learning tests are calibrated on. The mean of per-asset PSNRs (the headline number) weighs a near-perfect asset
    heavily (a black cube on the black background swings between 32 and 42 dB); pooling the errors does not."""
    mse = [10.0 ** (-v / 10.0) for v in psnrs if not math.isnan(v)]
    return float(-10.0 * math.log10(np.mean(mse))) if mse else math.nan


def resolve_views(views: str, model) -> str:
    """``auto`` → ``holdout`` when ``model`` holds target views out (``model.holdout_views >= 1``), else ``all``."""
    if views == "auto":
        return "holdout" if getattr(model, "holdout_views", 0) >= 1 else "all"
    if views not in ("all", "holdout"):
        raise ValueError(f"views must be 'auto', 'all' or 'holdout', got {views!r}")
    if views == "holdout" and model.holdout_views < 1:
        raise ValueError("views='holdout' but the model holds out no target views (model.holdout_views = 0)")
    return views


MESH_METRICS = ("stf_psnr", "stf_psnr_pooled", "chamfer", "f_score", "n_empty_meshes")  # depend on the mesh grid
IMAGE_METRICS = ("nerf_psnr", "nerf_psnr_pooled", "nerf_transmittance_l1", "stf_psnr", "stf_psnr_pooled")  # resolution


def metric_keys(row: Mapping[str, Any], *, grid_size: int, resolution: int | None) -> dict[str, float]:
    """The scalar means of an :func:`evaluate_checkpoint` row under names that carry any setting cheaper than
    ``evaluate.py``'s defaults (:class:`~shapee.eval.config.EncoderEval`), so a cheap in-training number is never read
    as the full one: a mesh grid other than 128³ adds ``@<grid>`` to the mesh metrics (``stf_psnr@32``), a render
    resolution below the records' adds ``@<R>px`` to the image metrics. ``n_assets`` and the views' resolution are
    reported as they are."""
    out: dict[str, float] = {}
    for name in ("nerf_psnr", "nerf_psnr_pooled", "nerf_transmittance_l1", "stf_psnr", "stf_psnr_pooled", "chamfer",
                 "f_score", "n_empty_meshes", "n_assets"):
        if name not in row:
            continue
        key = name
        if name in MESH_METRICS and grid_size != EncoderEval.grid_size:
            key += f"@{grid_size}"
        if name in IMAGE_METRICS and resolution is not None:
            key += f"@{resolution}px"
        out[key] = float(row[name])
    return out


@torch.no_grad()
def evaluate_checkpoint(
    model,
    dataset,
    *,
    views: str = EncoderEval.views,
    resolution: int | None = EncoderEval.resolution,
    grid_size: int | None = EncoderEval.grid_size,
    n_points: int = EncoderEval.n_points,
    fscore_threshold: float = EncoderEval.fscore_threshold,
    psnr_cap: float | None = EncoderEval.psnr_cap,
    batch_size: int = EncoderEval.batch_size,
    seed: int = EncoderEval.seed,
    stf: bool = EncoderEval.stf,
    geometry: bool = EncoderEval.geometry,
    sources: SourceMeshes | None = None,
    grid_assets: int = EncoderEval.grid_assets,
    grid_views: int = EncoderEval.grid_views,
) -> tuple[dict[str, Any], np.ndarray | None]:
    """Metrics of one :class:`~shapee.models.Transmitter` on every asset of ``dataset`` (an ``AssetDataset`` with
    targets): the one evaluation behind ``evaluate.py task=encoder`` and the encoder trainer's ``eval/*`` numbers.

    Returns ``(row, grid)``: the row's means (``nerf_psnr``, ``nerf_transmittance_l1``, and with ``stf``:
    ``stf_psnr``, ``chamfer``, ``f_score``, ``n_empty_meshes``), ``n_assets``, ``views`` (resolved), ``grid_size``
    and the per-asset values; and a uint8 image grid ``[A·rows·R, V·R, 3]`` (per asset: target, NeRF and, with
    ``stf``, STF rows). ``grid_size=None``: the model's ``stf_grid_size``. ``geometry=False`` skips Chamfer / F-score
    (they need the source meshes). Settings and defaults: :class:`~shapee.eval.config.EncoderEval`.
    """
    views = resolve_views(views, model)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    grid_size = int(grid_size or model.stf_grid_size)
    sources = sources or SourceMeshes()
    device = next(model.parameters()).device
    per_asset: list[dict[str, Any]] = []
    grid_rows: list[Tensor] = []
    generator = torch.Generator(device).manual_seed(seed)  # the encoder's point-conv shuffle
    start = time.perf_counter()
    for first in progress_bar(range(0, len(dataset), batch_size), desc="evaluate encoder", unit="batch", leave=False):
        indices = list(range(first, min(first + batch_size, len(dataset))))
        batch = collate_assets([dataset[i] for i in indices])
        batch = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()}
        target = batch["target_rgb"]  # [B, T, H, W, 3] sRGB on black
        T, H = target.shape[1], target.shape[2]
        keep = slice(0, T) if views == "all" else slice(T - model.holdout_views, T)
        cameras = [c[keep] for c in batch_cameras(batch, "target")]
        target = target[:, keep]  # [B, n, H, W, 3]
        alpha = batch["target_alpha"][:, keep] if "target_alpha" in batch else None  # [B, n, H, W]
        if resolution is not None and resolution != H:
            if resolution > H:
                raise ValueError(f"resolution={resolution} is above the records' target resolution {H}")
            cameras = [c.resized(resolution) for c in cameras]
            target = _area_resize(target, resolution)
            alpha = None if alpha is None else _area_resize(alpha[..., None], resolution)[..., 0]
        cameras = [c.to(device) for c in cameras]

        latent = model.encode(batch, generator=generator)  # [B, n_ctx, d]
        nerf_out = model.render_nerf(latent, cameras, deterministic=True)
        nerf = nerf_out["rgb"].clamp(0, 1)  # [B, n, R, R, 3]
        nerf_psnr = psnr_per_item(nerf, target, cap=psnr_cap)  # [B]
        transmittance_l1 = None
        if alpha is not None and "transmittance" in nerf_out:
            transmittance_l1 = (nerf_out["transmittance"] - (1 - alpha)).abs().flatten(1).mean(1)  # [B]
        if stf:
            stf_out = model.render_stf(latent, cameras, grid_size=grid_size)
            stf_rgb = stf_out["rgb"].clamp(0, 1)  # [B, n, R, R, 3]
            stf_psnr = psnr_per_item(stf_rgb, target, cap=psnr_cap)  # [B]

        for b, index in enumerate(indices):
            record = dataset.records[index]
            asset = {"asset_id": record.asset_id, "nerf_psnr": float(nerf_psnr[b])}
            if transmittance_l1 is not None:
                asset["nerf_transmittance_l1"] = float(transmittance_l1[b])
            if stf:
                verts, faces = stf_out["verts"][b], stf_out["faces"][b]  # [V, 3], [F, 3] world frame
                asset.update(stf_psnr=float(stf_psnr[b]), empty_mesh=bool(faces.shape[0] == 0))
                if geometry and faces.shape[0] == 0:
                    asset.update(chamfer=math.nan, f_score=0.0, precision=0.0, recall=0.0)
                elif geometry:
                    reference = source_points(sources.get(record), n_points, seed + index, device)  # [n, 3]
                    g = torch.Generator().manual_seed(seed + index)
                    predicted = sample_mesh_points(verts, faces, n_points, generator=g)  # [n, 3]
                    asset.update(point_set_metrics(predicted, reference, fscore_threshold))
            per_asset.append(asset)
            if len(grid_rows) < (3 if stf else 2) * grid_assets:
                v = slice(0, grid_views)
                for images in (target[b, v], nerf[b, v]) + ((stf_rgb[b, v],) if stf else ()):  # [v, R, R, 3] each
                    grid_rows.append(torch.cat(list(images), dim=1))  # [R, v·R, 3]
    seconds = time.perf_counter() - start
    row: dict[str, Any] = {"nerf_psnr": _mean([a["nerf_psnr"] for a in per_asset]),
                           "nerf_psnr_pooled": _pooled_psnr([a["nerf_psnr"] for a in per_asset])}
    if per_asset and "nerf_transmittance_l1" in per_asset[0]:
        row["nerf_transmittance_l1"] = _mean([a["nerf_transmittance_l1"] for a in per_asset])
    if stf:
        row["stf_psnr"] = _mean([a["stf_psnr"] for a in per_asset])
        row["stf_psnr_pooled"] = _pooled_psnr([a["stf_psnr"] for a in per_asset])
        if geometry:
            row["chamfer"] = _mean([a["chamfer"] for a in per_asset])
            row["f_score"] = _mean([a["f_score"] for a in per_asset])
        row["n_empty_meshes"] = sum(a["empty_mesh"] for a in per_asset)
    row.update(
        n_assets=len(per_asset), views=views, grid_size=grid_size, seconds_per_asset=seconds / max(len(per_asset), 1),
        assets=per_asset,
    )
    grid = None
    if grid_rows:
        grid = (torch.cat(grid_rows, dim=0).cpu().numpy() * 255).round().astype(np.uint8)  # [rows·R, v·R, 3]
    return row, grid


def _default_label(path: str, model) -> str:
    """``<stage> (<file>)`` for our snapshots/checkpoints (the stage the run trained), ``released (<file>)`` else."""
    ours = False
    if not str(path).endswith(".safetensors"):
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)  # mmap: the weights are not read
        ours = isinstance(obj, Mapping) and obj.get("format") in (SNAPSHOT_FORMAT, CHECKPOINT_FORMAT)
    return f"{model.stage if ours else 'released'} ({Path(path).name})"


def _fmt(value: float, digits: int = 2) -> str:
    """A table cell: ``n/a`` for NaN (e.g. Chamfer when every mesh was empty)."""
    return "n/a" if math.isnan(value) else f"{value:.{digits}f}"


def _checkpoints(transmitter) -> list[str]:
    paths = [str(transmitter)] if isinstance(transmitter, (str, Path)) else [str(c) for c in transmitter]
    if not paths:
        raise ValueError("transmitter is an empty list: give a transmitter snapshot or a list of them")
    return paths


def evaluate_encoder(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """Table 1 for the transmitter checkpoints ``cfg["transmitter"]`` (one path or a list) on the records
    ``cfg["data"]["root"]``.

    Keys: the fields of :class:`~shapee.eval.config.EncoderEval`, which holds their defaults and meanings (``out``: a
    folder for ``results.json``, ``results.md`` and ``grids/*.png``; None writes nothing); an unknown key is a
    ``ValueError`` naming it. Returns ``{"task", "settings", "rows", "markdown"}``; each row has the means,
    ``n_assets``, ``n_empty_meshes`` and the per-asset values.
    """
    s = merge_settings(EncoderEval, cfg)
    root = s.data.root
    if not root:
        raise ValueError("data.root=<records folder> is required for task=encoder")
    paths = _checkpoints(s.transmitter)
    labels = s.labels
    if labels is not None and len(labels) != len(paths):
        raise ValueError(f"labels has {len(labels)} names for {len(paths)} checkpoints")
    device = resolve_device(s.device)
    sources = SourceMeshes(int(s.toy_seed))
    out = Path(s.out) if s.out else None

    rows, resolution = [], None
    for i, path in enumerate(paths):
        model = load_model(path, expect="transmitter", device=device)
        encoder = model.encoder
        read = dict(load_targets=True, load_sdf=False, n_points=encoder.n_points, n_views=encoder.n_views)
        dataset = AssetDataset(root, **read)
        if s.holdout:
            _, dataset = dataset.split(int(s.holdout), seed=int(s.split_seed))
        if s.max_assets is not None and s.max_assets < len(dataset):
            dataset = AssetDataset(root, asset_ids=dataset.asset_ids[: int(s.max_assets)], **read)
        row, grid = evaluate_checkpoint(
            model, dataset, views=s.views, resolution=s.resolution, grid_size=s.grid_size,
            n_points=int(s.n_points), fscore_threshold=float(s.fscore_threshold), psnr_cap=s.psnr_cap,
            batch_size=int(s.batch_size), seed=int(s.seed), stf=bool(s.stf), geometry=bool(s.geometry),
            sources=sources, grid_assets=int(s.grid_assets), grid_views=int(s.grid_views),
        )
        resolution = s.resolution or int(dataset[0]["target_rgb"].shape[1])
        label = labels[i] if labels is not None else _default_label(path, model)
        row = {"label": label, "ckpt": str(path), "resolution": resolution, **row}
        if out is not None and grid is not None:
            row["grid"] = str(save_image_grid(out / "grids" / f"encoder_{i}.png", grid))
        rows.append(row)
        del model

    settings = {
        "data_root": str(root),
        "views": s.views if s.views != "auto" else "auto (holdout when the model holds views out, else all)",
        "views_per_row": [r["views"] for r in rows],
        "cameras": "the records' fixed target cameras",
        "batch_size": int(s.batch_size),
        "nerf_sampling": "deterministic (stratified midpoints + deterministic importance sampling)",
        "background": "black",
        "colour_space": "sRGB in [0, 1]",
        "psnr": f"per asset over all pixels of its evaluated views, mean over assets; capped at {s.psnr_cap} dB",
        "mesh": f"SDF grid {'/'.join(sorted({str(r['grid_size']) for r in rows}))}³ → Marching Cubes 33 (level 0)",
        "chamfer": "Chamfer-L1: ½(mean NN distance both ways), world units of the normalised frame [-1, 1]³",
        "fscore_threshold": float(s.fscore_threshold),
        "n_points": int(s.n_points),
        "seed": int(s.seed),
        "device": str(device),
    }
    table = markdown_table(
        ["stage / checkpoint", "NeRF PSNR (dB)", "STF PSNR (dB)", "Chamfer-L1 (×10⁻³)",
         f"F-score@{s.fscore_threshold:g}", "assets", "empty meshes", "resolution"],
        [[r["label"], _fmt(r["nerf_psnr"]), _fmt(r.get("stf_psnr", math.nan)), _fmt(r.get("chamfer", math.nan) * 1e3),
          _fmt(r.get("f_score", math.nan), 3), r["n_assets"], r.get("n_empty_meshes", "n/a"), f"{r['resolution']}²"]
         for r in rows],
    )
    notes = [
        f"Records: `{root}`; views: {'/'.join(sorted({r['views'] for r in rows}))} target views per asset, the "
        f"records' fixed cameras, rendered at {resolution}², black background, sRGB in [0, 1]. NeRF: deterministic "
        f"sampling. STF: mesh from a {'/'.join(sorted({str(r['grid_size']) for r in rows}))}³ SDF grid (MC33), "
        "PyTorch3D with the dataset lighting.",
        f"PSNR per asset over all its evaluated pixels, mean over assets, capped at {s.psnr_cap} dB.",
        f"Chamfer-L1 and F-score: {s.n_points} area-uniform surface samples on the extracted mesh and on the source "
        f"mesh, normalised world frame [-1, 1]³ (box side 2); F-score threshold τ = {s.fscore_threshold:g} "
        f"({100 * float(s.fscore_threshold) / 2:g} % of the box side). Empty meshes: no Chamfer, F-score 0."
        if s.stf and s.geometry else "Chamfer-L1 and F-score: not measured (stf=false or geometry=false).",
    ]
    markdown = "## Encoder evaluation (Table 1)\n\n" + table + "\n\n" + "\n".join(f"- {n}" for n in notes) + "\n"
    results = {"task": "encoder", "settings": settings, "rows": rows, "markdown": markdown}
    if out is not None:
        write_results(out, results, markdown)
    return results
