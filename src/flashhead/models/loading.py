"""Finding and reading checkpoint files, with one-line errors that name the file.

Local folders, Hugging Face hub ids (through `huggingface_hub`, cache first) and the official file formats
are all handled here, so that each model class only says which files it needs.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch

from flashhead.errors import CheckpointError

logger = logging.getLogger(__name__)

SAFETENSORS_NAME = "diffusion_pytorch_model.safetensors"
SAFETENSORS_INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"


def resolve_model_dir(
    name_or_path: str | Path,
    subfolder: str | None = None,
    *,
    revision: str | None = None,
    cache_dir: str | Path | None = None,
    local_files_only: bool | None = None,
) -> Path:
    """Return a local folder for a path or a hub id, downloading (or reading the hub cache) if needed."""
    path = Path(name_or_path).expanduser()
    if path.exists():
        folder = path / subfolder if subfolder else path
        if not folder.is_dir():
            raise CheckpointError(f"{folder}: checkpoint folder not found")
        return folder
    repo_id = str(name_or_path)
    if repo_id.count("/") != 1 or repo_id.startswith((".", "/", "~")):
        raise CheckpointError(f"{name_or_path}: no such checkpoint folder (and not a Hugging Face hub id)")

    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    patterns = [f"{subfolder}/*"] if subfolder else None
    try:
        root = snapshot_download(
            repo_id,
            revision=revision,
            cache_dir=cache_dir,
            allow_patterns=patterns,
            local_files_only=bool(local_files_only),
        )
    except LocalEntryNotFoundError as e:
        raise CheckpointError(
            f"{repo_id}: not in the local Hugging Face cache and the hub could not be reached ({type(e).__name__})"
        ) from e
    except (HfHubHTTPError, OSError, ValueError) as e:
        raise CheckpointError(f"{repo_id}: could not be fetched from the Hugging Face hub: {e}".splitlines()[0]) from e
    folder = Path(root) / subfolder if subfolder else Path(root)
    if not folder.is_dir():
        raise CheckpointError(f"{repo_id}: the hub repository has no folder {subfolder!r}")
    return folder


def read_json(path: Path) -> dict:
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from e


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


def load_safetensors(paths: Iterable[Path], device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for path in paths:
        try:
            state.update(load_file(str(path), device=str(device)))
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{path}: unreadable safetensors file, truncated or corrupt ({e})") from e
    return state


def check_state_dict(
    state: Mapping[str, torch.Tensor],
    expected: Mapping[str, torch.Size],
    source: str | Path,
    optional_prefixes: tuple[str, ...] = (),
) -> list[str]:
    """Raise CheckpointError unless names and shapes match; return the optional keys that are absent."""
    missing = [k for k in expected if k not in state]
    absent_optional = [k for k in missing if k.startswith(optional_prefixes)]
    missing = [k for k in missing if k not in absent_optional]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        raise CheckpointError(f"{source}: weights do not match the model config: {', '.join(parts)}")
    for k, shape in expected.items():
        if k in state and tuple(state[k].shape) != tuple(shape):
            raise CheckpointError(
                f"{source}: {k} has shape {tuple(state[k].shape)}, the model config needs {tuple(shape)}"
            )
    return absent_optional
