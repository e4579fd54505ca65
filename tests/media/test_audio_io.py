"""Loading speech from the real recordings, videos and broken files in ../shared/media."""

from __future__ import annotations

import logging
import wave

import av
import numpy as np
import pytest

from _util import MEDIA
from flashhead.errors import AudioError
from flashhead.media.audio_io import active_level_dbfs, check_not_silent, load_audio
from flashhead.media.video_io import VideoWriter

AUDIO = sorted((MEDIA / "audio").iterdir())
VIDEOS = sorted((MEDIA / "video").glob("*.mp4"))
JFK = MEDIA / "audio" / "speech_en_male_44k_stereo_11s.flac"


def wav_samples(path) -> tuple[np.ndarray, int]:
    """(n, channels) float samples read with the standard library, independently of PyAV."""
    with wave.open(str(path)) as f:
        assert f.getsampwidth() == 2
        data = np.frombuffer(f.readframes(f.getnframes()), "<i2").reshape(-1, f.getnchannels())
        return data.astype(np.float32) / 32768, f.getframerate()


def expected_seconds(path) -> float:
    if path.suffix == ".wav":
        samples, rate = wav_samples(path)
        return len(samples) / rate
    return {"speech_en_male_44k_stereo_11s.flac": 11.0}[path.name]  # 485,100 samples at 44.1 kHz (SOURCES.md)


@pytest.mark.parametrize("path", AUDIO, ids=lambda p: p.name)
def test_every_shared_recording_loads_at_16k_with_its_duration(path):
    waveform, duration = load_audio(path)
    assert waveform.dtype == np.float32 and waveform.ndim == 1
    assert abs(duration - expected_seconds(path)) <= 0.02
    assert abs(len(waveform) - expected_seconds(path) * 16000) <= 0.02 * 16000
    assert duration == len(waveform) / 16000


def test_stereo_is_averaged_to_mono():
    path = MEDIA / "audio" / "speech_en_radio31_16k_8s.wav"  # 16 kHz stereo: no resampling involved
    samples, _ = wav_samples(path)
    assert samples.shape[1] == 2 and not np.allclose(samples[:, 0], samples[:, 1])
    waveform, _ = load_audio(path)
    np.testing.assert_allclose(waveform, samples.mean(axis=1), atol=1e-6)


def test_resampling_keeps_the_level_and_the_rate():
    path = MEDIA / "audio" / "speech_fr_female_8k_29s.wav"
    samples, rate = wav_samples(path)
    waveform, _ = load_audio(path, target_sr=16000)
    assert len(waveform) == 2 * len(samples)
    assert abs(active_level_dbfs(waveform, 16000) - active_level_dbfs(samples[:, 0], rate)) < 0.5
    # Every other 16 kHz sample lands on an original 8 kHz sample: the speech itself is unchanged.
    assert np.corrcoef(waveform[::2][1000:-1000], samples[1000:-1000, 0])[0, 1] > 0.95
    # At the file's own rate nothing is resampled: the samples come through exactly.
    native, _ = load_audio(path, target_sr=8000)
    np.testing.assert_allclose(native, samples[:, 0], atol=1e-6)


def test_44k_stereo_flac_loads_as_mono_at_any_rate():
    waveform, duration = load_audio(JFK, target_sr=24000)
    assert waveform.shape == (11 * 24000,) and duration == pytest.approx(11.0)
    assert check_not_silent(waveform, 24000) > -30


@pytest.mark.parametrize("path", VIDEOS, ids=lambda p: p.name)
def test_audio_track_of_every_shared_video_loads(path):
    with av.open(str(path)) as container:
        stream = container.streams.audio[0]
        header_seconds = float(stream.duration * stream.time_base)
    waveform, duration = load_audio(path)
    assert abs(duration - header_seconds) <= 0.03
    assert check_not_silent(waveform, 16000, source=path) > -40


@pytest.mark.parametrize(
    ("codec", "container", "suffix"),
    [("libmp3lame", "mp3", ".mp3"), ("aac", "ipod", ".m4a"), ("libopus", "ogg", ".ogg"), ("libopus", "webm", ".webm")],
)
def test_common_compressed_formats_load(tmp_path, codec, container, suffix):
    reference, _ = load_audio(JFK, target_sr=48000)
    path = tmp_path / f"jfk{suffix}"
    with av.open(str(path), "w", format=container) as out:
        stream = out.add_stream(codec, rate=48000, layout="mono")
        frame = av.AudioFrame.from_ndarray(reference[None], format="flt", layout="mono")
        frame.sample_rate, frame.pts = 48000, 0
        for packet in [*stream.encode(frame), *stream.encode(None)]:
            out.mux(packet)
    waveform, duration = load_audio(path)
    assert abs(duration - 11.0) <= 0.06  # encoder padding is at most one codec frame
    assert check_not_silent(waveform, 16000) > -30


