"""The whole suite without weights: FID/FVD/Sync unavailable with reasons, CSIM/LMD/drift still computed."""

from __future__ import annotations

import json
import shutil

import pytest

from _util import MEDIA
from flashhead.errors import ConfigError, MediaError
from flashhead.eval import EvalConfig, evaluate, write_report
from flashhead.eval.cli import eval_command
from flashhead.eval.protocol import PROTOCOLS, select_videos

pytest.importorskip("mediapipe")
pytest.importorskip("dlib")

CLIPS = ("talk_man_suit_6s.mp4", "talk_woman_blonde_8s.mp4")


@pytest.fixture
def folders(tmp_path):
    pred, gt = tmp_path / "pred", tmp_path / "gt"
    pred.mkdir(), gt.mkdir()
    for name in CLIPS:
        shutil.copy(MEDIA / "video" / name, gt / name)
        shutil.copy(MEDIA / "video" / name, pred / name)
    shutil.copy(MEDIA / "video" / "talk_man_map_bg_5s.mp4", gt / "unpaired.mp4")
    return pred, gt


def test_missing_weights_run(folders, tmp_path, no_weights):
    pred, gt = folders
    speed = tmp_path / "bench.json"
    speed.write_text(json.dumps({"fps": 96.0, "device": "RTX 4090", "variant": "lite"}))
    config = EvalConfig(
        max_frames=60, drift_window_s=1.0, csim_frames_per_video=4, drift_identity_fps=1.0, speed=str(speed)
    )
    report = evaluate(pred, gt, config)
    m = report["metrics"]
    for key, needle in (("fid", "inception"), ("fvd", "i3d"), ("sync_c", "syncnet"), ("sync_d", "syncnet")):
        assert m[key]["status"] == "unavailable", key
        assert needle in m[key]["reason"] and "weights" in m[key]["reason"], m[key]["reason"]
    for key in ("csim", "lmd_mouth", "lmd_face", "drift_colour_slope_per_min", "drift_identity_slope_per_min"):
        assert m[key]["status"] == "ok", (key, m[key])
    assert m["csim"]["value"] > 0.95  # the prediction is the ground truth itself
    assert m["lmd_mouth"]["value"] == 0.0
    assert m["av_offset_energy"]["status"] == "ok"
    assert m["av_offset_energy_vs_gt"]["value"] == 0  # identical videos: no offset introduced
    assert m["speed"]["value"] == 96.0 and m["speed"]["benchmark"]["device"] == "RTX 4090"
    assert report["unpaired"] == {"pred_only": [], "gt_only": ["unpaired"]}
    assert [v["frames_pred"] for v in report["videos"]] == [60, 60]

    write_report(report, tmp_path / "out" / "report.json")
    saved = json.loads((tmp_path / "out" / "report.json").read_text())
    assert saved["metrics"]["fid"]["status"] == "unavailable"
    page = (tmp_path / "out" / "report.html").read_text()
    assert page.count("data:image/png;base64,") >= 2 and "data:image/jpeg;base64," in page
    assert "unavailable" in page and "<script" not in page and "http" not in page.split("<body>")[1][:20000]


def test_cli_command_and_errors(folders, tmp_path, no_weights):
    pred, gt = folders
    out = tmp_path / "r.json"
    assert eval_command(pred, gt, out, max_frames=30, fid_stride=5) == 0
    assert out.is_file() and out.with_suffix(".html").is_file()
    with pytest.raises(MediaError):
        eval_command(tmp_path / "missing", gt, out)
    with pytest.raises(ConfigError, match="unknown protocol"):
        eval_command(pred, gt, out, protocol="nope")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(MediaError, match="no video"):
        evaluate(empty, gt)
    # An unusable report path is refused before the scoring, not with a traceback after it.
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="a folder; give a file path"):
        eval_command(pred, gt, empty, max_frames=30)
    with pytest.raises(ConfigError, match=r"--out's folder .*file: a file, not a folder"):
        eval_command(pred, gt, tmp_path / "file" / "r.json", max_frames=30)
    assert not any(p.name.endswith(".tmp") for p in tmp_path.iterdir())  # the reports were written whole
    with pytest.raises(ConfigError, match="is not a torch device"):
        eval_command(pred, gt, out, device="gpu")


def test_protocols_are_documented_and_deterministic():
    assert set(PROTOCOLS) == {"hdtf", "vfhq"}
    names = [f"video_{i:03d}" for i in range(200)]
    chosen = select_videos(names, PROTOCOLS["hdtf"])
    assert len(chosen) == 75 and chosen == select_videos(list(reversed(names)), PROTOCOLS["hdtf"])
    assert select_videos(names[:10], PROTOCOLS["vfhq"]) == names[:10]
    assert PROTOCOLS["hdtf"].max_frames == 250 and PROTOCOLS["vfhq"].max_frames == 125
