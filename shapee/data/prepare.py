"""Data preparation: meshes → one self-contained record per asset (see :mod:`shapee.data.records`).

Per asset (reference §6.2–6.3, with our own renderer in place of Blender):

1. **load**: ``load_mesh`` (flatten, validate, normalise into [-1, 1]³) and the sha256 of the source file;
2. **render**: ``views`` encoder views and ``targets`` target views (random directions, distance 4, Blender's
   field of view, "basic" lighting), plus ``pc_views`` views for the point cloud, rasterised together; the encoder
   and target views are shaded (rgb, alpha, depth);
3. **pointcloud**: back-project the point-cloud views' albedo and farthest-point-sample ``n_points`` points (only
   the surface pixels that the random candidate subset keeps are shaded: see ``point_cloud_from_fragments``);
4. **sdf**: ``sdf_uniform`` points uniform in the box and ``sdf_near`` points near the surface, signed positive inside
   (generalised winding number, so nearly closed meshes get a sensible inside); a mesh with no inside at all (no
   target > 0: an open sheet, a lamp shade) fails here with "open mesh: no interior, SDF sign undefined";
5. **write**: encode the record arrays (uint8 images) and write the record, atomically; then the main process
   appends its manifest line.

Cameras are drawn from a generator seeded by the asset id and the global ``seed``, so a rerun (or another shard
that happens to redo an asset) produces the same record.

A record's manifest line says where the colours came from (``color_source``) and lists the asset's ``warnings``
(a texture, ``mtllib`` or ``usemtl`` the file names but that could not be used: see
:func:`shapee.data.mesh.resolve_colors`). A run ends with a summary (records, colour sources, warnings and failures
by kind) on stderr and in ``summary.json`` beside the manifest.

:func:`prepare_dataset` runs this over a folder / glob of meshes (or the toy world) with resume, sharding, a worker
pool and a per-asset failure log; ``scripts/prepare_data.py`` is its command line.
"""

from __future__ import annotations

import glob as globlib
import hashlib
import multiprocessing as mp
import os
import sys
import time
from collections.abc import Mapping
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from shapee.cameras import BLENDER_FOV, CAMERA_DISTANCE, Cameras, random_cameras
from shapee.cli import progress_bar
from shapee.data.captions import CaptionFileError, read_captions
from shapee.data.mesh import MeshError, load_mesh
from shapee.data.pointcloud import point_cloud_from_fragments
from shapee.data.records import (
    AssetRecord,
    append_jsonl,
    arrays_sha256,
    count_by,
    failure_kind,
    failures_name,
    file_sha256,
    folder_summary,
    manifest_name,
    read_failures,
    read_jsonl,
    read_manifests,
    record_relpath,
    remove_stale_temp_files,
    sanitise_id,
    summary_name,
    unique_ids,
    write_json_atomic,
    write_jsonl_atomic,
    write_record,
)
from shapee.data.render import rasterize, shade
from shapee.data.sdf import open_edges, sample_sdf_points
from shapee.data.toy import TOY_SHAPES, toy_assets
from shapee.runtime import resolve_device

MESH_EXTENSIONS = (".obj", ".glb", ".gltf", ".ply", ".stl", ".off")
STAGES = ("load", "render", "pointcloud", "sdf", "write")


class PrepareError(ValueError):
    """A problem with the command (input, output, captions, shard) found before any asset is touched."""


class AssetFailure(Exception):
    """One asset failed at one stage; ``message`` is meant for a person reading failures.jsonl, ``kind`` (its head,
    e.g. "open mesh", "empty mesh") for the summary's failure counts."""

    def __init__(self, stage: str, message: str):
        super().__init__(f"{stage}: {message}")
        self.stage = stage
        self.message = message
        self.kind = failure_kind(message, stage)


OPEN_MESH_ERROR = "open mesh: no interior, SDF sign undefined"


