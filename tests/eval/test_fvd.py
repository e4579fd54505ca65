"""FVD's code path with a stand-in TorchScript detector that has StyleGAN-V's I3D calling convention."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from flashhead.eval.frechet import frechet_distance_from_features
from flashhead.eval.fvd import fvd_from_features, i3d_features, load_i3d, video_clips
from flashhead.eval.weights import MetricUnavailable

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")


class FakeI3D(torch.nn.Module):
    """Same signature as i3d_torchscript.pt: uint8 (B, 3, T, H, W) + flags -> (B, 400) features."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(3 * 4 * 4, 400)

    def forward(self, x: torch.Tensor, rescale: bool = False, resize: bool = False, return_features: bool = False):
        y = x.float()
        if rescale:
            y = y / 127.5 - 1
        if resize:
            y = torch.nn.functional.interpolate(y, size=(y.shape[2], 224, 224), mode="trilinear", align_corners=False)
        assert return_features
        pooled = torch.nn.functional.adaptive_avg_pool3d(y, (1, 4, 4)).flatten(1)  # B, 48
        return self.proj(pooled)


@pytest.fixture(scope="module")
def fake_i3d_path(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("i3d") / "i3d_torchscript.pt"
    torch.jit.script(FakeI3D()).save(str(path))
    return path


def test_clips_are_non_overlapping_16_frame_windows():
    frames = np.arange(50)[:, None, None, None] * np.ones((1, 2, 2, 3), np.uint8)
    clips = video_clips(frames)
    assert [c[0, 0, 0, 0] for c in clips] == [0, 16, 32]
    assert all(c.shape == (16, 2, 2, 3) for c in clips)
    assert len(video_clips(frames, clips_per_video=1)) == 1


def test_fvd_through_a_torchscript_detector(fake_i3d_path, clips):
    detector = load_i3d(fake_i3d_path)
    a = clips("talk_man_suit_6s.mp4", 96).frames
    b = clips("talk_woman_blonde_8s.mp4", 96).frames
    fa = i3d_features(detector, video_clips(a[:, ::4, ::4]) + video_clips(a[::-1, ::4, ::4]))
    fb = i3d_features(detector, video_clips(b[:, ::4, ::4]) + video_clips(b[::-1, ::4, ::4]))
    assert fa.shape == (12, 400)
    assert fvd_from_features(fa, fa) == pytest.approx(0.0, abs=1e-6)
    different = fvd_from_features(fa, fb)
    assert different > 1.0
    # StyleGAN-V statistics: covariance over N (ddof=0), which differs from FID's N - 1.
    assert different == pytest.approx(frechet_distance_from_features(fa, fb, ddof=0), rel=1e-9)
    assert different != pytest.approx(frechet_distance_from_features(fa, fb, ddof=1), rel=1e-6)


def test_missing_detector_is_unavailable(no_weights, tmp_path):
    with pytest.raises(MetricUnavailable, match="no i3d weights"):
        load_i3d()
    junk = tmp_path / "i3d_torchscript.pt"
    junk.write_bytes(b"not a torchscript archive")
    with pytest.raises(MetricUnavailable, match="cannot load"):
        load_i3d(junk)
