"""Rebuild the example evaluation report in this folder (report.json, report.html).

No model weights can be shipped or downloaded here, so the "predictions" are not model output: they
are real clips from shared/media/video, looped to 60 s (ping-pong, with their audio), with known
defects applied so that every weight-free metric has something to find:

- suit_60s:   a slow warm colour cast (red +20 %, blue -20 % over the minute), a light blur, and the
              audio delayed by 3 frames (120 ms);
- blonde_60s: the ground truth re-encoded at low quality (CRF 35) — no drift, no delay.

Run from the repository root:  python docs/eval-example/make_example.py
FID, FVD and Sync-C/D show as "unavailable" unless their weights are installed (docs/evaluation.md).
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import numpy as np

from flashhead.eval import EvalConfig, evaluate, write_report
from flashhead.eval.drift import ping_pong
from flashhead.eval.video import load_clip
from flashhead.media.video_io import VideoWriter

HERE = Path(__file__).resolve().parent
MEDIA = HERE.parents[2] / "shared" / "media" / "video"
SECONDS, FPS, RATE = 60, 25, 16000
HOP = RATE // FPS  # audio samples per video frame


def looped(name: str) -> tuple[np.ndarray, np.ndarray]:
    """Frames and audio of a clip played forwards and backwards to 60 s; each frame keeps its own audio."""
    clip = load_clip(MEDIA / name)
    n = min(len(clip.frames), len(clip.audio) // HOP)
    segments = clip.audio[: n * HOP].reshape(n, HOP)
    order = list(ping_pong(np.arange(n), SECONDS * FPS))
    frames = np.stack([clip.frames[i] for i in order])
    # backwards frames get their audio segment backwards too, so the mouth and the sound stay together
    audio = np.concatenate([segments[i] if k % (2 * (n - 1)) < n else segments[i][::-1] for k, i in enumerate(order)])
    return frames, audio


def write(path: Path, frames: np.ndarray, audio: np.ndarray, crf: int = 18) -> None:
    with VideoWriter(path, fps=FPS, crf=crf, preset="veryfast", audio=audio, sample_rate=RATE) as writer:
        writer.write_frames(frames)


def main() -> None:
    import cv2

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    with tempfile.TemporaryDirectory() as tmp:
        pred, gt = Path(tmp) / "pred", Path(tmp) / "gt"
        pred.mkdir(), gt.mkdir()

        frames, audio = looped("talk_man_suit_6s.mp4")
        write(gt / "suit_60s.mp4", frames, audio)
        ramp = np.linspace(0, 1, len(frames))[:, None, None]
        warm = frames.astype(np.float32)
        warm[..., 0] *= 1 + 0.2 * ramp
        warm[..., 2] *= 1 - 0.2 * ramp
        warm = np.stack([cv2.GaussianBlur(f, (5, 5), 1.0) for f in np.clip(warm, 0, 255).astype(np.uint8)])
        delayed = np.concatenate([np.zeros(3 * HOP, np.float32), audio])[: len(audio)]
        write(pred / "suit_60s.mp4", warm, delayed)

        frames, audio = looped("talk_woman_blonde_8s.mp4")
        write(gt / "blonde_60s.mp4", frames, audio)
        write(pred / "blonde_60s.mp4", frames, audio, crf=35)
        del frames, warm

        report = evaluate(pred, gt, EvalConfig(csim_frames_per_video=24))
    report["pred_dir"] = "pred/ (made by docs/eval-example/make_example.py)"
    report["gt_dir"] = "gt/ (shared/media/video clips looped to 60 s)"
    for video in report["videos"]:
        video["pred"], video["gt"] = f"pred/{video['name']}.mp4", f"gt/{video['name']}.mp4"
    write_report(report, HERE / "report.json", HERE / "report.html")


if __name__ == "__main__":
    main()
