"""The log-mel audio encoder of flashhead-tiny: shapes, loudness handling, streaming invariance, round trip."""

from __future__ import annotations

import json

import pytest
import torch

from _util import MEDIA
from flashhead.errors import CheckpointError
from flashhead.media.audio_io import load_audio
from flashhead.models.audio import AudioContextCache
from flashhead.models.mel_encoder import MelAudioEncoder, MelConfig

SPEECH = MEDIA / "audio" / "speech_en_radio31_16k_8s.wav"


@pytest.fixture(scope="module")
def speech() -> torch.Tensor:
    return torch.from_numpy(load_audio(SPEECH)[0].copy())


def test_one_row_per_video_frame(speech):
    enc = MelAudioEncoder()
    for n in (640, 12_345, len(speech)):
        out = enc(speech[:n])
        assert out.shape == (n * 25 // 16000, 2, 64) and out.dtype == torch.float32
    assert enc.num_layers == 2 and enc.hidden_size == 64
    # Speech lands in a sane range (the DiT's projection sees roughly unit-scale inputs).
    out = enc(speech)
    assert -3 < out.mean() < 1 and 0.5 < out.std() < 2


def test_loudness_is_normalised_and_silence_is_not_amplified(speech):
    enc = MelAudioEncoder()
    loud, quiet = enc(speech), enc(speech * 0.05)
    # -26 dB of level would shift every log-mel by ~1.5 without the gain; with it, hardly at all.
    assert (loud - quiet).abs().mean() < 0.1
    floor = enc(torch.zeros(16000))
    hiss = enc(torch.randn(16000) * 3e-4)  # -70 dBFS noise stays near the silence floor
    assert torch.allclose(floor, floor.flatten()[0].expand_as(floor))
    assert (hiss - floor).abs().max() < 0.5 and (loud.mean() - floor.mean()) > 1.0


def test_leading_silence_in_the_cache_does_not_change_later_frames(speech):
    enc = MelAudioEncoder()
    padded = torch.cat([torch.zeros(64_000), speech[:64_000]])
    assert torch.allclose(enc(padded)[100:], enc(speech[:64_000]), atol=1e-5)
    batch = enc(torch.stack([speech[:32_000], speech[32_000:64_000]]))
    assert torch.allclose(batch[1], enc(speech[32_000:64_000]), atol=1e-5)


def test_a_tone_lights_its_own_mel_band():
    enc = MelAudioEncoder()
    t = torch.arange(16000) / 16000
    low, high = enc(0.3 * torch.sin(2 * torch.pi * 300 * t)), enc(0.3 * torch.sin(2 * torch.pi * 3000 * t))
    assert low[5:-5].mean((0, 1)).argmax() < high[5:-5].mean((0, 1)).argmax()


def test_works_in_the_streaming_cache(speech):
    cache = AudioContextCache(MelAudioEncoder(), new_frames=28)
    ctx = cache.push(speech[: cache.slice_samples])
    assert ctx.shape == (1, 33, 5, 2, 64)


def test_save_and_load(tmp_path, speech):
    enc = MelAudioEncoder(MelConfig(n_mels=40))
    enc.save_pretrained(tmp_path / "a")
    back = MelAudioEncoder.from_pretrained(tmp_path / "a")
    assert back.mel_config == enc.mel_config and torch.equal(back(speech[:8000]), enc(speech[:8000]))
    (tmp_path / "a" / "config.json").write_text(json.dumps({"_class_name": "MelAudioEncoder", "n_bins": 3}))
    with pytest.raises(CheckpointError, match="unknown mel encoder settings"):
        MelAudioEncoder.from_pretrained(tmp_path / "a")
    with pytest.raises(CheckpointError, match="cannot read"):
        MelAudioEncoder.from_pretrained(tmp_path / "missing")


def test_the_waveform_goes_to_the_device_without_blocking_the_host():
    """The engine encodes the next chunk's audio on a side CUDA stream from pinned memory; a blocking copy there
    holds the host until that stream's queue has run (tests/pipeline/test_gpu_stream_host.py found it on the
    GPU). "meta" stands in for the GPU: the copy to it must be non-blocking."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Seen(Exception):
        pass

    copies = []

    class Copies(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            target = kwargs.get("device")
            if func is torch.ops.aten._to_copy.default and target is not None and args[0].device != target:
                copies.append(kwargs.get("non_blocking", False))
                raise Seen  # the rest of the forward does not matter here
            return func(*args, **kwargs)

    encoder = MelAudioEncoder().to("meta")
    with pytest.raises(Seen), Copies():
        encoder(torch.zeros(2, 16000))
    assert copies == [True]
