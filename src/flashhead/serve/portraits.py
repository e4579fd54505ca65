"""Uploaded portraits: decoded safely, face-cropped by the pipeline, kept for a while under an id."""

from __future__ import annotations

import asyncio
import io
import secrets
import tempfile
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from flashhead.errors import FlashHeadError, SessionError
from flashhead.pipeline.flashhead_pipeline import FlashHeadPipeline


@dataclass
class Portrait:
    id: str
    image: np.ndarray  # (H, W, 3) uint8 at the pipeline's output size
    created: float

    def png(self) -> bytes:
        buffer = io.BytesIO()
        Image.fromarray(self.image).save(buffer, format="PNG")
        return buffer.getvalue()


class PortraitStore:
    """Prepared portraits by id, least recently used dropped first, expired after `ttl` seconds.

    Decoding and face detection run in a one-thread pool of their own: off the event loop, and never in the
    engine thread (they do not use the model).
    """

    def __init__(self, pipeline: FlashHeadPipeline, *, max_items: int, ttl: float):
        self.pipeline = pipeline
        self.max_items = max_items
        self.ttl = ttl
        self._items: OrderedDict[str, Portrait] = OrderedDict()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="flashhead-portrait")

    def prepare_file(self, path: Path, crop: bool = True) -> np.ndarray:
        return np.array(self.pipeline.prepare_image(path, crop=crop), dtype=np.uint8)  # a writable copy

    def prepare_bytes(self, data: bytes, suffix: str = "", crop: bool = True) -> np.ndarray:
        # Through a file, so that the image loader can refuse oversize pictures from the header before decoding.
        with tempfile.TemporaryDirectory(prefix="flashhead-portrait-") as folder:
            path = Path(folder) / f"portrait{suffix[:8] if suffix.startswith('.') else ''}"
            path.write_bytes(data)
            try:
                return self.prepare_file(path, crop=crop)
            except FlashHeadError as e:  # name the upload, not the server's temporary file
                raise type(e)(str(e).replace(str(path), "uploaded image")) from None

    async def prepare(self, data: bytes, suffix: str = "", crop: bool = True) -> np.ndarray:
        """Decode and crop an image file's bytes (ImageError, NoFaceError)."""
        return await asyncio.get_running_loop().run_in_executor(self._pool, self.prepare_bytes, data, suffix, crop)

    async def prepare_path(self, path: Path, crop: bool = True) -> np.ndarray:
        return await asyncio.get_running_loop().run_in_executor(self._pool, self.prepare_file, path, crop)

    def add(self, image: np.ndarray) -> Portrait:
        self._expire()
        portrait = Portrait(f"p-{secrets.token_hex(8)}", image, time.monotonic())
        self._items[portrait.id] = portrait
        while len(self._items) > self.max_items:
            self._items.popitem(last=False)
        return portrait

    def get(self, portrait_id: str) -> Portrait:
        self._expire()
        try:
            self._items.move_to_end(portrait_id)
            return self._items[portrait_id]
        except KeyError:
            raise SessionError(f"no portrait {portrait_id!r} (unknown or expired; upload it again)") from None

    def __len__(self) -> int:
        return len(self._items)

    def _expire(self) -> None:
        limit = time.monotonic() - self.ttl
        for key in [k for k, p in self._items.items() if p.created < limit]:
            del self._items[key]

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
