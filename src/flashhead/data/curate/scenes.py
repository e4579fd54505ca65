"""Slicing: PySceneDetect's adaptive detector finds the cuts; scenes become segments of 5-50 s [PAPER].

A scene shorter than `min_seconds` is dropped; one longer than `max_seconds` is split into the fewest
equal parts that fit (each then lies in [max/2, max], so in range because max >= 2 min).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from flashhead.data.curate.config import ScenesSection
from flashhead.errors import MediaError


@dataclass(frozen=True)
class Segment:
    start: float  # seconds from the start of the input
    end: float

    @property
    def duration(self) -> float:
        return self.end - self.start


def detect_cuts(path: str | Path, cfg: ScenesSection) -> tuple[list[float], float]:
    """(times of the cuts in seconds, video duration in seconds) of one input."""
    import av.logging
    from scenedetect import AdaptiveDetector, SceneManager, open_video
    from scenedetect.video_stream import VideoOpenFailure

    # PySceneDetect's PyAV backend hands FFmpeg's logging back to FFmpeg (which prints at INFO: x264's statistics for
    # every clip encoded afterwards); keep that to errors while it decodes, and put PyAV's own handler back after.
    level = av.logging.get_level()
    av.logging.set_libav_level(av.logging.ERROR)
    try:
        try:
            video = open_video(str(path), backend="pyav")
        except (VideoOpenFailure, OSError, ValueError) as e:
            raise MediaError(f"{Path(path).name}: PySceneDetect cannot open it ({e})") from None
        manager = SceneManager()
        manager.auto_downscale = True
        manager.add_detector(AdaptiveDetector(adaptive_threshold=cfg.adaptive_threshold))
        manager.detect_scenes(video, show_progress=False)
        scenes = manager.get_scene_list()
    finally:
        if level is not None:
            av.logging.set_level(level)
    duration = video.duration.seconds if video.duration is not None else video.position.seconds
    return [round(start.seconds, 4) for start, _ in scenes[1:]], float(duration)


def segments_from_cuts(cuts: list[float], duration: float, cfg: ScenesSection) -> tuple[list[Segment], list[Segment]]:
    """(kept segments, dropped scenes) for the scenes between `cuts`."""
    bounds = [0.0, *cuts, duration]
    kept, dropped = [], []
    for start, end in zip(bounds[:-1], bounds[1:], strict=True):
        length = end - start
        if length < cfg.min_seconds:
            dropped.append(Segment(start, end))
            continue
        parts = math.ceil(length / cfg.max_seconds)
        step = length / parts
        kept += [Segment(round(start + i * step, 4), round(start + (i + 1) * step, 4)) for i in range(parts)]
    return kept, dropped
