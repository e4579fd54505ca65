"""Write a file or a folder so that readers see the old one or the whole new one, never a half-written one."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling of `path` to write (a file, or a folder to create); on success it replaces `path`.

    A left-over temporary from an interrupted run is removed first; on an exception the temporary is removed and
    `path` is untouched. Folders are swapped by removing the old one and renaming the new one (two steps, since
    POSIX cannot rename over a non-empty folder); files in one `os.replace`.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    _remove(tmp)
    try:
        yield tmp
        if tmp.is_dir():
            _remove(path)
        os.replace(tmp, path)
    finally:
        _remove(tmp)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def make_folder(path: str | Path, setting: str = "output folder") -> Path:
    """Create the folder `path` (and its parents) before work that writes there, or say in one line why it cannot
    be: a ConfigError naming the `setting`, not an OSError traceback after minutes of loading."""
    from flashhead.errors import ConfigError

    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise ConfigError(f"{setting} {path}: a file, not a folder") from None
    except OSError as e:
        raise ConfigError(f"{setting} {path}: cannot be created ({e.strerror})") from None
    return path
