"""VAE adapters against the tiny pipeline fixtures (fixtures/README.md sections 8 and 9).

The fixtures store each tiny VAE in its upstream layout (`vae/*`): LTX's native
`CausalVideoAutoencoder` for Lite, the official `WanVAE_` for Pro. They are converted to the diffusers
classes through the library's conversion functions and must reproduce the upstream encode/decode.
"""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import AutoencoderKLLTXVideo, AutoencoderKLWan
from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers
from safetensors.torch import save_file

from _util import load_fixture, prefixed, rel_l2
from flashhead.errors import CheckpointError, ConfigError
from flashhead.models.vae import (
    LTX_VIDEO_090_VAE_CONFIG,
    WAN21_LATENTS_MEAN,
    WAN21_LATENTS_STD,
    LTXVideoVAE,
    WanVideoVAE,
    check_ltx_video_090_config,
    convert_wan_vae_state_dict,
    ltx_native_config_to_diffusers,
)

TOL = 1e-4

# SPEC section 5.6 / fixtures README section 9.
SPEC_WAN_MEAN = [-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
                 0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921]  # fmt: skip
SPEC_WAN_STD = [2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
                3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160]  # fmt: skip


# ---- fixture glue: the tiny VAEs as the upstream code stores them -------------------------------


def _lite_native() -> tuple[dict[str, torch.Tensor], dict]:
    tensors, meta = load_fixture("pipeline_lite_tiny")
    return prefixed(tensors, "vae/"), meta["vae_config"]


def _pro_official() -> tuple[dict[str, torch.Tensor], dict]:
    tensors, meta = load_fixture("pipeline_pro_tiny")
    config = {k: v for k, v in meta["vae_config"].items() if k != "wrapper"}  # "wrapper" is a note
    return prefixed(tensors, "vae/"), config


@pytest.fixture(scope="module")
def lite():
    tensors, _ = load_fixture("pipeline_lite_tiny")
    state_dict, native_config = _lite_native()
    vae = LTXVideoVAE.from_native_state_dict(state_dict, native_config, strict_config=False)
    return vae, tensors


@pytest.fixture(scope="module")
def pro():
    tensors, _ = load_fixture("pipeline_pro_tiny")
    state_dict, config = _pro_official()
    return WanVideoVAE.from_official_state_dict(state_dict, config), tensors


# ---- Lite: LTX-Video VAE ----------------------------------------------------------------------


@torch.no_grad()
def test_lite_decode_chunk0(lite):
    vae, t = lite
    out = vae.decode(t["chunk0/final_latent"][None])  # fixture latents carry no batch dim
    err = rel_l2(out, t["chunk0/decoded"])
    print(f"lite decode chunk0 rel-L2 {err:.2e}")
    assert err <= TOL


@torch.no_grad()
def test_lite_encode_reference(lite):
    vae, t = lite
    clip = t["cond_image_tensor"].repeat(1, 1, 33, 1, 1)
    z = vae.encode(clip, noise=t["prepare/encode_noise"])
    err = rel_l2(z[0], t["ref_latent"])
    print(f"lite encode ref_latent rel-L2 {err:.2e}")
    assert err <= TOL


@pytest.mark.parametrize("k", [0, 1])
@torch.no_grad()
def test_lite_encode_motion(lite, k):
    vae, t = lite
    z = vae.encode(t[f"chunk{k}/motion_frames_video"], noise=t[f"chunk{k}/motion_encode_noise"])
    err = rel_l2(z[0], t[f"chunk{k}/motion_latents_out"])
    print(f"lite encode chunk{k} motion rel-L2 {err:.2e}")
    assert err <= TOL


@torch.no_grad()
def test_lite_posterior_noise_sources(lite):
    vae, t = lite
    video = t["chunk0/motion_frames_video"]
    shape = t["chunk0/motion_encode_noise"].shape
    eps = torch.randn(shape, generator=torch.Generator().manual_seed(7))
    from_gen = vae.encode(video, generator=torch.Generator().manual_seed(7))
    assert torch.equal(from_gen, vae.encode(video, noise=eps))
    mean = vae.encode(video, sample_posterior=False)
    assert not torch.allclose(mean, from_gen)
    # the sample is mean + std * eps with one std shared by all 128 channels (uniform log-variance)
    spread = (from_gen - mean) * vae.model.latents_std.view(1, -1, 1, 1, 1) / eps
    assert torch.allclose(spread, spread[:, :1].expand_as(spread), rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError):
        vae.encode(video, noise=eps[:, :, :1])


