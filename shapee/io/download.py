"""The released Shap-E files: where they come from, their SHA-256, and a checked download into a local cache.

The URLs and checksums are the ones the official loader pins (``shap_e/models/download.py``; reference §7 names the
files). The config checksums equal the SHA-256 of ``shared/reference/official_configs/*.yaml`` (checked by a test),
which is how we know this table is the published one.

Cache: ``$SHAPEE_CACHE`` if set, else ``~/.cache/shapee``; a file is ``<cache>/<file name>`` (e.g.
``~/.cache/shapee/text_cond.pt``). A file already there is checked against its checksum and used; otherwise it is
downloaded (unless offline), hashed while it streams, and renamed into place only when the checksum matches, so the
cache never holds a partial or corrupt file under the real name.

Offline (``SHAPEE_OFFLINE=1`` or ``HF_HUB_OFFLINE=1``, as in the tests), or when the download fails, the error names
the file, the path to put it at, and the URL to fetch it from by hand. No retries: the projects' machines often have
no route to the CDN, and a short timeout fails fast instead of hanging a run.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "OFFICIAL_FILES",
    "OfficialDownloadError",
    "OfficialFile",
    "cache_dir",
    "copy_into_cache",
    "fetch_official",
    "is_offline",
    "official_path",
    "sha256_file",
]

_BASE_URL = "https://openaipublic.azureedge.net/main/shap-e/"


@dataclass(frozen=True)
class OfficialFile:
    """One released file: its name in the cache, where to download it, and its SHA-256 (hex)."""

    filename: str
    url: str
    sha256: str


def _file(filename: str, sha256: str) -> OfficialFile:
    return OfficialFile(filename, _BASE_URL + filename, sha256)


# Model name (as shapee.io.load_official knows it) → released file. "decoder" is the standalone vector decoder
# (reference §1.8: nothing uses it, its config is unknown); kept so that its checksum is on record.
OFFICIAL_FILES: dict[str, OfficialFile] = {
    "transmitter": _file("transmitter.pt", "af02a0b85a8abdfb3919584b63c540ba175f6ad4790f574a7fef4617e5acdc3b"),
    "decoder": _file("vector_decoder.pt", "d7e7ebbfe3780499ae89b2da5e7c1354012dba5a6abfe295bed42f25c3be1b98"),
    "text300M": _file("text_cond.pt", "e6b4fa599a7b3c3b16c222d5f5fe56f9db9289ff0b6575fbe5c11bc97106aad4"),
    "image300M": _file("image_cond.pt", "cb8072c64bbbcf6910488814d212227de5db291780d4ea99c6152f9346cf12aa"),
    "transmitter_config": _file("transmitter_config.yaml", "ffe1bcb405104a37d9408391182ab118a4ef313c391e07689684f1f62071605e"),
    "decoder_config": _file("vector_decoder_config.yaml", "e6d373649f8e24d85925f4674b9ac41c57aba5f60e42cde6d10f87381326365c"),
    "text300M_config": _file("text_cond_config.yaml", "f290beeea3d3e9ff15db01bde5382b6e549e463060c0744f89c049505be246c1"),
    "image300M_config": _file("image_cond_config.yaml", "4e0745605a533c543c72add803a78d233e2a6401e0abfa0cad58afb4d74ad0b0"),
    "diffusion_config": _file("diffusion_config.yaml", "efcb2cd7ee545b2d27223979d41857802448143990572a42645cd09c2942ed57"),
}

_TRUE = {"1", "true", "yes", "on"}


class OfficialDownloadError(RuntimeError):
    """A released file is not in the cache and could not be downloaded, or its checksum is wrong."""


def cache_dir() -> Path:
    """``$SHAPEE_CACHE`` or ``~/.cache/shapee`` (not created here)."""
    env = os.environ.get("SHAPEE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "shapee"


def is_offline() -> bool:
    """True when ``SHAPEE_OFFLINE`` or ``HF_HUB_OFFLINE`` is set to 1/true/yes/on."""
    return any(os.environ.get(k, "").strip().lower() in _TRUE for k in ("SHAPEE_OFFLINE", "HF_HUB_OFFLINE"))


def official_path(name: str, directory: str | os.PathLike | None = None) -> Path:
    """Where the released file ``name`` lives: ``<directory or cache_dir()>/<file name>``."""
    folder = Path(directory).expanduser() if directory is not None else cache_dir()
    return folder / _entry(name).filename


def _entry(name: str) -> OfficialFile:
    if name not in OFFICIAL_FILES:
        raise ValueError(f"unknown official file {name!r}; known: {sorted(OFFICIAL_FILES)}")
    return OFFICIAL_FILES[name]


def sha256_file(path: str | os.PathLike, chunk_bytes: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in ``chunk_bytes`` pieces (the priors are ~1.3 GB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk_bytes):
            digest.update(block)
    return digest.hexdigest()


def _by_hand(entry: OfficialFile, target: Path) -> str:
    return (
        f"download {entry.url} by hand (SHA-256 {entry.sha256}) and put it at {target} "
        f"(the folder is $SHAPEE_CACHE, default ~/.cache/shapee), or pass the file's path explicitly"
    )


def fetch_official(
    name: str,
    *,
    directory: str | os.PathLike | None = None,
    offline: bool | None = None,
    timeout_s: float = 10.0,
    verify: bool = True,
) -> Path:
    """The local path of the released file ``name`` (see :data:`OFFICIAL_FILES`), downloading it if needed.

    Args:
        name: ``transmitter``, ``text300M``, ``image300M`` (or a ``*_config`` / ``decoder`` entry).
        directory: cache folder (default :func:`cache_dir`).
        offline: never touch the network (default: :func:`is_offline`).
        timeout_s: socket timeout of the download (connect and each read).
        verify: check the SHA-256 of a file already in the cache (a download is always checked).

    Raises:
        OfficialDownloadError: offline or the download failed (the message names the file, the expected path and
            the URL to fetch by hand), or a cached/downloaded file has the wrong checksum.
    """
    entry = _entry(name)
    target = official_path(name, directory)
    folder = target.parent
    if target.is_file():
        if verify:
            actual = sha256_file(target)
            if actual != entry.sha256:
                raise OfficialDownloadError(
                    f"{target} ({name}) has SHA-256 {actual}, expected {entry.sha256}: the file is corrupt or not "
                    f"the released {entry.filename}; delete it and run again, or {_by_hand(entry, target)}"
                )
        return target
    if offline if offline is not None else is_offline():
        raise OfficialDownloadError(
            f"the released {name} weights ({entry.filename}) are not at {target} and downloads are off "
            f"(SHAPEE_OFFLINE / HF_HUB_OFFLINE); {_by_hand(entry, target)}"
        )
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{entry.filename}.", suffix=".part", dir=folder)
    try:
        digest = hashlib.sha256()
        with os.fdopen(fd, "wb") as f, urllib.request.urlopen(entry.url, timeout=timeout_s) as response:
            while block := response.read(1 << 20):
                digest.update(block)
                f.write(block)
            f.flush()
            os.fsync(f.fileno())
        if digest.hexdigest() != entry.sha256:
            raise OfficialDownloadError(
                f"downloaded {entry.url} has SHA-256 {digest.hexdigest()}, expected {entry.sha256}; nothing was "
                f"written to {target}. Try again, or {_by_hand(entry, target)}"
            )
        os.replace(tmp, target)
    except (urllib.error.URLError, OSError, ValueError) as e:  # no route, DNS, timeout, HTTP error, disk full
        raise OfficialDownloadError(
            f"could not download the released {name} weights ({entry.filename}) from {entry.url}: "
            f"{type(e).__name__}: {e}; {_by_hand(entry, target)}"
        ) from e
    finally:
        Path(tmp).unlink(missing_ok=True)
    return target


def copy_into_cache(name: str, source: str | os.PathLike, *, directory: str | os.PathLike | None = None) -> Path:
    """Check a hand-downloaded file against the checksum of ``name`` and copy it into the cache."""
    entry = _entry(name)
    actual = sha256_file(source)
    if actual != entry.sha256:
        raise OfficialDownloadError(f"{source} has SHA-256 {actual}, not the released {entry.filename} ({entry.sha256})")
    target = official_path(name, directory)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{entry.filename}.copy")
    shutil.copyfile(source, tmp)
    os.replace(tmp, target)
    return target
