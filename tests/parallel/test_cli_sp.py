"""`flashhead generate --sp N`: the command starts torchrun itself; rank 0 writes the same video as one process.

The tiny model has too few tokens for the split to pay (flashhead.parallel.policy), so under --sp 2 its
leader works alone and the follower returns at once; the split itself is tested in test_sp_pipeline.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
import wave

import numpy as np
import pytest

from _util import MEDIA, REPO

PORTRAIT = MEDIA / "portraits" / "astronaut_woman_512.png"


def _short_speech(path, seconds: float = 1.2):
    with wave.open(str(MEDIA / "audio" / "speech_en_radio31_16k_8s.wav")) as src:
        params, pcm = src.getparams(), src.readframes(int(seconds * src.getframerate()))
    with wave.open(str(path), "wb") as dst:
        dst.setparams(params)
        dst.writeframes(pcm)
    return path


def _run(*args: str, torchrun: int = 0) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src")}
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={torchrun}"] if torchrun else []
    cmd = [sys.executable, *launcher, "-m", "flashhead.cli", "generate", *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)


@pytest.mark.slow  # two CPU processes generating next to a third: ~80 s on 2 shared cores
def test_generate_sp2_matches_one_process(tmp_path):
    from flashhead.media.video_io import read_video

    speech = _short_speech(tmp_path / "speech.wav")
    common = ["--model", "tiny", "-i", str(PORTRAIT), "-a", str(speech), "--device", "cpu"]
    proc = _run(*common, "-o", str(tmp_path / "sp.mp4"), "--sp", "2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("wrote") == 1  # only the leader writes and reports
    # One plain process with the same thread count: a different count changes float reductions, and the
    # autoregressive chunks carry such rounding differences on through the whole video.
    single = _run(*common, "-o", str(tmp_path / "one.mp4"))
    assert single.returncode == 0, single.stderr[-3000:]
    a, fps, _ = read_video(tmp_path / "sp.mp4")
    b, _, _ = read_video(tmp_path / "one.mp4")
    assert a.shape == b.shape and len(a) == 30 and fps == 25
    assert np.array_equal(a, b)  # the leader computed alone, as one process does


def test_world_size_mismatch_is_a_clear_error(tmp_path):
    speech = _short_speech(tmp_path / "speech.wav")
    proc = _run("--model", "tiny", "-i", str(PORTRAIT), "-a", str(speech), "-o", str(tmp_path / "x.mp4"),
                "--device", "cpu", "--sp", "3", torchrun=2)  # fmt: skip
    assert proc.returncode != 0
    assert "error: --sp 3 but torchrun started 2 processes" in proc.stderr
    assert not (tmp_path / "x.mp4").exists()
