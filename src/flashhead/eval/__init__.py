"""Evaluation of generated talking-head videos: FID, FVD, Sync-C/D, CSIM, LMD, drift and speed.

    from flashhead.eval import EvalConfig, evaluate, write_report

    report = evaluate("out/pred", "data/gt", EvalConfig(syncnet="weights/syncnet_v2.model"))
    write_report(report, "report.json")  # + report.html

Each metric also stands alone (`frechet_distance`, `fid.load_inception`, `syncnet.offset_search`,
`identity.csim`, `landmarks.landmark_distance`, `drift.drift`). See docs/evaluation.md.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

# Bound now, not on first use: the function shares its module's name, and importing the submodule (as the suite
# does) would otherwise leave the package attribute `drift` pointing at the module. It needs no torch.
from flashhead.eval.drift import DriftResult, drift

# Where each other public name lives. Imported on first use (PEP 562), so that `flashhead --help` and the other
# commands do not pay for torch and the metric networks unless they evaluate.
_EXPORTS = {
    "GaussianStats": "frechet",
    "frechet_distance": "frechet",
    "frechet_distance_from_features": "frechet",
    "gaussian_stats": "frechet",
    "PROTOCOLS": "protocol",
    "Protocol": "protocol",
    "render_html": "report",
    "write_report": "report",
    "EvalConfig": "suite",
    "evaluate": "suite",
    "SyncNet": "syncnet",
    "SyncResult": "syncnet",
    "offset_search": "syncnet",
    "MetricUnavailable": "weights",
}
__all__ = [
    "PROTOCOLS",
    "DriftResult",
    "EvalConfig",
    "GaussianStats",
    "MetricUnavailable",
    "Protocol",
    "SyncNet",
    "SyncResult",
    "drift",
    "evaluate",
    "frechet_distance",
    "frechet_distance_from_features",
    "gaussian_stats",
    "offset_search",
    "render_html",
    "write_report",
]

if TYPE_CHECKING:
    from flashhead.eval.frechet import GaussianStats, frechet_distance, frechet_distance_from_features, gaussian_stats
    from flashhead.eval.protocol import PROTOCOLS, Protocol
    from flashhead.eval.report import render_html, write_report
    from flashhead.eval.suite import EvalConfig, evaluate
    from flashhead.eval.syncnet import SyncNet, SyncResult, offset_search
    from flashhead.eval.weights import MetricUnavailable


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
