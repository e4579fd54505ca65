"""The audio path: 25 fps wav2vec2 features, per-frame windows, the streaming cache, once mode,
resampling and checkpoint loading, checked against the reference fixtures (CPU, float32)."""

from __future__ import annotations

import json
import math
import wave

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from transformers import Wav2Vec2Config, Wav2Vec2FeatureExtractor, Wav2Vec2Model

from _util import FIXTURES, MEDIA, load_fixture, prefixed, rel_l2
from flashhead.errors import AudioError, CheckpointError, ConfigError
from flashhead.models.audio import (
    AudioConfig,
    AudioContextCache,
    Wav2VecEncoder,
    audio_windows,
    check_waveform,
    encode_offline,
    motion_frames,
    normalize_waveform,
    num_offline_chunks,
    num_stream_chunks,
    offline_padded_length,
    prepare_waveform,
    resample,
    tf32_matmuls,
    to_mono,
    variant_new_frames,
    variant_slice_samples,
    window_indices,
)

TOL = 1e-4  # fixtures README: wav2vec features within 1e-4 relative L2


def tiny_wav2vec(tensors: dict[str, torch.Tensor], meta: dict, prefix: str) -> Wav2Vec2Model:
    model = Wav2Vec2Model(Wav2Vec2Config(**meta["wav2vec2_config"]))
    model.load_state_dict(prefixed(tensors, prefix), strict=True)
    return model


@pytest.fixture(scope="module")
def features_fixture():
    return load_fixture("wav2vec_features_tiny")


@pytest.fixture(scope="module")
def tiny_encoder(features_fixture):
    tensors, meta = features_fixture
    return Wav2VecEncoder(tiny_wav2vec(tensors, meta, "weights/"))


@pytest.fixture(scope="module")
def windows_json():
    path = FIXTURES / "audio_windows.json"
    if not path.exists():
        pytest.skip(f"fixture {path} not present")
    return json.loads(path.read_text())


def frame_index_encoder(waveform: torch.Tensor) -> torch.Tensor:
    """Stand-in encoder whose feature for frame j is j: (S, 1, 1)."""
    frames = AudioConfig().frames_for(waveform.numel())
    return torch.arange(frames, dtype=torch.float32).view(-1, 1, 1)


def last_sample_encoder(waveform: torch.Tensor) -> torch.Tensor:
    """Stand-in encoder whose feature for frame j is the last sample of that frame: (S, 1, 1)."""
    return waveform.view(-1, AudioConfig().samples_per_frame)[:, -1].reshape(-1, 1, 1)


def read_wav(name: str) -> tuple[np.ndarray, int]:
    """16-bit PCM WAV from the shared media folder -> (samples, channels) int16, sample rate."""
    path = MEDIA / "audio" / name
    if not path.exists():
        pytest.skip(f"media file {path} not present")
    with wave.open(str(path)) as f:
        assert f.getsampwidth() == 2
        data = np.frombuffer(f.readframes(f.getnframes()), dtype="<i2")
        return data.reshape(-1, f.getnchannels()), f.getframerate()


# --------------------------------------------------------------------------------------------------
# Timing constants and chunk geometry


def test_config_matches_official_numbers(windows_json):
    config = AudioConfig()
    assert (config.samples_per_frame, config.cache_samples, config.cache_frames) == (640, 128000, 200)
    assert config.chunk_samples == 21120
    assert windows_json["stream_mode"]["cached_audio_length_samples"] == config.cache_samples
    assert windows_json["stream_mode"]["audio_start_idx"] == config.cache_frames - config.frame_num
    for variant, facts in windows_json["variants"].items():
        assert variant_new_frames(variant) == facts["new_frames_per_chunk (slice_len)"]
        assert variant_slice_samples(variant) == facts["audio_samples_per_new_chunk"]
        assert (
            motion_frames(facts["vae_temporal_stride"])
            == facts["motion_frames_num (video frames re-encoded as motion latents)"]
        )


@pytest.mark.parametrize("kwargs", [{"fps": 24, "sample_rate": 16001}, {"window": 4}, {"cache_seconds": 1}, {"fps": 0}])
def test_config_rejects_inconsistent_values(kwargs):
    with pytest.raises(ConfigError):
        AudioConfig(**kwargs)