def test_lite_native_config_mapping():
    _, native_config = _lite_native()
    cfg = ltx_native_config_to_diffusers(native_config)
    assert cfg["block_out_channels"] == [4, 8, 16, 16]
    assert cfg["decoder_block_out_channels"] == [4, 8, 16, 16]
    assert cfg["layers_per_block"] == cfg["decoder_layers_per_block"] == [1, 1, 1, 1, 1]
    assert (cfg["patch_size"], cfg["latent_channels"], cfg["decoder_causal"]) == (4, 128, False)
    # the real 0.9.0 native config maps onto the released diffusers config
    blocks = [["res_x", 4], ["compress_all", 1], ["res_x_y", 1], ["res_x", 3], ["compress_all", 1]]
    blocks += [["res_x_y", 1], ["res_x", 3], ["compress_all", 1], ["res_x", 3], ["res_x", 4]]
    real = dict(native_config, blocks=blocks)  # SPEC section 2; base channels default to 128
    del real["encoder_base_channels"], real["decoder_base_channels"]
    check_ltx_video_090_config(ltx_native_config_to_diffusers(real))
    with pytest.raises(ConfigError, match="norm_layer"):
        ltx_native_config_to_diffusers(dict(native_config, norm_layer="group_norm"))
    with pytest.raises(ConfigError, match="blocks"):
        ltx_native_config_to_diffusers(dict(native_config, blocks=native_config["blocks"][:-1]))


def test_ltx_config_check():
    check_ltx_video_090_config(LTX_VIDEO_090_VAE_CONFIG)
    with torch.device("meta"):  # a config re-saved by diffusers (all defaults spelled out) passes too
        saved = dict(AutoencoderKLLTXVideo(**LTX_VIDEO_090_VAE_CONFIG_ARGS).config)
    check_ltx_video_090_config(saved)
    wrong = dict(LTX_VIDEO_090_VAE_CONFIG, latent_channels=64)
    with pytest.raises(CheckpointError, match=r"cfg\.json: not the LTX-Video 0\.9\.0 .*latent_channels=64"):
        check_ltx_video_090_config(wrong, source="cfg.json")
    with pytest.raises(CheckpointError, match="timestep_conditioning"):
        check_ltx_video_090_config(dict(LTX_VIDEO_090_VAE_CONFIG, timestep_conditioning=True))


LTX_VIDEO_090_VAE_CONFIG_ARGS = {k: v for k, v in LTX_VIDEO_090_VAE_CONFIG.items() if not k.startswith("_")}


@torch.no_grad()
def test_lite_diffusers_folder_roundtrip(lite, tmp_path):
    vae, t = lite
    vae.model.save_pretrained(tmp_path / "VAE_LTX")  # the released layout: config.json + safetensors
    with pytest.raises(CheckpointError, match=r"config\.json: not the LTX-Video 0\.9\.0 VAE config"):
        LTXVideoVAE.from_pretrained(tmp_path)
    loaded = LTXVideoVAE.from_pretrained(tmp_path, strict_config=False)
    err = rel_l2(loaded.decode(t["chunk0/final_latent"][None]), t["chunk0/decoded"])
    print(f"lite decode chunk0 after save/load rel-L2 {err:.2e}")
    assert err <= TOL

    weights = tmp_path / "VAE_LTX" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:5000])
    with pytest.raises(CheckpointError, match="diffusion_pytorch_model.safetensors: truncated"):
        LTXVideoVAE.from_pretrained(tmp_path, strict_config=False)


def test_lite_native_single_file_and_bad_keys(tmp_path):
    state_dict, native_config = _lite_native()
    path = tmp_path / "ltx_vae.safetensors"
    tensors = {"vae." + k: v.contiguous() for k, v in state_dict.items()}
    save_file(tensors, str(path), metadata={"config": json.dumps({"vae": native_config})})
    vae = LTXVideoVAE.from_pretrained(path, strict_config=False)
    assert vae.latent_channels == 128 and vae.stride == (8, 32, 32)

    del tensors["vae.decoder.conv_in.conv.bias"]
    tensors["vae.encoder.conv_in.conv.weight"] = tensors["vae.encoder.conv_in.conv.weight"][:2]
    save_file(tensors, str(path), metadata={"config": json.dumps({"vae": native_config})})
    with pytest.raises(CheckpointError, match=r"ltx_vae\.safetensors: .*missing 1 .*wrong shape 1"):
        LTXVideoVAE.from_pretrained(path, strict_config=False)


