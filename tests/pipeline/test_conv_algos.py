"""benchmarks/conv_algos.py (the Wan decode's convolutions one by one) and its plot, on the CPU."""

from __future__ import annotations

import os

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from _util import load_benchmark


@pytest.fixture(scope="module")
def conv_algos():
    return load_benchmark("conv_algos")


@pytest.mark.parametrize(
    "x_shape, w_shape, stride, padding",
    [((1, 8, 5, 12, 10), (6, 8, 3, 3, 3), (1, 1, 1), (0, 1, 1)), ((2, 4, 9, 7), (3, 4, 3, 3), (2, 2), (1, 1))],
)
def test_recorded_convolutions_and_their_flops(conv_algos, x_shape, w_shape, stride, padding):
    """Each distinct convolution is recorded once with its call count, and its FLOPs are torch's FlopCounter's."""
    x, w = torch.randn(x_shape), torch.randn(w_shape)
    conv = torch.nn.functional.conv3d if len(x_shape) == 5 else torch.nn.functional.conv2d
    recorder = conv_algos.ConvRecorder()
    with recorder:
        for _ in range(3):
            conv(x, w, None, stride, padding)
        conv(x.contiguous(memory_format=torch.channels_last_3d if x.dim() == 5 else torch.channels_last), w, None,
             stride, padding)  # fmt: skip
    assert sorted(e["count"] for e in recorder.calls.values()) == [1, 3]  # the other layout is another entry
    key = next(k for k, e in recorder.calls.items() if e["count"] == 3)
    assert key[0] == x_shape and key[2] == w_shape and key[5] == stride
    with FlopCounterMode(display=False) as counter:
        conv(x, w, None, stride, padding)
    assert conv_algos.conv_flops(key) == counter.get_total_flops()


def test_inductor_variant_compiles_the_recorded_convolution(conv_algos):
    """--inductor: the recorded convolution compiled with max-autotune (on the CPU: Inductor's own choice), timed and
    compared with the eager call."""
    x, w = torch.randn(1, 8, 4, 6, 6), torch.randn(3, 8, 3, 3, 3)
    recorder = conv_algos.ConvRecorder()
    with recorder:
        torch.nn.functional.conv3d(x, w, torch.randn(3), 1, (0, 1, 1))
    (key,) = recorder.calls
    out = conv_algos.inductor_variant(key, torch.device("cpu"), torch.float32, repeat=2)
    assert out["inductor_ms"] > 0 and out["inductor_autotune_s"] > 0
    assert out["inductor_max_abs_diff"] < 1e-4


def test_plot_sums_rows_and_writes_a_png(tmp_path):
    plot = load_benchmark("plot_conv_algos")
    row = {"input": [1, 96, 6, 64, 64], "weight": [96, 96, 3, 3, 3], "count": 4, "ms": 2.0}
    first = {"gpu": "test", "benchmark_limit": 10, "convolutions": [row, {**row, "ms": 1.0}]}  # strides differ
    second = {"gpu": "test", "benchmark_limit": 0, "convolutions": [{**row, "ms": 1.5}]}
    assert plot.shares(first) == {((1, 96, 6, 64, 64), (96, 96, 3, 3, 3), 4): 12.0}
    out = tmp_path / "convs.png"
    plot.plot([first, second], ["limit 10", "limit 0"], out, top=5)
    assert plot.legend_label("limit 10", plot.shares(first), first) == "limit 10: 12 ms in all"
    searched = {**second, "search_s": 12.65}
    assert plot.legend_label("limit 0", plot.shares(second), searched) == "limit 0: 6 ms in all, search 12.7 s"
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_search_only_reports_the_search_and_each_chosen_convolution(tmp_path):
    """--search-only (CONV_SEARCH_ONLY with several CONV_LIMITS on the device): the first decode's extra time, the
    number of shapes, and each recorded convolution timed as chosen, without the reformulations. A CPU smoke run of
    the whole script on the full-size Wan2.1 decoder with a tiny latent (~15 s)."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    out = tmp_path / "conv.json"
    subprocess.run([sys.executable, str(root / "benchmarks" / "conv_algos.py"), "--device", "cpu", "--latent",
                    "16,2,8,8", "--search-only", "--repeat", "2", "--json", str(out)],
                   check=True, capture_output=True, env={**os.environ, "PYTHONPATH": str(root / "src")})  # fmt: skip
    report = json.loads(out.read_text())
    assert report["first_decode_s"] > 0 and report["search_s"] == pytest.approx(
        report["first_decode_s"] - report["eager_decode_ms"] / 1000, abs=0.01)
    assert report["shapes"] == len(report["convolutions"]) > 10 and report["dtype"] == "float32"
    rows = report["convolutions"]
    assert all(r["ms"] > 0 for r in rows)
    assert not any("split_ms" in r or "padded_ms" in r for r in rows)  # no reformulations
    assert report["conv_ms_sum"] == pytest.approx(sum(r["count"] * r["ms"] for r in rows), rel=1e-3)