def test_chunk_counts():
    assert num_stream_chunks(0, 24) == 0
    assert num_stream_chunks(15360, 24) == 1
    assert num_stream_chunks(15361, 24) == 2
    # Once mode pads to 21120 + k * slice; the official script renders k chunks, we render k + 1.
    assert offline_padded_length(21120, 24) == 21120
    assert offline_padded_length(21121, 24) == 21120 + 15360
    assert offline_padded_length(100, 28) == 21120
    assert num_offline_chunks(100, 28, official_quirks=True) == 0
    assert num_offline_chunks(100, 28) == 1
    assert num_offline_chunks(21121, 24, official_quirks=True) == 1
    assert num_offline_chunks(21121, 24) == 2
    with pytest.raises(ConfigError):
        variant_new_frames("ultra")


# --------------------------------------------------------------------------------------------------
# wav2vec2 at 25 fps


@pytest.mark.parametrize("case", ["case1", "case2"])
def test_wav2vec_features_tiny(features_fixture, tiny_encoder, case):
    tensors, _ = features_fixture
    waveform = tensors[f"{case}/waveform"]

    input_values = normalize_waveform(waveform)
    assert rel_l2(input_values, tensors[f"{case}/input_values"]) <= TOL

    frames = AudioConfig().frames_for(waveform.numel())
    with torch.no_grad():
        cnn = tiny_encoder.cnn_features(input_values[None], frames)[0]
    assert rel_l2(cnn, tensors[f"{case}/cnn_features_interp"]) <= TOL

    out = tiny_encoder(waveform)
    assert out.dtype == torch.float32
    assert rel_l2(out, tensors[f"{case}/output"]) <= TOL


def test_windowed_last33(features_fixture, tiny_encoder):
    tensors, _ = features_fixture
    expected = tensors["case1/windowed_last33"]
    assert torch.equal(audio_windows(tensors["case1/output"], 17, 50), expected)
    assert rel_l2(audio_windows(tiny_encoder(tensors["case1/waveform"]), 17, 50), expected) <= TOL


def test_batched_encoding_matches_single(features_fixture, tiny_encoder):
    tensors, _ = features_fixture
    waveform = tensors["case1/waveform"]
    batch = torch.stack([waveform, waveform.flip(0)])
    out = tiny_encoder(batch)
    assert out.shape == (2, 50, 3, 16)
    assert rel_l2(out[0], tiny_encoder(waveform)) <= 1e-6
    assert rel_l2(out[1], tiny_encoder(waveform.flip(0))) <= 1e-6


def test_tf32_matmuls_only_while_the_pass_runs(features_fixture, tiny_encoder, monkeypatch):
    """The audio_tf32 switch: cuBLAS's TF32 flag is on while wav2vec2's layers run and as before afterwards, also
    when the pass fails. (CPU GEMMs ignore the flag, so here the features stay the same; the GPU test checks them.)"""
    matmul = torch.backends.cuda.matmul
    waveform = features_fixture[0]["case1/waveform"]
    seen: list[bool] = []
    hook = tiny_encoder.model.encoder.layers[0].register_forward_pre_hook(lambda *_: seen.append(matmul.allow_tf32))
    try:
        plain = tiny_encoder(waveform)
        tiny_encoder.tf32_matmuls = True
        tf32 = tiny_encoder(waveform)
        assert seen == [False, True] and not matmul.allow_tf32
        assert torch.equal(tf32, plain)
        monkeypatch.setattr(tiny_encoder, "encode_features", lambda _: 1 / 0)
        with pytest.raises(ZeroDivisionError):
            tiny_encoder(waveform)
        assert not matmul.allow_tf32
    finally:
        hook.remove()
        tiny_encoder.tf32_matmuls = False


def test_overlapping_tf32_uses_restore_the_flag_once_all_are_done():
    """Two passes overlapping (e.g. in two threads): the first to finish must not switch TF32 off under the other,
    and the last restores the flag as it was before either."""
    matmul = torch.backends.cuda.matmul
    first, second = tf32_matmuls(), tf32_matmuls()
    first.__enter__()
    second.__enter__()
    first.__exit__(None, None, None)
    assert matmul.allow_tf32
    second.__exit__(None, None, None)
    assert not matmul.allow_tf32
    with tf32_matmuls(False):
        assert not matmul.allow_tf32


def test_streaming_interpolation_is_exact_decimation(tiny_encoder):
    # 128,000 samples -> 399 CNN frames -> 200 frames with align_corners: frame j sits on CNN frame 2j.
    samples = normalize_waveform(torch.randn(AudioConfig().cache_samples, generator=torch.Generator().manual_seed(0)))
    with torch.no_grad():
        cnn = tiny_encoder.model.feature_extractor(samples[None])  # (1, C, 399)
        interp = tiny_encoder.cnn_features(samples[None], 200)  # (1, 200, C)
    assert cnn.shape[-1] == 399
    assert rel_l2(interp, cnn[:, :, ::2].transpose(1, 2)) <= 1e-6


