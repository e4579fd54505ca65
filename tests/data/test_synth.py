"""Synthetic talking heads: real espeak-ng speech, mouths measured on the rendered pixels."""

from __future__ import annotations

import ctypes.util
import shutil
import time

import numpy as np
import pytest

from _util import MEDIA
from flashhead.data.visemes import (
    LANGUAGES,
    Phone,
    Voice,
    mouth_tracks,
    phoneme_visemes,
    random_sentence,
    speak,
    speech_track,
)
from flashhead.eval.mouth import LUMA, dark_gap, frame_energy, pearson

pytestmark = pytest.mark.skipif(
    ctypes.util.find_library("espeak-ng") is None, reason="needs espeak-ng: apt-get install -y espeak-ng"
)
PORTRAIT = MEDIA / "portraits" / "cc0_woman_dark_skin_frontal.jpg"
FPS, SR = 25, 16000


def _luma(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float32) @ LUMA


def silent_frames(meta: dict, n: int, margin: float = 0.12) -> np.ndarray:
    """Frames at least `margin` seconds away from any spoken sentence."""
    t = (np.arange(n) + 0.5) / FPS
    quiet = np.ones(n, bool)
    for a, b in meta["speech_spans"]:
        quiet &= (t < a - margin) | (t > b + margin)
    return quiet


# ---------------------------------------------------------------- speech and visemes


def test_visemes_of_espeak_phonemes():
    assert phoneme_visemes("aI") == ["AA", "IH"]
    assert phoneme_visemes("p") == phoneme_visemes("m") == ["PP"]
    assert phoneme_visemes("'O:") == ["OH"]
    assert phoneme_visemes("tS") == ["CH"]
    assert phoneme_visemes("_:") == ["sil"]
    tracks = mouth_tracks([Phone("A:", 0.2, 0.5), Phone("m", 0.5, 0.6)], num_frames=30)
    assert tracks.open[:3].max() == 0.0 and tracks.open[-5:].max() == 0.0  # silence before and after
    assert tracks.open[9] > 0.8  # mid-vowel, 0.36 s
    assert tracks.open[9] > tracks.open[14]  # the /m/ closes the lips again


def test_speech_is_real_16k_and_varied():
    rng = np.random.default_rng(0)
    assert {random_sentence(rng, lang) for lang in LANGUAGES}.__len__() == len(LANGUAGES)
    a = speak("Hello there, how are you today?", Voice("en", "m1", 160, 40, 50))
    b = speak("Hello there, how are you today?", Voice("en", "f3", 200, 70, 50))
    for utt in (a, b):
        assert utt.audio.dtype == np.float32 and np.abs(utt.audio).max() <= 1.0
        assert np.sqrt(np.mean(utt.audio**2)) > 0.02
        assert len(utt.phones) > 10 and utt.phones[-1].end <= len(utt.audio) / SR + 1e-3
    assert len(b.audio) < len(a.audio)  # a faster voice speaks the same text in less time
    track = speech_track(np.random.default_rng(1), 3.0, Voice("de", "m3"), [1, 2, 3])
    assert len(track.audio) == 3 * SR and track.texts and track.phones[-1].start < 3.0


# ---------------------------------------------------------------- procedural faces


@pytest.fixture(scope="module")
def procedural_clips():
    from flashhead.data.synth_procedural import ProceduralConfig, generate_clip

    cfg = ProceduralConfig(size=128, long_silence_prob=1.0)  # every clip opens with a long silence
    start = time.perf_counter()
    clips = [generate_clip(f"p{i}", i, 100 + i, [10 * i + j for j in range(6)], 4.0, config=cfg) for i in range(3)]
    return clips, time.perf_counter() - start


