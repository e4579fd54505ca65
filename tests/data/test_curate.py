"""Data curation on real clips plus constructed bad cases: each rejected by the right stage, the rest in
shards the Stage-1 trainer reads; byte-identical output after a SIGKILL; the same manifest through Ray."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soxr

from _util import MEDIA, REPO
from flashhead.data.curate import CurateConfig, curate
from flashhead.data.shards import list_shards, read_manifest
from flashhead.errors import ConfigError
from flashhead.media.image import load_image
from flashhead.media.video_io import VideoWriter, read_video

VIDEO = MEDIA / "video"
GOOD = sorted(p.name for p in VIDEO.glob("*.mp4"))
SPEECH = MEDIA / "audio" / "speech_en_radio31_16k_8s.wav"
# Small crops keep the test fast; every threshold stays at its default.
SETTINGS = ["face.crop_size=128"]


def _speech(seconds: float) -> np.ndarray:
    from flashhead.media.audio_io import load_audio

    audio, _ = load_audio(SPEECH, 16000)
    return audio[: int(seconds * 16000)]


def _write(path: Path, frames: np.ndarray, audio: np.ndarray | None, crf: int = 23) -> Path:
    with VideoWriter(path, crf=crf, preset="ultrafast") as writer:
        if audio is not None:
            writer.set_audio(audio, 16000)
        writer.write_frames(frames)
    return path


def _still_video(image: np.ndarray, seconds: float, zoom: float = 0.08) -> np.ndarray:
    """A slow zoom into a photo: a video with a little motion, as a real camera shows."""
    import cv2

    h, w = image.shape[:2]
    frames = []
    for i in range(round(seconds * 25)):
        s = 1 - zoom * i / (seconds * 25)
        ch, cw = round(h * s), round(w * s)
        y, x = (h - ch) // 2, (w - cw) // 2
        frames.append(cv2.resize(image[y : y + ch, x : x + cw], (w, h), interpolation=cv2.INTER_AREA))
    return np.stack(frames)


def make_bad_cases(folder: Path) -> dict[str, str]:
    """Write the bad inputs into `folder`; returns {file name: the stage that must reject it}."""
    a, _, (wa, ra) = read_video(VIDEO / "talk_woman_blonde_8s.mp4")
    b, _, (wb, rb) = read_video(VIDEO / "talk_man_suit_6s.mp4")
    wa, wb = soxr.resample(wa, ra, 16000), soxr.resample(wb, rb, 16000)
    _write(folder / "hard_cut.mp4", np.concatenate([a[:75], b[:75]]), np.concatenate([wa[:48000], wb[:48000]]))
    landscape = np.asarray(load_image(MEDIA / "portraits" / "noface_landscape.jpg"))[:426, :426]
    _write(folder / "no_face.mp4", _still_video(landscape, 6.0), _speech(6.0))
    hand = np.asarray(load_image(MEDIA / "portraits" / "woman_hand_on_chin_600x900.jpg"))[::2, ::2]  # 300x450
    _write(folder / "hand_over_mouth.mp4", _still_video(hand, 6.0), _speech(6.0))
    shutil.copy(MEDIA / "bad" / "truncated_no_moov.mp4", folder / "corrupt.mp4")
    m, _, _ = read_video(VIDEO / "talk_man_map_bg_5s.mp4")
    _write(folder / "no_audio.mp4", m, None)
    shutil.copy(VIDEO / "talk_man_suit_6s.mp4", folder / "zz_exact_copy.mp4")
    c, _, (wc, rc) = read_video(VIDEO / "talk_woman_blue_bg_6s.mp4")
    _write(folder / "zz_reencoded_copy.mp4", c[:, ::2, ::2].copy(), soxr.resample(wc, rc, 16000), crf=32)
    return {
        "hard_cut.mp4": "scenes",
        "no_face.mp4": "face",
        "hand_over_mouth.mp4": "occlusion",
        "corrupt.mp4": "probe",
        "no_audio.mp4": "probe",
        "zz_exact_copy.mp4": "dedup",
        "zz_reencoded_copy.mp4": "dedup",
    }


@pytest.fixture(scope="module")
def tiny_wav2vec(tmp_path_factory) -> Path:
    """A tiny random wav2vec2 saved as a model folder (no real weights can be downloaded here)."""
    import torch
    from transformers import Wav2Vec2Config, Wav2Vec2Model

    folder = tmp_path_factory.mktemp("wav2vec")
    torch.manual_seed(0)
    config = Wav2Vec2Config(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                            conv_dim=(16, 16, 16, 16, 16, 16, 16), num_conv_pos_embeddings=16)  # fmt: skip
    Wav2Vec2Model(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def curated(tmp_path_factory, tiny_wav2vec):
    inputs = tmp_path_factory.mktemp("inputs")
    for name in GOOD:
        shutil.copy(VIDEO / name, inputs / name)
    expected = make_bad_cases(inputs)
    out = tmp_path_factory.mktemp("curated")
    cfg = CurateConfig.from_file(None, [*SETTINGS, f"features.wav2vec={tiny_wav2vec}"])
    report = curate([inputs], out, cfg, workers=2, progress=False)
    return out, report, expected


def test_bad_cases_are_rejected_by_the_right_stage_and_good_clips_kept(curated):
    out, report, expected = curated
    by_input: dict[str, list[dict]] = {}
    for r in report["rejected"]:
        by_input.setdefault(r["input"], []).append(r)
    for name, stage in expected.items():
        assert name in by_input, f"{name} was not rejected"
        assert {r["stage"] for r in by_input[name]} == {stage}, (name, by_input[name])
    reasons = {name: " ".join(r["reason"] for r in rows) for name, rows in by_input.items()}
    assert "cuts at 3.00 s" in reasons["hard_cut.mp4"]
    assert "no face" in reasons["no_face.mp4"]
    assert "hand over the face" in reasons["hand_over_mouth.mp4"]
    assert "no audio track" in reasons["no_audio.mp4"]
    assert "damaged MP4" in reasons["corrupt.mp4"]
    assert "exact copy of talk_man_suit_6s.mp4" in reasons["zz_exact_copy.mp4"]
    assert "re-encoded copy of talk_woman_blue_bg_6s.mp4" in reasons["zz_reencoded_copy.mp4"]
    assert set(by_input) == set(expected), "a good clip was rejected"

    kept = {k["input"] for k in report["kept"]}
    assert kept == set(GOOD)
    manifest = read_manifest(out)
    assert sorted(manifest["source"]) == GOOD
    assert (manifest["fps"] == 25).all() and (manifest["width"] == 128).all() and (manifest["height"] == 128).all()
    # 25 fps over the whole segment: 5.0 s -> 125 frames, 8 s -> 200
    frames = dict(zip(manifest["source"], manifest["num_frames"], strict=True))
    assert frames["talk_man_map_bg_5s.mp4"] == 125 and frames["talk_woman_blonde_8s.mp4"] == 200

    # the funnel: 13 files in, 2 fail probe, 2 dedup; every stage's out is the next one's in
    funnel = {row["stage"]: row for row in report["funnel"]}
    assert (funnel["probe"]["in"], funnel["probe"]["out"], funnel["dedup"]["out"]) == (len(GOOD) + 7, len(GOOD) + 5,
                                                                                      len(GOOD) + 3)  # fmt: skip
    assert funnel["shards"]["out"] == len(GOOD)
    rows = report["funnel"][2:]
    assert all(a["out"] == b["in"] for a, b in zip(rows[:-1], rows[1:], strict=True))
    skipped = {s["stage"]: s["reason"] for s in report["skipped_stages"]}
    assert set(skipped) == {"sync"} and "syncnet" in skipped["sync"].lower()
    assert report["time"]["clip_seconds_per_core_second"] > 0

    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk["rejected"] == report["rejected"]
    page = (out / "report.html").read_text()
    assert "data:image/png;base64," in page
    for name in expected:
        assert f"<td>{name}</td>" in page
    assert not list(out.glob("*.tmp")) and not list(out.glob(".*.tmp"))


def test_curated_shards_feed_the_stage1_trainer(curated):
    from flashhead.train.data import SampleSpec, Stage1Dataset, index_clips

    out, _, _ = curated
    spec = SampleSpec(height=128, width=128, vae_stride=(4, 8, 8))
    clips = index_clips([out], "train", spec)
    assert len(clips) == len(GOOD)
    dataset = Stage1Dataset(clips, spec, seed=0)
    sample = dataset.sample_at(0)
    assert sample["video"].shape[0] == 33
    # precomputed wav2vec features (tiny model: 2 layers x 16) are used instead of the raw audio
    assert sample["audio_features"].shape == (35, 2, 16) and "audio" not in sample
    assert np.isfinite(sample["audio_features"].numpy()).all()
    assert float(sample["face_mask"].sum()) > 0  # from the stored per-frame mouth boxes


SUBSET = ["talk_man_map_bg_5s.mp4", "talk_man_suit_6s.mp4"]


@pytest.fixture(scope="module")
def subset(tmp_path_factory) -> tuple[Path, Path]:
    """Two inputs and their uninterrupted curation (in this process)."""
    inputs = tmp_path_factory.mktemp("subset")
    for name in SUBSET:
        shutil.copy(VIDEO / name, inputs / name)
    out = tmp_path_factory.mktemp("subset_out")
    curate([inputs], out, CurateConfig.from_file(None, SETTINGS), workers=1, progress=False)
    return inputs, out


def _cli(inputs: Path, out: Path) -> list[str]:
    sets = [a for s in SETTINGS for a in ("--set", s)]
    return [sys.executable, "-m", "flashhead.cli", "data", "curate", str(inputs), "--out", str(out), "--workers", "1",
            *sets]  # fmt: skip


def _env() -> dict[str, str]:
    return os.environ | {"PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}


def test_sigkill_midway_then_resume_gives_byte_identical_shards(subset, tmp_path):
    inputs, reference = subset
    out = tmp_path / "out"
    proc = subprocess.Popen(_cli(inputs, out), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)  # fmt: skip
    items = out / ".work" / "items"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if items.is_dir() and any(p.is_dir() and not p.name.startswith(".") for p in items.iterdir()):
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the run finished before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done = {p.name: p.stat().st_mtime_ns for p in items.iterdir() if not p.name.startswith(".")}
    assert 1 <= len(done) < len(SUBSET) and not (out / "manifest.parquet").exists()

    resumed = subprocess.run(_cli(inputs, out), env=_env(), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    # finished work was kept, not redone
    assert all((items / name).stat().st_mtime_ns == mtime for name, mtime in done.items())
    shards = [p.name for p in list_shards(reference)]
    assert shards and [p.name for p in list_shards(out)] == shards
    for name in [*shards, "manifest.parquet"]:
        assert (out / name).read_bytes() == (reference / name).read_bytes(), name
    assert not [p for p in items.iterdir() if p.name.startswith(".")], "temporary folders left behind"


def test_local_ray_gives_the_same_manifest(subset, tmp_path):
    pytest.importorskip("ray")
    inputs, reference = subset
    out = tmp_path / "ray_out"
    curate([inputs], out, CurateConfig.from_file(None, SETTINGS), workers=2, ray_address="local", progress=False)
    assert read_manifest(out).equals(read_manifest(reference))
    for shard in list_shards(reference):
        assert (out / shard.name).read_bytes() == shard.read_bytes()


def test_cached_work_from_other_settings_is_refused(subset, tmp_path):
    inputs, reference = subset
    with pytest.raises(ConfigError, match="other settings"):
        curate([inputs], reference, CurateConfig.from_file(None, ["face.crop_size=256"]), progress=False)


def test_sync_stage_scores_with_user_weights_and_applies_its_thresholds(tmp_path):
    """No real SyncNet weights exist here: random ones in the real file format exercise the whole stage."""
    import torch

    from flashhead.data.curate.config import FaceSection, SyncSection
    from flashhead.data.curate.face_track import Rejected, crop_frames, track_face
    from flashhead.data.curate.sync import check_sync, syncnet_unavailable
    from flashhead.eval.syncnet import SyncNet

    assert "syncnet" in syncnet_unavailable(SyncSection(weights=str(tmp_path / "missing.model"))).lower()
    torch.manual_seed(0)
    weights = tmp_path / "syncnet_v2.model"
    torch.save(SyncNet().state_dict(), weights)
    lenient = SyncSection(weights=str(weights), min_confidence=-1e9, max_distance=1e9, max_offset=99)
    assert syncnet_unavailable(lenient) is None

    frames, _, (audio, rate) = read_video(VIDEO / "talk_man_map_bg_5s.mp4", max_frames=20)
    audio = soxr.resample(audio, rate, 16000)[: len(frames) * 640]
    crops, boxes = crop_frames(frames, track := track_face(frames, FaceSection(), 25, {}), 128)
    assert track.face_width > 100
    scores = check_sync(crops, boxes, audio, lenient)
    assert set(scores) == {"lse_c", "lse_d", "av_offset"} and np.isfinite(list(scores.values())).all()
    strict = SyncSection(weights=str(weights), min_confidence=scores["lse_c"] + 1)
    with pytest.raises(Rejected, match="LSE-C"):
        check_sync(crops, boxes, audio, strict)


def test_scene_detection_leaves_ffmpeg_quiet(capfd):
    """PySceneDetect gives FFmpeg its own (INFO) logging back; after detect_cuts, encoding a clip prints no x264
    statistics (they filled the curation's output, one block per clip)."""
    import av.logging

    from flashhead.data.curate.config import ScenesSection
    from flashhead.data.curate.scenes import detect_cuts
    from flashhead.data.shards import encode_mp4

    before = av.logging.get_level()
    av.logging.set_level(av.logging.ERROR)  # as the curation's workers run
    try:
        cuts, duration = detect_cuts(VIDEO / "talk_man_map_bg_5s.mp4", ScenesSection())
        encode_mp4(np.zeros((3, 64, 64, 3), np.uint8))
    finally:
        av.logging.set_level(before)
    assert duration == pytest.approx(5.0, abs=0.2) and cuts == []
    assert "libx264" not in capfd.readouterr().err


def test_an_output_that_is_a_file_is_refused_before_any_work(tmp_path):
    (tmp_path / "out").write_text("a file")
    with pytest.raises(ConfigError, match="a file, not a folder"):  # was a FileExistsError traceback
        curate([VIDEO / "talk_man_map_bg_5s.mp4"], tmp_path / "out", progress=False)
    assert (tmp_path / "out").read_text() == "a file"
