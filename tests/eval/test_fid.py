"""The FID Inception: torch-fidelity's architecture and key names, torchmetrics' pre-processing, weight lookup."""

from __future__ import annotations

import pytest
import torch

from flashhead.eval.fid import FIDInceptionV3, inception_features, load_inception, resize_bilinear_tf1
from flashhead.eval.weights import MetricUnavailable


@pytest.fixture(scope="module")
def random_weights(tmp_path_factory):
    """A random but well-scaled FID Inception state dict saved as the converted-weights files are."""
    torch.manual_seed(0)
    state = FIDInceptionV3().state_dict()
    for key, value in state.items():
        if key.endswith("running_var"):
            value.uniform_(0.5, 2.0)
        elif key.endswith("running_mean") or key.endswith("bn.bias"):
            value.normal_(0, 0.1)
        elif key.endswith("bn.weight"):
            value.uniform_(0.5, 1.5)
    path = tmp_path_factory.mktemp("inception") / "weights-inception-2015-12-05-6726825d.pth"
    torch.save({k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}, path)
    return path


@pytest.fixture(scope="module")
def images():
    return torch.randint(0, 256, (2, 3, 512, 512), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)


def test_same_pool_features_as_torchmetrics(torchmetrics_fid, random_weights, images):
    if torchmetrics_fid.interpolate_bilinear_2d_like_tensorflow1x is None:
        pytest.skip("torchmetrics' Inception needs torch-fidelity")
    ref = torchmetrics_fid.NoTrainInceptionV3("inception-v3-compat", ["2048"], str(random_weights))
    ours = load_inception(random_weights)
    a, b = ours(images), ref(images)
    rel = float((a - b).norm() / b.norm())
    print(f"pool features vs torchmetrics: rel {rel:.2e}")
    assert a.shape == (2, 2048)
    assert rel < 1e-5


def test_torch_fidelity_loads_our_names_and_agrees_in_tf1_mode(torch_fidelity_inception, random_weights, images):
    # torch-fidelity loads state dicts strictly: this proves our names and shapes are the converted weights'.
    ref = torch_fidelity_inception.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], str(random_weights))
    strip = lambda sd: {k: tuple(v.shape) for k, v in sd.items() if not k.endswith("num_batches_tracked")}  # noqa: E731
    assert strip(ref.state_dict()) == strip(FIDInceptionV3().state_dict())
    (b,) = ref(images)
    a = load_inception(random_weights, resize="tf1")(images)
    rel = float((a - b).norm() / b.norm())
    print(f"pool features vs torch-fidelity (TF1 resize): rel {rel:.2e}")
    assert rel < 1e-5


def test_tf1_resize_matches_torch_fidelity(torch_fidelity_inception):
    from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x

    x = torch.rand(1, 3, 512, 384) * 255
    ref = interpolate_bilinear_2d_like_tensorflow1x(x, size=(299, 299), align_corners=False)
    assert (resize_bilinear_tf1(x, 299) - ref).abs().max() < 1e-3


def test_missing_and_corrupt_weights_are_unavailable(tmp_path, no_weights):
    with pytest.raises(MetricUnavailable, match="no inception weights"):
        load_inception()
    with pytest.raises(MetricUnavailable, match="do not exist"):
        load_inception(tmp_path / "nope.pth")
    bad = tmp_path / "bad.pth"
    torch.save({"conv.weight": torch.zeros(3)}, bad)
    with pytest.raises(MetricUnavailable, match="not an FID Inception state dict"):
        load_inception(bad)


def test_found_in_eval_home_and_features_batched(random_weights, tmp_path, monkeypatch, no_weights, images):
    home = tmp_path / "eval-home"
    home.mkdir()
    (home / random_weights.name).write_bytes(random_weights.read_bytes())
    model = load_inception()  # found via $FLASHHEAD_EVAL_HOME
    frames = [img.permute(1, 2, 0).numpy() for img in images]
    feats = inception_features(model, frames, batch_size=1)
    assert feats.shape == (2, 2048)
    assert torch.allclose(torch.from_numpy(feats).float(), model(images), atol=1e-4)
