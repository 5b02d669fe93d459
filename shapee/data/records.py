"""On-disk asset records, the manifest and the failure log.

Layout of a prepared dataset folder::

    out/
      records/<asset_id>.npz          one self-contained record per asset (uncompressed npz, no pickles)
      manifest.jsonl                  one line per finished record (``manifest-<i>-of-<n>.jsonl`` per shard)
      failures.jsonl                  one line per asset that could not be prepared (``failures-<i>-of-<n>.jsonl``)
      summary.json                    counts of the last run and of the whole folder (``summary-<i>-of-<n>.json``):
                                      records, colour sources, warnings by kind, failures by kind

A record is written to ``<asset_id>.npz.tmp`` and ``os.replace``'d into place, so a reader (or a restarted run) sees
either the whole record or none. Its manifest line is appended only after the record is in place: a record without a
line is redone on resume, a line without its record is ignored. A run killed while appending can leave a torn last
line; readers skip it and writers start a fresh line after it.

Arrays of a record (``[V]`` encoder views, ``[T]`` target views, ``H = W = resolution``)::

    views          [V, H, W, 3] uint8  sRGB, shaded, black background
    view_alpha     [V, H, W]    uint8  0 / 255
    view_depth     [V, H, W]    float32 planar depth, +inf background
    view_cameras   [V, 4, 3]    float32 rows origin, x, y, z (``Cameras.to_matrix``)
    target_rgb / target_alpha / target_depth / target_cameras: the same for the target views
    points_xyz     [P, 3]       float32 world frame, farthest-point order
    points_rgb     [P, 3]       uint8  sRGB albedo
    sdf_points     [S, 3]       float32
    sdf            [S]          float32 positive inside
    meta           []           str    JSON: see :class:`AssetRecord` and ``meta`` keys below
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
import uuid
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

# Bump when the arrays or meta keys of a record change meaning; readers refuse records of another version.
FORMAT_VERSION = 1

RECORDS_DIR = "records"
RECORD_SUFFIX = ".npz"

# The arrays every record holds, with their dtypes (checked on write and read).
RECORD_ARRAYS: dict[str, np.dtype] = {
    "views": np.dtype(np.uint8),
    "view_alpha": np.dtype(np.uint8),
    "view_depth": np.dtype(np.float32),
    "view_cameras": np.dtype(np.float32),
    "target_rgb": np.dtype(np.uint8),
    "target_alpha": np.dtype(np.uint8),
    "target_depth": np.dtype(np.float32),
    "target_cameras": np.dtype(np.float32),
    "points_xyz": np.dtype(np.float32),
    "points_rgb": np.dtype(np.uint8),
    "sdf_points": np.dtype(np.float32),
    "sdf": np.dtype(np.float32),
}


class RecordError(ValueError):
    """A record file that cannot be read (missing, truncated, wrong format version, missing arrays)."""


@dataclass
class AssetRecord:
    """What the manifest says about one prepared asset (one JSON line of ``manifest*.jsonl``)."""

    asset_id: str
    record: str  # path of the record relative to the dataset root, e.g. "records/bunny.ply.npz"
    source: str  # the input file (absolute path) or "toy:<id>"
    content_hash: str  # sha256 of the source file bytes (toy assets: of their mesh arrays)
    n_views: int
    n_targets: int
    n_points: int
    n_sdf: int
    captions: list[str] = field(default_factory=list)
    # Seconds per step (load, render, pointcloud, sdf, write, total) and the process CPU seconds of each ("<step>_cpu",
    # all threads): wall time says how long it took, CPU time how much machine it took (robust to other load).
    timings: dict[str, float] = field(default_factory=dict)
    # Where the colours came from ("texture" | "vertex" | "material" | "default", see shapee.data.mesh.resolve_colors;
    # "" in manifests written before this field existed) and what went wrong on the way: sources the file declared
    # but that could not be used, loader messages: [{"kind": ..., "message": ...}].
    color_source: str = ""
    warnings: list[dict] = field(default_factory=list)
    format_version: int = FORMAT_VERSION

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> "AssetRecord":
        known = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        return cls(**known)


# ------------------------------------------------------------------------------------------------ asset ids
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def sanitise_id(relative_path: str) -> str:
    """A file-name-safe asset id from a path relative to the input root: ``"chairs/a b.obj"`` → ``"chairs__a_b.obj"``.

    The extension stays in the id so that ``x.obj`` and ``x.ply`` side by side stay two assets.
    """
    parts = [p for p in Path(relative_path).as_posix().split("/") if p not in ("", ".")]
    if not parts:
        raise ValueError(f"cannot make an asset id from an empty path {relative_path!r}")
    asset_id = "__".join(_UNSAFE.sub("_", p) for p in parts).lstrip(".")
    return asset_id or "asset"


def unique_ids(relative_paths: list[str]) -> list[str]:
    """Sanitised ids for a list of relative paths, disambiguated by a short path hash where two would collide.

    Depends only on the paths themselves (not on their order), so every shard computes the same ids.
    """
    ids = [sanitise_id(p) for p in relative_paths]
    counts: dict[str, int] = {}
    for i in ids:
        counts[i] = counts.get(i, 0) + 1
    return [
        i if counts[i] == 1 else f"{i}-{hashlib.sha1(Path(p).as_posix().encode()).hexdigest()[:8]}"
        for i, p in zip(ids, relative_paths)
    ]


def file_sha256(path: str | os.PathLike, chunk_bytes: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            h.update(chunk)
    return h.hexdigest()


def arrays_sha256(*arrays: np.ndarray) -> str:
    """Content hash of in-memory assets (toy meshes): sha256 over dtype, shape and bytes of each array."""
    h = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(f"{a.dtype.str}{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------- record files
def record_relpath(asset_id: str) -> str:
    return f"{RECORDS_DIR}/{asset_id}{RECORD_SUFFIX}"


def write_record(path: str | os.PathLike, arrays: dict[str, np.ndarray], meta: dict) -> None:
    """Atomically write one record: every array of :data:`RECORD_ARRAYS` plus a JSON ``meta`` dict.

    The file appears under ``path`` complete or not at all (temp file, fsync, ``os.replace``).
    """
    path = Path(path)
    missing = sorted(set(RECORD_ARRAYS) - set(arrays))
    if missing:
        raise ValueError(f"write_record({path.name}): missing arrays {missing}")
    payload = {}
    for name, dtype in RECORD_ARRAYS.items():
        a = np.asarray(arrays[name])
        if a.dtype != dtype:
            raise ValueError(f"write_record({path.name}): array {name!r} must be {dtype}, got {a.dtype}")
        payload[name] = a
    meta = {**meta, "format_version": FORMAT_VERSION}
    # A 0-d unicode array: readable with allow_pickle=False, unlike an object array.
    payload["meta"] = np.array(json.dumps(meta, sort_keys=True))
    path.parent.mkdir(parents=True, exist_ok=True)
    # A name of its own per writer: an orphaned worker of a killed run and the rerun may write the same asset at
    # once; each then renames a complete file of its own.
    tmp = path.with_name(f"{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
    with open(tmp, "wb") as f:
        np.savez(f, **payload)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_record(path: str | os.PathLike, keys: Iterable[str] | None = None) -> tuple[dict, dict[str, np.ndarray]]:
    """``(meta, arrays)`` of one record (only ``keys`` of it if given: the others are not read from disk).

    Raises :class:`RecordError` naming the file and the problem.
    """
    path = Path(path)
    if not path.is_file():
        raise RecordError(f"record {path}: file not found")
    wanted = list(RECORD_ARRAYS) if keys is None else list(keys)
    unknown = sorted(set(wanted) - set(RECORD_ARRAYS))
    if unknown:
        raise ValueError(f"read_record: unknown array names {unknown}; records hold {sorted(RECORD_ARRAYS)}")
    try:
        with np.load(path, allow_pickle=False) as npz:
            names = set(npz.files)
            if "meta" not in names:
                raise RecordError(f"record {path}: no 'meta' entry")
            meta = json.loads(str(npz["meta"]))
            version = meta.get("format_version")
            if version != FORMAT_VERSION:
                raise RecordError(f"record {path}: format version {version}, this code reads version {FORMAT_VERSION}")
            missing = sorted(set(RECORD_ARRAYS) - names)
            if missing:
                raise RecordError(f"record {path}: missing arrays {missing}")
            data = {k: npz[k] for k in wanted}
    except RecordError:
        raise
    except Exception as e:  # zipfile.BadZipFile, ValueError, EOFError ... all mean "not a readable record"
        raise RecordError(f"record {path}: unreadable ({type(e).__name__}: {e})") from e
    return meta, data


def remove_stale_temp_files(records_dir: str | os.PathLike, older_than_s: float = 3600.0) -> int:
    """Delete ``*.tmp`` files left by killed writers (older than ``older_than_s``: no live write takes that long)."""
    removed = 0
    now = time.time()
    for tmp in Path(records_dir).glob("*.tmp"):
        try:
            if now - tmp.stat().st_mtime > older_than_s:
                tmp.unlink()
                removed += 1
        except FileNotFoundError:  # its writer just finished or another process removed it
            pass
    return removed


# ------------------------------------------------------------------------------------------ jsonl logs
def shard_suffix(shard: tuple[int, int] | None) -> str:
    """``""`` unsharded, ``"-<i>-of-<n>"`` for shard ``i`` of ``n``."""
    if shard is None or shard[1] == 1:
        return ""
    return f"-{shard[0]}-of-{shard[1]}"


def manifest_name(shard: tuple[int, int] | None = None) -> str:
    return f"manifest{shard_suffix(shard)}.jsonl"


def failures_name(shard: tuple[int, int] | None = None) -> str:
    return f"failures{shard_suffix(shard)}.jsonl"


def summary_name(shard: tuple[int, int] | None = None) -> str:
    return f"summary{shard_suffix(shard)}.json"


def append_jsonl(path: str | os.PathLike, entry: dict) -> None:
    """Append one JSON line durably. If a killed writer left a torn last line, start on a fresh line after it."""
    path = Path(path)
    line = json.dumps(entry, sort_keys=True) + "\n"
    with open(path, "ab+") as f:
        f.seek(0, os.SEEK_END)
        if f.tell() > 0:
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                line = "\n" + line
        f.write(line.encode())
        f.flush()
        os.fsync(f.fileno())


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """The parseable object lines of a jsonl file; torn or garbled lines are skipped (a killed writer)."""
    entries = []
    with open(path, "rb") as f:
        for raw in f:
            try:
                entry = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError):
                continue
            if isinstance(entry, dict):
                entries.append(entry)
    return entries


def write_jsonl_atomic(path: str | os.PathLike, entries: list[dict]) -> None:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        for e in entries:
            f.write(json.dumps(e, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def select_assets(entries: dict, asset_ids, *, what: str, root) -> dict:
    """``entries`` (asset id → manifest entry) restricted to ``asset_ids`` in that order, or all when ``None``;
    a KeyError names the ids that ``root`` does not hold (``what``: the dataset's name, for the message)."""
    if asset_ids is None:
        return entries
    missing = sorted(set(asset_ids) - set(entries))
    if missing:
        raise KeyError(f"{what}: asset_ids not in {root}: {missing[:5]}{'...' if len(missing) > 5 else ''}")
    return {k: entries[k] for k in asset_ids}


def read_manifests(root: str | os.PathLike, require_record: bool = True) -> dict[str, AssetRecord]:
    """All ``manifest*.jsonl`` lines under ``root`` as ``{asset_id: AssetRecord}`` (a later line wins).

    With ``require_record`` only entries whose record file exists are kept (a line whose record was deleted is not
    an asset any more). Lines of another format version are ignored.
    """
    root = Path(root)
    records: dict[str, AssetRecord] = {}
    for manifest in sorted(root.glob("manifest*.jsonl")):
        for entry in read_jsonl(manifest):
            if "asset_id" not in entry or "record" not in entry:
                continue
            if entry.get("format_version", FORMAT_VERSION) != FORMAT_VERSION:
                continue
            rec = AssetRecord.from_dict(entry)
            if require_record and not (root / rec.record).is_file():
                continue
            records[rec.asset_id] = rec
    return records


def count_by(values: Iterable[str]) -> dict[str, int]:
    """``{value: count}``, most frequent first (ties by name): the shape of every "by kind" count of a summary."""
    counts: dict[str, int] = {}
    for v in values:
        counts[v] = counts.get(v, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def failure_kind(error: str, stage: str = "") -> str:
    """A short, countable kind of a failure message: its head before the first ``:`` or `` (`` (``"empty mesh"``,
    ``"no faces"``, ``"open mesh"``, ``"NaN in vertex colours"``), or the stage when the message has no short head."""
    head = re.split(r":| \(", str(error), maxsplit=1)[0].strip()
    return head if 0 < len(head) <= 60 else (stage or "unknown")


def folder_summary(root: str | os.PathLike) -> dict:
    """Counts over every manifest and failure log under ``root``: ``records``, ``color_sources``, ``warnings`` (by
    kind, over all records' warnings), ``assets_with_warnings``, ``failures`` and ``failures_by_kind``."""
    records = read_manifests(root)
    failures = read_failures(root)
    return {
        "records": len(records),
        "color_sources": count_by(r.color_source or "unknown" for r in records.values()),
        "warnings": count_by(w.get("kind", "unknown") for r in records.values() for w in r.warnings),
        "assets_with_warnings": sum(bool(r.warnings) for r in records.values()),
        "failures": len(failures),
        "failures_by_kind": count_by(e.get("kind") or failure_kind(e.get("error", ""), e.get("stage", ""))
                                     for e in failures.values()),
    }


def write_json_atomic(path: str | os.PathLike, obj) -> None:
    path = Path(path)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_failures(root: str | os.PathLike) -> dict[str, dict]:
    """All ``failures*.jsonl`` lines under ``root`` as ``{asset_id: {"asset", "stage", "error", ...}}``."""
    failures: dict[str, dict] = {}
    for path in sorted(Path(root).glob("failures*.jsonl")):
        for entry in read_jsonl(path):
            if "asset" in entry:
                failures[entry["asset"]] = entry
    return failures
