"""The `flashhead` command line, run as a user runs it (a real subprocess)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import typer

from _util import FIXTURES, MEDIA


def flashhead(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flashhead.cli", *args], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("variant", ["lite", "pro"])
def test_info_prints_the_official_parameter_counts(variant):
    manifest = json.loads((FIXTURES / f"official_dit_{variant}_keys.json").read_text())
    out = flashhead("info", "--model", variant, "--json")
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["parameters"] == manifest["num_params"]
    assert report["state_dict_keys"] == manifest["num_keys"]
    assert report["fp32_bytes"] == manifest["fp32_bytes"]
    assert report["tokens_per_chunk_512"] == {"lite": 1280, "pro": 9216}[variant]
    table = flashhead("info", "--model", variant)
    assert f"{manifest['num_params']:,}" in table.stdout


def test_info_reads_a_checkpoint_folder(tmp_path):
    manifest = json.loads((FIXTURES / "official_dit_pro_keys.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(manifest["config"]))
    report = json.loads(flashhead("info", "--model", str(tmp_path), "--json").stdout)
    assert report["parameters"] == manifest["num_params"]


def test_bad_model_gives_one_line_error_and_nonzero_exit():
    out = flashhead("info", "--model", "no/such/model")
    assert out.returncode != 0
    assert out.stderr.strip().count("\n") == 0 and out.stderr.startswith("error: no/such/model")
    assert "Traceback" not in out.stderr


def test_bench_refuses_an_output_folder_that_does_not_exist_before_measuring(tmp_path):
    for option in ("--trace", "--json"):
        out = flashhead("bench", "--model", "lite", "--device", "cpu", option, str(tmp_path / "no" / "out.gz"))
        assert out.returncode != 0
        assert out.stderr.strip() == f"error: {option}: the folder {tmp_path / 'no'} does not exist"
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("args, says", [
    (["--seconds", "0"], "--seconds must be more than 0"),  # was: 'audio is empty' after loading the model
    (["--seconds", "-3"], "--seconds must be more than 0"),  # was: measured on the audio's first seconds, exit 0
    (["--streams", "-5"], "--streams must be a number of streams, or -1"),  # was: accepted, exit 0
    (["--json", "DIR"], "a folder; give a file path"),  # was: IsADirectoryError after the whole benchmark
])  # fmt: skip
def test_bench_refuses_bad_options_in_one_line(tmp_path, args, says):
    from typer.testing import CliRunner

    from flashhead.cli import app

    out = CliRunner().invoke(app, ["bench", "--model", "tiny", *[str(tmp_path) if a == "DIR" else a for a in args]])
    assert out.exit_code == 2 and says in out.output and "Traceback" not in out.output


def test_bench_speech_takes_any_audio_file_and_repeats_a_short_one(tmp_path):
    from flashhead.benchmark import _speech
    from flashhead.errors import AudioError
    from flashhead.media.audio_io import load_audio

    wav = MEDIA / "audio" / "speech_en_radio31_16k_8s.wav"  # 16 kHz mono: read as it is
    eight = _speech(str(wav), 8.0)
    assert np.array_equal(eight, load_audio(wav, 16000)[0][: len(eight)])
    twenty = _speech(str(wav), 20.0)  # longer than the file: repeated, not a synthetic signal
    assert len(twenty) == 320_000 and np.array_equal(twenty[len(eight) : 2 * len(eight)], eight)
    flac = _speech(str(MEDIA / "audio" / "speech_en_male_44k_stereo_11s.flac"), 3.0)  # resampled to 16 kHz mono
    assert flac.shape == (48_000,) and np.abs(flac).max() > 0.05
    (tmp_path / "text.mp4").write_text("not audio")
    with pytest.raises(AudioError, match="not a readable audio"):
        _speech(str(tmp_path / "text.mp4"), 2.0)


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="the defaults under test are the CPU's")
def test_bench_measures_the_shipped_model_on_a_machine_without_a_gpu(tmp_path):
    """`flashhead bench --model tiny` on a laptop: the device and dtype default to the CPU's (float32), and the report
    has the stream's speed and every stage."""
    out = flashhead("bench", "--model", "tiny", "--seconds", "2", "--json", str(tmp_path / "tiny.json"))
    assert out.returncode == 0, out.stderr[-2000:]
    report = json.loads((tmp_path / "tiny.json").read_text())
    assert report == json.loads(out.stdout)
    assert report["model"] == "tiny" and report["weights"] == "shipped" and report["switches"]["dtype"] == "float32"
    assert report["environment"]["gpu"] is None and report["dit_mfu"] is None
    # the VAE stages' work is counted (no GPU peak here to turn it into an MFU)
    assert report["vae_tflop_per_chunk"]["vae_decode"] > 0 and report["vae_tflop_per_chunk"]["vae_encode_motion"] > 0
    assert report["vae_mfu"] is None
    assert report["steady_fps"] > 0 and report["time_to_first_frame_ms"] > 0
    assert {"audio_features", "dit", "vae_decode", "color_correction", "vae_encode_motion"} <= set(
        report["stage_ms_per_chunk"]
    )


