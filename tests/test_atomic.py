"""flashhead.atomic: a file or folder is replaced whole, or not at all."""

from __future__ import annotations

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
