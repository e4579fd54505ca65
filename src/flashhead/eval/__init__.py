"""Evaluation of generated talking-head videos: FID, FVD, Sync-C/D, CSIM, LMD, drift and speed.

    from flashhead.eval import EvalConfig, evaluate, write_report

    report = evaluate("out/pred", "data/gt", EvalConfig(syncnet="weights/syncnet_v2.model"))
    write_report(report, "report.json")  # + report.html

Each metric also stands alone (`frechet_distance`, `fid.load_inception`, `syncnet.offset_search`,
`identity.csim`, `landmarks.landmark_distance`, `drift.drift`). See docs/evaluation.md.
"""

from flashhead.eval.drift import DriftResult, drift
from flashhead.eval.frechet import GaussianStats, frechet_distance, frechet_distance_from_features, gaussian_stats
from flashhead.eval.protocol import PROTOCOLS, Protocol
from flashhead.eval.report import render_html, write_report
from flashhead.eval.suite import EvalConfig, evaluate
from flashhead.eval.syncnet import SyncNet, SyncResult, offset_search
from flashhead.eval.weights import MetricUnavailable

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
