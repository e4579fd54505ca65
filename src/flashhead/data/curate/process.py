"""The work of one input, as a worker runs it: probe (for dedup), then every stage after dedup.

Both functions are pure (they read the input file and return results; nothing is written), so any
executor can run them — a local process pool or Ray — and the driver alone persists what comes back.
"""

from __future__ import annotations

import hashlib
import logging
import re
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from flashhead.data.curate import attributes as attrs
from flashhead.data.curate.config import CurateConfig
from flashhead.data.curate.dedup import Fingerprint, fingerprint
from flashhead.data.curate.face_track import Rejected, crop_frames, mouth_boxes, track_face
from flashhead.data.curate.filters import check_faceless, check_motion, check_occlusion
from flashhead.data.curate.normalize import frame_range, segment_audio, segment_frames
from flashhead.data.curate.scenes import Segment, detect_cuts, segments_from_cuts
from flashhead.data.shards import Clip, VideoCodec, encode_clip
from flashhead.errors import FlashHeadError

log = logging.getLogger(__name__)

# Funnel order. probe/dedup/scenes count input files; the stages after them count segments (clips).
STAGES = (
    "probe", "dedup", "scenes", "normalize", "face", "motion", "faceless", "occlusion", "sync", "features",
    "attributes", "shards",
)  # fmt: skip
FILE_STAGES = ("probe", "dedup", "scenes")


@dataclass
class Outcome:
    """What happened to one input (file stages) or one segment: kept (stage "shards") or rejected."""

    input: str  # file name
    stage: str
    reason: str | None = None  # None: kept
    segment: int | None = None
    start: float = 0.0
    end: float = 0.0
    key: str | None = None
    info: dict[str, Any] = field(default_factory=dict)  # attributes and filter scores

    @property
    def seconds(self) -> float:
        return self.end - self.start


@dataclass
class ProbeResult:
    path: str
    fingerprint: Fingerprint | None
    error: str | None
    seconds: float  # time spent


@dataclass
class ItemResult:
    path: str
    duration: float
    outcomes: list[Outcome]
    clips: list[Clip]  # kept clips, video already encoded
    timings: dict[str, float]  # seconds per stage


def worker_setup() -> None:
    """One thread per worker for torch and OpenCV: the pool supplies the parallelism, and results must not
    depend on thread counts (float reductions)."""
    import av.logging
    import cv2
    import torch

    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    av.logging.set_level(av.logging.ERROR)  # x264 prints its statistics for every clip otherwise
    logging.getLogger("flashhead").setLevel(logging.ERROR)


def probe_input(path: str, cfg: CurateConfig) -> ProbeResult:
    start = time.process_time()
    try:
        return ProbeResult(path, fingerprint(path, cfg.dedup), None, time.process_time() - start)
    except FlashHeadError as e:
        return ProbeResult(path, None, str(e).removeprefix(f"{path}: ").removeprefix(f"{Path(path).name}: "),
                           time.process_time() - start)  # fmt: skip


def clip_key(path: str, md5: str, segment: int) -> str:
    stem = re.sub(r"[^A-Za-z0-9_-]+", "_", Path(path).stem)[:40].strip("_") or "clip"
    return f"{stem}-{md5[:8]}-{segment:03d}"


def _split(identity: str, val_fraction: float) -> str:
    unit = int.from_bytes(hashlib.sha256(identity.encode()).digest()[:8], "big") / 2**64
    return "val" if unit < val_fraction else "train"


class _Timer:
    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)

    def add(self, stage: str, since: float) -> float:
        now = time.process_time()
        self.seconds[stage] += now - since
        return now


