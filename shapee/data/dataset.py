"""``AssetDataset``: prepared records as the tensors the encoder and the rendering losses read.

Item (one asset; after :func:`collate_assets` every tensor gains a leading batch dimension ``B``)::

    points          [N, 6]        float32  xyz world frame, rgb in [0, 1]; farthest-point order (reference §6.3)
    views           [V, H, W, 3]  float32  sRGB in [0, 1], black background
    view_alpha      [V, H, W]     float32  {0, 1}
    view_depth      [V, H, W]     float32  planar depth, +inf background
    view_cameras    [V, 4, 3]     float32  rows origin, x, y, z (``Cameras.from_matrix``)
    view_fov        []            float64  radians (double: the encoder's rays take tan(fov/2) from it, cameras.py)
    target_rgb      [T, H, W, 3]  float32  (load_targets=True)
    target_alpha    [T, H, W]     float32
    target_depth    [T, H, W]     float32
    target_cameras  [T, 4, 3]     float32
    target_fov      []            float64
    sdf_points      [P, 3]        float32  (load_sdf=True)
    sdf             [P]           float32  positive inside
    asset_id        str
    captions        list[str]

Distributed training: every record is a self-contained file and the item order is fixed (sorted asset ids), so
each rank builds the same ``AssetDataset`` and a ``torch.utils.data.DistributedSampler(dataset, shuffle=True,
seed=s)`` (``set_epoch`` every epoch) hands each rank a disjoint share; no rank needs another's files.
:func:`make_loader` does exactly that when ``torch.distributed`` is initialised. Held-out evaluation assets come
from :meth:`AssetDataset.split`, which depends only on asset ids and a seed, so every rank and every run agree.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from shapee.data.records import RECORD_ARRAYS, AssetRecord, RecordError, read_manifests, read_record, select_assets


class AssetDataset(Dataset):
    """The records listed in every ``manifest*.jsonl`` under ``root`` (one per asset, sorted by asset id).

    ``load_targets`` / ``load_sdf``: include the target views / SDF samples (skip them to read less, e.g. for latent
    extraction). ``n_points`` / ``n_views``: keep the first points of the FPS-ordered cloud / the first views
    (``None`` = all). ``asset_ids``: restrict to these ids (what :meth:`split` uses).
    """

    def __init__(
        self,
        root: str | os.PathLike,
        *,
        load_targets: bool = True,
        load_sdf: bool = True,
        n_points: int | None = None,
        n_views: int | None = None,
        asset_ids: list[str] | None = None,
    ):
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"AssetDataset root {str(self.root)!r}: no such folder")
        entries = select_assets(read_manifests(self.root), asset_ids, what="AssetDataset", root=self.root)
        if not entries:
            raise ValueError(f"AssetDataset root {str(self.root)!r}: no records (no manifest*.jsonl lines with a record)")
        self.records: list[AssetRecord] = [entries[k] for k in sorted(entries)]
        self.load_targets = load_targets
        self.load_sdf = load_sdf
        self.n_points = n_points
        self.n_views = n_views

    def __len__(self) -> int:
        return len(self.records)

    @property
    def asset_ids(self) -> list[str]:
        return [r.asset_id for r in self.records]

    def __getitem__(self, index: int) -> dict:
        rec = self.records[index]
        keys = ["points_xyz", "points_rgb", "views", "view_alpha", "view_depth", "view_cameras"]
        if self.load_targets:
            keys += ["target_rgb", "target_alpha", "target_depth", "target_cameras"]
        if self.load_sdf:
            keys += ["sdf_points", "sdf"]
        path = self.root / rec.record
        meta, a = read_record(path, keys)  # the arrays left out are not read from disk
        _check_arrays(path, meta, a)
        nv = self.n_views
        views = a["views"][:nv]
        if nv is not None and views.shape[0] < nv:
            raise RecordError(f"record {path}: has {views.shape[0]} views, n_views={nv} asked")
        n_points = self.n_points
        if n_points is not None and a["points_xyz"].shape[0] < n_points:
            raise RecordError(f"record {path}: has {a['points_xyz'].shape[0]} points, n_points={n_points} asked")
        fov = torch.tensor(meta["fov"], dtype=torch.float64)  # the stored angle as written, not rounded to float32
        points = np.concatenate(
            [a["points_xyz"][:n_points], a["points_rgb"][:n_points].astype(np.float32) / 255.0], axis=-1
        )  # [N, 6]
        item = {
            "points": torch.from_numpy(points),
            "views": _image(views),  # [V, H, W, 3]
            "view_alpha": _image(a["view_alpha"][:nv]),  # [V, H, W]
            "view_depth": torch.from_numpy(a["view_depth"][:nv]),  # [V, H, W]
            "view_cameras": torch.from_numpy(a["view_cameras"][:nv]),  # [V, 4, 3]
            "view_fov": fov,
            "asset_id": rec.asset_id,
            "captions": list(meta.get("captions", rec.captions)),
        }
        if self.load_targets:
            item.update(
                target_rgb=_image(a["target_rgb"]),  # [T, H, W, 3]
                target_alpha=_image(a["target_alpha"]),  # [T, H, W]
                target_depth=torch.from_numpy(a["target_depth"]),  # [T, H, W]
                target_cameras=torch.from_numpy(a["target_cameras"]),  # [T, 4, 3]
                target_fov=fov.clone(),
            )
        if self.load_sdf:
            item.update(sdf_points=torch.from_numpy(a["sdf_points"]), sdf=torch.from_numpy(a["sdf"]))
        return item

    def split(self, holdout: int, seed: int = 0) -> tuple["AssetDataset", "AssetDataset"]:
        """``(train, held_out)``: ``holdout`` assets chosen by a hash of (seed, asset id), the rest for training.

        Deterministic and independent of the order records were prepared in; an asset keeps its side when others
        are added unless it is displaced by a new asset with a smaller hash.
        """
        if not 1 <= holdout < len(self):
            raise ValueError(f"split(holdout={holdout}): need 1 <= holdout < {len(self)} (the number of assets)")
        ranked = sorted(self.asset_ids, key=lambda i: hashlib.sha256(f"{seed}:{i}".encode()).hexdigest())
        held = set(ranked[:holdout])
        kwargs = dict(load_targets=self.load_targets, load_sdf=self.load_sdf, n_points=self.n_points, n_views=self.n_views)
        train = AssetDataset(self.root, asset_ids=[i for i in self.asset_ids if i not in held], **kwargs)
        held_out = AssetDataset(self.root, asset_ids=[i for i in self.asset_ids if i in held], **kwargs)
        return train, held_out


# Array name → its shape with symbolic sizes (V views, T targets, H×W pixels, P points, S sdf samples).
_SHAPES: dict[str, tuple] = {
    "views": ("V", "H", "W", 3), "view_alpha": ("V", "H", "W"), "view_depth": ("V", "H", "W"),
    "view_cameras": ("V", 4, 3),
    "target_rgb": ("T", "h", "w", 3), "target_alpha": ("T", "h", "w"), "target_depth": ("T", "h", "w"),
    "target_cameras": ("T", 4, 3),
    "points_xyz": ("P", 3), "points_rgb": ("P", 3), "sdf_points": ("S", 3), "sdf": ("S",),
}


def _check_arrays(path: Path, meta: dict, arrays: dict[str, np.ndarray]) -> None:
    """Raise :class:`RecordError` naming ``path`` and the array unless every array read has the dtype and shape
    of the record format (sizes that must agree across arrays, e.g. ``V`` of ``views`` and ``view_depth``, do)
    and ``meta["fov"]`` is a finite angle: a corrupt record fails here, not deep inside the encoder or collate."""
    sizes: dict[str, tuple[int, str]] = {}
    for name, a in arrays.items():
        if a.dtype != RECORD_ARRAYS[name]:
            raise RecordError(f"record {path}: array {name!r} is {a.dtype}, the format has {RECORD_ARRAYS[name]}")
        want = _SHAPES[name]
        if a.ndim != len(want):
            raise RecordError(f"record {path}: array {name!r} has shape {a.shape}, expected {list(want)}")
        for dim, (n, w) in enumerate(zip(a.shape, want)):
            if isinstance(w, int):
                if n != w:
                    raise RecordError(f"record {path}: array {name!r} has shape {a.shape}, expected {list(want)}")
            elif w in sizes and sizes[w][0] != n:
                first, other = sizes[w]
                raise RecordError(f"record {path}: array {name!r} has shape {a.shape} (size {w}={n} in dim {dim}), "
                                  f"but {other!r} has {w}={first}")
            else:
                sizes.setdefault(w, (n, name))
    fov = meta.get("fov")
    if not isinstance(fov, (int, float)) or not 0 < fov < np.pi:
        raise RecordError(f"record {path}: meta 'fov' must be an angle in (0, pi) radians, got {fov!r}")


def _image(x: np.ndarray) -> Tensor:
    """uint8 image data → float32 in [0, 1]."""
    return torch.from_numpy(x).to(torch.float32) / 255.0


def collate_assets(items: list[dict]) -> dict:
    """Stack the tensors of ``items`` along a new batch dimension; strings and lists stay Python lists.

    Raises ``ValueError`` naming the key when items disagree (e.g. records prepared at different resolutions).
    """
    if not items:
        raise ValueError("collate_assets: empty batch")
    keys = items[0].keys()
    batch = {}
    for key in keys:
        values = [item[key] for item in items]
        if isinstance(values[0], Tensor):
            shapes = {tuple(v.shape) for v in values}
            if len(shapes) > 1:
                ids = [item.get("asset_id") for item in items]
                raise ValueError(f"collate_assets: {key!r} has different shapes {sorted(shapes)} across assets {ids}")
            batch[key] = torch.stack(values)
        else:
            batch[key] = values
    return batch


def make_loader(
    dataset: Dataset,
    batch_size: int,
    *,
    shuffle: bool = True,
    seed: int = 0,
    num_workers: int = 0,
    drop_last: bool = False,
) -> DataLoader:
    """A DataLoader with :func:`collate_assets`; under ``torch.distributed`` a ``DistributedSampler`` shards it.

    With the distributed sampler, call ``loader.sampler.set_epoch(epoch)`` each epoch for a new shuffle.
    """
    sampler = None
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        sampler = torch.utils.data.DistributedSampler(dataset, shuffle=shuffle, seed=seed, drop_last=drop_last)
        shuffle = False  # the sampler shuffles
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        sampler=sampler,
        num_workers=num_workers,
        collate_fn=collate_assets,
        drop_last=drop_last,
        generator=generator,
        persistent_workers=num_workers > 0,
    )
