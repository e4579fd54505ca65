"""`evaluate`: every metric over a folder of predicted videos and a folder of ground-truth videos.

Videos are paired by file stem. Metrics that need weights we cannot ship (FID, FVD, Sync-C/D, ArcFace
CSIM) are reported `{"status": "unavailable", "reason": ...}` when their weights are missing; the others
(dlib CSIM, LMD, drift, the weight-free AV offset) are always computed. One metric failing never stops
the others.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from flashhead.errors import ConfigError, MediaError
from flashhead.eval.protocol import PROTOCOLS, Protocol, select_videos
from flashhead.eval.video import Clip, list_videos, load_clip
from flashhead.eval.weights import MetricUnavailable

log = logging.getLogger(__name__)


@dataclass
class EvalConfig:
    """What to compute and with which weights; every field has a CLI flag of the same name."""

    inception: str | None = None  # FID Inception weights (path or hf:OWNER/REPO/FILE)
    i3d: str | None = None  # StyleGAN-V i3d_torchscript.pt
    syncnet: str | None = None  # syncnet_v2.model
    arcface: str | None = None  # optional ArcFace (ONNX / TorchScript) for a second CSIM
    speed: str | None = None  # benchmark JSON to include
    protocol: str | None = None  # "hdtf" | "vfhq"
    references: str | None = None  # folder of reference images by video stem; default: ground-truth frame 0
    max_frames: int | None = None  # per video (the protocol sets it too)
    fid_frame_stride: int = 1  # every k-th frame enters FID
    fvd_clips_per_video: int | None = None
    csim_frames_per_video: int = 16
    drift_window_s: float = 5.0
    drift_identity_fps: float = 1.0
    vshift: int = 15
    device: str = "cpu"
    thumbnails: bool = True  # keep a few small frames per video for the HTML report

    def apply_protocol(self, protocol: Protocol) -> None:
        self.protocol = protocol.name
        self.max_frames = protocol.max_frames
        self.fid_frame_stride = protocol.fid_frame_stride
        self.fvd_clips_per_video = protocol.fvd_clips_per_video
        self.csim_frames_per_video = protocol.csim_frames_per_video


def ok(value: float, **details) -> dict:
    return {"status": "ok", "value": float(value), **details}


def unavailable(reason: str) -> dict:
    return {"status": "unavailable", "reason": reason}


@dataclass
class _Models:
    """Networks loaded once, or the reason each could not be."""

    config: EvalConfig
    loaded: dict = field(default_factory=dict)

    def get(self, name: str):
        if name not in self.loaded:
            try:
                self.loaded[name] = self._load(name)
            except MetricUnavailable as e:
                self.loaded[name] = e
        value = self.loaded[name]
        if isinstance(value, MetricUnavailable):
            raise value
        return value

    def _load(self, name: str):
        c = self.config
        if name == "inception":
            from flashhead.eval.fid import load_inception

            return load_inception(c.inception)
        if name == "i3d":
            from flashhead.eval.fvd import load_i3d

            return load_i3d(c.i3d)
        if name == "syncnet":
            from flashhead.eval.syncnet import load_syncnet

            return load_syncnet(c.syncnet)
        if name == "dlib":
            from flashhead.eval.identity import DlibEmbedder

            return DlibEmbedder()
        if name == "arcface":
            from flashhead.eval.identity import ArcFaceEmbedder

            if c.arcface is None:
                raise MetricUnavailable("no --arcface weights given (optional)")
            return ArcFaceEmbedder(c.arcface)
        if name == "mesh":
            from flashhead.eval.landmarks import FaceMesh

            return FaceMesh()
        raise KeyError(name)


def _guard(fn, *args, **kwargs) -> dict:
    """Run one metric; a missing dependency or an error becomes an 'unavailable' entry, never a crash."""
    try:
        return fn(*args, **kwargs)
    except MetricUnavailable as e:
        return unavailable(str(e))
    except Exception as e:  # one broken metric must not lose the others
        log.exception("metric failed")
        return unavailable(f"failed: {e.__class__.__name__}: {e}")


def _evenly(n: int, k: int) -> np.ndarray:
    return np.unique(np.linspace(0, n - 1, min(n, k)).round().astype(int))


def _thumbs(frames: np.ndarray, k: int = 3, size: int = 192) -> list[np.ndarray]:
    import cv2

    return [cv2.resize(frames[i], (size, size * frames.shape[1] // frames.shape[2]), interpolation=cv2.INTER_AREA)
            for i in _evenly(len(frames), k)]  # fmt: skip


def _reference(config: EvalConfig, name: str, gt: Clip) -> tuple[np.ndarray, str]:
    if config.references:
        folder = Path(config.references)
        for suffix in (".png", ".jpg", ".jpeg", ".webp"):
            if (folder / f"{name}{suffix}").is_file():
                from flashhead.media.image import load_image

                return np.asarray(load_image(folder / f"{name}{suffix}")), str(folder / f"{name}{suffix}")
        log.warning("no reference image for %s in %s; using ground-truth frame 0", name, folder)
    return gt.frames[0], "ground-truth frame 0"


def _sync(models: _Models, clip: Clip, landmarks: np.ndarray, config: EvalConfig, audio: np.ndarray) -> dict:
    from flashhead.eval.landmarks import face_boxes
    from flashhead.eval.syncnet import sync_scores

    model = models.get("syncnet")
    r = sync_scores(model, clip.frames, audio, face_boxes(landmarks), vshift=config.vshift, device=config.device)
    return {"status": "ok", "sync_c": r.confidence, "sync_d": r.min_dist, "offset": r.offset,
            "mean_dists": r.mean_dists.tolist(), "windows": r.n_windows}  # fmt: skip


def _energy_offset(clip: Clip, landmarks: np.ndarray, audio: np.ndarray, vshift: int) -> dict:
    from flashhead.eval.landmarks import mouth_opening
    from flashhead.eval.syncnet import audio_log_energy, energy_features, offset_search

    v, a = energy_features(mouth_opening(landmarks), audio_log_energy(audio, len(clip.frames), clip.fps))
    r = offset_search(v, a, vshift)
    return {"status": "ok", "offset": r.offset, "confidence": r.confidence, "mean_dists": r.mean_dists.tolist()}


def _csim(models: _Models, which: str, frames: np.ndarray, reference: np.ndarray, k: int) -> dict:
    from flashhead.eval.identity import csim

    r = csim(models.get(which), frames[_evenly(len(frames), k)], reference)
    return {
        "status": "ok",
        "value": r["csim"],
        "per_frame": r["per_frame"],
        "frames_without_face": r["frames_without_face"],
    }


def _lmd(pred_lm: np.ndarray, gt_lm: np.ndarray, pred: Clip, gt: Clip) -> dict:
    from flashhead.eval.landmarks import landmark_distance

    r = landmark_distance(pred_lm, gt_lm, pred.frames.shape[1:3], gt.frames.shape[1:3])
    return {"status": "ok", "lmd_mouth": r.lmd_mouth, "lmd_face": r.lmd_face, "frames_used": r.frames_used,
            "frames_skipped": r.frames_skipped, "per_frame_mouth": r.per_frame_mouth.tolist()}  # fmt: skip


def _drift(models: _Models, clip: Clip, reference: np.ndarray, config: EvalConfig) -> dict:
    from flashhead.eval.drift import drift

    if clip.duration < 2 * config.drift_window_s:
        raise MetricUnavailable(f"{clip.duration:.1f} s is shorter than two {config.drift_window_s:g} s windows")
    try:
        embedder = models.get("dlib")
    except MetricUnavailable as e:
        log.warning("identity drift skipped: %s", e)
        embedder = None
    r = drift(clip.frames, clip.fps, reference, embedder, config.drift_window_s, config.drift_identity_fps)
    return {"status": "ok", **r.to_dict()}


def _evaluate_pair(name: str, pred_path: Path, gt_path: Path, config: EvalConfig, models: _Models, pools: dict) -> dict:
    pred = load_clip(pred_path, config.max_frames)
    gt = load_clip(gt_path, config.max_frames)
    entry: dict = {
        "name": name,
        "pred": str(pred_path),
        "gt": str(gt_path),
        "frames_pred": len(pred.frames),
        "frames_gt": len(gt.frames),
        "fps_pred": pred.fps,
        "size_pred": list(pred.frames.shape[1:3]),
        "size_gt": list(gt.frames.shape[1:3]),
    }
    if config.max_frames and len(pred.frames) < config.max_frames:
        entry["warning"] = f"prediction has {len(pred.frames)} frames, fewer than the protocol's {config.max_frames}"
    reference, entry["reference"] = _reference(config, name, gt)

    # Pools for the distribution metrics (FID over frames, FVD over clips).
    pools["fid_pred"].extend(pred.frames[:: config.fid_frame_stride])
    pools["fid_gt"].extend(gt.frames[:: config.fid_frame_stride])
    from flashhead.eval.fvd import video_clips

    pools["fvd_pred"].extend(video_clips(pred.frames, clips_per_video=config.fvd_clips_per_video))
    pools["fvd_gt"].extend(video_clips(gt.frames, clips_per_video=config.fvd_clips_per_video))

    try:
        mesh = models.get("mesh")
        pred_lm, gt_lm = mesh.track(pred.frames), mesh.track(gt.frames)
    except MetricUnavailable as e:
        pred_lm = gt_lm = None
        mesh_reason = str(e)

    audio, entry["audio_source"] = (
        (pred.audio, "prediction") if pred.audio is not None and len(pred.audio) else (gt.audio, "ground truth")
    )
    for key, clip, lm, aud in (("sync", pred, pred_lm, audio), ("sync_gt", gt, gt_lm, gt.audio)):
        if lm is None:
            entry[key] = unavailable(mesh_reason)
        elif aud is None or not len(aud):
            entry[key] = unavailable("no audio track")
        else:
            entry[key] = _guard(_sync, models, clip, lm, config, aud)
    if pred_lm is None or audio is None:
        entry["av_offset_energy"] = unavailable(mesh_reason if pred_lm is None else "no audio track")
        entry["lmd"] = unavailable(mesh_reason) if pred_lm is None else _guard(_lmd, pred_lm, gt_lm, pred, gt)
    else:
        entry["av_offset_energy"] = _guard(_energy_offset, pred, pred_lm, audio, config.vshift)
        entry["lmd"] = _guard(_lmd, pred_lm, gt_lm, pred, gt)
    # The weight-free pair has a per-clip bias (speech onsets lead lip opening by varying amounts), so the
    # ground truth's own estimate is the zero point: pred - gt is the offset the generator introduced.
    if gt_lm is not None and gt.audio is not None and len(gt.audio):
        entry["av_offset_energy_gt"] = _guard(_energy_offset, gt, gt_lm, gt.audio, config.vshift)
        p, g = entry["av_offset_energy"], entry["av_offset_energy_gt"]
        if p.get("status") == "ok" and g.get("status") == "ok":
            entry["av_offset_energy_vs_gt"] = {"status": "ok", "value": p["offset"] - g["offset"]}
    entry["csim"] = _guard(_csim, models, "dlib", pred.frames, reference, config.csim_frames_per_video)
    entry["csim_gt"] = _guard(_csim, models, "dlib", gt.frames, reference, config.csim_frames_per_video)
    if config.arcface:
        entry["csim_arcface"] = _guard(_csim, models, "arcface", pred.frames, reference, config.csim_frames_per_video)
    entry["drift"] = _guard(_drift, models, pred, reference, config)
    if config.thumbnails:
        entry["_thumbs"] = (_thumbs(pred.frames), _thumbs(gt.frames))
    return entry


def _distribution_metrics(models: _Models, pools: dict, config: EvalConfig) -> dict:
    out = {}

    def fid() -> dict:
        from flashhead.eval.fid import fid_from_features, inception_features

        model = models.get("inception")
        fp = inception_features(model, pools["fid_pred"], device=config.device)
        fg = inception_features(model, pools["fid_gt"], device=config.device)
        return ok(fid_from_features(fp, fg), n_pred=len(fp), n_gt=len(fg))

    def fvd() -> dict:
        from flashhead.eval.fvd import fvd_from_features, i3d_features

        detector = models.get("i3d")
        if len(pools["fvd_pred"]) < 2 or len(pools["fvd_gt"]) < 2:
            raise MetricUnavailable("fewer than two 16-frame clips on a side")
        fp = i3d_features(detector, pools["fvd_pred"], device=config.device)
        fg = i3d_features(detector, pools["fvd_gt"], device=config.device)
        return ok(fvd_from_features(fp, fg), n_pred=len(fp), n_gt=len(fg))

    out["fid"] = _guard(fid)
    out["fvd"] = _guard(fvd)
    return out


def _mean_of(videos: list[dict], key: str, field_name: str) -> dict:
    values = [v[key][field_name] for v in videos if v.get(key, {}).get("status") == "ok"]
    if not values:
        reasons = {v[key]["reason"] for v in videos if key in v and v[key].get("status") != "ok"}
        return unavailable("; ".join(sorted(reasons)) or "no video")
    return ok(float(np.mean(values)), videos=len(values), per_video=[float(x) for x in values])


def summarise(videos: list[dict], distribution: dict, speed: dict | None) -> dict:
    """The report's headline numbers (means over videos where per-video)."""
    m = dict(distribution)
    m["sync_c"] = _mean_of(videos, "sync", "sync_c")
    m["sync_d"] = _mean_of(videos, "sync", "sync_d")
    m["sync_c_gt"] = _mean_of(videos, "sync_gt", "sync_c")
    m["sync_d_gt"] = _mean_of(videos, "sync_gt", "sync_d")
    m["csim"] = _mean_of(videos, "csim", "value")
    m["csim_gt"] = _mean_of(videos, "csim_gt", "value")
    if any("csim_arcface" in v for v in videos):
        m["csim_arcface"] = _mean_of(videos, "csim_arcface", "value")
    m["lmd_mouth"] = _mean_of(videos, "lmd", "lmd_mouth")
    m["lmd_face"] = _mean_of(videos, "lmd", "lmd_face")
    m["av_offset_energy"] = _mean_of(videos, "av_offset_energy", "offset")
    m["av_offset_energy_vs_gt"] = _mean_of(videos, "av_offset_energy_vs_gt", "value")
    m["drift_colour_slope_per_min"] = _mean_of(videos, "drift", "colour_slope_per_min")
    ident = [v for v in videos if v.get("drift", {}).get("identity_slope_per_min") is not None]
    m["drift_identity_slope_per_min"] = (
        _mean_of(ident, "drift", "identity_slope_per_min") if ident else unavailable("no identity drift measured")
    )
    flagged = [
        v["name"] for v in videos if v.get("drift", {}).get("colour_drift") or v.get("drift", {}).get("identity_drift")
    ]
    m["drift_flagged_videos"] = flagged
    if speed is None:
        m["speed"] = unavailable("no --speed benchmark JSON given")
    else:
        fps = speed.get("fps")
        m["speed"] = {
            "status": "ok",
            "benchmark": speed,
            **({"value": float(fps)} if isinstance(fps, int | float) else {}),
        }
    return m


