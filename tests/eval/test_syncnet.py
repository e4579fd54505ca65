"""SyncNet: syncnet_v2 state-dict layout, the offset/confidence arithmetic, and the offset search on a real clip."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from flashhead.eval.syncnet import (
    VSHIFT,
    SyncNet,
    audio_log_energy,
    energy_features,
    face_track_crops,
    load_syncnet,
    mfcc,
    offset_from_distances,
    offset_search,
    pairwise_offset_distances,
    sync_scores,
    syncnet_features,
)
from flashhead.eval.weights import MetricUnavailable, resolve_weights

# Shapes of a sample of syncnet_v2.model's tensors (syncnet_python's SyncNetModel.S layer indices).
SYNCNET_V2_SHAPES = {
    "netcnnaud.0.weight": (64, 1, 3, 3),
    "netcnnaud.1.running_var": (64,),
    "netcnnaud.4.weight": (192, 64, 3, 3),
    "netcnnaud.8.weight": (384, 192, 3, 3),
    "netcnnaud.11.weight": (256, 384, 3, 3),
    "netcnnaud.14.weight": (256, 256, 3, 3),
    "netcnnaud.18.weight": (512, 256, 5, 4),
    "netcnnaud.19.running_mean": (512,),
    "netfcaud.0.weight": (512, 512),
    "netfcaud.1.weight": (512,),
    "netfcaud.3.weight": (1024, 512),
    "netcnnlip.0.weight": (96, 3, 5, 7, 7),
    "netcnnlip.4.weight": (256, 96, 1, 5, 5),
    "netcnnlip.8.weight": (256, 256, 1, 3, 3),
    "netcnnlip.11.weight": (256, 256, 1, 3, 3),
    "netcnnlip.14.weight": (256, 256, 1, 3, 3),
    "netcnnlip.18.weight": (512, 256, 1, 6, 6),
    "netcnnlip.19.bias": (512,),
    "netfclip.3.bias": (1024,),
}


def test_state_dict_layout_matches_syncnet_v2():
    state = SyncNet().state_dict()
    for key, shape in SYNCNET_V2_SHAPES.items():
        assert tuple(state[key].shape) == shape, key
    convs = [k for k in state if k.endswith(".weight") and state[k].ndim >= 4]
    assert len(convs) == 12  # six conv layers per tower
    assert not [k for k in state if not k.startswith(("netcnnaud.", "netcnnlip.", "netfcaud.", "netfclip."))]


def test_random_weights_roundtrip_and_shapes(tmp_path):
    torch.manual_seed(0)
    model = SyncNet().eval()
    # Saved the way the 2017 file is: no num_batches_tracked buffers.
    path = tmp_path / "syncnet_v2.model"
    torch.save({k: v for k, v in model.state_dict().items() if "num_batches" not in k}, path)
    loaded = load_syncnet(path)
    video, audio = torch.rand(2, 3, 5, 224, 224) * 255, torch.randn(2, 1, 13, 20)
    with torch.no_grad():
        assert loaded.forward_lip(video).shape == (2, 1024)
        assert loaded.forward_aud(audio).shape == (2, 1024)
        assert torch.equal(loaded.forward_aud(audio), model.forward_aud(audio))
    torch.save({"netcnnaud.0.weight": torch.zeros(1)}, tmp_path / "bad.model")
    with pytest.raises(MetricUnavailable, match="not syncnet_v2 weights"):
        load_syncnet(tmp_path / "bad.model")


def test_offset_and_confidence_by_hand():
    # vshift = 2: columns are candidate shifts -2..+2 (audio index i + j - 2 against video index i).
    dists = np.array(
        [
            [4.0, 1.0, 3.0, 5.0, 7.0],
            [5.0, 2.0, 3.0, 4.0, 5.0],
            [3.0, 3.0, 3.0, 6.0, 6.0],
        ]
    )
    r = offset_from_distances(dists, vshift=2)
    # column means: [4, 2, 3, 5, 6]; min 2 at j = 1; median 4
    assert np.allclose(r.mean_dists, [4, 2, 3, 5, 6])
    assert r.offset == 2 - 1 == 1  # the video lags the audio by one frame
    assert r.min_dist == pytest.approx(2.0)  # Sync-D
    assert r.confidence == pytest.approx(4.0 - 2.0)  # Sync-C = median - min


def test_pairwise_distances_zero_pad_like_calc_pdist():
    video = np.array([[1.0], [2.0], [3.0]])
    audio = np.array([[10.0], [20.0], [30.0]])
    d = pairwise_offset_distances(video, audio, vshift=1)
    # row i, column j compares video[i] with audio[i + j - 1], zeros outside the clip
    expected = np.array([[1, 9, 19], [8, 18, 28], [17, 27, 3]], dtype=np.float64)
    assert np.allclose(d, expected, atol=1e-4)


def test_random_weight_syncnet_end_to_end_on_a_real_clip(clips):
    torch.manual_seed(0)
    clip = clips("talk_man_suit_6s.mp4", 16)
    boxes = np.tile([150.0, 100.0, 350.0, 330.0], (len(clip.frames), 1))
    crops = face_track_crops(clip.frames, boxes)
    assert crops.shape == (16, 224, 224, 3)
    assert np.array_equal(crops[0, 112, 112], crops[0, 112, 112][::-1][::-1])  # BGR uint8
    lip, aud = syncnet_features(SyncNet().eval(), crops, clip.audio)
    assert lip.shape == aud.shape == (16 - 5, 1024)  # syncnet_python stops 5 windows before the end
    r = sync_scores(SyncNet().eval(), clip.frames, clip.audio, boxes, vshift=3)
    assert -3 <= r.offset <= 3 and np.isfinite(r.confidence) and r.mean_dists.shape == (7,)


def test_mfcc_is_python_speech_features_at_int16_scale(clips):
    psf = pytest.importorskip("python_speech_features")
    audio = clips("talk_man_suit_6s.mp4", 25).audio
    ours = mfcc(audio)
    assert ours.shape[1] == 13 and abs(len(ours) - len(audio) / 160) <= 2
    pcm16 = np.clip(np.round(audio.astype(np.float64) * 32768), -32768, 32767).astype(np.int16)
    assert np.array_equal(ours, psf.mfcc(pcm16, 16000))


def _shifted(audio: np.ndarray, frames: int) -> np.ndarray:
    """Delay the audio by `frames` video frames (negative: advance), keeping its length."""
    s = frames * 640
    if s >= 0:
        return np.concatenate([np.zeros(s, audio.dtype), audio])[: len(audio)]
    return np.concatenate([audio[-s:], np.zeros(-s, audio.dtype)])


@pytest.fixture(scope="module")
def suit_mouth(clips):
    pytest.importorskip("mediapipe")
    from flashhead.eval.landmarks import FaceMesh, mouth_opening

    clip = clips("talk_man_suit_6s.mp4")
    return clip, mouth_opening(FaceMesh().track(clip.frames))


def test_offset_search_recovers_a_known_audio_shift(suit_mouth):
    """Weight-free AV pair (mouth opening vs audio log-energy) through the same offset search as SyncNet."""
    clip, opening = suit_mouth
    found = {}
    for shift in (0, -8, -5, -2, 3, 5, 8):
        energy = audio_log_energy(_shifted(clip.audio, shift), len(clip.frames))
        found[shift] = offset_search(*energy_features(opening, energy)).offset
    print("offset found per audio delay (frames):", found)
    base = found[0]  # the clip's own small offset (speech onset vs. mouth opening, AAC priming)
    assert abs(base) <= 3
    for shift, offset in found.items():
        # delaying the audio by k frames makes the video lead by k more: offset drops by k
        assert offset == base - shift, (shift, offset, base)


@pytest.mark.slow
def test_real_syncnet_recovers_a_known_shift(suit_mouth):
    """Needs syncnet_v2.model (--syncnet / $FLASHHEAD_SYNCNET / eval home); skipped where it is absent."""
    try:
        resolve_weights(__import__("flashhead.eval.weights", fromlist=["SYNCNET"]).SYNCNET)
    except MetricUnavailable as e:
        pytest.skip(str(e))
    from flashhead.eval.landmarks import FaceMesh, face_boxes

    clip, _ = suit_mouth
    model = load_syncnet()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    boxes = face_boxes(FaceMesh().track(clip.frames))
    base = sync_scores(model, clip.frames, clip.audio, boxes, device=device)
    moved = sync_scores(model, clip.frames, _shifted(clip.audio, 5), boxes, device=device)
    print(f"real SyncNet: offset {base.offset}, Sync-C {base.confidence:.2f}, Sync-D {base.min_dist:.2f}")
    assert base.confidence > 1.0 and abs(base.offset) <= 3
    assert moved.offset == base.offset - 5
    assert VSHIFT == 15
