"""Turntable GIF writer: frames round-trip through Pillow, inputs are checked, writes are atomic."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, ImageSequence

from shapee.io.gif import to_uint8_frames, write_gif

COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (250, 250, 10), (0, 0, 0)]


def _solid_frames(h: int = 12, w: int = 10) -> np.ndarray:
    frames = np.zeros((len(COLOURS), h, w, 3), dtype=np.uint8)  # [N, H, W, 3]
    for i, c in enumerate(COLOURS):
        frames[i] = c
        frames[i, : h // 2, : w // 2] = 255 - np.array(c)  # a second colour per frame: the palette holds both
    return frames


def _read(path) -> tuple[list[np.ndarray], Image.Image]:
    image = Image.open(path)
    frames = [np.asarray(f.convert("RGB")) for f in ImageSequence.Iterator(image)]
    return frames, image


def test_frames_round_trip_exactly_with_timing_and_loop(tmp_path):
    frames = _solid_frames()
    path = write_gif(frames, tmp_path / "sub" / "turntable.gif", fps=20, loop=0)
    read, image = _read(path)
    assert len(read) == len(COLOURS)
    assert read[0].shape == (12, 10, 3)
    for got, want in zip(read, frames):
        np.testing.assert_array_equal(got, want)  # ≤ 256 colours per frame: lossless
    assert image.info["duration"] == 50 and image.info["loop"] == 0


def test_float_and_tensor_frames_match_uint8(tmp_path):
    frames = _solid_frames()
    a = write_gif(frames, tmp_path / "a.gif")
    b = write_gif(torch.from_numpy(frames.astype(np.float32) / 255.0), tmp_path / "b.gif")
    assert a.read_bytes() == b.read_bytes()
    np.testing.assert_array_equal(to_uint8_frames(np.full((1, 2, 2, 3), 2.0)), np.full((1, 2, 2, 3), 255))


def test_smooth_frames_stay_close(tmp_path):
    ramp = np.linspace(0, 255, 64, dtype=np.float64)
    frame = np.stack(np.broadcast_arrays(ramp[None, :], ramp[:, None], np.full((64, 64), 128.0)), -1)  # [64, 64, 3]
    frames = np.stack([frame, frame[::-1]]).round().astype(np.uint8)  # 4096 colours: must be quantised
    read, _ = _read(write_gif(frames, tmp_path / "ramp.gif"))
    err = np.abs(np.stack(read).astype(int) - frames.astype(int))
    assert len(read) == 2 and err.mean() < 3 and err.max() < 24


@pytest.mark.parametrize(
    "frames, error, match",
    [
        (np.zeros((4, 4, 3), np.uint8), ValueError, r"\[N, H, W, 3\]"),
        (np.zeros((2, 4, 4, 4), np.uint8), ValueError, r"\[N, H, W, 3\]"),
        (np.zeros((0, 4, 4, 3), np.uint8), ValueError, "at least one"),
        (np.zeros((1, 4, 4, 3), np.int32), TypeError, "uint8 or floats"),
        (np.full((1, 4, 4, 3), np.nan, np.float32), ValueError, "NaN"),
    ],
)
def test_bad_frames_raise_and_leave_the_old_file(tmp_path, frames, error, match):
    path = tmp_path / "keep.gif"
    path.write_bytes(b"old")
    with pytest.raises(error, match=match):
        write_gif(frames, path)
    assert path.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.gif"]  # no temporary file left behind


def test_bad_options_raise(tmp_path):
    frames = _solid_frames()
    with pytest.raises(ValueError, match=r"\.gif"):
        write_gif(frames, tmp_path / "x.png")
    with pytest.raises(ValueError, match="fps"):
        write_gif(frames, tmp_path / "x.gif", fps=0)
    with pytest.raises(ValueError, match="loop"):
        write_gif(frames, tmp_path / "x.gif", loop=-1)
