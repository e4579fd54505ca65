"""The `flashhead` command line, run as a user runs it (a real subprocess)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from _util import FIXTURES


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
