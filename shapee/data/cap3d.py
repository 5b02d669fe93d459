"""Cap3D's released Shap-E latents and captions, read as they ship, for fine-tuning the text prior.

Cap3D (Luo et al., "Scalable 3D Captioning with Pretrained Models", github.com/crockwell/Cap3D, data at
huggingface.co/datasets/tiange/Cap3D) releases, for Objaverse objects:

* **Latents** (``ShapELatentCode_zips``): one file per object, ``<uid>.pt``, holding the Shap-E transmitter's latent
  as a tensor (saved with ``torch.save``) of 1024·1024 = 1,048,576 floats, shaped ``[1, 1048576]`` (a batch of one,
  as the official encoder returns it) or ``[1048576]``. Cap3D's fine-tuning script
  (``text-to-3D/finetune_shapE.py``) loads ``os.path.join(latent_code_path, uid + '.pt')`` with
  ``torch.load(...).squeeze()`` and hands the flat vector to the official text300M, whose ``SplitVectorDiffusion``
  wrapper views it as ``[latent_ctx = 1024, 1024]`` rows: token ``r`` is elements ``r·1024 … r·1024 + 1023``.
  That is our ``[n_ctx, d_latent]`` latent, row-major, so a file becomes ``latent.reshape(n_ctx, d_latent)`` (no
  transpose).
* **Captions** (``Cap3D_automated_Objaverse*.csv``): no header, two columns ``uid, caption``; the same script reads it
  with ``pandas.read_csv(path, header=None)`` and joins column 0 to the latent file's uid. Several rows for one uid
  give several captions (one is drawn per step, as for our own records).

Sources checked: Cap3D's ``text-to-3D/finetune_shapE.py`` (file naming ``<uid>.pt``, ``torch.load(...).squeeze()``,
the headerless two-column CSV read with ``header=None``, the flat vector handed to text300M) and the official Shap-E
code (``shap_e/models/transmitter/base.py``: ``encode_to_vector`` is ``encode_to_channels(...).flatten(1)`` of
``[B, latent_ctx, d_latent]`` and ``bottleneck_to_channels`` is ``vector.view(B, latent_ctx, -1)``;
``shap_e/models/generation/latent_diffusion.py``: ``SplitVectorDiffusion`` reshapes ``x`` to ``[B, n_ctx, -1]``).
Assumed, not checked against the released files themselves (Cap3D's repository has no latent-extraction script):
that each file holds one tensor of exactly 1,048,576 floats with leading singleton dimensions at most (``.squeeze()``
suggests ``[1, 1048576]``, what ``encode_to_bottleneck`` returns for one object); any such shape is accepted here.

Files are read with ``torch.load(weights_only=True)``: tensors only, never pickled code. Bad inputs never stop a
run: unreadable files, files that are no tensor or of another size, latents with NaN / inf, latents without a
caption and captions without a latent are skipped, each recorded in :attr:`Cap3DLatentDataset.failures` (and
counted in one log line); only an empty result is an error.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

from shapee.data.captions import read_captions

LATENT_SUFFIX = ".pt"


class Cap3DLatentError(ValueError):
    """A Cap3D latent file that cannot be used: ``kind`` (``unreadable`` | ``not a tensor`` | ``wrong shape`` |
    ``not floats`` | ``non-finite``) and a message naming the file and why."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