@pytest.mark.parametrize("stable", [False, True], ids=["post_ln", "pre_ln"])
def test_layer_outputs_match_transformers_hidden_states(stable):
    # At the CNN's own rate (no interpolation) our layer stack must equal transformers' hidden_states[1:].
    # For pre-LN models the last entry is the final LayerNorm's output, as transformers 4.x reports it
    # (5.x reports the raw last layer there; the official code pinned 4.57.3).
    config = Wav2Vec2Config(
        hidden_size=16,
        num_hidden_layers=3,
        num_attention_heads=2,
        intermediate_size=32,
        conv_dim=[8] * 7,
        num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=2,
        do_stable_layer_norm=stable,
        feat_extract_norm="layer" if stable else "group",
    )
    torch.manual_seed(0)
    encoder = Wav2VecEncoder(Wav2Vec2Model(config))
    samples = torch.randn(1, 8000)
    with torch.no_grad():
        reference = encoder.model(samples, output_hidden_states=True)
        ours = encoder.encode_features(encoder.model.feature_extractor(samples).transpose(1, 2))
    assert ours.shape[2] == 3
    for layer in range(2):
        assert torch.allclose(ours[:, :, layer], reference.hidden_states[layer + 1], atol=1e-6)
    assert torch.allclose(ours[:, :, 2], reference.last_hidden_state, atol=1e-6)


def test_encoder_stays_frozen(tiny_encoder):
    tiny_encoder.train()
    assert not tiny_encoder.model.training
    assert not any(p.requires_grad for p in tiny_encoder.parameters())
    with pytest.raises(AudioError):
        tiny_encoder(torch.zeros(639))


# --------------------------------------------------------------------------------------------------
# Windows


def test_stream_chunk_context_indices(windows_json):
    example = windows_json["worked_examples"]["stream_chunk_context_indices"]
    features = torch.arange(200).view(200, 1, 1)
    got = audio_windows(features, 167, 200)[..., 0, 0]
    assert got.tolist() == example["indices"]
    assert torch.equal(window_indices(167, 200), got)


def test_once_mode_windows_first_and_last_3(windows_json):
    example = windows_json["worked_examples"]["once_mode_all_windows_first_and_last_3"]
    got = audio_windows(torch.arange(61).view(61, 1, 1))[..., 0, 0]
    assert got.shape == (61, 5)
    assert got[:3].tolist() == example["first"]
    assert got[-3:].tolist() == example["last"]


