"""Caption tables: asset id → captions, from the files people already have.

Formats read by :func:`read_captions` (every caption is stripped; empty ones are dropped; several rows for one id
give several captions, in file order):

* **CSV with a header** naming an id column (``asset_id`` / ``asset`` / ``id`` / ``uid`` / ``object_id`` /
  ``path``) and a caption column (``caption`` / ``captions`` / ``text``); one row per caption.
* **CSV without a header, two columns ``uid,caption``**: Cap3D's ``Cap3D_automated_Objaverse*.csv`` (its own
  fine-tuning script reads it with ``pandas.read_csv(..., header=None)`` and takes column 0 as the uid, column 1 as the
  caption: ``text-to-3D/finetune_shapE.py`` in github.com/crockwell/Cap3D). A first row is taken as a header when one of
  its cells is one of the column names above, else as data.
* **JSON object** ``{uid: caption}`` or ``{uid: [captions]}`` (one file).
* **JSON lines** ``{"asset_id": ..., "caption": "..."}`` or ``"captions": [...]`` per line (any id / caption key
  above); a ``.json`` file holding a list of such objects reads the same.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

from shapee.data.records import read_jsonl

ID_KEYS = ("asset_id", "asset", "id", "uid", "object_id", "path")
TEXT_KEYS = ("caption", "captions", "text")


class CaptionFileError(ValueError):
    """A caption file that cannot be read as any of the formats above (the message names the file)."""


def read_captions(path: str | os.PathLike) -> dict[str, list[str]]:
    """``{asset id: [captions]}`` from a caption file (formats: the module docstring).

    Raises:
        CaptionFileError: no such file, an unknown extension, a CSV header without an id or a caption column, or a
            JSON value that is no object / list of objects.
    """
    path = Path(path)
    if not path.is_file():
        raise CaptionFileError(f"captions {str(path)!r}: no such file")
    out: dict[str, list[str]] = {}

    def add(key, value) -> None:
        if key is None or value is None:
            return
        values = value if isinstance(value, list) else [value]
        out.setdefault(str(key).strip(), []).extend(str(v).strip() for v in values if str(v).strip())

    def add_entry(entry) -> None:
        if not isinstance(entry, dict):
            raise CaptionFileError(f"captions {str(path)!r}: expected JSON objects, got {type(entry).__name__}")
        key = next((entry[k] for k in ID_KEYS if k in entry), None)
        add(key, next((entry[k] for k in TEXT_KEYS if k in entry), None))

    suffix = path.suffix.lower()
    if suffix == ".csv":
        with open(path, newline="", encoding="utf-8-sig") as f:  # -sig: a BOM is not part of the first id
            rows = csv.reader(f)
            first = next(rows, None)
            if first is None:
                return out
            cells = [c.strip() for c in first]
            if set(cells) & (set(ID_KEYS) | set(TEXT_KEYS)):  # a header
                id_col = next((cells.index(k) for k in ID_KEYS if k in cells), None)
                text_col = next((cells.index(k) for k in TEXT_KEYS if k in cells), None)
                if id_col is None or text_col is None:
                    raise CaptionFileError(
                        f"captions {str(path)!r}: the CSV header needs an id column ({'/'.join(ID_KEYS)}) and a "
                        f"caption column ({'/'.join(TEXT_KEYS)}), got {first}"
                    )
                body = rows
            elif len(cells) >= 2:  # no header: uid,caption (Cap3D)
                id_col, text_col, body = 0, 1, [first, *rows]
            else:
                raise CaptionFileError(
                    f"captions {str(path)!r}: expected a header with an id and a caption column, or two columns "
                    f"uid,caption without a header (Cap3D's format); the first row is {first}"
                )
            for row in body:
                if len(row) > max(id_col, text_col):
                    add(row[id_col], row[text_col])
        return out
    if suffix not in (".json", ".jsonl", ".ndjson"):
        raise CaptionFileError(f"captions {str(path)!r}: expected a .csv, .json or .jsonl file")
    whole = None
    if suffix == ".json":
        try:
            whole = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            whole = None  # several lines: JSON lines
    if isinstance(whole, list):
        for entry in whole:
            add_entry(entry)
    elif isinstance(whole, dict) and not (set(whole) & set(ID_KEYS) and set(whole) & set(TEXT_KEYS)):
        for key, value in whole.items():  # {uid: caption | [captions]}
            if not isinstance(value, (str, list)):
                raise CaptionFileError(
                    f"captions {str(path)!r}: a JSON object maps each id to a caption or a list of captions; "
                    f"{key!r} maps to {type(value).__name__}"
                )
            add(key, value)
    elif isinstance(whole, dict):  # one entry {"asset_id": ..., "caption": ...}
        add_entry(whole)
    elif whole is not None:
        raise CaptionFileError(f"captions {str(path)!r}: expected a JSON object or list, got {type(whole).__name__}")
    else:  # JSON lines
        for entry in read_jsonl(path):
            add_entry(entry)
    return out


__all__ = ["CaptionFileError", "ID_KEYS", "TEXT_KEYS", "read_captions"]
