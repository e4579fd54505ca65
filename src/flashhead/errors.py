"""User-facing errors.

Each failure a user can cause has its own exception type carrying a one-line message; the CLI prints
the message and exits non-zero. Library code raises these instead of letting a stack trace from deep
inside torch or safetensors reach the user.
"""

from __future__ import annotations


class FlashHeadError(Exception):
    """Base class: a failure with a one-line, user-readable message."""

    exit_code = 1


class CheckpointError(FlashHeadError):
    """A checkpoint file or folder is missing, truncated, or does not match the model it is loaded into."""

    exit_code = 3


class AudioError(FlashHeadError):
    """Audio that cannot be decoded or used (empty, corrupt, wrong shape)."""

    exit_code = 4


class ConfigError(FlashHeadError):
    """A configuration value that the model or pipeline cannot work with."""

    exit_code = 2


class ImageError(FlashHeadError):
    """A portrait that cannot be decoded or is unsafe to decode (corrupt, empty, too large)."""

    exit_code = 5


class NoFaceError(FlashHeadError):
    """No face was found in a portrait (or in a video frame where one is required)."""

    exit_code = 6


class MediaError(FlashHeadError):
    """A video or container that cannot be read or written."""

    exit_code = 7


class CapacityError(FlashHeadError):
    """The engine or server is at its measured capacity and cannot admit another real-time session."""

    exit_code = 8


class SessionError(FlashHeadError):
    """A streaming session that does not exist, has ended, or was used out of order."""

    exit_code = 9


def friendly_errors(fn):
    """Wrap a typer command: a FlashHeadError becomes one line on stderr and its exit code, never a traceback."""
    import functools
    import sys

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except FlashHeadError as e:
            import typer

            print(f"error: {e}", file=sys.stderr)
            raise typer.Exit(e.exit_code) from None

    return wrapper