@dataclass
class PrepareSettings:
    """What goes into each record. Defaults are the official sizes (reference §1.2, §6.2–6.3)."""

    views: int = 20  # encoder views per asset
    targets: int = 20  # extra views used as targets of the rendering losses
    resolution: int = 256  # side of encoder and target views
    pc_views: int = 40  # views back-projected into the point cloud
    pc_resolution: int = 256  # side of the point-cloud views
    n_points: int = 16384  # points in the FPS-ordered cloud
    pc_candidates: int | None = None  # back-projected points FPS chooses from; None: pointcloud.py's default
    sdf_uniform: int = 2**14  # SDF samples uniform in [-1, 1]³ (the sdf.py default)
    sdf_near: int = 2**14  # SDF samples near the surface
    sdf_sigma: float | list[float] | None = None  # std(s) of the near-surface offsets; None: sdf.py's default
    backend: str = "auto"  # render backend: "auto" | "embree" | "pytorch3d"
    device: str = "cpu"  # "cpu" | "cuda" | "auto" (cuda when available)
    seed: int = 0  # global seed mixed with each asset id

    def __post_init__(self) -> None:
        for name in ("views", "resolution", "pc_views", "pc_resolution", "n_points"):
            if int(getattr(self, name)) < 1:
                raise PrepareError(f"setting {name} must be >= 1, got {getattr(self, name)}")
        for name in ("targets", "sdf_uniform", "sdf_near"):
            if int(getattr(self, name)) < 0:
                raise PrepareError(f"setting {name} must be >= 0, got {getattr(self, name)}")
        if self.resolution < 2 or self.pc_resolution < 2:
            raise PrepareError("resolution and pc_resolution must be at least 2 pixels")
        if self.sdf_uniform + self.sdf_near < 1:
            raise PrepareError("sdf_uniform + sdf_near must be at least 1")
        if self.backend not in ("auto", "embree", "pytorch3d"):
            raise PrepareError(f"backend={self.backend!r}: expected auto, embree or pytorch3d")
        if not (self.device in ("cpu", "auto") or self.device.startswith("cuda")):
            raise PrepareError(f"device={self.device!r}: expected cpu, cuda[:i] or auto")

    @classmethod
    def from_config(cls, cfg: Mapping | "PrepareSettings" | None) -> "PrepareSettings":
        """Pick the known keys out of a (Hydra) config; unknown keys are someone else's business."""
        if isinstance(cfg, PrepareSettings):
            return cfg
        if isinstance(cfg, DictConfig):
            cfg = OmegaConf.to_container(cfg, resolve=True)
        cfg = {} if cfg is None else cfg
        kwargs = {}
        for f in fields(cls):
            if f.name in cfg and cfg[f.name] is not None:
                value = cfg[f.name]
                try:
                    kwargs[f.name] = value if f.default is None else type(f.default)(value)
                except (TypeError, ValueError):
                    raise PrepareError(f"setting {f.name}={value!r}: expected {type(f.default).__name__}") from None
        return cls(**kwargs)


@dataclass
class AssetSource:
    """One unit of work: a mesh file (``path``) or an in-memory toy mesh (``mesh``)."""

    asset_id: str
    path: str | None = None
    relpath: str | None = None
    mesh: object | None = None  # shapee.data.mesh.Mesh for toy assets
    captions: list[str] = field(default_factory=list)

    @property
    def source(self) -> str:
        return self.path if self.path is not None else f"toy:{self.asset_id}"