def load_cap3d_latent(path: str | os.PathLike, n_ctx: int = 1024, d_latent: int = 1024) -> Tensor:
    """One Cap3D latent file → ``[n_ctx, d_latent]`` float32 (the flat vector's rows; see the module docstring).

    Accepts a tensor of ``n = n_ctx·d_latent`` elements shaped ``[1, n]``, ``[n]`` (any leading singleton dimensions)
    or already ``[n_ctx, d_latent]``.

    Raises:
        Cap3DLatentError: unreadable (not a torch file, truncated, holds code), not a tensor, another size, or
            non-finite values.
    """
    path = Path(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated / garbage / pickled code refused by weights_only
        first_line = (str(e).splitlines() or [""])[0][:200]
        raise Cap3DLatentError("unreadable", f"{path}: unreadable ({type(e).__name__}: {first_line})") from None
    if not isinstance(obj, Tensor):
        raise Cap3DLatentError("not a tensor", f"{path}: holds a {type(obj).__name__}, not a tensor")
    want = n_ctx * d_latent
    shape = list(obj.shape)
    if obj.numel() != want or not (obj.squeeze().ndim <= 1 or shape == [n_ctx, d_latent]):  # [1, n], [n], [1, 1, n]
        raise Cap3DLatentError(
            "wrong shape",
            f"{path}: shape {shape} ({obj.numel()} values), expected {want} = {n_ctx}·{d_latent} values "
            f"([1, {want}] or [{want}])"
        )
    if not obj.is_floating_point():
        raise Cap3DLatentError("not floats", f"{path}: dtype {obj.dtype}, expected floats")
    latent = obj.reshape(n_ctx, d_latent).float()  # [n_ctx, d_latent]: row r = elements r·d … r·d + d − 1
    if not torch.isfinite(latent).all():
        bad = int((~torch.isfinite(latent)).sum())
        raise Cap3DLatentError("non-finite", f"{path}: {bad} non-finite values (NaN / inf)")
    return latent


class Cap3DLatentDataset(Dataset):
    """Cap3D's ``<uid>.pt`` latents (``latents``, searched recursively) paired by uid with its caption file.

    Item (the same as :class:`shapee.data.latents.LatentDataset`'s text items, so the prior's training path takes
    it unchanged)::

        latent      [n_ctx, d_latent]   float32
        asset_id    str                 the uid
        captions    list[str]

    Args:
        latents: folder of ``<uid>.pt`` files (nested folders are searched; the first path in sorted order wins
            when two files share a uid, the other is a failure ``duplicate uid``).
        captions: caption file: Cap3D's headerless ``uid,caption`` CSV, or any format of
            :func:`shapee.data.captions.read_captions`.
        n_ctx, d_latent: the latent's shape (the prior's ``latent_shape``; 1024, 1024 for text300M).
        check: ``"full"``: read every file at construction, so :attr:`failures` is complete before training and the
            dataset holds only good latents (reads ~4 MiB per object: minutes for a few thousand, hours for all of
            Cap3D); ``"lazy"``: only pair file names with captions at construction; a bad file met in
            ``__getitem__`` is recorded, logged once (per process: DataLoader workers keep their own lists) and replaced
            by the next good item, so a run never stops on one.
        asset_ids: restrict to these uids (those that lack a latent or caption are failures).
        log: print the summary line (and, lazily, each skipped file) on stderr.

    Attributes:
        failures: ``[{"asset_id", "path", "kind", "reason"}]`` for every skipped uid or file (``kind``: a
            :class:`Cap3DLatentError` kind, ``duplicate uid``, ``latent without caption`` or
            ``caption without latent``).
        uids: the uids used, sorted.
    """

    def __init__(
        self,
        latents: str | os.PathLike,
        captions: str | os.PathLike,
        *,
        n_ctx: int = 1024,
        d_latent: int = 1024,
        check: str = "full",
        asset_ids: Sequence[str] | None = None,
        log: bool = True,
    ) -> None:
        if check not in ("full", "lazy"):
            raise ValueError(f"check must be 'full' or 'lazy', got {check!r}")
        self.root = Path(latents)
        if not self.root.is_dir():
            raise FileNotFoundError(f"Cap3D latents {str(self.root)!r}: no such folder")
        self.n_ctx, self.d_latent, self.check = int(n_ctx), int(d_latent), check
        self.failures: list[dict[str, str]] = []
        self._log = log
        caption_table = read_captions(captions)

        files: dict[str, Path] = {}
        for path in sorted(self.root.rglob(f"*{LATENT_SUFFIX}"), key=lambda p: p.relative_to(self.root).as_posix()):
            if not path.is_file():
                continue
            uid = path.stem
            if uid in files:
                self._fail(uid, path, "duplicate uid", f"{path}: duplicate uid (kept {files[uid]})")
                continue
            files[uid] = path
        wanted = set(files) | set(caption_table) if asset_ids is None else set(asset_ids)

        self.paths: dict[str, Path] = {}
        self.captions: dict[str, list[str]] = {}
        for uid in sorted(wanted):
            path, caps = files.get(uid), caption_table.get(uid) or []
            if path is None:
                self._fail(uid, None, "caption without latent", f"{uid}: a caption but no {uid}{LATENT_SUFFIX}")
                continue
            if not caps:
                self._fail(uid, path, "latent without caption", f"{path}: no caption for {uid}")
                continue
            if check == "full":
                try:
                    load_cap3d_latent(path, self.n_ctx, self.d_latent)
                except Cap3DLatentError as e:
                    self._fail(uid, path, e.kind, str(e))
                    continue
            self.paths[uid], self.captions[uid] = path, caps
        self.uids = sorted(self.paths)
        self._bad: set[str] = set()
        if log:
            print(self.summary(), file=sys.stderr, flush=True)
        if not self.uids:
            first = next((f["reason"] for f in self.failures), "no <uid>.pt files and no captions")
            raise ValueError(
                f"Cap3D latents {str(self.root)!r} + captions {str(captions)!r}: no usable latent "
                f"({len(self.failures)} skipped; first: {first})"
            )

    def _fail(self, uid: str, path: Path | None, kind: str, reason: str) -> None:
        self.failures.append({"asset_id": uid, "path": "" if path is None else str(path), "kind": kind,
                              "reason": reason})

    def summary(self) -> str:
        """One line: how many latents are used and how many uids / files were skipped, by reason."""
        kinds: dict[str, int] = {}
        for f in self.failures:
            kinds[f["kind"]] = kinds.get(f["kind"], 0) + 1
        detail = ", ".join(f"{k}: {v}" for k, v in sorted(kinds.items()))
        return (
            f"Cap3D latents {self.root}: {len(self.paths)} used, {len(self.failures)} skipped"
            + (f" ({detail})" if detail else "") + f" [check={self.check}]"
        )

    def __len__(self) -> int:
        return len(self.uids)

    @property
    def asset_ids(self) -> list[str]:
        return list(self.uids)

    def __getitem__(self, index: int) -> dict[str, Any]:
        n = len(self.uids)
        for k in range(n):  # lazy check: a bad file is replaced by the next good item
            uid = self.uids[(index + k) % n]
            if uid in self._bad:
                continue
            try:
                latent = load_cap3d_latent(self.paths[uid], self.n_ctx, self.d_latent)  # [n_ctx, d_latent]
            except Cap3DLatentError as e:
                self._bad.add(uid)
                self._fail(uid, self.paths[uid], e.kind, str(e))
                if self._log:
                    print(f"Cap3D: skipping {uid}: {e}", file=sys.stderr, flush=True)
                continue
            return {"latent": latent, "asset_id": uid, "captions": list(self.captions[uid])}
        raise ValueError(f"Cap3D latents {self.root}: every one of the {n} latent files is unusable")


__all__ = ["Cap3DLatentDataset", "Cap3DLatentError", "load_cap3d_latent"]
