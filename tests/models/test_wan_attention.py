"""vae_attention_gemm: the Wan2.1 VAE's middle-block attention as two GEMMs gives diffusers' block output; the switch
changes only the blocks' class and switches back."""

from __future__ import annotations

import torch
from diffusers.models.autoencoders.autoencoder_kl_wan import WanAttentionBlock

from flashhead.models.vae.wan_attention import GemmWanAttentionBlock, attention_by_gemms, set_attention_gemm
from models.test_wan_conv import tiny_wan


def test_attention_by_gemms_is_sdpa():
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(3, 50, 24, generator=gen) for _ in range(3))
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    torch.testing.assert_close(attention_by_gemms(q, k, v), ref, rtol=1e-5, atol=1e-5)
    # bf16 inputs: float32 scores and softmax, the output in bf16 within bf16 rounding of the float32 result
    out = attention_by_gemms(q.bfloat16(), k.bfloat16(), v.bfloat16())
    assert out.dtype == torch.bfloat16
    exact = torch.nn.functional.scaled_dot_product_attention(*(t.bfloat16().float() for t in (q, k, v)))
    torch.testing.assert_close(out.float(), exact, rtol=2e-2, atol=2e-2)


def test_gemm_block_matches_diffusers_block():
    torch.manual_seed(0)
    block = WanAttentionBlock(16).eval()
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.3)  # gamma included: not the identity norm
        x = torch.randn(2, 16, 3, 6, 5)
        ref = block(x)
        assert set_attention_gemm(block, True) == 1 and type(block) is GemmWanAttentionBlock
        out = block(x)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert set_attention_gemm(block, False) == 1 and type(block) is WanAttentionBlock


def test_switch_covers_the_decoder_and_keeps_the_state_dict():
    vae = tiny_wan()
    before = {k: v.clone() for k, v in vae.model.state_dict().items()}
    blocks = [m for m in vae.model.modules() if isinstance(m, WanAttentionBlock)]
    assert blocks  # the middle blocks of encoder and decoder
    assert set_attention_gemm(vae.model, True) == len(blocks)
    assert all(type(m) is GemmWanAttentionBlock for m in blocks)
    after = vae.model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    set_attention_gemm(vae.model, False)
    assert all(type(m) is WanAttentionBlock for m in blocks)
