"""Start the FlashHead DiT from Wan2.1-T2V-1.3B (the report's base model, SPEC 3.9-3.10).

Wan's `WanModel` state-dict names are our backbone's names, so the mapping is mostly the identity:

    blocks.*, time_embedding.*, time_projection.*, text_embedding.*, head.modulation   copied (same shapes)
    patch_embedding   Wan (dim, 16, 1, 2, 2); ours takes the noisy latent AND the reference latent
                      (2x channels): Wan's kernel goes into the first half (the noisy latent, which is what
                      Wan saw), the reference half starts at zero, so step 0 behaves exactly like Wan on
                      the noisy latent. A kernel of another size (Lite: 1x1x1 over 256 LTX channels) cannot
                      be transferred and stays freshly initialised.
    head.head         copied when the shape matches (Pro: 16 channels x 2x2 patch = 64); otherwise (Lite:
                      128 x 1) re-initialised to zero, as Wan initialises its own head
    audio_proj.*, audio_emb.*   new modules, left as initialised

Every copied tensor's shape is checked; a Wan key we do not know is an error (no silent strict=False).
The per-block cross-attention (Wan: text tokens) keeps Wan's weights and now reads audio tokens: the
official FlashHead block has the same names and shapes there (SPEC 3.2), so this is the natural start.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from flashhead.errors import CheckpointError
from flashhead.models.dit import FlashHeadDiT
from flashhead.models.loading import read_safetensors, read_torch_state_dict, safetensors_files

logger = logging.getLogger(__name__)

# Our parameters that Wan2.1 does not have.
NEW_PREFIXES = ("audio_proj.", "audio_emb.")


@dataclass
class WanInitReport:
    copied: list[str] = field(default_factory=list)
    widened: list[str] = field(default_factory=list)  # copied into the first half of the input channels
    fresh: list[str] = field(default_factory=list)  # kept (or zero-) initialised

    def summary(self) -> str:
        return f"{len(self.copied)} tensors copied, {len(self.widened)} widened, {len(self.fresh)} fresh"


def read_wan_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Wan2.1 DiT weights from a folder (diffusion_pytorch_model*.safetensors) or a .safetensors/.pth file."""
    path = Path(path)
    if path.is_dir():
        state: dict[str, torch.Tensor] = {}
        for file in safetensors_files(path):
            state.update(read_safetensors(file)[0])
    elif path.suffix == ".safetensors":
        state = read_safetensors(path)[0]
    else:
        state = read_torch_state_dict(path)
    if any(k.startswith(("condition_embedder.", "proj_out.")) for k in state):
        raise CheckpointError(
            f"{path}: these are diffusers-format Wan weights; use the original Wan-AI/Wan2.1-T2V-1.3B "
            "release (WanModel names: patch_embedding, blocks.N.self_attn.q, ...)"
        )
    return state


@torch.no_grad()
def init_from_wan(model: FlashHeadDiT, wan: str | Path | dict[str, torch.Tensor]) -> WanInitReport:
    """Copy Wan2.1 T2V weights into `model` in place (see the module docstring for the rules)."""
    wan_state = read_wan_state_dict(wan) if not isinstance(wan, dict) else wan
    ours = model.state_dict()
    report = WanInitReport()
    unknown = sorted(k for k in wan_state if k not in ours)
    if unknown:
        raise CheckpointError(f"Wan weights have {len(unknown)} keys the FlashHead DiT lacks, e.g. {unknown[:3]}")

    for name, target in ours.items():
        source = wan_state.get(name)
        if name.startswith(NEW_PREFIXES):
            report.fresh.append(name)
        elif source is None:
            raise CheckpointError(f"Wan weights lack {name}")
        elif source.shape == target.shape:
            target.copy_(source)
            report.copied.append(name)
        elif name == "patch_embedding.weight" and _widenable(source.shape, target.shape):
            target.zero_()
            target[:, : source.shape[1]] = source  # (dim, C_noisy, kt, kh, kw): reference half stays 0
            report.widened.append(name)
        elif name.startswith(("patch_embedding.", "head.head.")):
            if name.startswith("head.head."):
                target.zero_()
            report.fresh.append(name)
            logger.info("init_from_wan: %s %s cannot take Wan's %s; left fresh", name, tuple(target.shape),
                        tuple(source.shape))  # fmt: skip
        else:
            raise CheckpointError(f"Wan tensor {name} has shape {tuple(source.shape)}, ours {tuple(target.shape)}")
    logger.info("init_from_wan: %s", report.summary())
    return report


def _widenable(source: torch.Size, target: torch.Size) -> bool:
    # Same width and kernel, exactly twice the input channels (noisy latent || reference latent).
    return source[0] == target[0] and source[2:] == target[2:] and 2 * source[1] == target[1]
