"""CSIM with dlib's face embedding separates same-person from different-person frames of the real clips."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from _util import MEDIA
from flashhead.eval.identity import cosine, csim

CLIPS = sorted(p.name for p in (MEDIA / "video").glob("*.mp4"))  # six clips, six different people


@pytest.fixture(scope="module")
def embeddings(clips, dlib_embedder):
    out = {}
    for name in CLIPS:
        frames = clips(name).frames
        picks = np.linspace(0, len(frames) - 1, 4).round().astype(int)  # 4 frames spread over the clip
        out[name] = [dlib_embedder(frames[i]) for i in picks]
    return out


def test_csim_separates_same_and_different_people(embeddings):
    assert all(e is not None for es in embeddings.values() for e in es), "dlib found no face in a frame"
    same = [cosine(a, b) for es in embeddings.values() for a, b in itertools.combinations(es, 2)]
    diff = [
        cosine(a, b) for n1, n2 in itertools.combinations(embeddings, 2) for a in embeddings[n1] for b in embeddings[n2]
    ]
    print(
        f"\nCSIM same person: n={len(same)} min {min(same):.3f} mean {np.mean(same):.3f} max {max(same):.3f}"
        f"\nCSIM different people: n={len(diff)} min {min(diff):.3f} mean {np.mean(diff):.3f} max {max(diff):.3f}"
    )
    auc = np.mean([s > d for s in same for d in diff])
    assert auc == 1.0  # every same-person pair scores above every different-person pair
    assert np.mean(same) - np.mean(diff) > 0.1
    # rank-1 identification: each frame's most similar other frame is from its own clip
    flat = [(n, e) for n, es in embeddings.items() for e in es]
    for i, (name, e) in enumerate(flat):
        best = max((cosine(e, f), m) for j, (m, f) in enumerate(flat) if j != i)
        assert best[1] == name


def test_csim_api_against_reference(clips, dlib_embedder):
    frames = clips("talk_woman_blonde_8s.mp4").frames
    other = clips("talk_man_map_bg_5s.mp4").frames
    own = csim(dlib_embedder, frames[::50], frames[0])
    foreign = csim(dlib_embedder, other[::50], frames[0])
    assert own["frames_used"] == len(frames[::50]) and own["frames_without_face"] == 0
    assert own["csim"] > 0.95 > foreign["csim"]


class _TinyRecogniser(torch.nn.Module):
    """Stand-in ArcFace with the same interface: (B, 3, 112, 112) in [-1, 1] -> (B, 512)."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(3 * 28 * 28, 512)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(torch.nn.functional.avg_pool2d(x, 4).flatten(1))


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_arcface_path_aligns_and_embeds(tmp_path, clips):
    pytest.importorskip("mediapipe")
    from flashhead.eval.identity import ArcFaceEmbedder

    torch.manual_seed(0)
    path = tmp_path / "arcface.pt"
    torch.jit.script(_TinyRecogniser()).save(str(path))
    embedder = ArcFaceEmbedder(path)
    frame = clips("talk_woman_blonde_8s.mp4").frames[0]
    lm = embedder._mesh(frame)
    crop = ArcFaceEmbedder.align(frame, lm)
    assert crop.shape == (112, 112, 3) and crop.mean() > 20  # a face, not the black border
    e = embedder(frame)
    assert e.shape == (512,) and cosine(e, embedder(frame)) == pytest.approx(1.0)
