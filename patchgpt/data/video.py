"""`videos:PATH`: the user's own clips, decoded lazily with PyAV (the `video` extra).

One subfolder per class gives a labelled set (class names = subfolder names, sorted); a flat folder gives an
unlabeled set (for pretraining). Each clip becomes a fixed number of frames, sampled uniformly over the whole
clip (the centre of F equal segments, as TSN samples) or every Nth frame from the start
(``data.frame_stride``), each converted and resized like a `folder:` image. Decoding stops after the last
frame needed and keeps only the sampled frames, so a long video never sits in memory.

The frame count comes from the container header where it has one (mp4, avi, gif) and otherwise from one
demux pass over the packets (webm, mkv), which reads but does not decode. A corrupt, empty, truncated or
unreadable file is one line naming it: the run stops, or with ``data.on_error=skip`` skips and counts it.
Reference: PyAV (github.com/PyAV-Org/PyAV); segment sampling after TSN (Wang et al. 2016).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from .base import DataError, DataInfo, ImageSet, Item, skip_or_raise
from .images import resize, scan_class_folder, to_mode, to_tensor

VIDEO_EXTS = {".mp4", ".m4v", ".mov", ".avi", ".webm", ".mkv", ".gif"}
SHORTFALL = 0.1  # a header may overstate the frame count a little; decoding less than 90% of it is truncation


def import_av():
    """The `av` module, or a one-line `DataError` with the install hint."""
    try:
        import av
    except ImportError:
        raise DataError("reading videos needs PyAV: pip install 'patchgpt[video]' (or: pip install av)") from None
    return av


def frame_count(path: str | Path) -> int:
    """Frames in the first video stream of `path` (header count, else a demux pass); `DataError` if unreadable."""
    av = import_av()
    try:
        with av.open(str(path)) as c:
            if not c.streams.video:
                raise DataError(f"{path}: no video stream (not a video, or truncated)")
            s = c.streams.video[0]
            if s.frames > 0:
                return int(s.frames)
            return sum(1 for p in c.demux(s) if p.size > 0)  # flush packets are empty
    except DataError:
        raise
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except Exception as e:  # noqa: BLE001 - PyAV raises many types (FFmpegError, OSError, EOFError, ...)
        raise DataError(f"{path}: cannot read video ({type(e).__name__}: {e})") from None


def sample_indices(n: int, frames: int, stride: int = 0) -> list[int]:
    """`frames` frame indices (non-decreasing) of a clip with `n` frames.

    ``stride=0``: the centre of each of `frames` equal segments (short clips repeat frames); ``stride=N``:
    0, N, 2N, ... from the start, repeating the last frame if the clip is too short."""
    if stride > 0:
        return [min(i * stride, n - 1) for i in range(frames)]
    return [min(n - 1, int((i + 0.5) * n / frames)) for i in range(frames)]


def read_video(path: str | Path, frames: int, size: int, channels: int = 3, policy: str = "crop",
               stride: int = 0, count: int | None = None) -> torch.Tensor:
    """Read `frames` sampled frames of a video file as (F, C, size, size) in [-1, 1].

    Args:
        path: the video file (any container and codec FFmpeg reads: mp4, avi, webm, mkv, gif, ...).
        frames: F, frames to sample; stride: 0 = uniform over the clip, N = every Nth frame from the start.
        size, channels, policy: each frame is converted and resized as a `folder:` image (crop|stretch|pad).
        count: the clip's frame count if already known (`frame_count`).
    Raises:
        DataError: one line naming the file when it is missing, corrupt, empty or truncated.
    """
    av = import_av()
    n = count if count is not None else frame_count(path)
    if n <= 0:
        raise DataError(f"{path}: the video has no frames")
    want = sample_indices(n, frames, stride)
    wanted, last = set(want), want[-1]
    got: dict[int, torch.Tensor] = {}
    decoded = 0
    try:
        with av.open(str(path)) as c:
            s = c.streams.video[0]
            s.thread_type = "AUTO"
            for i, frame in enumerate(c.decode(s)):
                decoded = i + 1
                if i in wanted:
                    got[i] = to_tensor(resize(to_mode(frame.to_image(), channels), size, policy))  # (C, S, S)
                if i >= last:
                    break
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except Exception as e:  # noqa: BLE001 - PyAV raises many types for damaged streams
        raise DataError(f"{path}: cannot decode video ({type(e).__name__}: {e})") from None
    if not got:
        raise DataError(f"{path}: no frame could be decoded (the file may be truncated or corrupt)")
    if decoded <= last and decoded < (1 - SHORTFALL) * n:
        raise DataError(f"{path}: truncated or corrupt: decoded {decoded} of {n} frames")
    out, prev = [], got[min(got)]
    for i in want:  # a header that overstated the count by a little: repeat the last decoded frame
        prev = got.get(i, prev)
        out.append(prev)
    return torch.stack(out)                                               # (F, C, S, S)


class VideoFolder(ImageSet):
    """Clips under `root` as items {"video": (F, C, S, S) in [-1, 1], "label"}, decoded on access.

    Files are checked while scanning (they open, have a video stream and frames); one that fails, then or
    later at decode time, stops the run with one line naming it (``on_error="stop"``) or is skipped and
    counted in ``info.skipped`` (``on_error="skip"``).
    """

    def __init__(self, root: str | Path, frames: int = 8, size: int = 32, channels: int = 3,
                 resize: str = "crop", stride: int = 0, on_error: str = "stop") -> None:
        import_av()
        root = Path(root).expanduser()
        classes, files = scan_class_folder(root, VIDEO_EXTS, "videos", "videos")
        self.frames, self.size, self.channels = frames, size, channels
        self.policy, self.stride, self.on_error = resize, stride, on_error
        skipped: list[str] = []
        self.files: list[tuple[Path, int, int]] = []   # (path, label, frame count)
        for p, c in files:
            try:
                n = frame_count(p)
                if n == 0:
                    raise DataError(f"{p}: the video has no frames")
                self.files.append((p, c, n))
            except DataError as e:
                if on_error == "stop":
                    raise DataError(f"{e}; set data.on_error=skip to skip such files") from None
                skipped.append(str(e))
        if skipped:
            print(f"patchgpt: skipped {len(skipped)} unreadable video(s) in {root}, e.g. {skipped[0]}",
                  file=sys.stderr)
        if not self.files:
            raise DataError(f"videos:{root}: every video was unreadable ({len(skipped)} skipped)")
        self.info = DataInfo(channels=channels, image_size=(size, size), classes=classes, skipped=skipped,
                             frames=frames)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> Item | None:
        path, label, n = self.files[i]
        try:
            clip = read_video(path, self.frames, self.size, self.channels, self.policy, self.stride, n)
            return {"video": clip, "label": label}
        except DataError as e:
            skip_or_raise(self.info, self.on_error, e)
            return None

    def labels(self) -> torch.Tensor:
        return torch.tensor([c for _, c, _ in self.files])
