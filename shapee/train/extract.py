"""Latent extraction (``scripts/extract_latents.py``): prepared records → one latent record per asset.

The trained (or released) encoder runs in eval mode (the latent bottleneck is a plain ``tanh``, no diffusion noise;
reference §1.5) over batches of records, under bf16 autocast on capable GPUs and fp32 on CPU. The work is sharded
by asset across the processes of a ``torchrun`` launch (rank ``r`` of ``n`` takes every ``n``-th asset of the sorted
list from the ``r``-th; no process group is needed) and resumes from what is on disk: assets listed in any
``manifest*.jsonl`` of the output folder are skipped, whatever world size wrote them (unless their record lacks the
conditioning this run stores: a ``cond=image`` run redoes text-only records).

One broken record does not stop the run (the prepare-data precedent, :mod:`shapee.data.prepare`): a record that
cannot be read (truncated or garbage file, missing arrays, wrong dtypes or shapes, a resolution or view/point count
the encoder cannot take), and one whose encoding fails (the forward raises for it, retried alone after its batch
failed, or its latent is not finite: NaN or inf among its values) is skipped and recorded as one JSON line ``{"asset", "source" (the record file), "stage",
"error"}`` in ``<out>/failures.jsonl`` (``failures-<r>-of-<n>.jsonl`` per rank of a multi-process run); the summary
counts them. Like prepare-data, a rerun skips recorded failures too (they stay on record); ``retry_failed=true``
drops this rank's failure lines for its assets and tries them again (e.g. after re-preparing the records).

Note: the released point-conv shuffles neighbours randomly even in eval mode (reference §8.3.1), so encoding is
stochastic; ``seed`` fixes it per run (the same batches give the same latents).
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from shapee.cli import progress_bar
from shapee.data.dataset import AssetDataset, collate_assets
from shapee.data.latents import read_latent_manifests, write_latent_record
from shapee.data.records import (
    RecordError,
    append_jsonl,
    failures_name,
    read_failures,
    read_jsonl,
    read_manifests,
    write_jsonl_atomic,
)
# The transmitter loader lives with the other loaders in shapee.io.loading; re-exported here for old imports.
from shapee.io.loading import load_model
from shapee.models.latent_diffusion import build_frozen_clip
from shapee.runtime import precision_dtype, resolve_device


class _GuardedItems(torch.utils.data.Dataset):
    """``AssetDataset`` items that never raise for one record's problem: a record that cannot be read, or that the
    encoder cannot take (views not ``image_size``²), becomes ``{"failure": {...}}`` (a failures.jsonl line) instead,
    so a DataLoader worker does not kill the run. Module-level so that worker processes can pickle it."""

    def __init__(self, dataset, image_size: int):
        self.dataset, self.image_size = dataset, image_size

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        rec = self.dataset.records[index]
        path = self.dataset.root / rec.record
        try:
            item = self.dataset[index]
            size = tuple(item["views"].shape[1:3])  # [V, H, W, 3]
            if size != (self.image_size, self.image_size):
                s = self.image_size
                raise RecordError(f"record {path}: views are {size[0]}x{size[1]}, the encoder takes {s}x{s}")
            return item
        except RecordError as e:
            return {"failure": {"asset": rec.asset_id, "source": str(path), "stage": "read", "error": str(e)}}
        except Exception as e:  # anything else one record triggers is still that record's failure, not the run's
            return {"failure": {"asset": rec.asset_id, "source": str(path), "stage": "internal",
                                "error": f"{type(e).__name__}: {e}"}}


def _collate_guarded(items: list[dict]) -> tuple[dict | None, list[dict]]:
    """``(batch of the good items or None, failure entries)``: good items all have the encoder's shapes."""
    good = [it for it in items if "failure" not in it]
    return (collate_assets(good) if good else None), [it["failure"] for it in items if "failure" in it]


def _select(batch: dict, index: list[int]) -> dict:
    """The items ``index`` of a collated batch (tensors and per-item lists alike)."""
    out = {}
    for k, v in batch.items():
        if torch.is_tensor(v):
            out[k] = v[torch.as_tensor(index, device=v.device)]
        elif isinstance(v, (list, tuple)):
            out[k] = [v[i] for i in index]
        else:
            out[k] = v
    return out