def test_missing_paths_and_offline_hub(tmp_path):
    with pytest.raises(CheckpointError, match="nowhere"):
        LTXVideoVAE.from_pretrained(tmp_path / "nowhere")
    with pytest.raises(CheckpointError, match="Wan2.1_VAE.pth: file not found"):
        WanVideoVAE.from_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="flashhead-tests/no-such-repo"):
        WanVideoVAE.from_pretrained("flashhead-tests/no-such-repo", local_files_only=True, cache_dir=tmp_path)
    with pytest.raises(CheckpointError, match="flashhead-tests/no-such-repo"):
        LTXVideoVAE.from_pretrained("flashhead-tests/no-such-repo", local_files_only=True, cache_dir=tmp_path)


# ---- Pro: Wan2.1 VAE --------------------------------------------------------------------------


@torch.no_grad()
def test_pro_decode_chunk0(pro):
    vae, t = pro
    out = vae.decode(t["chunk0/final_latent"][None])
    err = rel_l2(out, t["chunk0/decoded"])
    print(f"pro decode chunk0 rel-L2 {err:.2e}")
    assert err <= TOL
    assert out.abs().max() <= 1.0


@torch.no_grad()
def test_pro_encode_reference(pro):
    vae, t = pro
    z = vae.encode(t["cond_image_tensor"].repeat(1, 1, 33, 1, 1))
    err = rel_l2(z[0], t["ref_latent"])
    print(f"pro encode ref_latent rel-L2 {err:.2e}")
    assert err <= TOL


@pytest.mark.parametrize("k", [0, 1])
@torch.no_grad()
def test_pro_encode_motion(pro, k):
    vae, t = pro
    z = vae.encode(t[f"chunk{k}/motion_frames_video"])
    err = rel_l2(z[0], t[f"chunk{k}/motion_latents_out"])
    print(f"pro encode chunk{k} motion rel-L2 {err:.2e}")
    assert err <= TOL


def test_pro_shapes_and_constants(pro):
    vae, _ = pro
    assert vae.latent_channels == 16 and vae.stride == (4, 8, 8)
    assert vae.latent_shape(33, 512, 512) == (16, 9, 64, 64)
    assert list(WAN21_LATENTS_MEAN) == SPEC_WAN_MEAN and list(WAN21_LATENTS_STD) == SPEC_WAN_STD
    with pytest.raises(ValueError, match="stride"):
        vae.encode(torch.zeros(1, 3, 6, 32, 32))


@torch.no_grad()
def test_pro_pth_roundtrip_and_errors(tmp_path):
    state_dict, config = _pro_official()
    folder = tmp_path / "ckpt" / "VAE_Wan"
    folder.mkdir(parents=True)
    pth = folder / "Wan2.1_VAE.pth"
    torch.save(state_dict, pth)
    t, _ = load_fixture("pipeline_pro_tiny")
    vae = WanVideoVAE.from_pretrained(tmp_path / "ckpt", config=config)  # the checkpoint root
    err = rel_l2(vae.decode(t["chunk0/final_latent"][None]), t["chunk0/decoded"])
    print(f"pro decode chunk0 after .pth save/load rel-L2 {err:.2e}")
    assert err <= TOL
    for where in (folder, pth):  # the VAE folder and the file itself load the same weights
        other = WanVideoVAE.from_pretrained(where, config=config).model.state_dict()
        assert all(torch.equal(v, other[k]) for k, v in vae.model.state_dict().items())

    bf16 = WanVideoVAE.from_pretrained(pth, config=config, dtype=torch.bfloat16)
    assert bf16.dtype == torch.bfloat16 and bf16.latents_std.dtype == torch.bfloat16

    torch.save({k: v for k, v in state_dict.items() if k != "decoder.head.2.bias"}, pth)
    with pytest.raises(CheckpointError, match=r"Wan2\.1_VAE\.pth: .*missing 1 \(decoder\.conv_out\.bias\)"):
        WanVideoVAE.from_pretrained(pth, config=config)
    with pytest.raises(CheckpointError, match=r"Wan2\.1_VAE\.pth: .*wrong shape"):  # tiny file, full config
        torch.save(state_dict, pth)
        WanVideoVAE.from_pretrained(pth)
    pth.write_bytes(pth.read_bytes()[:3000])
    with pytest.raises(CheckpointError, match=r"Wan2\.1_VAE\.pth: truncated"):
        WanVideoVAE.from_pretrained(pth, config=config)


