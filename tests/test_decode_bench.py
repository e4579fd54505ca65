"""benchmarks/decode_ab_bench.py on the CPU: the full-size Wan2.1 VAE (random weights) under a whole-number switch's
values, each decode's PSNR against the first and its figures."""

from __future__ import annotations

import json

from _util import load_benchmark


def test_decode_ab_bench_compares_the_values_of_a_whole_number_switch(tmp_path):
    bench = load_benchmark("decode_ab_bench")
    out = tmp_path / "decode.json"
    report = bench.main([
        "--device", "cpu", "--latent", "16,3,4,4", "--repeat", "1", "--switch", "vae_call_frames",
        "--base", "vae_whole_chunk=on", "--variants", "eager-0,eager-1", "--json", str(out),
    ])  # fmt: skip
    assert json.loads(out.read_text()) == report
    decodes = report["decodes"]
    assert list(decodes) == ["eager-0", "eager-1"] and all(d["ms"] > 0 for d in decodes.values())
    # the official Wan2.1 architecture: its 3 latent frames in one call and in three give the same frames
    assert decodes["eager-1"]["psnr_vs_off_db"] == "inf" or decodes["eager-1"]["psnr_vs_off_db"] > 90
