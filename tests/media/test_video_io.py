"""Writing MP4s with VideoWriter and reading them (and the shared clips) back with PyAV."""

from __future__ import annotations

import datetime
import json

import av
import numpy as np
import pytest

from _util import MEDIA, psnr_uint8
from flashhead import __version__
from flashhead.errors import ConfigError, MediaError
from flashhead.media.audio_io import load_audio
from flashhead.media.video_io import VideoWriter, probe, read_provenance, read_video

SPEECH = MEDIA / "audio" / "speech_en_radio31_16k_8s.wav"


def moving_block(num_frames: int, size: int = 256) -> np.ndarray:
    """Frames that tell each other apart: a gradient with a white block that moves 4 px a frame."""
    ramp = np.linspace(30, 200, size, dtype=np.float32)
    frames = np.empty((num_frames, size, size, 3), np.uint8)
    frames[:] = np.stack([ramp[None, :].repeat(size, 0), ramp[:, None].repeat(size, 1), np.full((size, size), 90)], -1)
    for i in range(num_frames):
        frames[i, 40:80, 8 + 4 * i : 48 + 4 * i] = 255
    return frames


def test_written_mp4_is_h264_at_25fps_with_aac_in_sync_and_provenance(tmp_path):
    frames = moving_block(40, size=512)  # 1.6 s
    speech, _ = load_audio(SPEECH)  # 8 s: cut to the video's length
    path = tmp_path / "out.mp4"
    with VideoWriter(path, metadata={"model": "lite", "seed": 7}) as writer:
        for start in range(0, 40, 15):  # streaming chunks of uneven length
            writer.write_frames(frames[start : start + 15])
        writer.set_audio(speech, 16000)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.mp4"]

    info = probe(path)
    assert (info["video_codec"], info["pix_fmt"], info["width"], info["height"]) == ("h264", "yuv420p", 512, 512)
    assert info["fps"] == 25 and info["frames"] == 40
    assert info["video_duration"] == pytest.approx(1.6)
    assert info["b_frames"] is False
    with av.open(str(path)) as container:
        assert all(p.pts == p.dts for p in container.demux(video=0) if p.size)  # no reordering anywhere
    assert (info["audio_codec"], info["sample_rate"], info["channels"]) == ("aac", 16000, 1)
    assert abs(info["audio_duration"] - info["video_duration"]) <= 0.04

    comment, description = info["metadata"]["comment"], info["metadata"]["description"]
    assert "AI-generated" in comment and __version__ in comment
    record = json.loads(description)
    assert record == read_provenance(path)
    assert record["generator"] == f"flashhead {__version__}" and record["ai_generated"] is True
    assert (record["model"], record["seed"]) == ("lite", 7)
    created = datetime.datetime.strptime(record["created_utc"], "%Y-%m-%dT%H:%M:%S%z")
    assert abs((datetime.datetime.now(datetime.timezone.utc) - created).total_seconds()) < 600

    decoded, fps, audio = read_video(path)
    assert decoded.shape == frames.shape and fps == 25
    assert all(psnr_uint8(d, f) > 38 for d, f in zip(decoded, frames, strict=True))  # every frame, in order, at CRF 18
    waveform, rate = audio
    assert rate == 16000 and abs(len(waveform) / rate - 1.6) <= 0.07  # decoders add up to one AAC frame
    # The muxed audio is the start of the speech, in sync: it correlates with the source at zero lag.
    n = 20000
    assert np.corrcoef(waveform[:n], speech[:n])[0, 1] > 0.9


def test_audio_given_first_and_shorter_than_the_video_is_padded(tmp_path):
    speech, _ = load_audio(SPEECH)
    path = tmp_path / "short_audio.mp4"
    with VideoWriter(path, audio=speech[:8000], sample_rate=16000) as writer:  # 0.5 s of audio, 1 s of video
        writer.write_frames(moving_block(25))
    info = probe(path)
    assert info["frames"] == 25 and abs(info["audio_duration"] - info["video_duration"]) <= 0.04


def test_audio_at_a_rate_aac_lacks_is_resampled(tmp_path):
    path = tmp_path / "odd_rate.mp4"
    tone = 0.3 * np.sin(np.arange(22000) * 2 * np.pi * 440 / 22000).astype(np.float32)
    with VideoWriter(path) as writer:
        writer.write_frames(moving_block(25))
        writer.set_audio(tone, 22000)
    info = probe(path)
    assert info["sample_rate"] == 48000 and abs(info["audio_duration"] - 1.0) <= 0.04