def load_speed(path: str | Path) -> dict:
    """A benchmark JSON (e.g. from `flashhead bench`), included in the report as it is."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path}: cannot read the speed benchmark JSON ({e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the speed benchmark must be a JSON object")
    return data


def evaluate(pred_dir: str | Path, gt_dir: str | Path, config: EvalConfig | None = None) -> dict:
    """Evaluate every predicted video against the ground-truth video of the same name.

    Args:
        pred_dir: folder of generated videos (with their audio, or silent: the ground-truth audio is used).
        gt_dir: folder of ground-truth videos, same file stems.
        config: weights, protocol and sampling choices (`EvalConfig`).

    Returns:
        The report as a JSON-serialisable dict ("metrics" for the headline numbers, "videos" per video);
        `report.write_report` saves it as JSON and HTML.

    Raises:
        MediaError: a folder is missing or no video pairs up.
        ConfigError: an unknown protocol or an unreadable speed JSON.
    """
    config = replace(config) if config else EvalConfig()  # a copy: the protocol overrides some fields
    protocol = None
    if config.protocol:
        if config.protocol not in PROTOCOLS:
            raise ConfigError(f"unknown protocol {config.protocol!r}; choose one of {', '.join(PROTOCOLS)}")
        protocol = PROTOCOLS[config.protocol]
        config.apply_protocol(protocol)
    speed = load_speed(config.speed) if config.speed else None
    preds, gts = list_videos(pred_dir), list_videos(gt_dir)
    names = sorted(set(preds) & set(gts))
    if protocol is not None:
        names = [n for n in select_videos(sorted(gts), protocol) if n in preds]
    if not names:
        raise MediaError(f"no video in {pred_dir} has a ground-truth video of the same name in {gt_dir}")
    started = time.time()
    models = _Models(config)
    pools: dict[str, list] = {"fid_pred": [], "fid_gt": [], "fvd_pred": [], "fvd_gt": []}
    videos = []
    for name in names:
        log.info("evaluating %s", name)
        videos.append(_evaluate_pair(name, preds[name], gts[name], config, models, pools))
    distribution = _distribution_metrics(models, pools, config)
    from flashhead import __version__

    return {
        "flashhead_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "seconds": round(time.time() - started, 1),
        "pred_dir": str(pred_dir),
        "gt_dir": str(gt_dir),
        "protocol": protocol.to_dict() if protocol else None,
        "config": asdict(config),
        "metrics": summarise(videos, distribution, speed),
        "videos": videos,
        "unpaired": {"pred_only": sorted(set(preds) - set(gts)), "gt_only": sorted(set(gts) - set(preds))},
    }
