"""FlashHeadDiT against the official model: layout, numerics, batching, loading."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from _util import FIXTURES, load_fixture, prefixed, rel_l2
from flashhead.errors import CheckpointError, ConfigError
from flashhead.models import FlashHeadDiT
from flashhead.models.audio_projection import AudioProjModel, group_audio_windows
from flashhead.models.dit import audio_config_from_official, official_config, sdpa_kernel

VARIANTS = ["lite", "pro"]


def manifest(variant: str) -> dict:
    return json.loads((FIXTURES / f"official_dit_{variant}_keys.json").read_text())


def tiny_model(variant: str) -> tuple[FlashHeadDiT, dict[str, torch.Tensor]]:
    """The tiny random-weight DiT of the parity fixture, loaded by the official names."""
    tensors, meta = load_fixture(f"parity_dit_{variant}_tiny")
    cfg = dict(meta["config"])
    cfg.update(audio_config_from_official(meta["audio_proj_override"]["kwargs"], cfg))
    model = FlashHeadDiT.from_config(cfg).eval()
    missing, unexpected = model.load_state_dict(prefixed(tensors, "weights/"), strict=False)
    # The fixture omits exactly the unused audio_emb.* weights (see fixtures/README.md §2).
    assert unexpected == [] and sorted(missing) == sorted(meta["omitted_weights"]["keys"])
    return model, tensors


def run_case(model: FlashHeadDiT, t: dict[str, torch.Tensor], case: int) -> torch.Tensor:
    with torch.no_grad():
        return model(t[f"case{case}/x"], t[f"case{case}/timestep"], t[f"case{case}/context"], t[f"case{case}/y"])


@pytest.mark.parametrize("variant", VARIANTS)
def test_full_size_layout_matches_official_manifest(variant):
    m = manifest(variant)
    with torch.device("meta"):
        model = FlashHeadDiT.from_config(m["config"])
    ours = [(k, list(v.shape)) for k, v in model.state_dict().items()]
    theirs = [(k["name"], k["shape"]) for k in m["keys"]]
    assert ours == theirs  # same names, shapes and order
    assert len(ours) == m["num_keys"] == 843
    assert sum(p.numel() for p in model.parameters()) == m["num_params"]
    assert sum(p.numel() for p in model.audio_proj.parameters()) == m["num_params_audio_proj"]
    assert m["config"] | official_config(variant) == m["config"]  # our presets equal the manifest config


@pytest.mark.parametrize("case", [1, 2, 3])
@pytest.mark.parametrize("variant", VARIANTS)
def test_forward_matches_official(variant, case):
    model, t = tiny_model(variant)
    assert rel_l2(run_case(model, t, case), t[f"case{case}/output"]) <= 1e-5


def test_audio_projection_matches_official():
    t, meta = load_fixture("parity_audio_proj_tiny")
    c = meta["config"]
    proj = AudioProjModel(
        window=c["seq_len"], window_vf=c["seq_len_vf"], layers=c["blocks"], channels=c["channels"],
        intermediate_dim=c["intermediate_dim"], output_dim=c["output_dim"], tokens=c["context_tokens"],
        norm_output=c["norm_output_audio"],
    )  # fmt: skip
    proj.load_state_dict(prefixed(t, "weights/"), strict=True)
    with torch.no_grad():
        out = proj(t["case1/audio_embeds"], t["case1/audio_embeds_vf"])
    assert out.shape == (2, 5, 4, 64)
    assert rel_l2(out, t["case1/output"]) <= 1e-5


@pytest.mark.parametrize("variant", VARIANTS)
def test_audio_rows_per_latent_frame_match_worked_example(variant):
    examples = json.loads((FIXTURES / "audio_windows.json").read_text())["worked_examples"]
    # A chunk context whose feature values are the embedding frame indices themselves.
    indices = torch.tensor(examples["stream_chunk_context_indices"]["indices"])  # (33, 5)
    context = indices[None, :, :, None, None].float()  # (1, 33, 5, layers=1, channels=1)
    vae_scale = official_config(variant)["vae_stride"][0]
    first, later = group_audio_windows(context, vae_scale)
    rows = [first[0, 0].flatten().long().tolist()] + [r.flatten().long().tolist() for r in later[0]]
    expected = [r["embedding_indices"] for r in examples[f"{variant}_dit_window_rows_stream_chunk"]["rows"]]
    assert rows == expected


@pytest.mark.parametrize("variant", VARIANTS)
def test_parity_test_detects_a_perturbed_weight_or_missing_audio(variant):
    model, t = tiny_model(variant)
    reference = t["case2/output"]
    with torch.no_grad():
        model.blocks[1].cross_attn.v.weight[0, 0] += 0.05
    assert rel_l2(run_case(model, t, 2), reference) > 1e-4
    model, t = tiny_model(variant)
    t["case2/context"] = torch.zeros_like(t["case2/context"])
    assert rel_l2(run_case(model, t, 2), reference) > 1e-4


@pytest.mark.parametrize("variant", VARIANTS)
def test_batch_with_one_timestep_per_sample_equals_single_calls(variant):
    model, t = tiny_model(variant)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn((3, *t["case1/x"].shape[1:]), generator=gen)
    y = torch.randn((3, *t["case1/y"].shape[1:]), generator=gen)
    context = torch.randn((3, *t["case1/context"].shape[1:]), generator=gen)
    timesteps = torch.tensor([1000.0, 833.3333, 250.0])
    with torch.no_grad():
        batched = model(x, timesteps, context, y)
        singles = torch.cat(
            [model(x[i : i + 1], timesteps[i : i + 1], context[i : i + 1], y[i : i + 1]) for i in range(3)]
        )
    assert rel_l2(batched, singles) <= 1e-5
    assert rel_l2(batched[0], batched[1]) > 1e-2  # samples really differ


def test_every_block_runs_on_a_contiguous_residual_stream():
    """The tokens leave patchify contiguous, so no block sees (or passes on) the conv output's channel-major
    layout: compiled blocks would otherwise reduce their norms over a strided dim (slower on the GPU)."""
    model, t = tiny_model("lite")
    layouts = []
    hooks = [b.register_forward_pre_hook(lambda _, args: layouts.append(args[0].is_contiguous())) for b in model.blocks]
    try:
        run_case(model, t, 1)
    finally:
        for h in hooks:
            h.remove()
    assert layouts == [True] * len(model.blocks)


def test_attention_kernel_for_self_attention_only():
    """attention=fa3 hands FA3 the self-attentions and leaves the cross-attentions (32 audio keys, where cuDNN is
    faster) to torch SDPA; the kernel gets (B, L, heads, d) and gives the same attention as SDPA."""
    model, t = tiny_model("lite")
    calls = []

    def kernel(q, k, v):  # SDPA in FA3's (B, L, heads, d) layout
        calls.append(q.shape)
        return sdpa_kernel(q, k, v)

    reference = run_case(model, t, 1)
    model.set_attention_kernel(kernel, cross=False)
    try:
        out = run_case(model, t, 1)
    finally:
        model.set_attention_kernel(None)
    assert len(calls) == len(model.blocks)  # one per block: the self-attention only
    assert all(shape[-2] == model.blocks[0].self_attn.num_heads for shape in calls)
    assert rel_l2(out, reference) <= 1e-5
    model.set_attention_kernel(kernel)  # both, by default
    try:
        run_case(model, t, 1)
    finally:
        model.set_attention_kernel(None)
    assert len(calls) == 3 * len(model.blocks)


# bf16 against fp32 at the same (bf16-rounded) timestep, measured on CPU with the tiny fixtures over all
# cases (docs/models.md): rel-L2 0.0067-0.0075. The bound leaves head-room for other CPUs and kernels.
BF16_TOLERANCE = 2e-2


@pytest.mark.parametrize("variant", VARIANTS)
def test_bfloat16_stays_within_documented_tolerance(variant):
    model, t = tiny_model(variant)
    # The official model rounds the timestep to the activation dtype (937.5 -> 936 in bf16); we do too.
    t32 = t | {"case2/timestep": t["case2/timestep"].bfloat16().float()}
    assert t32["case2/timestep"].item() == 936.0
    reference = run_case(model, t32, 2)
    model = model.to(torch.bfloat16)
    t16 = {k: v.to(torch.bfloat16) for k, v in t.items()}
    out = run_case(model, t16, 2)
    assert out.dtype == torch.bfloat16
    assert rel_l2(out.float(), reference) <= BF16_TOLERANCE
    assert torch.equal(out, run_case(model, t16 | {"case2/timestep": torch.tensor([936.0])}, 2))


def test_gradient_checkpointing_gives_the_same_gradients():
    model, t = tiny_model("lite")
    args = (t["case2/x"], t["case2/timestep"], t["case2/context"], t["case2/y"])
    model.train()
    model(*args).square().mean().backward()
    plain = model.patch_embedding.weight.grad.clone()
    model.zero_grad()
    model.enable_gradient_checkpointing()
    model(*args).square().mean().backward()
    assert rel_l2(model.patch_embedding.weight.grad, plain) <= 1e-5


def test_unsupported_configs_are_refused():
    cfg = official_config("lite") | dict(dim=64, ffn_dim=128, num_heads=2, num_layers=1, text_dim=8)
    with pytest.raises(ConfigError, match="has_image_input"):
        FlashHeadDiT.from_config(cfg | {"has_image_input": True})
    with pytest.raises(ConfigError, match="in_dim"):
        FlashHeadDiT.from_config(cfg | {"in_dim": 100})
    with pytest.raises(ConfigError, match="unknown model variant"):
        official_config("ultra")


# --- loading -------------------------------------------------------------------------------------------


def official_style_folder(tmp_path, variant="pro"):
    """A checkpoint folder as released: official config.json keys, every official tensor name, fp32."""
    model, _ = tiny_model(variant)
    folder = tmp_path / f"Model_{variant.capitalize()}"
    folder.mkdir()
    _, meta = load_fixture(f"parity_dit_{variant}_tiny")
    config = {"_class_name": "WanModelAudioProject", "_diffusers_version": "0.33.1", **meta["config"]}
    config.update(audio_config_from_official(meta["audio_proj_override"]["kwargs"], meta["config"]))
    (folder / "config.json").write_text(json.dumps(config))
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "diffusion_pytorch_model.safetensors")
    )
    return folder, model


def test_save_pretrained_round_trip_is_bit_exact(tmp_path):
    model, _ = tiny_model("lite")
    model.save_pretrained(tmp_path / "ckpt")
    loaded = FlashHeadDiT.from_pretrained(tmp_path / "ckpt")
    assert loaded.config == model.config
    for (k, a), (k2, b) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(a, b)


def test_loads_official_folder_and_casts_to_bfloat16(tmp_path):
    folder, model = official_style_folder(tmp_path)
    loaded = FlashHeadDiT.from_pretrained(folder, torch_dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in loaded.parameters())
    assert torch.equal(loaded.head.head.weight, model.head.head.weight.to(torch.bfloat16))
    assert not loaded.training


def test_loads_a_checkpoint_without_the_unused_weights(tmp_path):
    folder, model = official_style_folder(tmp_path)
    weights = folder / "diffusion_pytorch_model.safetensors"
    state = {k: v for k, v in load_file(str(weights)).items() if not k.startswith("audio_emb.")}
    save_file(state, str(weights))
    loaded = FlashHeadDiT.from_pretrained(folder)
    assert torch.equal(loaded.blocks[0].ffn[0].weight, model.blocks[0].ffn[0].weight)


def test_missing_truncated_or_mismatched_files_name_the_file(tmp_path):
    folder, _ = official_style_folder(tmp_path)
    weights = folder / "diffusion_pytorch_model.safetensors"
    data = weights.read_bytes()

    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="diffusion_pytorch_model.safetensors.*truncated") as e:
        FlashHeadDiT.from_pretrained(folder)
    assert "\n" not in str(e.value)

    weights.unlink()
    with pytest.raises(CheckpointError, match="diffusion_pytorch_model.safetensors: file not found"):
        FlashHeadDiT.from_pretrained(folder)

    weights.write_bytes(data)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(config | {"num_layers": 3}))
    with pytest.raises(
        CheckpointError, match="diffusion_pytorch_model.safetensors: does not match FlashHeadDiT: missing"
    ):
        FlashHeadDiT.from_pretrained(folder)
    (folder / "config.json").write_text(json.dumps(config | {"ffn_dim": 96}))
    with pytest.raises(CheckpointError, match=r"wrong shape .*ffn.0.weight \(128, 64\) vs \(96, 64\)"):
        FlashHeadDiT.from_pretrained(folder)

    (folder / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json: not a readable JSON file"):
        FlashHeadDiT.from_pretrained(folder)
    (folder / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json: file not found"):
        FlashHeadDiT.from_pretrained(folder)
    with pytest.raises(CheckpointError, match="no such checkpoint folder"):
        FlashHeadDiT.from_pretrained(tmp_path / "nowhere")


def test_hub_id_offline_and_not_cached_gives_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(
        CheckpointError, match="Soul-AILab/SoulX-FlashHead-1_3B: Model_Lite not in the local Hugging Face cache"
    ):
        FlashHeadDiT.from_pretrained(
            "Soul-AILab/SoulX-FlashHead-1_3B", "Model_Lite", cache_dir=tmp_path, local_files_only=True
        )


def test_hub_id_is_read_from_the_local_cache(tmp_path, monkeypatch):
    """A hub snapshot laid out as huggingface_hub caches it is found offline, subfolder included."""
    folder, model = official_style_folder(tmp_path, "lite")
    snapshot = tmp_path / "cache" / "models--Soul-AILab--SoulX-FlashHead-1_3B" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    folder.rename(snapshot / "Model_Lite")
    refs = snapshot.parents[1] / "refs"
    refs.mkdir()
    (refs / "main").write_text("0" * 40)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    loaded = FlashHeadDiT.from_pretrained(
        "Soul-AILab/SoulX-FlashHead-1_3B", "Model_Lite", cache_dir=tmp_path / "cache", local_files_only=True
    )
    assert torch.equal(loaded.patch_embedding.weight, model.patch_embedding.weight)


@pytest.mark.parametrize("head_dim", [32, 48, 64, 80, 128])
def test_rope_split_follows_wan_for_any_head_dim(head_dim):
    # Wan2.1 splits a head into time d - 4*(d//6) and height/width 2*(d//6) channels each.
    from flashhead.models.dit import rope_frequencies

    table = rope_frequencies(head_dim, (2, 3, 4), torch.device("cpu"))
    assert table.shape == (2 * 3 * 4, 1, head_dim // 2)
    d_hw = (head_dim // 6) * 2 // 2
    d_t = head_dim // 2 - 2 * d_hw
    # Moving one step along width rotates only the last d_hw phasors.
    step_w = table[1, 0] / table[0, 0]
    assert torch.allclose(step_w[: d_t + d_hw], torch.ones(d_t + d_hw, dtype=step_w.dtype))
    assert not torch.allclose(step_w[d_t + d_hw :], torch.ones(d_hw, dtype=step_w.dtype))