def _encode_guarded(encoder, batch: dict, generator: torch.Generator, amp_dtype: torch.dtype,
                    sources: Mapping[str, Path]) -> tuple[torch.Tensor | None, list[dict]]:
    """Latents ``[B, n_ctx, d_latent]`` (float32) of a batch, and failure entries for the assets that could not be
    encoded: a forward that raises is retried asset by asset (the one that raises is that asset's failure), and an
    asset whose latent is not finite (NaN or inf in its record's values) fails instead of reaching the latent set.
    Failed assets' rows are left as they came out; the caller drops them. ``sources``: asset id → record file."""
    device_type = next(encoder.parameters()).device.type

    def encode(b: dict) -> torch.Tensor:
        with torch.autocast(device_type, dtype=amp_dtype, enabled=amp_dtype != torch.float32):
            return encoder(b, generator=generator).float()  # [B, n_ctx, d_latent] in (−1, 1)

    ids = list(batch["asset_id"])
    failures: list[dict] = []

    def failure(asset: str, error: str) -> dict:
        return {"asset": asset, "source": str(sources.get(asset, "")), "stage": "encode", "error": error}

    try:
        latent = encode(batch)
    except Exception as e:  # e.g. CUDA out of memory on one odd asset: not the run's failure
        if len(ids) == 1:
            return None, [failure(ids[0], f"{type(e).__name__}: {e}")]
        rows = []
        for b, asset in enumerate(ids):  # one at a time: find the asset the batch could not take
            try:
                rows.append(encode(_select(batch, [b]))[0])
            except Exception as e1:
                failures.append(failure(asset, f"{type(e1).__name__}: {e1}"))
                rows.append(None)
        good = next((r for r in rows if r is not None), None)
        if good is None:
            return None, failures
        latent = torch.stack([r if r is not None else torch.full_like(good, float("nan")) for r in rows])
    finite = torch.isfinite(latent).flatten(1).all(1).tolist()  # [B]
    failed = {f["asset"] for f in failures}
    for asset, ok in zip(ids, finite):
        if not ok and asset not in failed:
            failures.append(failure(asset, "the encoder's latent has non-finite values (NaN or inf in the record's "
                                           "points or views?)"))
    return latent, failures