def test_windows_are_indexed_where_the_features_are():
    """No host-made index copied to the features' device: on CUDA that copy blocks the host until the stream's
    queued work (the whole audio encoder, on the engine's side stream) has run. "meta" stands in for the GPU."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Copies(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.moves = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            sources = {a.device for a in args if isinstance(a, torch.Tensor)}
            if isinstance(out, torch.Tensor) and sources and out.device not in sources:
                self.moves.append(str(func))
            return out

    features = torch.empty(200, 2, 3, device="meta")
    with Copies() as copies:
        windows = audio_windows(features, 167, 200)
    assert windows.shape == (33, 5, 2, 3) and windows.device.type == "meta"
    assert copies.moves == []


def test_window_range_is_validated():
    with pytest.raises(ValueError):
        audio_windows(torch.zeros(10, 1, 1), 5, 11)
    with pytest.raises(ValueError):
        audio_windows(torch.zeros(10, 1, 1), 5, 5)


# --------------------------------------------------------------------------------------------------
# Streaming cache


@pytest.mark.parametrize("variant", ["lite", "pro"])
def test_cache_reproduces_pipeline_fixture(variant):
    tensors, meta = load_fixture(f"pipeline_{variant}_tiny")
    encoder = Wav2VecEncoder(tiny_wav2vec(tensors, meta, "wav2vec/"))
    cache = AudioContextCache(encoder, variant_new_frames(variant))
    audio = tensors["inputs/audio"]
    assert audio.numel() == 2 * cache.slice_samples
    for k, piece in enumerate(audio.split(cache.slice_samples)):
        context = cache.push(piece)
        assert context.shape == (1, 33, 5, 3, 16)
        assert rel_l2(context, tensors[f"chunk{k}/audio_embedding"]) <= TOL


def test_cache_fifo_alignment():
    cache = AudioContextCache(last_sample_encoder, new_frames=24)
    audio = torch.arange(1, 2 * 15360 + 1, dtype=torch.float32)
    chunks = list(cache.iter_chunks(audio))
    assert len(chunks) == 2 and cache.chunks_pushed == 2

    centre = [c[0, :, 2, 0, 0] for c in chunks]  # feature of each of the 33 frames itself
    frame_end = torch.arange(1, 49) * 640.0  # last sample value of audio frames 0..47
    # Chunk 0: 9 motion frames of silence, then the 24 new frames.
    assert torch.equal(centre[0][:9], torch.zeros(9))
    assert torch.equal(centre[0][9:], frame_end[:24])
    # Chunk 1: the motion frames are the previous chunk's last 9 frames.
    assert torch.equal(centre[1], frame_end[15:48])
    # No look-ahead at the buffer end: the last two frames repeat the final frame.
    assert torch.equal(chunks[1][0, 31, 3:, 0, 0], frame_end[[47, 47]])
    assert torch.equal(chunks[1][0, 32, :, 0, 0], frame_end[[45, 46, 47, 47, 47]])

    cache.reset()
    assert cache.chunks_pushed == 0 and not cache.buffer.any()


def test_cache_pushes_are_validated():
    cache = AudioContextCache(last_sample_encoder, new_frames=28)
    with pytest.raises(AudioError):
        cache.push(torch.zeros(17919))
    with pytest.raises(AudioError):
        cache.push(torch.zeros(17921), pad=True)
    with pytest.raises(AudioError):
        cache.push(torch.full((17920,), float("nan")))
    context = cache.push(torch.ones(1000), pad=True)
    assert context.shape == (1, 33, 5, 1, 1)
    assert cache.buffer[-17920:-16920].eq(1).all() and not cache.buffer[-16920:].any()
    with pytest.raises(ConfigError):
        AudioContextCache(last_sample_encoder, new_frames=34)


# --------------------------------------------------------------------------------------------------
# Once mode


def official_once_chunks(num_samples: int, slice_len: int) -> list[torch.Tensor]:
    """The official script's once mode, written out on frame indices."""
    frame_num, slice_samples = 33, slice_len * 640
    remainder = (num_samples - frame_num * 640) % slice_samples
    padded = num_samples + (slice_samples - remainder if remainder > 0 else 0)
    frames = int(padded * 25 / 16000)
    all_windows = (torch.arange(frames)[:, None] + torch.arange(-2, 3)).clamp(0, frames - 1)
    return [all_windows[i * slice_len : i * slice_len + frame_num] for i in range((frames - frame_num) // slice_len)]


@pytest.mark.parametrize(
    ("num_samples", "new_frames"), [(70_001, 24), (50_000, 28), (21_120, 28), (9_000, 24), (3_000, 28)]
)
def test_offline_chunks_match_official(num_samples, new_frames):
    audio = torch.rand(num_samples, generator=torch.Generator().manual_seed(num_samples))
    expected = official_once_chunks(num_samples, new_frames)

    quirky = encode_offline(frame_index_encoder, audio, new_frames, official_quirks=True)
    assert len(quirky) == len(expected) == num_offline_chunks(num_samples, new_frames, official_quirks=True)
    for got, want in zip(quirky, expected, strict=True):
        assert torch.equal(got[0, :, :, 0, 0].long(), want)

    full = encode_offline(frame_index_encoder, audio, new_frames)
    assert len(full) == len(expected) + 1 == num_offline_chunks(num_samples, new_frames)
    last = full[-1][0, :, :, 0, 0].long()
    frames = full.features.shape[0]
    assert last[-1].tolist() == [frames - 3, frames - 2, frames - 1, frames - 1, frames - 1]
    assert (frames - 33) % new_frames == 0 and frames * 640 >= num_samples


# --------------------------------------------------------------------------------------------------
# Waveform hygiene


def test_resample_real_file_length():
    pcm, sr = read_wav("speech_fr_female_8k_29s.wav")
    assert sr == 8000
    out = resample(to_mono(pcm), sr, 16000)
    assert out.dtype == torch.float32 and out.ndim == 1
    assert abs(out.numel() - round(pcm.shape[0] * 16000 / sr)) <= 1
    assert 0 < out.abs().max() <= 1.0


def test_resample_keeps_pitch():
    sr = 44100
    t = torch.arange(sr) / sr
    out = resample(torch.sin(2 * math.pi * 440 * t), sr, 16000)
    assert out.numel() == 16000
    spectrum = torch.fft.rfft(out).abs()
    assert int(spectrum.argmax()) == 440  # 1 s of audio: bin k is k Hz
    assert torch.equal(resample(out, 16000, 16000), out)


def test_stereo_to_mono():
    pcm, sr = read_wav("speech_en_radio31_16k_8s.wav")
    assert pcm.shape == (128000, 2)
    mono = to_mono(pcm)
    expected = torch.from_numpy(pcm.astype(np.float32) / 32768).mean(dim=1)
    assert torch.allclose(mono, expected, atol=1e-7)
    assert torch.allclose(to_mono(pcm.T.copy()), mono, atol=1e-7)
    assert torch.allclose(prepare_waveform(pcm, sr), mono, atol=1e-7)


@pytest.mark.parametrize(
    "bad",
    [np.zeros(0, np.float32), np.array([0.1, np.nan, 0.2]), np.array([0.0, np.inf]), np.zeros((2, 3, 4))],
    ids=["empty", "nan", "inf", "3d"],
)
def test_bad_audio_raises(bad):
    with pytest.raises(AudioError) as info:
        prepare_waveform(bad, 16000)
    assert "\n" not in str(info.value)


def test_bad_inputs_raise():
    with pytest.raises(AudioError):
        resample(np.zeros(100, np.float32), 0)
    with pytest.raises(AudioError):
        check_waveform(np.zeros((2, 100), np.float32))
    with pytest.raises(AudioError):
        check_waveform(np.array(["a", "b"]))


# --------------------------------------------------------------------------------------------------
# Loading


def test_from_pretrained_folder(tmp_path, features_fixture, tiny_encoder):
    tensors, meta = features_fixture
    tiny_wav2vec(tensors, meta, "weights/").save_pretrained(tmp_path)
    Wav2Vec2FeatureExtractor(do_normalize=True).save_pretrained(tmp_path)
    loaded = Wav2VecEncoder.from_pretrained(tmp_path)
    assert loaded.normalize and not loaded.model.training
    waveform = tensors["case2/waveform"]
    assert torch.equal(loaded(waveform), tiny_encoder(waveform))

    Wav2Vec2FeatureExtractor(do_normalize=False).save_pretrained(tmp_path)
    assert not Wav2VecEncoder.from_pretrained(str(tmp_path)).normalize


def test_from_pretrained_hub_layout(tmp_path, features_fixture, tiny_encoder):
    """A checkpoint laid out like facebook/wav2vec2-base-960h on the hub: a CTC model (`wav2vec2.`
    prefix, an `lm_head`) whose positional conv stores the legacy weight-norm names weight_g/weight_v."""
    tensors, meta = features_fixture
    config = Wav2Vec2Config(**meta["wav2vec2_config"])
    config.architectures = ["Wav2Vec2ForCTC"]
    config.save_pretrained(tmp_path)
    legacy = {
        "wav2vec2."
        + key.replace("parametrizations.weight.original0", "weight_g").replace(
            "parametrizations.weight.original1", "weight_v"
        ): value.contiguous()
        for key, value in prefixed(tensors, "weights/").items()
    }
    legacy["lm_head.weight"] = torch.zeros(config.vocab_size, config.hidden_size)
    legacy["lm_head.bias"] = torch.zeros(config.vocab_size)
    save_file(legacy, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})

    loaded = Wav2VecEncoder.from_pretrained(tmp_path)  # no preprocessor_config.json: normalises
    waveform = tensors["case1/waveform"]
    assert torch.equal(loaded(waveform), tiny_encoder(waveform))


def test_from_pretrained_errors(tmp_path):
    missing = tmp_path / "no" / "such" / "wav2vec2"
    with pytest.raises(CheckpointError, match=str(missing)):
        Wav2VecEncoder.from_pretrained(missing)
    with pytest.raises(CheckpointError, match="empty"):
        (tmp_path / "empty").mkdir()
        Wav2VecEncoder.from_pretrained(tmp_path / "empty")
    (tmp_path / "file.bin").write_bytes(b"")
    with pytest.raises(CheckpointError, match="file.bin"):
        Wav2VecEncoder.from_pretrained(tmp_path / "file.bin")
    with pytest.raises(CheckpointError, match="facebook/wav2vec2-base-960h") as info:
        Wav2VecEncoder.from_pretrained(
            "facebook/wav2vec2-base-960h", local_files_only=True, cache_dir=tmp_path / "cache"
        )
    assert "\n" not in str(info.value)
