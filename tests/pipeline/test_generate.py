"""Offline generation end to end on the real media: portrait + speech file -> MP4 (issue: offline generation).

The networks are the official tiny random-weight fixtures (tests/_tiny.py), saved as a pipeline folder and
loaded through the public `--model PATH`; the media are the real files in ../shared/media.
"""

from __future__ import annotations

import subprocess
import sys

import av
import numpy as np
import pytest
from typer.testing import CliRunner

from _tiny import tiny_pipeline
from _util import MEDIA, png_header_only
from flashhead.cli import app
from flashhead.media.audio_io import load_audio
from flashhead.media.video_io import VideoWriter, probe, read_provenance, read_video
from flashhead.media.watermark import detect_watermark

SPEECH = sorted(p for p in (MEDIA / "audio").iterdir() if p.name.startswith("speech_"))
PORTRAIT = MEDIA / "portraits" / "cc0_woman_east_asian_smiling.jpg"


@pytest.fixture(scope="module")
def small_pipe():
    pipe, _, _ = tiny_pipeline("lite", height=32, width=32)  # smallest Lite geometry: fast frame counting
    return pipe


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    pipe, _, _ = tiny_pipeline("lite", height=128, width=128)
    return pipe.save_pretrained(tmp_path_factory.mktemp("models") / "tiny-lite-128")


def run_cli(*args: str):
    result = CliRunner().invoke(app, list(args))
    return result.exit_code, result.output


@pytest.mark.parametrize("speech", SPEECH, ids=lambda p: p.name)
def test_frame_count_is_round_seconds_times_25_for_cuts_and_whole_files(small_pipe, speech):
    waveform, seconds = load_audio(speech)
    image = np.full((32, 32, 3), 128, np.uint8)
    for cut in (1.0, 3.3, None):
        audio = waveform if cut is None else waveform[: int(cut * 16000)]
        out = small_pipe(image, audio, sample_rate=16000, progress=False, watermark=False, allow_silent=True)
        expected = round((seconds if cut is None else cut) * 25)
        assert len(out.frames) == expected, (speech.name, cut)