def extract_latents(cfg: DictConfig | Mapping[str, Any]) -> dict[str, Any]:
    """Encode every prepared record of ``cfg.records`` not yet in ``cfg.out`` (this rank's share); returns a summary.

    Config keys (``configs/extract_latents.yaml``): ``records``, ``transmitter``, ``encoder_format``, ``official``,
    ``out``, ``batch_size``, ``cond.mode`` (``text``: latents + captions; ``image``: + ``image_cond``: the encoder view
    ``cond_view`` as uint8 (``view``) or its CLIP grid (``grid``, with ``clip``)), ``latent_dtype``, ``num_workers``,
    ``seed``, ``device``, ``precision``, ``progress``, ``retry_failed``.

    Records that cannot be encoded are skipped and appended to ``<out>/failures*.jsonl`` (see the module docstring);
    summary keys ``failed`` (this run) and ``skipped_failed`` (recorded by an earlier run, not retried) count them.
    """
    cfg = cfg if isinstance(cfg, DictConfig) else OmegaConf.create(dict(cfg))
    cond = cfg.cond.mode  # the cond group (configs/cond/{text,image}.yaml)
    if cond not in ("text", "image"):
        raise ValueError(f"cond must be text|image, got {cond!r}")
    if cond == "image" and cfg.image_cond not in ("view", "grid"):
        raise ValueError(f"image_cond must be view|grid, got {cfg.image_cond!r}")
    if int(cfg.batch_size) < 1:
        raise ValueError(f"batch_size must be >= 1, got {cfg.batch_size}")
    records = Path(cfg.records)
    if not records.is_dir():
        raise FileNotFoundError(f"records={str(records)!r}: no such folder (prepare it with scripts/prepare_data.py)")
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    device = resolve_device(cfg.device)
    t0 = time.perf_counter()

    all_ids = sorted(read_manifests(records))
    if not all_ids:
        raise ValueError(f"records={str(records)!r}: no records listed in its manifest*.jsonl")
    mine = all_ids[rank::world]
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    # Done = on disk with what this run would store (a text-only record is redone by a cond=image run).
    needs = {"text": set(), "image": {"clip_grid" if cfg.image_cond == "grid" else "cond_image"}}[cond]
    done = {k for k, e in read_latent_manifests(out).items() if needs <= set(e.get("has", []))}
    shard = (rank, world) if world > 1 else None
    failures_path = out / failures_name(shard)
    retry = bool(cfg.get("retry_failed", False))
    if retry and failures_path.exists():  # only this rank's own file is rewritten: ranks never write each other's
        mine_set = set(mine)
        write_jsonl_atomic(failures_path, [e for e in read_jsonl(failures_path) if e.get("asset") not in mine_set])
    failed = {} if retry else read_failures(out)
    todo = [i for i in mine if i not in done and i not in failed]
    skipped_done = sum(i in done for i in mine)
    summary = {"total": len(all_ids), "assigned": len(mine), "skipped_done": skipped_done,
               "skipped_failed": len(mine) - len(todo) - skipped_done, "extracted": 0, "failed": 0,
               "failures_file": str(failures_path), "rank": rank, "world_size": world}
    if not todo:
        summary["seconds"] = round(time.perf_counter() - t0, 3)
        return summary

    official = OmegaConf.to_container(cfg.official, resolve=True) if cfg.get("official") else None
    model = load_model(cfg.transmitter, expect="transmitter", encoder_format=cfg.encoder_format, official=official,
                       device=device)
    encoder = model.encoder
    if cond == "image" and not 0 <= int(cfg.cond_view) < encoder.n_views:
        raise ValueError(f"cond_view={cfg.cond_view} is not one of the encoder's {encoder.n_views} views")
    clip = None
    if cond == "image" and cfg.image_cond == "grid":
        # Seeded as LatentDiffusion builds its CLIP, so that random-weight CLIPs (tests) agree with the prior's.
        clip = build_frozen_clip(OmegaConf.to_container(cfg.clip, resolve=True), seed=0, device=device)

    dataset = AssetDataset(
        records, load_targets=False, load_sdf=False, n_points=encoder.n_points, n_views=encoder.n_views, asset_ids=todo
    )
    loader = torch.utils.data.DataLoader(
        _GuardedItems(dataset, encoder.image_size), batch_size=int(cfg.batch_size), shuffle=False,
        num_workers=int(cfg.num_workers), collate_fn=_collate_guarded, pin_memory=device.type == "cuda",
    )
    sources = {r.asset_id: dataset.root / r.record for r in dataset.records}
    amp_dtype = precision_dtype(cfg.precision, device)
    generator = torch.Generator(device).manual_seed(int(cfg.seed) * world + rank)
    progress = progress_bar(total=len(todo), desc="extract", unit="asset", enabled=bool(cfg.progress) and rank == 0)

    def record_failures(failures: list[dict]) -> None:
        for failure in failures:
            append_jsonl(failures_path, failure)
            tqdm.write(f"extract_latents: skipped {failure['asset']} [{failure['stage']}]: {failure['error']}",
                       file=sys.stderr)
        summary["failed"] += len(failures)
        progress.update(len(failures))

    with torch.no_grad():
        for batch, failures in loader:
            record_failures(failures)
            if batch is None:
                continue
            batch = {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}
            latent, failures = _encode_guarded(encoder, batch, generator, amp_dtype, sources)
            record_failures(failures)
            if failures:  # keep the assets that encoded
                keep = [b for b, a in enumerate(batch["asset_id"]) if a not in {f["asset"] for f in failures}]
                if not keep:
                    continue
                batch, latent = _select(batch, keep), latent[keep]
            grids = views = None
            if cond == "image":
                views = batch["views"][:, int(cfg.cond_view)]  # [B, H, W, 3] in [0, 1]
                if clip is not None:
                    grids = clip.embed_image_grid(views)  # [B, 256, 1024]
            for b, asset_id in enumerate(batch["asset_id"]):
                write_latent_record(
                    out,
                    asset_id=asset_id,
                    latent=latent[b],
                    captions=batch["captions"][b],
                    clip_grid=None if grids is None else grids[b],
                    cond_image=None if views is None or grids is not None else views[b],
                    latent_dtype=cfg.latent_dtype,
                    encoder=str(cfg.transmitter),
                    shard=shard,
                )
            summary["extracted"] += len(batch["asset_id"])
            progress.update(len(batch["asset_id"]))
    progress.close()
    if summary["failed"]:
        print(f"extract_latents: {summary['failed']} of {len(todo)} records failed and were skipped; "
              f"see {failures_path}", file=sys.stderr)
    seconds = time.perf_counter() - t0
    summary.update(seconds=round(seconds, 3), latents_per_s=round(summary["extracted"] / max(seconds, 1e-9), 3))
    return summary