@pytest.mark.parametrize("interrupt", [RuntimeError, KeyboardInterrupt])
def test_an_exception_mid_write_leaves_no_file(tmp_path, interrupt):
    path = tmp_path / "out.mp4"
    with pytest.raises(interrupt), VideoWriter(path) as writer:
        writer.write_frames(moving_block(30))
        writer.set_audio(np.zeros(16000, np.float32), 16000)
        writer.write_frames(moving_block(5))
        raise interrupt("stopped mid-write")
    assert list(tmp_path.iterdir()) == []


def test_a_failed_write_does_not_clobber_an_existing_file(tmp_path):
    path = tmp_path / "out.mp4"
    with VideoWriter(path) as writer:
        writer.write_frames(moving_block(10))
    before = path.read_bytes()
    with pytest.raises(RuntimeError), VideoWriter(path) as writer:
        writer.write_frames(moving_block(20))
        raise RuntimeError
    assert path.read_bytes() == before and len(list(tmp_path.iterdir())) == 1


def test_closing_without_frames_is_an_error_and_leaves_nothing(tmp_path):
    with pytest.raises(MediaError, match="no frames were written"), VideoWriter(tmp_path / "out.mp4"):
        pass
    assert list(tmp_path.iterdir()) == []


def test_bad_frames_and_settings_are_refused(tmp_path):
    with pytest.raises(MediaError, match="must be uint8"), VideoWriter(tmp_path / "a.mp4") as writer:
        writer.write_frames(np.zeros((2, 64, 64, 3), np.float32))
    with pytest.raises(MediaError, match="must be even"), VideoWriter(tmp_path / "b.mp4") as writer:
        writer.write_frames(np.zeros((2, 63, 64, 3), np.uint8))
    with pytest.raises(MediaError, match="frame size changed"), VideoWriter(tmp_path / "c.mp4") as writer:
        writer.write_frames(np.zeros((2, 64, 64, 3), np.uint8))
        writer.write_frames(np.zeros((2, 64, 32, 3), np.uint8))
    with pytest.raises(MediaError, match="mono waveform"), VideoWriter(tmp_path / "d.mp4") as writer:
        writer.set_audio(np.zeros((2, 100), np.float32), 16000)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ConfigError, match="crf"):
        VideoWriter(tmp_path / "e.mp4", crf=60)
    with pytest.raises(ConfigError, match="preset must be one of"):
        VideoWriter(tmp_path / "e.mp4", preset="warp")
    with pytest.raises(MediaError, match="output folder does not exist"):
        VideoWriter(tmp_path / "missing" / "f.mp4")


def test_crf_trades_size_for_quality(tmp_path):
    rng = np.random.default_rng(0)
    frames = np.clip(moving_block(10) + rng.normal(0, 6, (10, 256, 256, 3)), 0, 255).astype(np.uint8)
    sizes = {}
    for crf in (18, 30):
        with VideoWriter(tmp_path / f"crf{crf}.mp4", crf=crf) as writer:
            writer.write_frames(frames)
        sizes[crf] = (tmp_path / f"crf{crf}.mp4").stat().st_size
    assert sizes[30] < sizes[18] / 2


def test_read_video_and_probe_on_a_shared_clip():
    path = MEDIA / "video" / "talk_woman_room_wide_640x360_9s.mp4"
    info = probe(path)
    assert (info["width"], info["height"], info["fps"]) == (640, 360, 25)
    assert info["frames"] == 235 and info["video_duration"] == pytest.approx(235 / 25)
    assert info["duration"] == pytest.approx(9.43, abs=0.01)  # the audio runs 30 ms longer (SOURCES.md)
    assert (info["audio_codec"], info["sample_rate"], info["channels"]) == ("aac", 44100, 2)
    frames, fps, (waveform, rate) = read_video(path, max_frames=10)
    assert frames.shape == (10, 360, 640, 3) and frames.dtype == np.uint8 and fps == 25
    assert rate == 44100 and waveform.ndim == 1 and abs(len(waveform) / rate - 9.43) < 0.05