def test_commands_work_without_the_serve_extra(tmp_path):
    # A plain `pip install flashhead` has no FastAPI/uvicorn/aiortc: only `serve` may complain, in one line.
    (tmp_path / "sitecustomize.py").write_text(
        "import sys\nfor name in ('starlette', 'fastapi', 'uvicorn', 'aiortc'):\n    sys.modules[name] = None\n"
    )
    import os

    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    run = lambda *a: subprocess.run(  # noqa: E731
        [sys.executable, "-m", "flashhead.cli", *a], capture_output=True, text=True, timeout=120, env=env
    )
    info = run("info", "--model", "lite", "--json")
    assert info.returncode == 0, info.stderr
    serve = run("serve")
    assert serve.returncode == 2 and "pip install 'flashhead[serve]'" in serve.stderr
    assert "Traceback" not in serve.stderr and len(serve.stderr.strip().splitlines()) == 1


def test_help_imports_no_torch_and_the_lazy_packages_export_their_names():
    """`flashhead --help` (and any command before it runs) loads neither torch nor the models: 5.6 s -> 0.5 s on this
    machine. The eval and train packages import their parts on first use; every name they export resolves."""
    code = ("import sys, flashhead.cli; from flashhead.cli import app; "
            "print(sorted(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules))")  # fmt: skip
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "[]\n"
    import flashhead.eval
    import flashhead.train

    for package in (flashhead.eval, flashhead.train):
        assert set(package._EXPORTS) <= set(package.__all__)
        for name in package._EXPORTS:
            value = getattr(package, name)
            assert value is getattr(sys.modules[f"{package.__name__}.{package._EXPORTS[name]}"], name)
    from flashhead.eval import drift
    from flashhead.eval.drift import drift as the_function

    assert drift is the_function  # not the submodule of the same name
    for package in (flashhead.eval, flashhead.train):
        with pytest.raises(AttributeError, match="has no attribute"):
            package.not_a_name  # noqa: B018


def _kernels(tmp_path, library) -> dict:
    env = {**os.environ, "FLASHHEAD_CONV3D_LIB": str(library), "FLASHHEAD_CONV3D_CHOICES": str(tmp_path / "kept.json")}
    out = subprocess.run([sys.executable, "-m", "flashhead.cli", "kernels", "--json"], capture_output=True, text=True,
                         timeout=120, env=env)  # fmt: skip
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


