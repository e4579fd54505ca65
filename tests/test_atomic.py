"""flashhead.atomic: a file or folder is replaced whole, or not at all."""

from __future__ import annotations

from pathlib import Path

import pytest

from flashhead.atomic import atomic_path


def test_file_is_replaced_and_no_temporary_is_left(tmp_path):
    target = tmp_path / "state.pt"
    target.write_text("old")
    with atomic_path(target) as tmp:
        assert tmp.parent == tmp_path and tmp != target
        tmp.write_text("new")
        assert target.read_text() == "old"  # readers still see the old file while the new one is written
    assert target.read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.pt"]


def test_folder_is_replaced_whole(tmp_path):
    target = tmp_path / "export"
    target.mkdir()
    (target / "stale.json").write_text("{}")
    with atomic_path(target) as tmp:
        tmp.mkdir()
        (tmp / "model.safetensors").write_bytes(b"weights")
    assert sorted(p.name for p in target.iterdir()) == ["model.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]


def test_failure_keeps_the_old_version_and_cleans_up(tmp_path):
    target = tmp_path / "export"
    target.mkdir()
    (target / "good.json").write_text("{}")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.mkdir()
        (tmp / "half.json").write_text("{")
        raise RuntimeError("disk full")
    assert sorted(p.name for p in target.iterdir()) == ["good.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]


def test_leftover_temporary_from_a_crash_is_removed_first(tmp_path):
    target = tmp_path / "report.json"
    leftover = tmp_path / ".report.json.tmp"
    leftover.mkdir()  # e.g. a folder left by a killed run under the same name
    with atomic_path(target) as tmp:
        assert not tmp.exists()
        tmp.write_text("{}")
    assert target.read_text() == "{}" and not leftover.exists()


def test_make_folder_creates_or_says_in_one_line_why_not(tmp_path):
    from flashhead.atomic import make_folder
    from flashhead.errors import ConfigError

    assert make_folder(tmp_path / "a" / "b").is_dir() and make_folder(tmp_path / "a" / "b").is_dir()  # twice: fine
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match=r"output_dir .*file: a file, not a folder"):
        make_folder(tmp_path / "file", "output_dir")
    with pytest.raises(ConfigError, match=r"cannot be created \(Not a directory\)"):
        make_folder(tmp_path / "file" / "sub")
    assert (tmp_path / "file").read_text() == "x"


def test_training_commands_refuse_an_output_that_is_a_file_before_loading_anything(tmp_path):
    """`flashhead train stage1` with output_dir on a file: one line and exit 2, not a FileExistsError traceback
    after the networks were built and the data read."""
    from typer.testing import CliRunner

    from flashhead.train.cli import train_app

    (tmp_path / "file").write_text("x")
    config = Path(__file__).parents[1] / "configs" / "stage1_tiny_cpu.yaml"
    result = CliRunner().invoke(train_app, ["stage1", str(config), "--set", f"output_dir={tmp_path / 'file'}",
                                            "--set", f"data.roots=[{tmp_path / 'no-data'}]"])  # fmt: skip
    assert result.exit_code == 2 and "a file, not a folder" in result.output and "Traceback" not in result.output
