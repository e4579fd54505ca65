"""`flashhead train tiny` end to end at toy size, one phase per call as on the time-limited device."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from _util import MEDIA, REPO

PORTRAIT = "cc0_elderly_man_smiling.jpg"
SPEECH = MEDIA / "audio" / "speech_en_radio31_16k_8s.wav"
TOY = [  # 64 px, a couple of steps of everything, no worker processes
    "vae.height=64", "vae.width=64", "vae.batch_size=2", "vae.total_steps=2", "vae.warmup_steps=1",
    "vae.num_workers=0", "vae.stats_batches=1", "vae.max_minutes=null", "cache.batch_size=4",
    "stage1.data.height=64", "stage1.data.width=64", "stage1.data.micro_batch_size=2", "stage1.data.num_workers=0",
    "stage1.optim.total_steps=3", "stage1.optim.warmup_steps=1", "stage1.log.interval=1", "stage1.model.compile=false",
    "stage1.log.tensorboard=false", 'stage1.data.source_weights={"*": 1.0}', "export.height=64", "export.width=64",
    "stage2.data.height=64", "stage2.data.width=64", "stage2.data.micro_batch_size=1", "stage2.data.num_workers=0",
    "stage2.distill.total_steps=2", "stage2.distill.num_chunks=2", "stage2.distill.critic_ratio=1",
    "stage2.generator_optim.warmup_steps=0", "stage2.critic_optim.warmup_steps=0", "stage2.log.interval=1",
    f"eval.portraits=[{PORTRAIT}]", f"eval.portrait_dir={MEDIA / 'portraits'}", f"eval.audio={SPEECH}",
    "eval.seconds=1.0",
]  # fmt: skip


def _tiny(dataset_dir, out, *args: str) -> subprocess.CompletedProcess:
    sets = [a for item in TOY for a in ("--set", item)]
    cmd = [sys.executable, "-m", "flashhead.train", "tiny", "--data", str(dataset_dir), "--out", str(out), *sets]
    env = {**os.environ, "PYTHONPATH": f"{REPO / 'src'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    return subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=600, env=env, cwd=REPO)


@pytest.mark.slow  # four CLI processes (VAE, cache, Stage 1, Stage 2, export, evaluation): about 2 min on 2 cores
def test_phases_run_one_call_each_and_evaluate_held_back_photos(dataset_dir, tmp_path):
    out = tmp_path / "run"
    first = _tiny(dataset_dir, out, "--until", "cache")
    assert first.returncode == 0, first.stderr[-2000:]
    assert (out / "vae" / "vae" / "config.json").is_file() and (out / "cache" / "cache.json").is_file()
    assert not (out / "stage1").exists()  # stopped after the cache phase

    second = _tiny(dataset_dir, out, "--until", "stage2")
    assert second.returncode == 0, second.stderr[-2000:]
    assert (out / "stage1" / "DONE").is_file() and (out / "stage2" / "DONE").read_text().strip() == "2"
    teacher = json.loads((out / "teacher" / "generation_config.json").read_text())
    assert teacher["sampler"] == "euler" and teacher["guidance_scale"] == 2.0  # the recipe's `export` sampling
    assert not (out / "flashhead-tiny").exists()

    third = _tiny(dataset_dir, out, "--until", "eval", "--eval-clips", "1")
    assert third.returncode == 0, third.stderr[-2000:]
    assert "held-back photos: mouth-region change vs speech energy r =" in third.stdout
    assert "(Stage-1 teacher: r = " in third.stdout
    shipped = json.loads((out / "flashhead-tiny" / "generation_config.json").read_text())
    assert shipped["sampler"] == "distilled" and shipped["guidance_scale"] == 1.0  # the student ships
    assert json.loads((out / "flashhead-tiny" / "model_index.json").read_text())["name"] == "flashhead-tiny"
    summary = json.loads((out / "eval.json").read_text())
    photos = summary["real_portraits"]["portraits"]
    assert list(photos) == [PORTRAIT] and -1 <= photos[PORTRAIT]["r_mouth_change_vs_energy"] <= 1
    assert -1 <= summary["teacher"]["r_generated"] <= 1
    assert (out / "curves.png").stat().st_size > 10_000
    config = (out / "stage1" / "config.yaml").read_text()
    assert f"cache: {out / 'cache'}" in config  # Stage 1 trained from the cache

    bad = _tiny(dataset_dir, out, "--until", "everything")
    assert bad.returncode != 0 and "--until must be one of" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1


def test_device_payload_carries_the_evaluation_speech_at_16_khz(dataset_dir, tmp_path):
    """benchmarks/tiny_payload.py packs shards + the held-back photos (cropped) + the evaluation speech."""
    import io
    import tarfile

    from scipy.io import wavfile

    from flashhead.train.tiny import load_recipe

    env = {**os.environ, "PYTHONPATH": f"{REPO / 'src'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "tiny_payload.py"), "--data",
                           f"toy={dataset_dir}", "--out", str(tmp_path), "--size", "64"],
                          capture_output=True, text=True, timeout=300, env=env, cwd=REPO)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    with tarfile.open(tmp_path / "data.tar.xz") as tar:
        names = tar.getnames()
        rate, speech = wavfile.read(io.BytesIO(tar.extractfile("eval/speech.wav").read()))
    recipe = load_recipe()["eval"]
    assert rate == 16000 and len(speech) == int(recipe["seconds"] * 16000)  # the first eval.seconds, at 16 kHz
    assert speech.std() > 100  # speech, not silence
    assert {f"eval/portraits/{p}" for p in recipe["portraits"]} <= set(names)
    assert any(n.startswith("toy/") and n.endswith(".tar") for n in names)
    assert (tmp_path / "run.sh").read_text() == (REPO / "benchmarks" / "tiny_run.sh").read_text()


def test_evaluation_speech_reads_without_pyav(monkeypatch):
    """Training machines may lack PyAV: the photo evaluation's WAV still loads, resampled to 16 kHz."""
    import numpy as np

    from flashhead.media.audio_io import load_audio
    from flashhead.train.tiny import _speech

    with_av = _speech(SPEECH, 16000)
    monkeypatch.setitem(sys.modules, "flashhead.media.audio_io", None)  # importing it now raises ImportError
    without = _speech(SPEECH, 16000)
    assert without.dtype == np.float32 and abs(len(without) - len(with_av)) <= 1
    assert np.corrcoef(without[: len(with_av)], with_av[: len(without)])[0, 1] > 0.99
    assert len(load_audio(SPEECH, target_sr=16000)[0]) == len(with_av)
    eight_khz = _speech(SPEECH, 8000)  # another rate: resampled
    assert abs(len(eight_khz) - len(with_av) // 2) <= 2