# ----------------------------------------------------------------------------------------------- one asset
def asset_seed(asset_id: str, seed: int) -> int:
    """A 63-bit seed from the global seed and the asset id (stable across runs, shards and machines)."""
    digest = hashlib.sha256(f"{int(seed)}:{asset_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _to_numpy(x) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def _to_uint8(x: np.ndarray) -> np.ndarray:
    """[0, 1] floats → uint8, rounding to nearest (no float64 temporaries: images are large)."""
    x = np.clip(x, 0.0, 1.0, dtype=np.float32)
    x *= 255.0
    return np.rint(x, out=x).astype(np.uint8)


def build_record(mesh, asset_id: str, settings: PrepareSettings) -> tuple[dict[str, np.ndarray], dict, dict[str, float]]:
    """Render, back-project and sample one mesh: ``(arrays, meta, timings)`` ready for :func:`write_record`.

    Raises :class:`AssetFailure` naming the stage that failed.
    """
    s = settings
    timings: dict[str, float] = {}
    seed = asset_seed(asset_id, s.seed)
    device = str(resolve_device(s.device))
    generator = torch.Generator().manual_seed(seed)

    # Encoder, target and point-cloud cameras from one stream, in this order (reproducible per asset).
    def cams(n: int, res: int) -> Cameras:
        return random_cameras(n, distance=CAMERA_DISTANCE, fov=BLENDER_FOV, resolution=res, generator=generator)

    enc = cams(s.views, s.resolution)
    tgt = cams(max(s.targets, 1), s.resolution)[: s.targets]
    pc = cams(s.pc_views, s.pc_resolution)

    # ---- render: one rasterisation per resolution (the ray-casting structure is built once per asset); the
    # encoder and target views are shaded with what the record keeps (rgb, alpha, depth). The point-cloud views are
    # never made into images: the point-cloud step shades the few of their pixels it keeps.
    t0, c0 = time.perf_counter(), time.process_time()
    try:
        main_cams, n_vt = Cameras.cat([enc, tgt]), s.views + s.targets
        if s.pc_resolution == s.resolution:
            fragments = rasterize(mesh, Cameras.cat([main_cams, pc]).to(device), backend=s.backend)
            main_fragments, pc_fragments = fragments.views(0, n_vt), fragments.views(n_vt, n_vt + s.pc_views)
        else:
            main_fragments = rasterize(mesh, main_cams.to(device), backend=s.backend)
            pc_fragments = rasterize(mesh, pc.to(device), backend=s.backend)
        main = shade(mesh, main_cams, main_fragments, outputs=("rgb", "alpha", "depth"))  # [V+T, ...] each
    except Exception as e:
        raise AssetFailure("render", f"{type(e).__name__}: {e}") from e
    timings["render"], timings["render_cpu"] = time.perf_counter() - t0, time.process_time() - c0
    v, t = s.views, s.targets
    alpha = main["alpha"] > 0.5  # [V+T, H, W]
    if not alpha[:v].any():
        raise AssetFailure("render", "the object is not visible in any encoder view (nothing rendered)")

    # ---- point cloud: back-project the albedo of the point-cloud views, FPS to n_points (§6.3)
    t0, c0 = time.perf_counter(), time.process_time()
    try:
        xyz, rgb = point_cloud_from_fragments(
            mesh, pc.to(device), pc_fragments,
            n_points=s.n_points, n_candidates=s.pc_candidates, generator=torch.Generator().manual_seed(seed ^ 0x5EED),
        )
        xyz, rgb = _to_numpy(xyz).astype(np.float32), _to_numpy(rgb).astype(np.float32)
    except Exception as e:
        raise AssetFailure("pointcloud", f"{type(e).__name__}: {e}") from e
    if xyz.shape != (s.n_points, 3) or not np.isfinite(xyz).all():
        raise AssetFailure("pointcloud", f"expected {s.n_points} finite points, got shape {xyz.shape}")
    timings["pointcloud"], timings["pointcloud_cpu"] = time.perf_counter() - t0, time.process_time() - c0

    # ---- SDF samples, positive inside
    t0, c0 = time.perf_counter(), time.process_time()
    try:
        rng = np.random.default_rng(np.random.SeedSequence([seed, 0x5DF]))
        sigma = {} if s.sdf_sigma is None else {"near_sigma": s.sdf_sigma}
        # Tensors on the device make the SDF queries run there (numpy arrays: CPU).
        vertices, faces = mesh.vertices, mesh.faces
        if device != "cpu":
            vertices, faces = torch.from_numpy(vertices).to(device), torch.from_numpy(faces).to(device)
        sdf_points, sdf = sample_sdf_points(vertices, faces, n_uniform=s.sdf_uniform, n_near=s.sdf_near, rng=rng,
                                            **sigma)
        sdf_points, sdf = _to_numpy(sdf_points).astype(np.float32), _to_numpy(sdf).astype(np.float32)
    except Exception as e:
        raise AssetFailure("sdf", f"{type(e).__name__}: {e}") from e
    if not (np.isfinite(sdf).all() and np.isfinite(sdf_points).all()):
        raise AssetFailure("sdf", "non-finite signed distances")
    if not (sdf > 0).any():
        # The winding number never exceeds 1/2 (a sheet, a shade whose faces point inwards): no point is inside, so
        # the targets would teach an SDF without a zero level set. Such an asset is refused, not recorded silently.
        raise AssetFailure("sdf", f"{OPEN_MESH_ERROR} (none of {len(sdf)} SDF samples is inside the mesh; "
                           "it has no closed or nearly closed part)")
    sdf_warnings = []
    n_open = open_edges(mesh.vertices, mesh.faces)
    if n_open:  # kept, but said: the inside is what the winding number makes of the holes
        sdf_warnings.append({"kind": "open mesh", "message": (
            f"mesh is not closed ({n_open} boundary or non-manifold edges): the SDF sign comes from the generalised "
            f"winding number ({float((sdf > 0).mean()):.1%} of SDF samples inside)")})
    timings["sdf"], timings["sdf_cpu"] = time.perf_counter() - t0, time.process_time() - c0

    # ---- write, first half: encode the record arrays (the file itself is written by the caller, who adds its time)
    t0, c0 = time.perf_counter(), time.process_time()
    try:
        arrays, meta = _assemble(main, alpha, enc, tgt, xyz, rgb, sdf_points, sdf, v, t)
    except Exception as e:
        raise AssetFailure("write", f"{type(e).__name__}: {e}") from e
    timings["write"], timings["write_cpu"] = time.perf_counter() - t0, time.process_time() - c0
    meta.update(
        asset_id=asset_id,
        fov=BLENDER_FOV,
        resolution=s.resolution,
        camera_distance=CAMERA_DISTANCE,
        seed=seed,
        color_source=getattr(mesh, "color_source", "default"),
        warnings=list(getattr(mesh, "warnings", [])) + sdf_warnings,
        n_faces=int(len(mesh.faces)),
        settings=asdict(s),
    )
    return arrays, meta, timings


def _assemble(main, alpha, enc, tgt, xyz, rgb, sdf_points, sdf, v: int, t: int) -> tuple[dict[str, np.ndarray], dict]:
    """The record arrays (uint8 images, float32 depth / cameras / points / SDF)."""
    arrays = {
        "views": _to_uint8(main["rgb"][:v]),  # [V, H, W, 3]
        "view_alpha": np.where(alpha[:v], 255, 0).astype(np.uint8),  # [V, H, W]
        "view_depth": main["depth"][:v].astype(np.float32),  # [V, H, W]
        "view_cameras": enc.to_matrix().numpy().astype(np.float32),  # [V, 4, 3]
        "target_rgb": _to_uint8(main["rgb"][v : v + t]),  # [T, H, W, 3]
        "target_alpha": np.where(alpha[v : v + t], 255, 0).astype(np.uint8),  # [T, H, W]
        "target_depth": main["depth"][v : v + t].astype(np.float32),  # [T, H, W]
        "target_cameras": tgt.to_matrix().numpy().astype(np.float32),  # [T, 4, 3]
        "points_xyz": xyz,  # [P, 3]
        "points_rgb": _to_uint8(rgb),  # [P, 3]
        "sdf_points": sdf_points,  # [S, 3]
        "sdf": sdf,  # [S]
    }
    return arrays, {}


def _prepare_source(item: AssetSource, out_dir: Path, settings: PrepareSettings) -> AssetRecord:
    """Load (if needed), build and write one asset; raises :class:`AssetFailure`."""
    timings: dict[str, float] = {}
    t0, c0 = time.perf_counter(), time.process_time()
    if item.mesh is not None:
        mesh = item.mesh
        content_hash = arrays_sha256(mesh.vertices, mesh.faces, mesh.corner_colors)
    else:
        try:
            mesh = load_mesh(item.path)
        except MeshError as e:
            raise AssetFailure("load", e.reason) from e
        except Exception as e:  # a loader crash on a broken file is still that file's problem, not the run's
            raise AssetFailure("load", f"{type(e).__name__}: {e}") from e
        try:
            content_hash = file_sha256(item.path)
        except OSError as e:
            raise AssetFailure("load", f"cannot read the file: {e}") from e
    timings["load"], timings["load_cpu"] = time.perf_counter() - t0, time.process_time() - c0

    arrays, meta, step_timings = build_record(mesh, item.asset_id, settings)
    timings.update(step_timings)

    t0, c0 = time.perf_counter(), time.process_time()
    rel = record_relpath(item.asset_id)
    meta.update(source=item.source, content_hash=content_hash, captions=list(item.captions))
    try:
        write_record(out_dir / rel, arrays, meta)
    except Exception as e:
        raise AssetFailure("write", f"{type(e).__name__}: {e}") from e
    timings["write"] = timings.get("write", 0.0) + time.perf_counter() - t0  # plus the encoding in build_record
    timings["write_cpu"] = timings.get("write_cpu", 0.0) + time.process_time() - c0
    timings["total"] = sum(timings[k] for k in STAGES if k in timings)
    timings["total_cpu"] = sum(timings[f"{k}_cpu"] for k in STAGES if f"{k}_cpu" in timings)
    return AssetRecord(
        asset_id=item.asset_id,
        record=rel,
        source=item.source,
        content_hash=content_hash,
        n_views=settings.views,
        n_targets=settings.targets,
        n_points=settings.n_points,
        n_sdf=int(arrays["sdf"].shape[0]),
        captions=list(item.captions),
        timings={k: round(v, 4) for k, v in timings.items()},
        color_source=str(meta.get("color_source", "")),
        warnings=list(meta.get("warnings", [])),
    )


def prepare_asset(
    mesh_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    cfg: Mapping | PrepareSettings | None = None,
    *,
    asset_id: str | None = None,
    captions: list[str] | None = None,
) -> AssetRecord:
    """Prepare one mesh file into ``out_dir/records/<asset_id>.npz`` and return its manifest entry.

    ``cfg``: a :class:`PrepareSettings` or a mapping with its keys (e.g. the prepare_data Hydra config).
    Does not touch the manifest (that is :func:`prepare_dataset`'s job). Raises :class:`AssetFailure` with the stage
    and a readable reason when the mesh cannot become a record.
    """
    mesh_path = Path(mesh_path)
    if not mesh_path.is_file():
        raise PrepareError(f"mesh_path {mesh_path}: no such file")
    settings = PrepareSettings.from_config(cfg)
    item = AssetSource(
        asset_id=asset_id or unique_ids([mesh_path.name])[0],
        path=str(mesh_path.resolve()),
        relpath=mesh_path.name,
        captions=list(captions or []),
    )
    return _prepare_source(item, Path(out_dir), settings)


# ------------------------------------------------------------------------------------------- the input list
def _has_magic(pattern: str) -> bool:
    return any(c in pattern for c in "*?[")


LIST_EXTENSIONS = (".txt", ".lst", ".list")


def list_mesh_files(input_spec: str | os.PathLike) -> tuple[Path, list[Path]]:
    """``(root, files)``: mesh files (by extension, sorted by path relative to ``root``) of a folder (recursive, so
    an Objaverse tree ``glbs/000-023/<uid>.glb`` is found whole), a glob pattern (``**`` recursive), a single file, or
    a list file (``.txt`` / ``.lst`` / ``.list``: one mesh path per line; blank lines and ``#`` comments skipped;
    relative paths are relative to the list file's folder; ``root`` is the folder the listed files share).
    Sidecar files (.mtl, textures) are not assets.

    Raises :class:`PrepareError` for a missing folder / file, a glob without matches, or a list file that is empty
    or names files that are not meshes. A listed mesh that does not exist is not an error here: it becomes that
    asset's failure line ("load"), as any other unreadable asset does.
    """
    spec = os.fspath(input_spec)
    if _has_magic(spec):
        parts = Path(spec).parts
        fixed = [p for p in parts[: next(i for i, p in enumerate(parts) if _has_magic(p))]]
        root = Path(*fixed) if fixed else Path(".")
        files = [Path(p) for p in globlib.glob(spec, recursive=True)]
        files = [p for p in files if p.is_file() and p.suffix.lower() in MESH_EXTENSIONS]
        if not files:
            raise PrepareError(f"input {spec!r}: the pattern matches no mesh files ({', '.join(MESH_EXTENSIONS)})")
    else:
        path = Path(spec)
        if not path.exists():
            raise PrepareError(f"input {spec!r}: no such folder or file")
        if path.is_file() and path.suffix.lower() in LIST_EXTENSIONS:
            root, files = _read_list_file(path)
        elif path.is_file():
            if path.suffix.lower() not in MESH_EXTENSIONS:
                raise PrepareError(
                    f"input {spec!r}: not a mesh file (extensions {', '.join(MESH_EXTENSIONS)}) nor a list file "
                    f"({', '.join(LIST_EXTENSIONS)})"
                )
            root, files = path.parent, [path]
        else:
            root = path
            files = [p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in MESH_EXTENSIONS]
    root = root.resolve()
    files = sorted({p.resolve() for p in files}, key=lambda p: p.relative_to(root).as_posix())
    return root, files


def _read_list_file(path: Path) -> tuple[Path, list[Path]]:
    """``(root, files)`` of a list file (see :func:`list_mesh_files`)."""
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    files = [(path.parent / line) for line in lines if line and not line.startswith("#")]
    if not files:
        raise PrepareError(f"input {str(path)!r}: the list file names no files")
    bad = [str(p) for p in files if p.suffix.lower() not in MESH_EXTENSIONS]
    if bad:
        raise PrepareError(
            f"input {str(path)!r}: {len(bad)} listed paths are not mesh files ({', '.join(MESH_EXTENSIONS)}), "
            f"e.g. {bad[:3]}"
        )
    root = Path(os.path.commonpath([str(p.resolve().parent) for p in files]))
    return root, files


def asset_ids_for(relative_paths: list[str], ids: str = "path") -> tuple[list[str | None], list[dict]]:
    """Asset ids for the sorted input list, and the duplicates dropped.

    ``ids="path"``: the sanitised path relative to the input root, extension kept (``chairs/a.obj`` →
    ``chairs__a.obj``; two files never share an id: see :func:`shapee.data.records.unique_ids`).
    ``ids="stem"``: the file name without its extension, as Objaverse names its files ``<uid>.glb``
    (``glbs/000-023/<uid>.glb`` → ``<uid>``), so records, captions and latents join by uid. Two files with the
    same stem (the same object downloaded into two shard folders, or ``x.obj`` beside ``x.glb``) would be one id:
    the first in the sorted input list is kept, every later one gets ``None`` (not prepared) and is returned as
    ``{"asset_id", "kept", "dropped"}`` for the run's summary. The choice depends only on the paths, so every
    shard makes the same one.
    """
    if ids == "path":
        return list(unique_ids(relative_paths)), []
    if ids != "stem":
        raise PrepareError(f"data.ids={ids!r}: expected 'path' or 'stem'")
    out: list[str | None] = []
    first: dict[str, str] = {}
    duplicates = []
    for rel in relative_paths:
        asset_id = sanitise_id(Path(rel).stem) if Path(rel).stem else sanitise_id(rel)
        if asset_id in first:
            out.append(None)
            duplicates.append({"asset_id": asset_id, "kept": first[asset_id], "dropped": rel})
        else:
            first[asset_id] = rel
            out.append(asset_id)
    return out, duplicates


def load_captions(path: str | os.PathLike) -> dict[str, list[str]]:
    """``{key: [captions]}`` from a caption file: a CSV with a header (an id column ``asset_id``/``asset``/``id``/
    ``uid`` and a ``caption``/``captions``/``text`` column; one row per caption), a CSV without a header holding
    ``uid,caption`` (Cap3D's ``Cap3D_automated_Objaverse*.csv``), a JSON object ``{uid: caption}`` or a JSONL file
    (``{"asset_id": ..., "caption": "..."}`` or ``"captions": [...]`` per line): see :mod:`shapee.data.captions`.
    Keys are matched against the asset id, its path relative to the input root, its file name and its stem.
    """
    try:
        return read_captions(path)
    except CaptionFileError as e:
        raise PrepareError(str(e)) from None


def _captions_for(captions: dict[str, list[str]], asset_id: str, relpath: str) -> list[str]:
    p = Path(relpath)
    for key in (asset_id, p.as_posix(), p.name, p.with_suffix("").as_posix(), p.stem):
        if key in captions:
            return list(captions[key])
    return []


def parse_shard(shard: str | None, env: Mapping[str, str] | None = None) -> tuple[int, int] | None:
    """``"i/n"`` → ``(i, n)``; ``None`` → ``(RANK, WORLD_SIZE)`` under torchrun, else ``None`` (no sharding)."""
    env = os.environ if env is None else env
    if shard is None or str(shard).strip() in ("", "null", "None"):
        world = int(env.get("WORLD_SIZE", "1"))
        if world > 1:
            return int(env.get("RANK", "0")), world
        return None
    text = str(shard).strip()
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise PrepareError(f"shard={text!r}: expected 'i/n' with integers, e.g. shard=0/4") from None
    if n < 1 or not 0 <= i < n:
        raise PrepareError(f"shard={text!r}: need 0 <= i < n")
    return (i, n) if n > 1 else None


def _make_sources(cfg: Mapping, duplicates: list | None = None) -> list[AssetSource]:
    """The full, sorted input list (every shard computes the same one); with ``data.ids=stem`` the files dropped as
    duplicate stems are appended to ``duplicates`` (see :func:`asset_ids_for`)."""
    data = cfg.get("data") or {}
    kind = data.get("kind", "files") if isinstance(data, Mapping) else str(data)
    n = cfg.get("n")
    if kind == "toy":
        count = int(n) if n is not None else 64
        # data.shapes / data.colors (null: all): a smaller world, e.g. 2 shapes × 2 colours for the prior's test.
        shapes, colors = data.get("shapes"), data.get("colors")
        toys = toy_assets(
            count, seed=int(data.get("seed", 0)), shapes=TOY_SHAPES if shapes is None else list(shapes),
            colors=None if colors is None else colors, random_rotation=bool(data.get("random_rotation", True)),
        )
        return [AssetSource(asset_id=a.asset_id, mesh=a.mesh, captions=list(a.captions)) for a in toys]
    if kind != "files":
        raise PrepareError(f"data.kind={kind!r}: expected 'files' or 'toy'")
    if cfg.get("input") is None:
        raise PrepareError("input=<folder or glob> is required (or data=toy for the toy world)")
    root, files = list_mesh_files(cfg["input"])
    rel = [f.relative_to(root).as_posix() for f in files]
    ids, dropped = asset_ids_for(rel, str(data.get("ids") or "path") if isinstance(data, Mapping) else "path")
    if duplicates is not None:
        duplicates.extend(dropped)
    kept = [(i, f, r) for i, f, r in zip(ids, files, rel) if i is not None]
    if n is not None:
        kept = kept[: int(n)]
    captions = load_captions(cfg["captions"]) if cfg.get("captions") else {}
    return [AssetSource(asset_id=i, path=str(f), relpath=r, captions=_captions_for(captions, i, r)) for i, f, r in kept]


# --------------------------------------------------------------------------------------------- the whole set
def _work(args: tuple[AssetSource, str, dict]) -> dict:
    """Pool task: one asset → ``{"record": {...}}`` or ``{"failure": {...}}`` (never raises for asset problems)."""
    item, out_dir, settings = args
    try:
        rec = _prepare_source(item, Path(out_dir), PrepareSettings(**settings))
        return {"record": asdict(rec)}
    except AssetFailure as e:
        return {"failure": {"asset": item.asset_id, "source": item.source, "stage": e.stage, "kind": e.kind,
                            "error": e.message}}
    except Exception as e:  # a bug outside the guarded stages: still one asset's failure, never the run's
        return {"failure": {"asset": item.asset_id, "source": item.source, "stage": "internal",
                            "kind": "internal error", "error": f"{type(e).__name__}: {e}"}}


def _run_pool(tasks: list, workers: int):
    """Yield ``_work`` results from ``workers`` processes, keeping at most ``2 * workers`` tasks in flight.

    A worker killed from outside (out of memory, a crash in native code) breaks the pool: the run stops with a
    clear error and a rerun resumes after the last finished asset.
    """
    # spawn, not fork: safe with CUDA and with whatever threads torch has started in this process.
    with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"), initializer=_init_worker) as pool:
        pending, queue = set(), iter(tasks)
        try:
            while True:
                while len(pending) < 2 * workers and (task := next(queue, None)) is not None:
                    pending.add(pool.submit(_work, task))
                if not pending:
                    return
                finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                for future in finished:
                    yield future.result()
        except BrokenProcessPool as e:
            raise RuntimeError(
                "a prepare_data worker process died (out of memory, or a crash in native code); "
                "the finished assets are saved: rerun the same command to resume"
            ) from e
        finally:
            for future in pending:
                future.cancel()


def _init_worker() -> None:
    # One thread per worker: the pool is the parallelism; more threads would fight over the same cores.
    torch.set_num_threads(1)


def prepare_dataset(cfg: Mapping) -> dict:
    """Prepare every asset of ``cfg`` (the ``configs/prepare_data.yaml`` keys) into ``cfg["out"]``; returns a summary.

    Keys: ``input`` (folder, glob, mesh file or list file) or ``data.kind == "toy"`` with ``n``; ``data.ids``
    (``path`` | ``stem``: see :func:`asset_ids_for`); ``out``; ``captions``; the
    :class:`PrepareSettings` keys; ``workers`` (0/1 = in process); ``shard`` (``"i/n"``, default RANK/WORLD_SIZE);
    ``retry_failed``; ``progress``.

    Resumable: assets with a manifest line and a record are skipped, failed assets are skipped unless
    ``retry_failed``. Sharded: shard ``i/n`` takes assets ``i, i+n, ...`` of the sorted list and writes
    ``manifest-<i>-of-<n>.jsonl`` / ``failures-<i>-of-<n>.jsonl``. Problems with the command itself raise
    :class:`PrepareError` before any asset is touched; problems with one asset become a failures line.
    """
    if isinstance(cfg, DictConfig):
        cfg = OmegaConf.to_container(cfg, resolve=True)
    cfg = dict(cfg)
    started = time.perf_counter()

    # ---- 1. check the command before any work
    if not cfg.get("out"):
        raise PrepareError("out=<folder> is required")
    out_dir = Path(cfg["out"]).expanduser().resolve()
    if out_dir.exists() and not out_dir.is_dir():
        raise PrepareError(f"out={cfg['out']!r} is an existing file, not a folder")
    settings = PrepareSettings.from_config(cfg)
    if settings.device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise PrepareError(f"device={settings.device!r} but CUDA is not available here (use device=cpu or auto)")
    shard = parse_shard(cfg.get("shard"))
    try:
        workers = int(cfg.get("workers") or 0)
    except (TypeError, ValueError):
        raise PrepareError(f"workers={cfg.get('workers')!r}: expected an integer") from None
    if workers < 0:
        raise PrepareError(f"workers={workers}: must be >= 0")
    duplicates: list[dict] = []
    sources = _make_sources(cfg, duplicates)

    # ---- 2. this shard's share, minus what is already done (or failed, unless retried)
    mine = sources if shard is None else sources[shard[0] :: shard[1]]
    (out_dir / "records").mkdir(parents=True, exist_ok=True)
    remove_stale_temp_files(out_dir / "records")
    done = read_manifests(out_dir)
    failed = read_failures(out_dir)
    retry = bool(cfg.get("retry_failed", False))
    failures_path = out_dir / failures_name(shard)
    manifest_path = out_dir / manifest_name(shard)
    if retry and failures_path.exists():
        retried = {s.asset_id for s in mine}
        write_jsonl_atomic(failures_path, [e for e in read_jsonl(failures_path) if e.get("asset") not in retried])
        failed = read_failures(out_dir)
    todo = [s for s in mine if s.asset_id not in done and (retry or s.asset_id not in failed)]
    skipped_done = sum(s.asset_id in done for s in mine)
    skipped_failed = len(mine) - len(todo) - skipped_done

    # ---- 3. work, in process or in a pool; only this process appends to this shard's logs
    settings_dict = asdict(settings)
    tasks = [(s, str(out_dir), settings_dict) for s in todo]
    n_ok, n_failed = 0, 0
    step_sums: dict[str, float] = {}
    sources_used: list[str] = []
    warning_kinds: list[str] = []
    failure_kinds: list[str] = []
    bar = progress_bar(total=len(tasks), desc="prepare", unit="asset", enabled=cfg.get("progress", True))
    try:
        if workers > 1 and len(tasks) > 1:
            results = _run_pool(tasks, min(workers, len(tasks)))
        else:
            results = map(_work, tasks)
        for result in results:
            if "record" in result:
                append_jsonl(manifest_path, result["record"])
                n_ok += 1
                sources_used.append(result["record"].get("color_source") or "unknown")
                warning_kinds.extend(w.get("kind", "unknown") for w in result["record"].get("warnings", []))
                for k, v in result["record"]["timings"].items():
                    step_sums[k] = step_sums.get(k, 0.0) + v
            else:
                append_jsonl(failures_path, result["failure"])
                n_failed += 1
                failure_kinds.append(result["failure"].get("kind") or result["failure"]["stage"])
                bar.write(f"failed {result['failure']['asset']} [{result['failure']['stage']}]: "
                          f"{result['failure']['error']}")
            bar.update(1)
            bar.set_postfix(ok=n_ok, failed=n_failed)
    finally:
        bar.close()

    summary = {
        "out": str(out_dir),
        "shard": None if shard is None else f"{shard[0]}/{shard[1]}",
        "total": len(sources),
        "assigned": len(mine),
        "prepared": n_ok,
        "failed": n_failed,
        "skipped_done": skipped_done,
        "skipped_failed": skipped_failed,
        "records": len(read_manifests(out_dir)),
        "seconds": round(time.perf_counter() - started, 3),
        "mean_timings": {k: round(v / n_ok, 4) for k, v in step_sums.items()} if n_ok else {},
        # This run's records and failures, counted (the manifest and failure lines hold the details).
        "color_sources": count_by(sources_used),
        "warnings": count_by(warning_kinds),
        "failures_by_kind": count_by(failure_kinds),
        # data.ids=stem: files not prepared because an earlier file (sorted path) has the same stem.
        "duplicates": len(duplicates),
        "duplicate_files": duplicates[:100],
        # The same counts over everything under `out` (all shards, all runs so far).
        "folder": folder_summary(out_dir),
    }
    write_json_atomic(out_dir / summary_name(shard), summary)
    print(summary_text(summary), file=sys.stderr, flush=True)
    return summary


def summary_text(summary: dict) -> str:
    """The few lines a run ends with: records written, colour sources, warnings and failures by kind."""

    def counts(d: dict[str, int]) -> str:
        return ", ".join(f"{k} {v}" for k, v in d.items()) if d else "none"

    folder = summary["folder"]
    return "\n".join([
        f"prepare_data: {summary['prepared']} records written, {summary['failed']} failed, "
        f"{summary['skipped_done'] + summary['skipped_failed']} skipped (done or failed before) "
        f"in {summary['seconds']:.1f} s",
        f"  colour sources: {counts(summary['color_sources'])}",
        f"  warnings by kind: {counts(summary['warnings'])}",
        f"  failures by kind: {counts(summary['failures_by_kind'])}",
        *[f"  {summary['duplicates']} files skipped as duplicate ids (same stem as an earlier file), e.g. "
          f"{d['dropped']} (kept {d['kept']})" for d in summary.get("duplicate_files", [])[:1]],
        f"  folder {summary['out']}: {folder['records']} records ({folder['assets_with_warnings']} with warnings), "
        f"{folder['failures']} failures; details in manifest*.jsonl (warnings, color_source), failures*.jsonl, "
        f"{summary_name(None if summary['shard'] is None else tuple(map(int, summary['shard'].split('/'))))}",
    ])