def test_procedural_clips_are_fast_and_well_formed(procedural_clips):
    clips, seconds = procedural_clips
    assert seconds < 6.0, f"3 clips of 4 s took {seconds:.1f} s"
    for clip in clips:
        assert clip.frames.shape == (100, 128, 128, 3) and clip.frames.dtype == np.uint8
        assert clip.sample_rate == SR and len(clip.audio) == 4 * SR
        assert len(clip.meta["mouth_open"]) == 100 and clip.extras["mouth_box"].shape == (100, 4)
        assert clip.meta["source"] == "synth-procedural" and clip.meta["text"]
        assert np.sqrt(np.mean(clip.audio**2)) > 0.01
    assert len({c.meta["identity"] for c in clips}) == 3
    assert not np.array_equal(clips[0].frames[0], clips[1].frames[0])


def test_procedural_mouth_follows_truth_and_audio():
    from flashhead.data.synth_procedural import ProceduralConfig, generate_clip

    # 256 px: at 128 px the mouth gap is a few pixels and this pixel count is too coarse (r ≈ 0.85 there).
    cfg = ProceduralConfig(size=256, long_silence_prob=1.0)
    for i in range(2):
        clip = generate_clip(f"p{i}", 20 + i, 200 + i, [30 * i + j for j in range(6)], 3.0, config=cfg)
        n = len(clip.frames)
        truth = np.array(clip.meta["mouth_open"])
        seen = dark_gap(clip.frames, clip.extras["mouth_box"])
        assert pearson(seen, truth) >= 0.8, clip.key
        assert pearson(seen, frame_energy(clip.audio, n)) >= 0.4, clip.key
        quiet = silent_frames(clip.meta, n)
        assert quiet.sum() >= 5
        assert truth[quiet].max() == 0.0
        assert seen[quiet].max() < 1.0  # less than a pixel of dark gap: the lips are closed
        assert seen[truth > 0.5].mean() > 6.0


def test_procedural_is_deterministic_at_other_sizes():
    from flashhead.data.synth_procedural import ProceduralConfig, generate_clip

    cfg = ProceduralConfig(size=256)
    a = generate_clip("x", 7, 3, [5, 6], 1.0, config=cfg)
    b = generate_clip("x", 7, 3, [5, 6], 1.0, config=cfg)
    np.testing.assert_array_equal(a.frames, b.frames)
    np.testing.assert_array_equal(a.audio, b.audio)
    assert a.meta == b.meta and a.frames.shape == (25, 256, 256, 3)
    big = generate_clip("x", 7, 3, [5, 6], 0.2, config=ProceduralConfig(size=512))
    assert big.frames.shape == (5, 512, 512, 3)


# ---------------------------------------------------------------- portraits