def curate_input(path: str, fp: Fingerprint, cfg: CurateConfig, skip: dict[str, str]) -> ItemResult:
    """Scenes, normalisation and every per-clip stage of one (probed, not duplicate) input."""
    from flashhead.media.audio_io import load_audio

    name = Path(path).name
    timer, outcomes, clips = _Timer(), [], []
    t = time.process_time()
    try:
        cuts, duration = detect_cuts(path, cfg.scenes)
    except FlashHeadError as e:
        t = timer.add("scenes", t)
        return ItemResult(path, fp.duration, [Outcome(name, "scenes", str(e), end=fp.duration)], [], timer.seconds)
    kept, dropped = segments_from_cuts(cuts, duration, cfg.scenes)
    cut_text = ", ".join(f"{c:.2f}" for c in cuts)
    for s in dropped:
        reason = f"scene {s.start:.2f}-{s.end:.2f} s is shorter than {cfg.scenes.min_seconds:g} s"
        outcomes.append(Outcome(name, "scenes", reason + (f" (cuts at {cut_text} s)" if cuts else ""),
                                start=s.start, end=s.end))  # fmt: skip
    t = timer.add("scenes", t)
    if not kept:
        return ItemResult(path, duration, outcomes, clips, timer.seconds)

    fps, rate = cfg.normalize.fps, cfg.normalize.sample_rate
    try:
        waveform, _ = load_audio(path, rate, allow_partial=True)
    except FlashHeadError as e:
        waveform, audio_error = None, str(e).removeprefix(f"{path}: ")
    t = timer.add("normalize", t)
    segments = segment_frames(path, kept, fps)
    while True:
        try:
            index, frames = next(segments)
        except StopIteration:
            break
        except FlashHeadError as e:  # the video breaks off: the segments not yet seen are lost
            done = {o.segment for o in outcomes}
            for i, s in enumerate(kept):
                if i not in done:
                    outcomes.append(Outcome(name, "normalize", str(e), i, s.start, s.end))
            break
        t = timer.add("normalize", t)
        segment = kept[index]
        outcome = Outcome(name, "normalize", None, index, segment.start, segment.end, clip_key(path, fp.md5, index))
        try:
            if waveform is None:
                raise Rejected(audio_error)
            clip = _curate_segment(frames, waveform, segment, outcome, fp, cfg, skip, timer)
            clips.append(clip)
            outcome.stage = "shards"
        except Rejected as e:
            outcome.reason = str(e)
        except Exception as e:  # one broken clip must not stop a run over thousands of hours
            log.exception("%s segment %d failed in stage %s", name, index, outcome.stage)
            outcome.reason = f"internal error: {type(e).__name__}: {e}"
        outcomes.append(outcome)
        t = time.process_time()
    outcomes.sort(key=lambda o: (o.start, o.segment if o.segment is not None else -1))
    return ItemResult(path, duration, outcomes, clips, dict(timer.seconds))


def _curate_segment(
    frames: np.ndarray,
    waveform: np.ndarray,
    segment: Segment,
    outcome: Outcome,
    fp: Fingerprint,
    cfg: CurateConfig,
    skip: dict[str, str],
    timer: _Timer,
) -> Clip:
    fps, rate = cfg.normalize.fps, cfg.normalize.sample_rate
    t = time.process_time()
    first, end = frame_range(segment, fps)
    if len(frames) < min(end - first, cfg.scenes.min_seconds * fps):
        raise Rejected(f"video ends after {len(frames) / fps:.2f} s of this {segment.duration:.2f} s segment")
    missing = (first + len(frames)) / fps - len(waveform) / rate
    if missing > cfg.normalize.max_av_gap:
        raise Rejected(f"audio ends {missing:.2f} s before the video")
    audio = segment_audio(waveform, first, len(frames), fps, rate)

    t = timer.add("normalize", t)
    outcome.stage = "face"
    cache: dict = {}
    track = track_face(frames, cfg.face, fps, cache)
    crops, boxes = crop_frames(frames, track, cfg.face.crop_size)
    t = timer.add("face", t)

    outcome.stage = "motion"
    outcome.info.update(check_motion(crops, cfg.motion, fps))
    t = timer.add("motion", t)
    outcome.stage = "faceless"
    outcome.info["faceless"] = check_faceless(frames, cache, cfg.faceless, fps)
    del frames  # the full-size frames are no longer needed
    t = timer.add("faceless", t)
    outcome.stage = "occlusion"
    outcome.info["occluded"] = check_occlusion(crops, boxes, cfg.occlusion, fps)
    t = timer.add("occlusion", t)
    outcome.stage = "sync"
    if "sync" not in skip:
        from flashhead.data.curate.sync import check_sync

        outcome.info.update(check_sync(crops, boxes, audio, cfg.sync))
    t = timer.add("sync", t)

    identity = fp.source_id or fp.md5[:12]
    meta = {
        "source": outcome.input,
        "identity": identity,
        "split": _split(identity, cfg.output.val_fraction),
        "segment_start": segment.start,
        "segment_end": segment.end,
        "crop_box": list(track.crop),
    }
    clip = Clip(outcome.key, crops, audio, rate, meta, {"face_box": boxes, "mouth_box": mouth_boxes(boxes)})
    outcome.stage = "features"
    if "features" not in skip:
        from flashhead.data.curate.features import clip_extras

        clip.extras.update(clip_extras(clip, cfg.features))
    t = timer.add("features", t)
    outcome.stage = "attributes"
    outcome.info.update(attrs.attributes(crops, track.face_width, track.crop[2] - track.crop[0], fps))
    meta.update(outcome.info)
    t = timer.add("attributes", t)
    outcome.stage = "shards"
    encoded = encode_clip(clip, VideoCodec(crf=cfg.output.crf, preset=cfg.output.preset))
    timer.add("shards", t)
    return encoded