def test_wan_conversion_matches_diffusers_for_released_layout():
    # The released VAE has 2 res blocks per level, the case diffusers' converter hard-codes. Build the
    # official key list for that layout (as WanVAE_ names them) with a small width and check that our
    # converter and diffusers' agree, and that the names fit AutoencoderKLWan exactly.
    keys = ["conv1.weight", "conv1.bias", "conv2.weight", "conv2.bias"]
    res = ["residual.0.gamma", "residual.2.weight", "residual.2.bias"]
    res += ["residual.3.gamma", "residual.6.weight", "residual.6.bias"]
    idx = 0
    for level in range(4):
        for r in range(2):
            keys += [f"encoder.downsamples.{idx}.{p}" for p in res]
            if level == 1 and r == 0:  # dims 96 -> 192: a shortcut
                keys += [f"encoder.downsamples.{idx}.shortcut.{p}" for p in ("weight", "bias")]
            if level == 2 and r == 0:
                keys += [f"encoder.downsamples.{idx}.shortcut.{p}" for p in ("weight", "bias")]
            idx += 1
        if level < 3:
            keys += [f"encoder.downsamples.{idx}.resample.1.{p}" for p in ("weight", "bias")]
            if level > 0:  # temporal downsample [False, True, True]
                keys += [f"encoder.downsamples.{idx}.time_conv.{p}" for p in ("weight", "bias")]
            idx += 1
    idx = 0
    for level in range(4):
        for r in range(3):
            keys += [f"decoder.upsamples.{idx}.{p}" for p in res]
            if level == 1 and r == 0:  # 384 // 2 -> 384 after the first (spatio-temporal) upsample
                keys += [f"decoder.upsamples.{idx}.shortcut.{p}" for p in ("weight", "bias")]
            idx += 1
        if level < 3:
            keys += [f"decoder.upsamples.{idx}.resample.1.{p}" for p in ("weight", "bias")]
            if level < 2:  # temporal upsample [True, True, False]
                keys += [f"decoder.upsamples.{idx}.time_conv.{p}" for p in ("weight", "bias")]
            idx += 1
    for part in ("encoder", "decoder"):
        keys += [f"{part}.conv1.weight", f"{part}.conv1.bias", f"{part}.head.0.gamma"]
        keys += [f"{part}.head.2.weight", f"{part}.head.2.bias"]
        for m in (0, 2):
            keys += [f"{part}.middle.{m}.{p}" for p in res]
        keys += [f"{part}.middle.1.{p}" for p in ("norm.gamma", "to_qkv.weight", "to_qkv.bias")]
        keys += [f"{part}.middle.1.{p}" for p in ("proj.weight", "proj.bias")]
    state = {k: torch.tensor([i]) for i, k in enumerate(keys)}

    ours = convert_wan_vae_state_dict(state, num_res_blocks=2)
    theirs = convert_wan_vae_to_diffusers(dict(state))
    assert ours == theirs
    with torch.device("meta"):
        model = AutoencoderKLWan(base_dim=8)
    assert set(ours) == set(model.state_dict())


@torch.no_grad()
def test_pro_encode_ignores_noise_arguments(pro):
    vae, t = pro
    video = t["chunk0/motion_frames_video"]
    eps = torch.randn(1, 16, 2, 4, 4)
    assert torch.equal(vae.encode(video), vae.encode(video, noise=eps, generator=torch.Generator()))


@torch.no_grad()
@pytest.mark.parametrize("head", [1, 2, 3])
def test_pro_decode_in_pieces_equals_the_whole_decode(pro, head):
    """The causal Wan decode pauses after `head` latent frames: the pieces, concatenated, are the whole decode,
    bit for bit (same per-frame calls and caches), and the first piece holds the pixels of those frames only."""
    vae, t = pro
    latent = t["chunk0/final_latent"][None]
    latent = torch.cat([latent, latent.flip(2)], dim=2)  # more latent frames than the fixture's chunk
    whole = vae.decode(latent)
    pieces = list(vae.decode_in_pieces(latent, head))
    assert len(pieces) == 2
    st = vae.stride[0]
    assert pieces[0].shape[2] == 1 + st * (head - 1)
    assert torch.equal(torch.cat(pieces, dim=2), whole)
    assert vae.model._feat_map == [None] * len(vae.model._feat_map)  # caches cleared after the last piece


@torch.no_grad()
def test_decode_in_pieces_is_one_piece_where_it_cannot_split(pro, lite):
    """Out-of-range heads (and the LTX decode, whose frames see later latent frames) give the whole decode."""
    vae, t = pro
    latent = t["chunk0/final_latent"][None]
    for head in (0, latent.shape[2]):
        (piece,) = vae.decode_in_pieces(latent, head)
        assert torch.equal(piece, vae.decode(latent))
    ltx, lt = lite
    latent = lt["chunk0/final_latent"][None]
    (piece,) = ltx.decode_in_pieces(latent, 1)
    assert torch.equal(piece, ltx.decode(latent))
