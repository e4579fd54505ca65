"""Where the evaluation networks' weights come from.

None of the evaluation networks ships with a package we can install, and nothing is downloaded at run
time: every metric that needs weights looks for them, in this order,

1. the path the user gave (`--inception`, `--i3d`, `--syncnet`, `--arcface`); `hf:OWNER/REPO/FILE` names a
   file in the local Hugging Face hub cache (never fetched);
2. the environment variable of that network (`FLASHHEAD_INCEPTION`, `FLASHHEAD_I3D`, `FLASHHEAD_SYNCNET`,
   `FLASHHEAD_ARCFACE`);
3. `$FLASHHEAD_EVAL_HOME` (default `~/.cache/flashhead/eval`) under the file's canonical name;
4. for Inception only, the torch hub checkpoint folder, where torchmetrics / torch-fidelity / pytorch-fid
   leave it after their own first download.

When none of these exists the metric is reported "unavailable" with the places that were searched.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


class MetricUnavailable(Exception):
    """A metric cannot be computed here (weights or an optional package missing); the message says why."""


@dataclass(frozen=True)
class WeightsSpec:
    name: str  # what the user calls it: the CLI flag without dashes
    env: str
    filenames: tuple[str, ...]  # canonical names, first preferred
    origin: str  # where users get the file (for the "unavailable" message and the docs)


INCEPTION = WeightsSpec(
    "inception",
    "FLASHHEAD_INCEPTION",
    ("weights-inception-2015-12-05-6726825d.pth", "pt_inception-2015-12-05-6726825d.pth"),
    "torch-fidelity release v0.2.0 (weights-inception-2015-12-05-6726825d.pth) or pytorch-fid release 0.1.1 "
    "(pt_inception-2015-12-05-6726825d.pth); both are the TF FID Inception graph converted to PyTorch",
)
I3D = WeightsSpec(
    "i3d",
    "FLASHHEAD_I3D",
    ("i3d_torchscript.pt",),
    "StyleGAN-V's FVD detector i3d_torchscript.pt (TorchScript I3D, Kinetics-400)",
)
SYNCNET = WeightsSpec(
    "syncnet",
    "FLASHHEAD_SYNCNET",
    ("syncnet_v2.model",),
    "syncnet_python's data/syncnet_v2.model (fetched by its download_model.sh)",
)
ARCFACE = WeightsSpec(
    "arcface",
    "FLASHHEAD_ARCFACE",
    ("arcface.onnx", "w600k_r50.onnx", "arcface.pt"),
    "an ArcFace recogniser taking 112x112 aligned RGB crops: ONNX (e.g. insightface's w600k_r50.onnx) or TorchScript",
)


def eval_home() -> Path:
    return Path(os.environ.get("FLASHHEAD_EVAL_HOME", Path.home() / ".cache" / "flashhead" / "eval"))


def _torch_hub_checkpoints() -> Path:
    torch_home = os.environ.get("TORCH_HOME", Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "torch")
    return Path(torch_home) / "hub" / "checkpoints"


def _from_hf_cache(ref: str) -> Path | None:
    owner, _, rest = ref.partition("/")
    repo, _, filename = rest.partition("/")
    if not (owner and repo and filename):
        raise MetricUnavailable(f"{ref!r}: expected hf:OWNER/REPO/FILE")
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    found = try_to_load_from_cache(f"{owner}/{repo}", filename)
    return Path(found) if isinstance(found, str) else None


def resolve_weights(spec: WeightsSpec, path: str | os.PathLike | None = None) -> Path:
    """The weights file of `spec`, searched as the module docstring says.

    Raises:
        MetricUnavailable: nothing found; the message lists what was searched and where to get the file.
    """
    searched: list[str] = []
    candidates: list[Path] = []
    if path is not None:
        text = str(path)
        if text.startswith("hf:"):
            found = _from_hf_cache(text[3:])
            if found is None:
                raise MetricUnavailable(f"{spec.name} weights {text} are not in the local Hugging Face cache")
            return found
        given = Path(text).expanduser()
        if not given.is_file():
            raise MetricUnavailable(f"{spec.name} weights {given} do not exist")
        return given
    if os.environ.get(spec.env):
        candidates.append(Path(os.environ[spec.env]).expanduser())
        searched.append(f"${spec.env}")
    folders = [eval_home()]
    if spec is INCEPTION:
        folders.append(_torch_hub_checkpoints())
    for folder in folders:
        candidates += [folder / name for name in spec.filenames]
        searched.append(str(folder))
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise MetricUnavailable(
        f"no {spec.name} weights: pass --{spec.name} PATH, set ${spec.env}, or put {spec.filenames[0]} in "
        f"{eval_home()} (searched {', '.join(searched)}); the file is {spec.origin}"
    )
