"""Drift: flags a slow colour shift and a slow identity morph over 60 s, stays flat on a real looped clip."""

from __future__ import annotations

import numpy as np
import pytest

from flashhead.eval.drift import drift, ping_pong

FPS, SECONDS = 25, 60
N = FPS * SECONDS


@pytest.fixture(scope="module")
def woman(clips):
    return clips("talk_woman_blonde_8s.mp4").frames


@pytest.fixture(scope="module")
def man(clips):
    return clips("talk_man_map_bg_5s.mp4").frames


def test_real_clip_looped_to_60s_is_flat(woman, dlib_embedder):
    r = drift(ping_pong(woman, N), FPS, embedder=dlib_embedder, identity_fps=0.5, colour_fps=2)
    print(f"\nflat: colour {r.colour_slope_per_min:+.3f} dE/min, identity {r.identity_slope_per_min:+.4f} CSIM/min")
    assert len(r.window_centres_s) == 12
    assert not r.colour_drift and not r.identity_drift
    assert abs(r.colour_slope_per_min) < 0.5 and abs(r.identity_slope_per_min) < 0.01


def test_slow_colour_shift_is_flagged(woman):
    def warming():
        for i, frame in enumerate(ping_pong(woman, N)):
            x = frame.astype(np.float32)
            x[..., 0] *= 1 + 0.2 * i / N  # red up 20 % over the minute
            x[..., 2] *= 1 - 0.2 * i / N  # blue down 20 %
            yield np.clip(x, 0, 255).astype(np.uint8)

    r = drift(warming(), FPS, colour_fps=2)
    print(f"\ncolour shift: {r.colour_slope_per_min:+.2f} dE/min")
    assert r.colour_drift and r.colour_slope_per_min > 10
    assert r.identity_csim is None  # no embedder given
    assert np.all(np.diff(r.colour_delta_e[1:]) > 0)  # grows window after window


def test_slow_identity_morph_is_flagged(woman, man, dlib_embedder):
    def morph():
        for i, (a, b) in enumerate(zip(ping_pong(woman, N), ping_pong(man, N), strict=True)):
            alpha = i / (N - 1)  # cross-dissolve from her to him over the minute
            yield ((1 - alpha) * a + alpha * b).astype(np.uint8)

    r = drift(morph(), FPS, embedder=dlib_embedder, identity_fps=0.5, colour_fps=1)
    print(f"\nidentity morph: {r.identity_slope_per_min:+.3f} CSIM/min, curve {np.round(r.identity_csim, 3)}")
    assert r.identity_drift and r.identity_slope_per_min < -0.1
    assert r.identity_csim[-1] < r.identity_csim[0] - 0.1
