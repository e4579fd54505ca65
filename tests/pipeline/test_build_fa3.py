"""benchmarks/build_fa3.py on the CPU: the build keeps exactly the FlashAttention-3 kernel the DiT needs."""

from __future__ import annotations

from _util import load_benchmark


def test_build_flags_keep_head_dim_128_bf16_forward_only():
    fa3 = load_benchmark("build_fa3")
    flags = fa3.build_flags()
    # The interface rounds head dims up to the first enabled one: 128, the DiT's (1536 / 12 heads).
    assert not flags["FLASHATTENTION_DISABLE_HDIM128"]
    assert all(flags[f"FLASHATTENTION_DISABLE_HDIM{d}"] for d in (64, 96, 192, 256))
    assert flags["FLASHATTENTION_DISABLE_BACKWARD"] and flags["FLASHATTENTION_DISABLE_FP16"]
    # Every compiled-out feature is also reported as disabled, and the one instantiation is bf16, head dim 128, Hopper.
    assert all(flags[f"FLASHATTENTION_DISABLE_{name}"] for name in fa3.DISABLED)
    assert [s for s in fa3.SOURCES if s.endswith(".cu") and "fwd" in s] == [
        "instantiations/flash_fwd_hdim128_bf16_sm90.cu"
    ]
