"""Checkpoint plumbing shared by the VAE adapters: finding files (local or Hub), reading them, and
loading a state dict into a diffusers model with strict checks.

Every failure a user can cause (missing file, truncated file, wrong keys or shapes, offline Hub) becomes
a one-line `CheckpointError` that names the file; nothing from deep inside torch or safetensors leaks.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn

from flashhead.errors import CheckpointError

M = TypeVar("M", bound=nn.Module)

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


def is_hub_id(path_or_repo_id: str | Path) -> bool:
    """True for an `owner/name` string that is not an existing local path."""
    s = str(path_or_repo_id)
    return not Path(s).exists() and _HUB_ID.match(s) is not None


def hub_download(
    repo_id: str,
    *,
    filename: str | None = None,
    folder: str | None = None,
    revision: str | None = None,
    cache_dir: str | Path | None = None,
    local_files_only: bool = False,
) -> Path:
    """Fetch one file (`filename`) or one folder (`folder`) of a Hub repo; returns its local path."""
    from huggingface_hub import hf_hub_download, snapshot_download

    what = filename or f"{folder}/"
    try:
        if filename is not None:
            return Path(
                hf_hub_download(
                    repo_id,
                    filename,
                    revision=revision,
                    cache_dir=cache_dir,
                    local_files_only=local_files_only,
                )
            )
        root = snapshot_download(
            repo_id,
            allow_patterns=[f"{folder}/*"],
            revision=revision,
            cache_dir=cache_dir,
            local_files_only=local_files_only,
        )
    except Exception as exc:  # the hub client raises many types; the user needs one message
        raise CheckpointError(
            f"{repo_id}/{what}: no such local path, and not downloadable from the Hugging Face Hub nor "
            f"cached (offline? wrong repo id?) ({_one_line(exc)})"
        ) from exc
    path = Path(root) / folder
    if not path.is_dir():
        raise CheckpointError(f"{repo_id}/{what}: not found in the Hub repository")
    return path


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from `path`, or a CheckpointError naming it."""
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: not a readable JSON file ({_one_line(exc)})") from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return data


def read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and string metadata of a .safetensors file."""
    from safetensors import safe_open

    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            names = f.keys()
            return {k: f.get_tensor(k) for k in names}, dict(f.metadata() or {})
    except Exception as exc:  # truncated or corrupt: safetensors raises its own error types
        raise CheckpointError(f"{path}: truncated or unreadable safetensors file ({_one_line(exc)})") from exc


def read_torch_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A state dict saved with `torch.save`, loaded with `weights_only=True` (no arbitrary pickles)."""
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated zip, bad pickle, ...: torch raises a zoo of types
        raise CheckpointError(f"{path}: truncated or unreadable torch checkpoint ({_one_line(exc)})") from exc
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: expected a flat state dict of tensors")
    return dict(obj)


def _summarise(keys: list[str], limit: int = 3) -> str:
    shown = ", ".join(keys[:limit])
    return f"{len(keys)} ({shown}{', ...' if len(keys) > limit else ''})"


def build_and_load(
    model_cls: type[M],
    config: Mapping[str, Any],
    state_dict: Mapping[str, torch.Tensor],
    source: str,
) -> M:
    """Build `model_cls` from a diffusers `config` and load `state_dict` into it, strictly.

    The model is created on the meta device and the tensors are assigned, so nothing is initialised
    twice and no memory is spent on random weights. Missing, unexpected or mis-shaped keys raise one
    CheckpointError naming `source`.
    """
    with torch.device("meta"):
        model = model_cls.from_config(dict(config))
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(k for k in expected if k not in state_dict)
    unexpected = sorted(k for k in state_dict if k not in expected)
    wrong = sorted(
        f"{k} {tuple(state_dict[k].shape)} vs {expected[k]}"
        for k in expected
        if k in state_dict and tuple(state_dict[k].shape) != expected[k]
    )
    problems = [
        f"{name} {_summarise(keys)}"
        for name, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong))
        if keys
    ]
    if problems:
        raise CheckpointError(f"{source}: does not match {model_cls.__name__}: " + "; ".join(problems))
    model.load_state_dict(dict(state_dict), strict=True, assign=True)
    # A non-persistent buffer would still sit on the meta device; neither VAE class has one today.
    leftover = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if leftover:
        raise RuntimeError(f"{model_cls.__name__}: tensors not in the state dict: {leftover[:3]}")
    return model.eval().requires_grad_(False)