def test_cli_writes_a_synced_watermarked_mp4_from_real_media(tiny_folder, tmp_path):
    out = tmp_path / "talk.mp4"
    speech = MEDIA / "audio" / "speech_en_male_44k_stereo_11s.flac"  # 44.1 kHz stereo FLAC
    proc = subprocess.run(
        [sys.executable, "-m", "flashhead.cli", "generate", "--image", str(PORTRAIT), "--audio", str(speech),
         "-o", str(out), "--model", str(tiny_folder), "--seed", "3"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "wrote" in proc.stdout and "tiny-lite" in proc.stdout
    info = probe(out)
    _, seconds = load_audio(speech)
    assert info["video_codec"] == "h264" and info["fps"] == 25 and (info["width"], info["height"]) == (128, 128)
    assert info["frames"] == round(seconds * 25)
    assert info["audio_codec"] == "aac" and abs(info["audio_duration"] - info["video_duration"]) <= 0.040
    provenance = read_provenance(out)
    assert provenance["model"] == "tiny-lite" and provenance["seed"] == 3 and provenance["ai_generated"]
    assert detect_watermark(out).detected
    assert [p.name for p in tmp_path.iterdir()] == ["talk.mp4"]  # no temporary files left


def test_same_seed_same_frames_other_seed_other_frames(tiny_folder, tmp_path):
    speech = MEDIA / "audio" / "speech_en_radio31_16k_8s.wav"
    videos = {}
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        code, output = run_cli("generate", "-i", str(PORTRAIT), "-a", str(speech), "-o", str(tmp_path / f"{name}.mp4"),
                               "--model", str(tiny_folder), "--seed", str(seed), "--crf", "0")  # fmt: skip
        assert code == 0, output
        videos[name] = read_video(tmp_path / f"{name}.mp4", max_frames=60)[0]
    assert np.array_equal(videos["a"], videos["b"])
    assert not np.array_equal(videos["a"], videos["c"])


def test_watermark_survives_crf28_and_256px_and_real_clips_are_clean(tmp_path):
    pipe, _, _ = tiny_pipeline("lite", height=512, width=512)
    waveform, _ = load_audio(MEDIA / "audio" / "speech_en_radio34_16k_8s.wav")
    out = pipe(PORTRAIT, waveform[:16000], sample_rate=16000, seed=0, progress=False)
    assert out.frames.shape == (25, 512, 512, 3)
    path = out.save(tmp_path / "ours.mp4")
    frames, _, _ = read_video(path)
    small = np.stack(
        [np.asarray(av.VideoFrame.from_ndarray(f).reformat(256, 256).to_ndarray(format="rgb24")) for f in frames]
    )
    with VideoWriter(tmp_path / "attacked.mp4", crf=28) as w:
        w.write_frames(small)
    assert detect_watermark(tmp_path / "attacked.mp4").detected
    for clip in sorted((MEDIA / "video").glob("*.mp4")):
        assert not detect_watermark(clip).detected, clip.name


SPEECH_8S = "audio/speech_en_radio31_16k_8s.wav"
FACE = "portraits/cc0_woman_headscarf.jpg"
BAD_INPUTS = [
    # (image, audio) relative to ../shared/media, expected message fragment, exit code
    ("portraits/noface_landscape.jpg", SPEECH_8S, "no face found", 6),
    ("bad/not_an_image.png", SPEECH_8S, "not an image", 5),
    ("video/talk_man_suit_6s.mp4", SPEECH_8S, "a video, not an image", 5),
    (FACE, "bad/empty.wav", "empty", 4),
    (FACE, "bad/truncated_header_says_longer.wav", "truncated", 4),
    (FACE, "bad/truncated_no_moov.mp4", "damaged", 4),
    (FACE, "bad/truncated_after_moov.mp4", "truncated", 4),
    (FACE, "audio/silence_near_16k_5s.wav", "silent", 4),
    (FACE, "bad/not_an_image.png", "not an audio or video file", 4),
    (FACE, "audio/missing.wav", "not found", 4),
]


@pytest.mark.parametrize(("image", "audio", "message", "code"), BAD_INPUTS, ids=[b[1] + "|" + b[0] for b in BAD_INPUTS])
def test_bad_inputs_give_one_line_errors_and_leave_no_file(tiny_folder, tmp_path, image, audio, message, code):
    out = tmp_path / "out.mp4"
    exit_code, output = run_cli("generate", "-i", str(MEDIA / image), "-a", str(MEDIA / audio), "-o", str(out),
                                "--model", str(tiny_folder))  # fmt: skip
    assert exit_code == code, output
    lines = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and message in lines[0], output
    assert list(tmp_path.iterdir()) == []


CONFIG_ERRORS = [
    # (file name, its text, what the one error line says)
    ("broken.yaml", "shift: [5.0\n", "broken.yaml: not valid YAML (expected ',' or ']', but got '<stream end>' at"),
    ("typo.yaml", "steps: 8\nshfit: 3.0\n",
     "unknown generation setting(s): shfit, steps (did you mean shfit -> shift; steps -> num_inference_steps or"),
    ("words.json", '{"num_inference_steps": "four"}', "num_inference_steps must be a whole number, got 'four'"),
    ("sampler.yaml", "sampler: dpm\n", "sampler must be one of auto, distilled, euler, got 'dpm'"),
    ("list.yaml", "- shift\n", "list.yaml: expected a mapping of settings"),
]


@pytest.mark.parametrize(("name", "text", "message"), CONFIG_ERRORS, ids=[c[0] for c in CONFIG_ERRORS])
def test_a_bad_settings_file_gives_one_line_and_exit_2(tiny_folder, tmp_path, name, text, message):
    settings = tmp_path / name
    settings.write_text(text)
    out = tmp_path / "out.mp4"
    code, output = run_cli("generate", "-i", str(MEDIA / FACE), "-a", str(MEDIA / SPEECH_8S), "-o", str(out),
                           "--model", str(tiny_folder), "--config", str(settings))  # fmt: skip
    assert code == 2, output
    lines = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and message in lines[0], output
    assert "Traceback" not in output and not out.exists()


def test_too_short_audio_and_huge_image(tiny_folder, tmp_path):
    import wave

    short = tmp_path / "short.wav"
    with wave.open(str(short), "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(16000)
        w.writeframes((np.sin(np.arange(800) / 3) * 8000).astype(np.int16).tobytes())  # 50 ms
    code, output = run_cli("generate", "-i", str(PORTRAIT), "-a", str(short), "-o", str(tmp_path / "o.mp4"),
                           "--model", str(tiny_folder))  # fmt: skip
    assert code == 4 and "too short" in output
    huge = png_header_only(tmp_path / "huge.png", 40000, 40000)  # a header claiming 1.6 gigapixels
    code, output = run_cli("generate", "-i", str(huge), "-a", str(MEDIA / "audio" / "speech_en_radio31_16k_8s.wav"),
                           "-o", str(tmp_path / "o.mp4"), "--model", str(tiny_folder))  # fmt: skip
    assert code == 5 and "too large" in output
    assert not (tmp_path / "o.mp4").exists()


def test_group_photo_uses_the_largest_face_and_says_so(caplog):
    from flashhead.media.face import prepare_portrait

    with caplog.at_level("WARNING", logger="flashhead.media.face"):
        portrait = prepare_portrait(MEDIA / "portraits" / "multi_face_group.jpg", size=512)
    assert portrait.shape == (512, 512, 3)
    assert any("faces found; using the largest" in r.getMessage() for r in caplog.records)


def test_teacher_sampling_flags(tiny_folder, tmp_path):
    """--steps/--guidance run the undistilled teacher path (20 Euler steps with audio CFG) on any checkpoint."""
    import wave

    out = tmp_path / "teacher.mp4"
    speech = tmp_path / "two_seconds.wav"  # 20 steps x 2 guidance branches: keep the clip short
    with wave.open(str(MEDIA / "audio" / "speech_en_radio34_16k_8s.wav")) as src, wave.open(str(speech), "wb") as dst:
        dst.setparams(src.getparams())
        dst.writeframes(src.readframes(2 * src.getframerate()))
    code, output = run_cli("generate", "-i", str(PORTRAIT), "-a", str(speech), "-o", str(out),
                           "--model", str(tiny_folder), "--steps", "20", "--guidance", "3.0")  # fmt: skip
    assert code == 0, output
    assert probe(out)["frames"] == 50


def test_video_encoder_choice_from_the_cli_and_the_speed_settings(tiny_folder, tmp_path):
    """--video-encoder auto writes H.264 (NVENC where it opens, x264 here); an unknown encoder, or NVENC where it
    is missing, fails in one line before anything is generated. A pipeline's outputs save with its speed setting."""
    from flashhead.media.video_io import nvenc_unavailable_reason
    from flashhead.pipeline.speed import SpeedConfig

    speech = MEDIA / SPEECH_8S
    out = tmp_path / "auto.mp4"
    code, output = run_cli("generate", "-i", str(PORTRAIT), "-a", str(speech), "-o", str(out),
                           "--model", str(tiny_folder), "--video-encoder", "auto")  # fmt: skip
    assert code == 0, output
    assert probe(out)["video_codec"] == "h264" and detect_watermark(out).detected
    refused = [("vp9", 2, "video encoder must be one of")]
    if nvenc_unavailable_reason():
        refused.append(("h264_nvenc", 7, "h264_nvenc"))
    for encoder, expected, message in refused:
        code, output = run_cli("generate", "-i", str(PORTRAIT), "-a", str(speech), "-o", str(tmp_path / "x.mp4"),
                               "--model", str(tiny_folder), "--video-encoder", encoder)  # fmt: skip
        lines = [line for line in output.splitlines() if line.startswith("error:")]
        assert code == expected and len(lines) == 1 and message in lines[0], output
        assert "model:" not in output  # refused before the model was loaded
    assert [p.name for p in tmp_path.iterdir()] == ["auto.mp4"]

    pipe, _, _ = tiny_pipeline("lite")
    waveform, _ = load_audio(speech)
    pipe.optimize(SpeedConfig(video_encoder="auto"))
    result = pipe(PORTRAIT, waveform[:8000], sample_rate=16000, seed=0, progress=False)
    assert result.video_encoder == "auto"
    for name, encoder in (("speed.mp4", None), ("x264.mp4", "libx264")):
        saved = result.save(tmp_path / name, encoder=encoder)
        assert probe(saved)["frames"] == len(result.frames)
