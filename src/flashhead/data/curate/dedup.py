"""Probing and de-duplication: which inputs are readable videos with speech, and which are copies.

Three kinds of copy, checked in this order against every input kept before it (inputs are visited in
sorted path order, so the first of a group is the one kept, whatever the worker count):

1. the same source id: the container tag `source_id`, or `purl` (the page URL yt-dlp writes with
   --embed-metadata) [PAPER: "source video ID"];
2. the same bytes (MD5) [PAPER];
3. the same pictures: 64-bit DCT perceptual hashes (pHash: the signs of the 8x8 lowest DCT frequencies of a
   32x32 grey frame against their median) of frames at fixed times
   (every `hash_every` s from 0.5 s), so a re-encoded, rescaled or remuxed copy hashes alike while the
   same speaker in another video does not. Copies trimmed at the start are not caught (the times shift).
"""

from __future__ import annotations

import bisect
import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import av
import numpy as np

from flashhead.data.curate.config import DedupSection
from flashhead.errors import MediaError
from flashhead.media.audio_io import open_media

_SOURCE_TAGS = ("source_id", "purl")
_HASH_SIDE = 32  # frames are shrunk to 32x32 grey before hashing


@dataclass
class Fingerprint:
    """What dedup needs of one input, computed in a worker (one pass over the file)."""

    path: str
    md5: str
    duration: float  # seconds of decoded video
    source_id: str | None = None
    hashes: list[int] = field(default_factory=list)  # pHash of the frame at 0.5 s, 0.5 + hash_every, ...


def md5_of(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def phash(gray: np.ndarray) -> int:
    """64-bit perceptual hash of a 32x32 grey image (numpy + scipy: works with any OpenCV flavour)."""
    from scipy.fft import dctn

    low = dctn(np.asarray(gray, np.float64), norm="ortho")[:8, :8]
    bits = (low > np.median(low)).flatten()
    return int(np.packbits(bits).view(">u8")[0])


def fingerprint(path: str | Path, cfg: DedupSection) -> Fingerprint:
    """Probe one input and hash its frames.

    Raises:
        MediaError: unreadable or corrupt, no video or no audio track, or no decodable frame.
    """
    name = Path(path).name
    with open_media(path, MediaError, "video") as container:
        if not container.streams.video:
            raise MediaError(f"{name}: has no video track")
        if not container.streams.audio:
            raise MediaError(f"{name}: has no audio track")
        tags = {k.lower(): v for k, v in container.metadata.items()}
        source_id = next((tags[t] for t in _SOURCE_TAGS if tags.get(t)), None)
        stream = container.streams.video[0]
        start = float(stream.start_time * stream.time_base) if stream.start_time is not None else 0.0
        hashes: list[int] = []
        next_time, last_time, count = 0.5, 0.0, 0
        try:
            for frame in container.decode(stream):
                count += 1
                last_time = float(frame.time) - start if frame.time is not None else count / 25.0
                if last_time + 1e-6 >= next_time:
                    gray = frame.to_ndarray(format="gray", width=_HASH_SIDE, height=_HASH_SIDE)
                    hashes.append(phash(gray))
                    next_time += cfg.hash_every
        except av.FFmpegError as e:
            raise MediaError(f"{name}: corrupt video data ({getattr(e, 'strerror', None) or e})") from None
        if count == 0:
            raise MediaError(f"{name}: the video track holds no frames")
        rate = float(stream.average_rate or stream.guessed_rate or 25)
    return Fingerprint(str(path), md5_of(path), last_time + 1 / rate, source_id, hashes)


def _same_pictures(a: Fingerprint, b: Fingerprint, cfg: DedupSection) -> tuple[bool, str]:
    n = min(len(a.hashes), len(b.hashes))
    if n == 0:
        return False, ""
    distances = [(x ^ y).bit_count() for x, y in zip(a.hashes[:n], b.hashes[:n], strict=True)]
    close = sum(d <= cfg.max_hamming for d in distances)
    return close >= cfg.match_fraction * n, f"{close}/{n} frames within {cfg.max_hamming} pHash bits"


def find_duplicates(prints: list[Fingerprint], cfg: DedupSection) -> dict[str, str]:
    """{path: reason} for every input that copies one kept before it (`prints` in the order to keep)."""
    by_source: dict[str, str] = {}
    by_md5: dict[str, str] = {}
    kept: list[tuple[float, int, Fingerprint]] = []  # sorted by duration, for the pHash comparisons
    duplicates: dict[str, str] = {}
    for i, fp in enumerate(prints):
        reason = None
        if fp.source_id and fp.source_id in by_source:
            reason = f"same source id {fp.source_id!r} as {Path(by_source[fp.source_id]).name}"
        elif fp.md5 in by_md5:
            reason = f"exact copy of {Path(by_md5[fp.md5]).name} (MD5 {fp.md5[:12]})"
        else:
            lo = bisect.bisect_left(kept, fp.duration - cfg.duration_tolerance, key=lambda k: k[0])
            for duration, _, other in kept[lo:]:
                if duration > fp.duration + cfg.duration_tolerance:
                    break
                same, detail = _same_pictures(fp, other, cfg)
                if same:
                    reason = f"re-encoded copy of {Path(other.path).name} ({detail})"
                    break
        if reason is not None:
            duplicates[fp.path] = reason
            continue
        if fp.source_id:
            by_source[fp.source_id] = fp.path
        by_md5[fp.md5] = fp.path
        bisect.insort(kept, (fp.duration, i, fp), key=lambda k: (k[0], k[1]))
    return duplicates



__all__ = ["Fingerprint", "find_duplicates", "fingerprint", "md5_of"]