def test_read_video_errors_are_one_line_media_errors():
    with pytest.raises(MediaError, match=r"truncated_no_moov.mp4: incomplete or damaged MP4/MOV file"):
        read_video(MEDIA / "bad" / "truncated_no_moov.mp4")
    with pytest.raises(MediaError, match=r"empty.wav: video file is empty"):
        read_video(MEDIA / "bad" / "empty.wav")
    with pytest.raises(MediaError, match=r"speech_en_radio31_16k_8s.wav: has no video track"):
        read_video(SPEECH)
    with pytest.raises(MediaError, match="video file not found"):
        read_video(MEDIA / "video" / "missing.mp4")


def test_auto_encoder_writes_h264_and_a_missing_nvenc_is_a_clear_error(tmp_path):
    """`auto` takes the GPU's NVENC where it opens and x264 elsewhere; asking for NVENC where it is missing fails in
    one line before any file exists. Unknown encoders are refused."""
    from flashhead.media.video_io import nvenc_unavailable_reason, resolve_encoder

    frames = moving_block(10)
    with VideoWriter(tmp_path / "auto.mp4", encoder="auto") as writer:
        writer.write_frames(frames)
    reason = nvenc_unavailable_reason()
    assert writer.encoder == ("libx264" if reason else "h264_nvenc") == resolve_encoder("auto")
    info = probe(tmp_path / "auto.mp4")
    assert (info["video_codec"], info["frames"], info["b_frames"]) == ("h264", 10, False)
    assert read_provenance(tmp_path / "auto.mp4")["ai_generated"] is True
    decoded, _, _ = read_video(tmp_path / "auto.mp4")
    assert all(psnr_uint8(d, f) > 35 for d, f in zip(decoded, frames, strict=True))
    with pytest.raises(ConfigError, match="video encoder must be one of"):
        VideoWriter(tmp_path / "x.mp4", encoder="libx265")
    if reason is None:
        return  # this machine has NVENC: nothing more to refuse
    assert "\n" not in reason
    with pytest.raises(MediaError, match="h264_nvenc.*use libx264 or auto"):
        VideoWriter(tmp_path / "nvenc.mp4", encoder="h264_nvenc")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["auto.mp4"]


def test_auto_falls_back_to_x264_when_nvenc_does_not_open(tmp_path, monkeypatch, caplog):
    """A GPU can list NVENC and still refuse a session (consumer cards cap concurrent sessions): `auto` then
    writes with x264 instead of failing. Forced here by making `auto` pick NVENC on a machine where it cannot open."""
    from flashhead.media import video_io

    if video_io.nvenc_unavailable_reason() is None:
        pytest.skip("NVENC opens on this machine: the fallback cannot be provoked")
    monkeypatch.setattr(video_io, "nvenc_unavailable_reason", lambda: None)
    frames = moving_block(6)
    with VideoWriter(tmp_path / "out.mp4", encoder="auto") as writer:
        assert writer.encoder == "h264_nvenc"  # what auto chose
        writer.write_frames(frames)
    assert writer.encoder == "libx264" and "NVENC did not open" in caplog.text
    assert [p.name for p in tmp_path.iterdir()] == ["out.mp4"]  # the abandoned NVENC file is gone
    assert probe(tmp_path / "out.mp4")["frames"] == 6


@pytest.mark.parametrize(
    ("gpu", "named"),
    [("NVIDIA H100 80GB HBM3", True), ("NVIDIA A100-SXM4-80GB", True), ("NVIDIA H200", True),
     ("NVIDIA L40S", False), ("NVIDIA GeForce RTX 4090", False), (None, False)],
)  # fmt: skip
def test_a_gpu_without_nvenc_is_named_as_the_reason(monkeypatch, gpu, named):
    """FFmpeg says only "Generic error in an external library" where the GPU has no NVENC block (H100: run 61),
    so the reason names the GPU; other GPUs get FFmpeg's own answer (whatever this machine gives)."""
    from flashhead.media import video_io

    monkeypatch.setattr(video_io, "_cuda_gpu_name", lambda: gpu)
    reason = video_io.nvenc_unavailable_reason.__wrapped__()
    if named:
        assert reason == f"the {gpu} has no NVENC video encoder"
    else:
        assert reason is None or "has no NVENC video encoder" not in reason
