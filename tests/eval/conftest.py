"""Fixtures shared by the evaluation tests: reference implementations and short real clips."""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types

import pytest

from _util import MEDIA

VIDEO = MEDIA / "video"


def _torch_fidelity_without_its_init() -> None:
    # torch-fidelity's package __init__ imports its CLIP/VGG extractors, which need torchvision; the Inception
    # extractor torchmetrics uses does not. Without torchvision, register the package so that its submodules
    # import without running that __init__.
    if "torch_fidelity" in sys.modules or importlib.util.find_spec("torch_fidelity") is None:
        return
    try:
        importlib.import_module("torch_fidelity")
        return
    except ImportError:
        sys.modules.pop("torch_fidelity", None)
    spec = importlib.util.find_spec("torch_fidelity")
    package = types.ModuleType("torch_fidelity")
    package.__path__ = list(spec.submodule_search_locations)
    package.__spec__ = spec
    sys.modules["torch_fidelity"] = package


@pytest.fixture(scope="session")
def torchmetrics_fid():
    """torchmetrics.image.fid (the reference FID), or skip."""
    _torch_fidelity_without_its_init()
    pytest.importorskip("torchmetrics")
    try:
        return importlib.import_module("torchmetrics.image.fid")
    except ImportError as e:
        pytest.skip(f"torchmetrics.image.fid not importable: {e}")


@pytest.fixture(scope="session")
def torch_fidelity_inception():
    """torch-fidelity's Inception module (architecture reference), or skip."""
    _torch_fidelity_without_its_init()
    try:
        return importlib.import_module("torch_fidelity.feature_extractor_inceptionv3")
    except ImportError as e:
        pytest.skip(f"torch-fidelity not importable: {e}")


@pytest.fixture(scope="session")
def clips():
    """Decoded real clips (frames + 16 kHz audio), loaded once per session, by name."""
    from flashhead.eval.video import load_clip

    cache: dict = {}

    def get(name: str, max_frames: int | None = None):
        key = (name, max_frames)
        if key not in cache:
            cache[key] = load_clip(VIDEO / name, max_frames)
        return cache[key]

    return get


@pytest.fixture(scope="session")
def dlib_embedder():
    pytest.importorskip("dlib")
    from flashhead.eval.identity import DlibEmbedder
    from flashhead.eval.weights import MetricUnavailable

    try:
        return DlibEmbedder()
    except MetricUnavailable as e:
        pytest.skip(str(e))


@pytest.fixture
def no_weights(tmp_path, monkeypatch):
    """An environment in which no evaluation weights can be found."""
    monkeypatch.setenv("FLASHHEAD_EVAL_HOME", str(tmp_path / "eval-home"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    for var in ("FLASHHEAD_INCEPTION", "FLASHHEAD_I3D", "FLASHHEAD_SYNCNET", "FLASHHEAD_ARCFACE"):
        monkeypatch.delenv(var, raising=False)