def _ssim(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    import cv2

    a, b = _luma(a).astype(np.float64), _luma(b).astype(np.float64)
    blur = lambda x: cv2.GaussianBlur(x, (7, 7), 1.5)  # noqa: E731
    ma, mb = blur(a), blur(b)
    va, vb, cov = blur(a * a) - ma**2, blur(b * b) - mb**2, blur(a * b) - ma * mb
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    return ((2 * ma * mb + c1) * (2 * cov + c2)) / ((ma**2 + mb**2 + c1) * (va + vb + c2))


@pytest.fixture(scope="module")
def portrait_clip():
    pytest.importorskip("mediapipe")
    if not PORTRAIT.exists():
        pytest.skip(f"{PORTRAIT} not present")
    from flashhead.data.synth_portrait import PortraitConfig, animator_for, generate_clip

    cfg = PortraitConfig(size=128, long_silence_prob=1.0)
    clip = generate_clip("q", 3, PORTRAIT, [11, 12, 13, 14], 4.0, config=cfg)
    return clip, animator_for(PORTRAIT, cfg)


def test_portrait_keeps_identity(portrait_clip):
    clip, animator = portrait_clip
    still = animator.still()
    frame0 = clip.frames[0][:, ::-1] if clip.meta["flipped"] else clip.frames[0]
    # The face without its mouth: landmark hull minus the mouth box.
    import cv2

    face = np.zeros(still.shape[:2], np.uint8)
    cv2.fillConvexPoly(face, cv2.convexHull(animator.lm.astype(np.int32)), 1)
    x0, y0, x1, y1 = animator._box.min(0).astype(int).tolist() + animator._box.max(0).astype(int).tolist()
    face[y0:y1, x0:x1] = 0
    ssim = _ssim(frame0, still)[face > 0].mean()
    assert ssim >= 0.8, ssim
    assert clip.meta["identity"] == "portrait-" + PORTRAIT.stem and clip.meta["source"] == "synth-portrait"


def test_portrait_mouth_follows_truth(portrait_clip):
    clip, animator = portrait_clip
    n = len(clip.frames)
    truth = np.array(clip.meta["mouth_open"])
    seen = dark_gap(clip.frames, clip.extras["mouth_box"])
    assert pearson(seen, truth) >= 0.8
    assert pearson(seen, frame_energy(clip.audio, n)) >= 0.4
    quiet = silent_frames(clip.meta, n)
    assert quiet.sum() >= 5 and truth[quiet].max() == 0.0 and seen[quiet].max() < 1.0
    # The mouth region changes with speech, the eyes-up part of the face hardly at all.
    still = animator.still()
    frames = clip.frames[:, :, ::-1] if clip.meta["flipped"] else clip.frames
    x0, y0, x1, y1 = animator._box.min(0).astype(int).tolist() + animator._box.max(0).astype(int).tolist()
    mouth_change = np.abs(frames[:, y0:y1, x0:x1].astype(int) - still[y0:y1, x0:x1]).mean((1, 2, 3))
    assert pearson(mouth_change, truth) >= 0.5
    assert mouth_change[truth > 0.5].mean() > 3 * max(mouth_change[quiet].mean(), 1.0)


def test_portrait_is_deterministic(portrait_clip):
    from flashhead.data.synth_portrait import PortraitConfig, generate_clip

    cfg = PortraitConfig(size=128)
    a = generate_clip("q", 9, PORTRAIT, [1, 2], 0.6, config=cfg)
    b = generate_clip("q", 9, PORTRAIT, [1, 2], 0.6, config=cfg)
    np.testing.assert_array_equal(a.frames, b.frames)
    np.testing.assert_array_equal(a.audio, b.audio)
    assert a.meta == b.meta


def test_portrait_without_face_is_refused(tmp_path):
    pytest.importorskip("mediapipe")
    from flashhead.data.synth_portrait import load_portrait
    from flashhead.errors import NoFaceError

    with pytest.raises(NoFaceError):
        load_portrait(MEDIA / "portraits" / "noface_landscape.jpg", 128)


# ---------------------------------------------------------------- splits and the CLI


def test_val_identities_and_sentences_are_held_out():
    from flashhead.data.cli import plan_clips

    plans = plan_clips(400, seed=3, kind="procedural", val_fraction=0.2)
    train = [p for p in plans if p.split == "train"]
    val = [p for p in plans if p.split == "val"]
    assert 40 <= len(val) <= 120
    assert not {p.identity for p in train} & {p.identity for p in val}
    train_s = {s for p in train for s in p.sentence_seeds}
    val_s = {s for p in val for s in p.sentence_seeds}
    assert not train_s & val_s

    def text(s):
        return random_sentence(np.random.default_rng(s), "en")

    assert not {text(s) for s in train_s} & {text(s) for s in val_s}
    assert plans == plan_clips(400, seed=3, kind="procedural", val_fraction=0.2)

    portraits = sorted((MEDIA / "portraits").glob("cc0_*.jpg"))
    mixed = plan_clips(60, seed=1, kind="mix", val_fraction=0.3, portraits=portraits)
    by_split = {s: {p.portrait for p in mixed if p.split == s and p.kind == "portrait"} for s in ("train", "val")}
    assert by_split["train"] and by_split["val"] and not by_split["train"] & by_split["val"]


def test_cli_writes_a_readable_dataset(tmp_path):
    pytest.importorskip("mediapipe")
    from typer.testing import CliRunner

    from flashhead.data.cli import data_app
    from flashhead.data.shards import iter_clips, read_manifest

    portraits = tmp_path / "portraits"
    portraits.mkdir()
    for name in ("cc0_woman_dark_skin_frontal.jpg", "cc0_elderly_man_smiling.jpg"):
        shutil.copy(MEDIA / "portraits" / name, portraits / name)  # a temp folder, never the repo
    args = ["synth", "--n", "4", "--out", str(tmp_path / "ds"), "--kind", "mix", "--portraits", str(portraits)]
    args += ["--seconds", "1-1.5", "--workers", "1", "--seed", "5", "--val-fraction", "0.3"]
    result = CliRunner().invoke(data_app, args)
    assert result.exit_code == 0, result.output
    df = read_manifest(tmp_path / "ds")
    assert len(df) == 4 and set(df["source"]) <= {"synth-procedural", "synth-portrait"}
    for clip in iter_clips(tmp_path / "ds"):
        assert clip.frames.shape[1:] == (128, 128, 3)
        assert len(clip.meta["mouth_open"]) == len(clip.frames) == clip.meta["num_frames"]
        assert clip.extras["mouth_box"].shape == (len(clip.frames), 4)
        assert abs(len(clip.audio) / SR - len(clip.frames) / FPS) < 1 / FPS
    bad = CliRunner().invoke(data_app, ["synth", "--n", "1", "--out", str(tmp_path / "x"), "--kind", "nope"])
    assert bad.exit_code != 0 and "kind" in bad.output


@pytest.mark.parametrize("args, says", [
    (["--n", "0"], "--n must be at least 1"),
    (["--size", "100000"], "--size must be an even number of pixels from 64 to 2048"),  # was a 149 GiB MemoryError
    (["--size", "65"], "--size must be an even number"),
    (["--val-fraction", "1.5"], "--val-fraction must be at least 0 and below 1"),
    (["--shard-max-clips", "0"], "--shard-max-clips must be at least 1"),
    (["--out", "FILE"], "a file, not a folder"),  # was a FileExistsError traceback
])  # fmt: skip
def test_synth_refuses_bad_options_in_one_line_before_rendering(tmp_path, args, says):
    from typer.testing import CliRunner

    from flashhead.data.cli import data_app

    (tmp_path / "FILE").write_text("not a folder")
    base = {"--n": "1", "--out": str(tmp_path / "ds"), "--workers": "1"}
    given = dict(zip(args[::2], args[1::2], strict=True))
    options = [x for k, v in (base | given).items() for x in (k, str(tmp_path / v) if v == "FILE" else v)]
    result = CliRunner().invoke(data_app, ["synth", *options])
    assert result.exit_code == 2 and says in result.output and "Traceback" not in result.output
    assert not (tmp_path / "ds").exists()  # nothing rendered or written


def test_dataset_bytes_do_not_depend_on_worker_count(tmp_path):
    from flashhead.data.cli import plan_clips, synth_dataset

    plans = plan_clips(3, seed=11, kind="procedural", seconds=(0.6, 1.0), val_fraction=0.3)
    synth_dataset(tmp_path / "one", plans, workers=1, progress=False)
    synth_dataset(tmp_path / "two", plans, workers=2, progress=False)
    one, two = (tmp_path / d / "shard-000000.tar" for d in ("one", "two"))
    assert one.read_bytes() == two.read_bytes()


def test_long_clips_speak_to_the_end_and_short_plans_are_unchanged():
    from flashhead.data.cli import is_val_sentence, make_clip, plan_clips

    # 8 seeds used to run out after ~20 s: a 60-s clip fell silent for its last two thirds
    short = plan_clips(20, seed=11, kind="procedural", seconds=(3, 5), val_fraction=0.1)
    assert all(len(p.sentence_seeds) == 8 for p in short)
    assert [p.identity for p in short[:3]] == [118199, 931619, 904320]  # flashhead-tiny's training set, as made
    (plan,) = plan_clips(1, seed=4, kind="procedural", seconds=(30, 30), val_fraction=0.1)
    assert len(plan.sentence_seeds) >= 30 and plan.sentence_seeds[:8] == plan_clips(
        1, seed=4, kind="procedural", seconds=(30, 30), val_fraction=0.1)[0].sentence_seeds[:8]  # fmt: skip
    assert all(is_val_sentence(s, 0.1) == (plan.split == "val") for s in plan.sentence_seeds)
    clip = make_clip(plan, size=64)
    assert clip.meta["speech_spans"][-1][1] > 25 and len(clip.meta["sentences"]) > 8


def test_held_out_plans_and_cli(tmp_path):
    from typer.testing import CliRunner

    from flashhead.data.cli import data_app, is_val_identity, plan_clips
    from flashhead.data.shards import read_manifest
    from flashhead.errors import ConfigError

    plans = plan_clips(30, seed=777, kind="procedural", seconds=(2, 3), val_fraction=0.1, held_out=True)
    train = plan_clips(300, seed=777, kind="procedural", seconds=(2, 3), val_fraction=0.1)
    assert all(p.split == "val" and is_val_identity(p.identity, 0.1) for p in plans)
    assert not {p.identity for p in plans} & {p.identity for p in train if p.split == "train"}
    assert not {s for p in plans for s in p.sentence_seeds} & {s for p in train if p.split == "train"
                                                                for s in p.sentence_seeds}  # fmt: skip
    with pytest.raises(ConfigError, match="val_fraction"):
        plan_clips(1, held_out=True, val_fraction=0.0)
    args = ["synth", "--n", "2", "--out", str(tmp_path / "ev"), "--seconds", "1", "--size", "64", "--workers", "1",
            "--held-out"]  # fmt: skip
    result = CliRunner().invoke(data_app, args)
    assert result.exit_code == 0, result.output
    assert set(read_manifest(tmp_path / "ev")["split"]) == {"val"}


def test_held_out_portraits_never_appear_in_train_clips():
    from flashhead.data.cli import plan_clips
    from flashhead.errors import ConfigError

    portraits = sorted((MEDIA / "portraits").glob("cc0_*.jpg"))
    held = [portraits[0].name, portraits[1].name]
    plans = plan_clips(80, seed=2, kind="portrait", val_fraction=0.2, portraits=portraits, hold_out=held)
    used = {s: {p.portrait.rsplit("/", 1)[-1] for p in plans if p.split == s} for s in ("train", "val")}
    assert used["val"] == set(held)  # val clips speak with the held-out photos only
    assert used["train"] and not used["train"] & set(held)
    with pytest.raises(ConfigError, match="--hold-out names no usable portrait"):
        plan_clips(4, kind="portrait", portraits=portraits, hold_out=["nobody.jpg"])


def test_crf_sets_the_shard_size(tmp_path):
    from typer.testing import CliRunner

    from flashhead.data.cli import data_app

    sizes = {}
    for crf in (12, 30):
        args = ["synth", "--n", "1", "--out", str(tmp_path / str(crf)), "--seconds", "1", "--workers", "1"]
        result = CliRunner().invoke(data_app, [*args, "--seed", "3", "--val-fraction", "0", "--crf", str(crf)])
        assert result.exit_code == 0, result.output
        sizes[crf] = (tmp_path / str(crf) / "shard-000000.tar").stat().st_size
    assert sizes[30] < sizes[12]
    bad = CliRunner().invoke(data_app, ["synth", "--n", "1", "--out", str(tmp_path / "x"), "--crf", "99"])
    assert bad.exit_code != 0 and "--crf must be in [0, 51]" in bad.output
