from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from flashhead.errors import CheckpointError
from flashhead.models.dit import FlashHeadDiT
from flashhead.train.wan_init import init_from_wan, read_wan_state_dict

TINY = dict(dim=64, ffn_dim=128, text_dim=32, freq_dim=256, num_heads=2, num_layers=2, audio_layers=3,
            audio_channels=16, audio_intermediate_dim=32, audio_tokens=4)  # fmt: skip
PRO = dict(TINY, in_dim=32, out_dim=16, vae_stride=(4, 8, 8), patch_size=(1, 2, 2))
LITE = dict(TINY, in_dim=256, out_dim=128, vae_stride=(8, 32, 32), patch_size=(1, 1, 1))


def fake_wan_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """A Wan2.1-T2V-shaped state dict at tiny width: WanModel names, 16 input channels, 2x2 patches, head 64."""
    torch.manual_seed(seed)
    ours = FlashHeadDiT(**PRO).state_dict()
    wan = {k: torch.randn_like(v) for k, v in ours.items() if not k.startswith(("audio_proj.", "audio_emb."))}
    wan["patch_embedding.weight"] = torch.randn(64, 16, 1, 2, 2)  # Wan sees the noisy latent only
    return wan


def test_pro_geometry_copies_the_backbone_and_widens_the_patch_embedding(tmp_path):
    wan = fake_wan_state_dict()
    save_file(wan, str(tmp_path / "diffusion_pytorch_model.safetensors"))
    torch.manual_seed(1)
    dit = FlashHeadDiT(**PRO)
    audio_before = {k: v.clone() for k, v in dit.state_dict().items() if k.startswith("audio_proj.")}
    report = init_from_wan(dit, tmp_path)  # a Wan folder, as released
    state = dit.state_dict()
    copied = ["blocks.1.self_attn.q.weight", "blocks.0.cross_attn.k.bias", "blocks.0.modulation", "head.modulation",
              "time_projection.1.weight", "text_embedding.2.weight", "head.head.weight"]  # fmt: skip
    for name in copied:
        assert torch.equal(state[name], wan[name]), name
    weight = state["patch_embedding.weight"]
    assert weight.shape == (64, 32, 1, 2, 2)
    assert torch.equal(weight[:, :16], wan["patch_embedding.weight"]) and not weight[:, 16:].any()
    for name, before in audio_before.items():
        assert torch.equal(state[name], before), name
    assert report.widened == ["patch_embedding.weight"] and "head.head.weight" in report.copied
    assert all(k.startswith(("audio_proj.", "audio_emb.")) for k in report.fresh)
    # the zero reference half makes step 0 ignore the reference latent: Wan on the noisy latent
    x, ctx = torch.randn(1, 16, 3, 4, 4), torch.randn(1, 9, 5, 3, 16)
    with torch.no_grad():
        a = dit(x, torch.tensor([500.0]), ctx, torch.randn_like(x))
        b = dit(x, torch.tensor([500.0]), ctx, torch.randn_like(x))
    assert torch.equal(a, b)


def test_lite_geometry_keeps_patch_embedding_fresh_and_zeroes_the_head():
    wan = fake_wan_state_dict()
    torch.manual_seed(1)
    dit = FlashHeadDiT(**LITE)
    patch_before = dit.patch_embedding.weight.clone()
    report = init_from_wan(dit, wan)
    assert torch.equal(dit.patch_embedding.weight, patch_before)  # 1x1x1 over 256 channels: nothing to copy
    assert not dit.head.head.weight.any() and not dit.head.head.bias.any()
    assert {"patch_embedding.weight", "head.head.weight", "head.head.bias"} <= set(report.fresh)
    assert torch.equal(dit.blocks[0].ffn[0].weight, wan["blocks.0.ffn.0.weight"])


def test_mismatches_are_errors_not_silently_skipped(tmp_path):
    wan = fake_wan_state_dict()
    with pytest.raises(CheckpointError, match="keys the FlashHead DiT lacks"):
        init_from_wan(FlashHeadDiT(**PRO), {**wan, "img_emb.proj.0.weight": torch.zeros(3)})
    wrong = dict(wan)
    wrong["blocks.0.self_attn.q.weight"] = torch.zeros(64, 32)
    with pytest.raises(CheckpointError, match="blocks.0.self_attn.q.weight has shape"):
        init_from_wan(FlashHeadDiT(**PRO), wrong)
    missing = {k: v for k, v in wan.items() if k != "blocks.1.norm3.weight"}
    with pytest.raises(CheckpointError, match="lack blocks.1.norm3.weight"):
        init_from_wan(FlashHeadDiT(**PRO), missing)
    save_file({"condition_embedder.x": torch.zeros(1)}, str(tmp_path / "diffusion_pytorch_model.safetensors"))
    with pytest.raises(CheckpointError, match="diffusers-format"):
        read_wan_state_dict(tmp_path)
