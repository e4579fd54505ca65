"""The `flashhead` command line."""

from __future__ import annotations

import functools
import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from flashhead import __version__
from flashhead.errors import ConfigError, FlashHeadError

app = typer.Typer(
    name="flashhead",
    help="Real-time, infinite-length, audio-driven talking-head video.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()


def friendly_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn a FlashHeadError into one line on stderr and the error's exit code, never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except FlashHeadError as e:
            print(f"error: {e}", file=sys.stderr)
            raise typer.Exit(e.exit_code) from None

    return wrapper


@app.callback()
def main(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log debug messages.")] = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )


@app.command()
def version() -> None:
    """Print the flashhead version."""
    print(__version__)


def _model_config(model: str) -> tuple[str, dict]:
    from flashhead.models.dit import official_config
    from flashhead.models.loading import read_json

    if model in ("lite", "pro"):
        return f"official {model.capitalize()} configuration", official_config(model)
    path = Path(model)
    if not path.exists():
        raise ConfigError(f"{model}: not 'lite', 'pro', or an existing checkpoint folder / config.json")
    config_path = path / "config.json" if path.is_dir() else path
    return str(config_path), read_json(config_path)


@app.command()
@friendly_errors
def info(
    model: Annotated[
        str, typer.Option("--model", "-m", help="lite, pro, or a checkpoint folder / config.json.")
    ] = "lite",
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """Describe a model: parameter counts by component and the token geometry of one 512x512 chunk."""
    import torch

    from flashhead.models import FlashHeadDiT

    source, config = _model_config(model)
    with torch.device("meta"):  # sizes only: nothing is allocated
        dit = FlashHeadDiT.from_config(config)
    cfg = dit.config

    def count(prefix: str = "") -> int:
        return sum(p.numel() for n, p in dit.named_parameters() if n.startswith(prefix))

    st, sh, sw = cfg.vae_stride
    pt, ph, pw = cfg.patch_size
    latent_frames = (33 - 1) // st + 1
    grid = (latent_frames // pt, 512 // sh // ph, 512 // sw // pw)
    report = {
        "source": source,
        "parameters": count(),
        "parameters_by_component": {
            "blocks": count("blocks."),
            "audio_proj": count("audio_proj."),
            "patch_embedding": count("patch_embedding."),
            "time_embedding+projection": count("time_embedding.") + count("time_projection."),
            "head": count("head."),
            "unused_in_forward (text_embedding, audio_emb)": count("text_embedding.") + count("audio_emb."),
        },
        "state_dict_keys": len(dit.state_dict()),
        "fp32_bytes": 4 * count(),
        "layers": cfg.num_layers,
        "width": cfg.dim,
        "heads": cfg.num_heads,
        "latent_channels": cfg.out_dim,
        "vae_stride": list(cfg.vae_stride),
        "patch_size": list(cfg.patch_size),
        "tokens_per_chunk_512": grid[0] * grid[1] * grid[2],
        "token_grid_512": list(grid),
    }
    if as_json:
        print(json.dumps(report, indent=2))
        return
    table = Table(title=f"FlashHeadDiT — {source}", show_header=False)
    for key, value in report.items():
        if isinstance(value, dict):
            for k, v in value.items():
                table.add_row(f"  {k}", f"{v:,}")
        else:
            table.add_row(key, f"{value:,}" if isinstance(value, int) else str(value))
    console.print(table)


if __name__ == "__main__":
    app()
