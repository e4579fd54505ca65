"""benchmarks/upsample_bench.py (the Wan decoder's upsampling layers, stock against sub-pixel) on the CPU."""

from __future__ import annotations

import json
import sys

from _util import load_benchmark


def test_records_every_upsampling_layer_and_times_each_way(tmp_path, monkeypatch):
    bench = load_benchmark("upsample_bench")
    out = tmp_path / "upsample.json"
    argv = ["upsample_bench", "--device", "cpu", "--latent", "16,2,3,4", "--repeat", "1", "--no-compile"]
    monkeypatch.setattr(sys, "argv", [*argv, "--no-decode", "--json", str(out)])
    bench.main()
    report = json.loads(out.read_text())
    layers = report["layers"]
    # The Wan2.1 decoder upsamples three times (to 2x, 4x, 8x the latent): 384 -> 192, 384 -> 192, 192 -> 96.
    assert sorted({(r["input"][1], r["out_channels"], r["input"][2]) for r in layers}) == [
        (192, 96, 12), (384, 192, 3), (384, 192, 6)
    ]  # fmt: skip
    for row in layers:
        assert row["calls"] >= 1 and row["stock_ms"] > 0 and row["transpose_ms"] > 0 and row["phases_ms"] > 0
        assert row["transpose_psnr_db"] > 100 and row["phases_psnr_db"] > 100  # float32: the same convolution
    assert report["per_chunk_ms"]["stock"] == round(sum(r["calls"] * r["stock_ms"] for r in layers), 2)
