"""`curate`: the driver. It lists the inputs, hands the work to an executor, persists every result the
moment it arrives, and finally writes the shards, the manifest and the report from what is persisted.

Work folder `OUT/.work/` (resumability):

    config.json           the settings the cached work was made with (a different config is refused)
    probe/<id>.json       one per probed input (fingerprint or the probe error)
    items/<id>/           one per curated input: its kept clips as a one-shard dataset + result.json

Each file or folder appears atomically (written under a temporary name, then renamed), so after a
crash or SIGKILL a rerun redoes exactly the inputs without a result. `<id>` hashes the input's path,
size and modification time. The shards are rewritten from the item folders in sorted input order, so
the output does not depend on the executor, the worker count or how often the run was interrupted.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm

from flashhead.atomic import make_folder
from flashhead.data.curate.config import CurateConfig
from flashhead.data.curate.dedup import Fingerprint, find_duplicates
from flashhead.data.curate.executors import local_map, ray_map, ray_session
from flashhead.data.curate.process import ItemResult, Outcome, ProbeResult, curate_input, probe_input
from flashhead.data.curate.report import write_report
from flashhead.data.shards import ShardWriter, VideoCodec, iter_clips
from flashhead.errors import ConfigError

log = logging.getLogger(__name__)

VIDEO_SUFFIXES = (".mp4", ".mov", ".mkv", ".webm", ".avi", ".m4v", ".flv", ".mpg", ".mpeg", ".ts")
WORK = ".work"


def expand_inputs(inputs: list[str | Path]) -> list[Path]:
    """Files as given, folders searched recursively for video files; sorted, each once."""
    found: set[Path] = set()
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found.update(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in VIDEO_SUFFIXES)
        elif path.is_file():
            found.add(path)
        else:
            raise ConfigError(f"{path}: no such file or folder")
    if not found:
        raise ConfigError("no video files among the inputs")
    return sorted(found, key=lambda p: str(p.resolve()))


def input_id(path: Path) -> str:
    st = path.stat()
    return hashlib.sha256(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:20]


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    os.replace(tmp, path)


def _prepare_work(out: Path, cfg: CurateConfig, fresh: bool) -> Path:
    work = out / WORK
    stamp = work / "config.json"
    if work.exists() and (fresh or not stamp.exists()):
        shutil.rmtree(work)
    elif stamp.exists() and json.loads(stamp.read_text()).get("fingerprint") != cfg.fingerprint():
        raise ConfigError(f"{work} holds work done with other settings; pass --fresh to discard it")
    for sub in ("probe", "items"):
        (work / sub).mkdir(parents=True, exist_ok=True)
    for stale in (work / "items").glob(".*"):  # temporary folders of a killed run
        shutil.rmtree(stale, ignore_errors=True)
    if not stamp.exists():
        _write_json(stamp, {"fingerprint": cfg.fingerprint(), "config": cfg.to_dict()})
    return work


def _save_probe(work: Path, pid: str, result: ProbeResult) -> None:
    fp = dataclasses.asdict(result.fingerprint) if result.fingerprint else None
    _write_json(work / "probe" / f"{pid}.json", {"fingerprint": fp, "error": result.error, "seconds": result.seconds})


def _save_item(work: Path, pid: str, result: ItemResult) -> None:
    final = work / "items" / pid
    tmp = work / "items" / f".{pid}.{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    # The clips are already encoded: this only stores bytes. One shard per input.
    with ShardWriter(tmp, shard_max_clips=max(1, len(result.clips))) as writer:
        for clip in result.clips:
            writer.write(clip)
    _write_json(tmp / "result.json", {
        "duration": result.duration,
        "timings": result.timings,
        "outcomes": [dataclasses.asdict(o) for o in result.outcomes],
    })  # fmt: skip
    os.replace(tmp, final)


def curate(
    inputs: list[str | Path],
    out: str | Path,
    cfg: CurateConfig | None = None,
    *,
    workers: int = 1,
    ray_address: str | None = None,
    fresh: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Curate `inputs` into shards under `out`; returns the report (also written as report.json/html)."""
    cfg = cfg or CurateConfig()
    started = time.perf_counter()
    files = expand_inputs(inputs)
    out = make_folder(out, "output folder")
    work = _prepare_work(out, cfg, fresh)
    ids = {f: input_id(f) for f in files}
    skip = _unavailable_stages(cfg)

    with ray_session(ray_address, workers) if ray_address else contextlib.nullcontext():
        def run(fn, jobs, desc):
            mapped = ray_map(fn, jobs) if ray_address else local_map(fn, jobs, workers)
            return tqdm(mapped, total=len(jobs), desc=desc, unit="file", disable=not progress)

        todo = [f for f in files if not (work / "probe" / f"{ids[f]}.json").exists()]
        for result in run(probe_input, [(str(f), cfg) for f in todo], "probe + hash"):
            _save_probe(work, ids[Path(result.path)], result)
        probes = {f: json.loads((work / "probe" / f"{ids[f]}.json").read_text()) for f in files}
        prints = {f: Fingerprint(**p["fingerprint"]) for f, p in probes.items() if p["fingerprint"]}
        duplicates = find_duplicates([prints[f] for f in files if f in prints], cfg.dedup)

        survivors = [f for f in files if f in prints and str(f) not in duplicates]
        todo = [f for f in survivors if not (work / "items" / ids[f]).is_dir()]
        jobs = [(str(f), prints[f], cfg, skip) for f in todo]
        for result in run(curate_input, jobs, "curate"):
            _save_item(work, ids[Path(result.path)], result)

    # Outcomes of every input, in input order, from the persisted results only.
    outcomes: list[Outcome] = []
    timings: dict[str, float] = {}
    durations: dict[str, float] = {}
    for f in files:
        p = probes[f]
        timings["probe"] = timings.get("probe", 0.0) + p["seconds"]
        if f not in prints:
            outcomes.append(Outcome(f.name, "probe", p["error"]))
            continue
        durations[f.name] = prints[f].duration
        if str(f) in duplicates:
            outcomes.append(Outcome(f.name, "dedup", duplicates[str(f)], end=prints[f].duration))
            continue
        result = json.loads((work / "items" / ids[f] / "result.json").read_text())
        outcomes += [Outcome(**o) for o in result["outcomes"]]
        for stage, seconds in result["timings"].items():
            timings[stage] = timings.get(stage, 0.0) + seconds

    codec = VideoCodec(crf=cfg.output.crf, preset=cfg.output.preset)  # unused: the clips come encoded
    with ShardWriter(out, shard_max_clips=cfg.output.shard_max_clips, codec=codec, overwrite=True) as writer:
        for f in tqdm(survivors, desc="shards", unit="file", disable=not progress):
            item = work / "items" / ids[f]
            if any(item.glob("shard-*.tar")):
                for clip in iter_clips(item, decode=False):
                    writer.write(clip)
    return write_report(out, cfg, files, durations, outcomes, timings, skip, time.perf_counter() - started, workers)


def _unavailable_stages(cfg: CurateConfig) -> dict[str, str]:
    from flashhead.data.curate.features import features_unavailable
    from flashhead.data.curate.sync import syncnet_unavailable

    skip = {}
    for stage, reason in (("sync", syncnet_unavailable(cfg.sync)), ("features", features_unavailable(cfg.features))):
        if reason is not None:
            log.warning("curate: skipping the %s stage: %s", stage, reason)
            skip[stage] = reason
    return skip
