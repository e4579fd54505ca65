"""`flashhead detect VIDEO`: say whether a video carries the flashhead watermark, and what its metadata claims.

The watermark is the evidence: metadata is easy to strip or forge, so it is only reported alongside.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from flashhead.errors import FlashHeadError

FOUND, NOT_FOUND = 0, 1


def detect_command(video: Path, as_json: bool) -> int:
    """Print whether `video` is flashhead output; return 0 if the watermark is found, 1 if not, else an error code.

    Errors (unreadable file, no video track) print one line to stderr and return the error's exit code (never
    0 or 1, so scripts can tell "not marked" from "could not check").
    """
    from flashhead.media.video_io import read_provenance
    from flashhead.media.watermark import WATERMARK_ID, detect_watermark

    try:
        result = detect_watermark(video)
        provenance = read_provenance(video)
    except FlashHeadError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code if e.exit_code not in (FOUND, NOT_FOUND) else 2

    if as_json:
        report = {
            "video": str(video),
            "detected": result.detected,
            "bit_accuracy": round(result.bit_accuracy, 4),
            "score": round(result.score, 2),
            "payload": f"0x{result.payload:08X}",
            "expected_payload": f"0x{WATERMARK_ID:08X}",
            "frames_checked": result.frames_checked,
            "provenance": provenance,
        }
        print(json.dumps(report, indent=2))
    elif result.detected:
        print(
            f"{video}: flashhead watermark detected (bit accuracy {result.bit_accuracy:.2f}, "
            f"score {result.score:.1f}, provenance: {_describe(provenance)})"
        )
    else:
        claim = f"; its metadata claims {_describe(provenance)}" if provenance else ""
        print(
            f"{video}: flashhead watermark not detected (bit accuracy {result.bit_accuracy:.2f}, "
            f"score {result.score:.1f}{claim})"
        )
    return FOUND if result.detected else NOT_FOUND


def _describe(provenance: dict[str, Any] | None) -> str:
    if not provenance:
        return "no metadata"
    parts = [str(provenance.get("generator", "flashhead"))]
    parts += [f"{key} {provenance[key]}" for key in ("model", "seed") if key in provenance]
    if "created_utc" in provenance:
        parts.append(f"made {provenance['created_utc']}")
    return ", ".join(parts)
