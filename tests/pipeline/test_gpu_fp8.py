"""fp8 quantises the DiT's linears and nothing else in the process (run on the device).

torchao's quantize_ sets process-wide options unless told not to: Inductor's coordinate-descent tuning in every
direction (session 39: a Lite `bench --optimized --switches fp8=on` still autotuning its compiled LTX VAE after 9
minutes, against a 61 s warm-up without fp8) and TF32 for every float32 matmul (wav2vec2's features would change).
"""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.gpu


def test_fp8_leaves_inductor_and_matmul_precision_as_they_were():
    import torch._inductor.config as inductor

    from flashhead.models.dit import FlashHeadDiT
    from flashhead.pipeline.fast_path import quantize_fp8

    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("float8 matrix units: Ada or Hopper")
    pytest.importorskip("torchao", reason="fp8 needs torchao: pip install 'flashhead[fp8]'")
    before = (inductor.coordinate_descent_tuning, inductor.coordinate_descent_check_all_directions,
              torch.get_float32_matmul_precision())
    # a small random-init DiT (float8 GEMMs want widths divisible by 16)
    dit = FlashHeadDiT.from_config(dict(dim=64, ffn_dim=128, num_heads=2, num_layers=2, text_dim=32,
                                        audio_channels=16, audio_intermediate_dim=32, audio_tokens=4))
    dit = dit.to("cuda", torch.bfloat16).eval()
    plain = [type(block.ffn[0].weight) for block in dit.blocks]
    quantize_fp8(dit)
    after = (inductor.coordinate_descent_tuning, inductor.coordinate_descent_check_all_directions,
             torch.get_float32_matmul_precision())
    assert after == before
    # and the quantisation itself happened: the blocks' weights are torchao's float8 tensors now
    assert all(type(block.ffn[0].weight) is not cls for block, cls in zip(dit.blocks, plain, strict=True))
    assert "float8" in str(dit.blocks[0].ffn[0].weight.qdata.dtype)