@pytest.mark.skipif(shutil.which("cc") is None, reason="needs a C compiler for the stand-in libraries")
def test_kernels_reports_the_cutlass_library_state(tmp_path):
    """`flashhead kernels` says where the CUTLASS library is expected and whether it loads: missing, built by an older
    flashhead (refused: rebuild), or built (its tiles); and what --optimized turns on here."""
    report = _kernels(tmp_path, tmp_path / "missing.so")
    conv = report["cutlass_conv3d"]
    assert conv["state"] == "not built" and "cutlass_conv build" in conv["reason"] and not conv["used"]
    assert report["optimized_switches"]["compile_dit"] is True and "fp8" not in report["optimized_switches"]
    if report["gpu"] is None:  # this CPU: no FlashAttention-3, cuDNN attention in the preset
        assert report["optimized_switches"]["attention"] == "cudnn" and not report["flash_attention_3"]["used"]

    def stand_in(name: str, source: str) -> Path:
        (tmp_path / f"{name}.c").write_text(source)
        lib = tmp_path / f"{name}.so"
        subprocess.run(["cc", "-shared", "-fPIC", "-o", str(lib), str(tmp_path / f"{name}.c")], check=True)
        return lib

    names = 'static const char* n[] = {"m128n96k64", "m128n192k64"};\n'
    listing = "int fh_conv3d_count(void) { return 2; }\nconst char* fh_conv3d_name(int i) { return n[i]; }\n"
    listing += "int fh_conv3d_run(void) { return 1; }\n"  # never called here: no GPU needed
    old = _kernels(tmp_path, stand_in("old", names + listing))["cutlass_conv3d"]  # no interface version: session 30
    assert old["state"] == "unusable" and "rebuild" in old["reason"]
    other = _kernels(tmp_path, stand_in("other", "int fh_conv3d_abi(void) { return 2; }\n"))["cutlass_conv3d"]
    assert other["state"] == "unusable" and "not a flashhead convolution library" in other["reason"]
    (tmp_path / "kept.json").write_text(json.dumps({"a gpu": {"p1": "m128n96k64", "p2": "cudnn"}}))
    built = _kernels(tmp_path, stand_in("new", names + listing + "int fh_conv3d_abi(void) { return 2; }\n"))
    conv = built["cutlass_conv3d"]
    assert conv["state"] == "built" and conv["tiles"] == ["m128n96k64", "m128n192k64"]
    assert conv["kept_choices"] == {"path": str(tmp_path / "kept.json"), "problems": 2}


def test_help_keeps_the_square_brackets_of_pip_extras():
    """Rich reads `[demo]` in a help text as a style tag and drops it, so the install hint read `flashhead''`."""
    from typer.testing import CliRunner

    from flashhead.cli import _missing_extra, app

    wide = {"COLUMNS": "200"}
    assert "pip install 'flashhead[demo]'" in CliRunner().invoke(app, ["--help"], env=wide).output
    assert "pip install 'flashhead[demo]'" in CliRunner().invoke(app, ["demo", "--help"], env=wide).output
    stand_in = typer.Typer()
    stand_in.command("serve")(_missing_extra("serve", ImportError("no module named fastapi", name="fastapi")))
    stand_in.command("other")(lambda: None)
    shown = CliRunner().invoke(stand_in, ["--help"], env=wide).output
    assert "(not installed: pip install 'flashhead[serve]')" in shown


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="this checks a machine without a GPU")
def test_a_device_this_machine_lacks_is_one_line_before_loading():
    """`--device cuda` on a CPU-only machine was torch's 'Torch not compiled with CUDA enabled' AssertionError
    traceback once the weights were loaded; a misspelt device, torch's list of every device type."""
    from flashhead.errors import ConfigError
    from flashhead.pipeline.registry import check_device

    assert check_device("cpu").type == "cpu"
    with pytest.raises(ConfigError, match="device 'gpu' is not a torch device such as cpu, cuda or cuda:1"):
        check_device("gpu")
    with pytest.raises(ConfigError, match="device cuda:1: .*use --device cpu"):
        check_device("cuda:1")
    out = flashhead("bench", "--model", "tiny", "--device", "cuda")
    assert out.returncode == 2 and out.stderr.startswith("error: device cuda: ") and "Traceback" not in out.stderr