BAD = [
    ("empty.wav", "audio file is empty"),
    ("truncated_header_says_longer.wav", "file is truncated (the header says 8.00 s of audio, only 0.31 s"),
    ("not_an_image.png", "not an audio or video file"),
    ("truncated_no_moov.mp4", "incomplete or damaged MP4/MOV file"),
    ("truncated_after_moov.mp4", "file is truncated (the header says 5.02 s of audio, only 1.32 s"),
]


@pytest.mark.parametrize(("name", "message"), BAD, ids=[b[0] for b in BAD])
def test_each_bad_file_gives_its_own_one_line_error(name, message):
    path = MEDIA / "bad" / name
    with pytest.raises(AudioError) as err:
        load_audio(path)
    text = str(err.value)
    assert text.startswith(f"{path}: ") and message in text
    assert "\n" not in text


def test_missing_file_and_folder():
    with pytest.raises(AudioError, match="audio file not found"):
        load_audio(MEDIA / "audio" / "no_such.wav")
    with pytest.raises(AudioError, match="not a file"):
        load_audio(MEDIA / "audio")


def test_truncated_file_loads_what_is_there_when_allowed(caplog):
    path = MEDIA / "bad" / "truncated_header_says_longer.wav"
    with caplog.at_level(logging.WARNING, logger="flashhead.media.audio_io"):
        waveform, duration = load_audio(path, allow_partial=True)
    assert duration == pytest.approx(4989 / 16000, abs=1e-3)  # 20,000 bytes minus the header, 4 bytes a frame
    assert "truncated" in caplog.text


def test_video_without_audio_track(tmp_path):
    path = tmp_path / "silent_movie.mp4"
    with VideoWriter(path) as writer:
        writer.write_frames(np.zeros((3, 64, 64, 3), np.uint8))
    with pytest.raises(AudioError, match=r"silent_movie.mp4: has no audio track$"):
        load_audio(path)


def test_too_short_has_a_settable_minimum(tmp_path):
    path = tmp_path / "blip.wav"
    with wave.open(str(path), "w") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(16000)
        f.writeframes((np.sin(np.arange(800) * 0.3) * 8000).astype("<i2").tobytes())  # 0.05 s
    with pytest.raises(AudioError, match=r"blip.wav: audio too short \(0.050 s\); need at least 0.1 s"):
        load_audio(path)
    waveform, duration = load_audio(path, min_duration=0.04)
    assert duration == pytest.approx(0.05)


def test_nan_samples_are_refused_with_their_count(tmp_path):
    path = tmp_path / "damaged.wav"
    samples = (np.sin(np.arange(16000) * 0.05) * 0.3).astype(np.float32)
    samples[::1000] = np.nan
    samples[5] = np.inf
    with av.open(str(path), "w") as container:  # a float WAV (format tag 3): the one kind of file that holds NaN
        stream = container.add_stream("pcm_f32le", rate=16000, layout="mono")
        frame = av.AudioFrame.from_ndarray(samples[None], format="flt", layout="mono")
        frame.sample_rate = 16000
        for packet in [*stream.encode(frame), *stream.encode(None)]:
            container.mux(packet)
    with pytest.raises(AudioError, match=r"damaged.wav: 17 of its 16000 samples are NaN or infinite"):
        load_audio(path)


def test_silence_is_loaded_but_refused_by_check_not_silent():
    path = MEDIA / "audio" / "silence_near_16k_5s.wav"
    waveform, _ = load_audio(path)  # streaming must accept silence, so loading does not judge it
    with pytest.raises(AudioError, match=r"silence_near_16k_5s.wav: audio is silent \(level -80 dBFS"):
        check_not_silent(waveform, 16000, source=path)
    with pytest.raises(AudioError, match="every sample is zero"):
        check_not_silent(np.zeros(16000, np.float32))


def test_speech_with_long_pauses_is_not_silent():
    speech, _ = load_audio(MEDIA / "audio" / "speech_en_radio34_16k_8s.wav")
    padded = np.concatenate([np.zeros(40 * 16000, np.float32), speech[: 2 * 16000]])  # 2 s of speech in 42 s
    assert check_not_silent(padded, 16000) > -40
