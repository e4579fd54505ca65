"""Normalisation to 25 fps video and 16 kHz mono audio [PAPER: FFmpeg to 25 fps].

Frames are resampled by nearest timestamp, as FFmpeg's `fps` filter does: output frame k of the input
timeline is the source frame shown at k / fps. One decoding pass serves every segment of an input, and
only the segment being filled is held in memory.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import av
import numpy as np

from flashhead.data.curate.scenes import Segment
from flashhead.errors import MediaError
from flashhead.media.audio_io import open_media


def frame_range(segment: Segment, fps: int) -> tuple[int, int]:
    """[first, end) output frames of a segment on the input's fps timeline."""
    return round(segment.start * fps), round(segment.end * fps)


def resampled_frames(path: str | Path, fps: int) -> Iterator[tuple[int, np.ndarray]]:
    """(k, RGB frame shown at k / fps) for k = 0, 1, ... up to the end of the video."""
    name = Path(path).name
    with open_media(path, MediaError, "video") as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        start = float(stream.start_time * stream.time_base) if stream.start_time is not None else 0.0
        rate = float(stream.average_rate or stream.guessed_rate or fps)
        k, previous = 0, None  # previous: (time, frame)
        try:
            for i, frame in enumerate(container.decode(stream)):
                t = float(frame.time) - start if frame.time is not None else i / rate
                image = frame.to_ndarray(format="rgb24")
                # Emit every output time that lies nearer the previous frame than this one.
                while previous is not None and k / fps < (previous[0] + t) / 2:
                    yield k, previous[1]
                    k += 1
                previous = (t, image)
        except av.FFmpegError as e:
            raise MediaError(f"{name}: corrupt video data ({getattr(e, 'strerror', None) or e})") from None
        if previous is not None:
            while k / fps < previous[0] + 1 / rate - 1e-9:
                yield k, previous[1]
                k += 1


def segment_frames(path: str | Path, segments: list[Segment], fps: int) -> Iterator[tuple[int, np.ndarray]]:
    """(segment index, (T, H, W, 3) frames) for each segment (in time order), from one decoding pass."""
    ranges = [frame_range(s, fps) for s in segments]
    order = sorted(range(len(segments)), key=lambda i: ranges[i])
    pos, buffer = 0, []
    for k, image in resampled_frames(path, fps):
        while pos < len(order) and k >= ranges[order[pos]][1]:
            yield order[pos], np.stack(buffer) if buffer else np.zeros((0, 1, 1, 3), np.uint8)
            pos, buffer = pos + 1, []
        if pos == len(order):
            return
        if k >= ranges[order[pos]][0]:
            buffer.append(image)
    while pos < len(order):  # the video ended inside (or before) these segments
        yield order[pos], np.stack(buffer) if buffer else np.zeros((0, 1, 1, 3), np.uint8)
        pos, buffer = pos + 1, []


def segment_audio(waveform: np.ndarray, first_frame: int, num_frames: int, fps: int, sample_rate: int) -> np.ndarray:
    """The audio under frames [first_frame, first_frame + num_frames), zero-padded where it runs out."""
    per_frame = sample_rate // fps
    start, length = first_frame * per_frame, num_frames * per_frame
    out = np.zeros(length, np.float32)
    piece = waveform[start : start + length]
    out[: len(piece)] = piece
    return out
