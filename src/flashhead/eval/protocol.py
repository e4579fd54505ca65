"""The evaluation protocols of the report's tables (SPEC §11.1), written down so they can be re-run.

The paper says only "we sampled 75 videos from the HDTF and VFHQ datasets" and reports FID, FVD,
Sync-C, Sync-D and FPS. Everything else below is our choice, made once and documented in
docs/evaluation.md, so numbers from different runs of this code are comparable with each other
(not necessarily with the paper's).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Protocol:
    name: str
    description: str
    n_videos: int  # videos taken from the ground-truth folder (all when fewer)
    max_frames: int  # frames per video evaluated, from the first frame (25 fps)
    fid_frame_stride: int  # every k-th frame of each video enters FID
    fvd_clips_per_video: int | None  # 16-frame non-overlapping clips per video (None: all that fit)
    csim_frames_per_video: int
    seed: int = 0  # for choosing n_videos among more

    def to_dict(self) -> dict:
        return asdict(self)


PROTOCOLS = {
    "hdtf": Protocol(
        name="hdtf",
        description=(
            "HDTF test videos, face-cropped to 512x512 at 25 fps; the first 250 frames (10 s) of 75 videos "
            "(chosen with seed 0 if the folder has more), reference = ground-truth frame 0, driving audio = "
            "the ground-truth audio"
        ),
        n_videos=75,
        max_frames=250,
        fid_frame_stride=5,
        fvd_clips_per_video=None,
        csim_frames_per_video=16,
    ),
    "vfhq": Protocol(
        name="vfhq",
        description=(
            "VFHQ test clips, face-cropped to 512x512 at 25 fps; the first 125 frames (5 s) of 75 clips "
            "(chosen with seed 0 if the folder has more, all if fewer), reference = ground-truth frame 0, "
            "driving audio = the ground-truth audio"
        ),
        n_videos=75,
        max_frames=125,
        fid_frame_stride=5,
        fvd_clips_per_video=None,
        csim_frames_per_video=16,
    ),
}


def select_videos(names: list[str], protocol: Protocol) -> list[str]:
    """The protocol's videos among `names`: all when there are at most n_videos, else a seeded sample (sorted)."""
    import numpy as np

    names = sorted(names)
    if len(names) <= protocol.n_videos:
        return names
    rng = np.random.default_rng(protocol.seed)
    return sorted(names[i] for i in rng.choice(len(names), protocol.n_videos, replace=False))
