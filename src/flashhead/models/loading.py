"""Finding and reading checkpoint files, with one-line errors that name the file.

Local folders, Hugging Face hub ids (through `huggingface_hub`, cache first) and the official file formats
(safetensors, torch pickles of plain state dicts) are handled here for every model class: the DiT, both
VAEs and our own pipeline folders. Models are built on the meta device and their tensors assigned, after
names and shapes have been checked.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn

from flashhead.errors import CheckpointError

logger = logging.getLogger(__name__)

M = TypeVar("M", bound=nn.Module)

SAFETENSORS_NAME = "diffusion_pytorch_model.safetensors"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


def is_hub_id(path_or_repo_id: str | Path) -> bool:
    """True for an `owner/name` string that is not an existing local path."""
    s = str(path_or_repo_id)
    return not Path(s).exists() and _HUB_ID.match(s) is not None


def resolve_model_dir(
    name_or_path: str | Path,
    subfolder: str | None = None,
    *,
    revision: str | None = None,
    cache_dir: str | Path | None = None,
    local_files_only: bool | None = None,
) -> Path:
    """A local folder for a path or a hub id (only `subfolder` is fetched; the local cache is tried first)."""
    path = Path(name_or_path).expanduser()
    if path.exists():
        folder = path / subfolder if subfolder else path
        if not folder.is_dir():
            raise CheckpointError(f"{folder}: checkpoint folder not found")
        return folder
    if not is_hub_id(name_or_path):
        raise CheckpointError(f"{name_or_path}: no such checkpoint folder (and not a Hugging Face hub id)")
    patterns = [f"{subfolder}/*"] if subfolder else None
    root = _from_hub(str(name_or_path), subfolder or "", revision, cache_dir, local_files_only, patterns=patterns)
    folder = root / subfolder if subfolder else root
    if not folder.is_dir():
        raise CheckpointError(f"{name_or_path}: the hub repository has no folder {subfolder!r}")
    return folder


def hub_download(
    repo_id: str,
    filename: str,
    *,
    revision: str | None = None,
    cache_dir: str | Path | None = None,
    local_files_only: bool | None = None,
) -> Path:
    """The local path of one file of a hub repo (from the cache when present)."""
    return _from_hub(repo_id, filename, revision, cache_dir, local_files_only, filename=filename)


def _from_hub(repo_id, what, revision, cache_dir, local_files_only, *, filename=None, patterns=None) -> Path:
    from huggingface_hub import hf_hub_download, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    where = dict(revision=revision, cache_dir=cache_dir, local_files_only=bool(local_files_only))
    try:
        if filename is not None:
            return Path(hf_hub_download(repo_id, filename, **where))
        return Path(snapshot_download(repo_id, allow_patterns=patterns, **where))
    except LocalEntryNotFoundError as exc:
        raise CheckpointError(
            f"{repo_id}: {what + ' ' if what else ''}not in the local Hugging Face cache and the hub could not be "
            f"reached (offline?)"
        ) from exc
    except Exception as exc:  # the hub client raises many types; the user needs one line
        raise CheckpointError(
            f"{repo_id}: {what} could not be fetched from the Hugging Face hub ({_one_line(exc)})"
        ) from exc


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


def safetensors_files(folder: Path, name: str = SAFETENSORS_NAME) -> list[Path]:
    """The weight files of a diffusers-layout folder: one file, or the shards listed by its index."""
    single, index = folder / name, folder / f"{name}.index.json"
    if single.is_file():
        return [single]
    if index.is_file():
        shards = sorted(set(read_json(index).get("weight_map", {}).values()))
        missing = [s for s in shards if not (folder / s).is_file()]
        if missing:
            raise CheckpointError(f"{folder / missing[0]}: shard listed in {index.name} not found")
        return [folder / s for s in shards]
    raise CheckpointError(f"{single}: file not found")


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
    optional_prefixes: tuple[str, ...] = (),
    frozen: bool = True,
) -> M:
    """Build `model_cls` from a diffusers `config` and load `state_dict` into it, strictly.

    The model is created on the meta device and the tensors are assigned, so nothing is initialised
    twice and no memory is spent on random weights. Missing, unexpected or mis-shaped keys raise one
    CheckpointError naming `source`. The model is returned in eval mode, and without gradients when `frozen`.
    """
    with torch.device("meta"):
        model = model_cls.from_config(dict(config))
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(k for k in expected if k not in state_dict)
    # Weights a checkpoint may omit (never used in forward): zero-filled rather than refused.
    absent_optional = [k for k in missing if k.startswith(optional_prefixes)] if optional_prefixes else []
    if absent_optional:
        dtype = next(iter(state_dict.values())).dtype if state_dict else torch.float32
        state_dict = {**state_dict, **{k: torch.zeros(expected[k], dtype=dtype) for k in absent_optional}}
        missing = [k for k in missing if k not in absent_optional]
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
    return model.eval().requires_grad_(not frozen)
