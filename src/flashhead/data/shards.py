"""The clip shard format: WebDataset-style tar shards of talking-head clips plus a parquet manifest.

A dataset is a folder::

    shard-000000.tar   <key>.json  metadata (key, fps, num_frames, width, height, duration, sample_rate,
                                   source, identity, split, optional text, mouth_open, free extras)
                       <key>.mp4   video only, H.264 (yuv420p, CRF 12 by default; or lossless RGB)
                       <key>.wav   mono PCM16, 16 kHz
                       <key>.<name>.npy  optional arrays, e.g. audio_features (float16), latents
    shard-000001.tar   ...
    manifest.parquet   one row per clip: key, shard, index_in_shard, offset, num_frames, fps, duration,
                       width, height, source, identity, split

Members of one clip are contiguous and named `<key>.<ext>` with no dot in the key, so any WebDataset
reader groups them; our own reader uses the manifest's byte offsets for random access. Writing is
deterministic (fixed tar headers, single-threaded x264): the same clips give byte-identical shards.
Each shard and the manifest appear atomically (written under a temporary name, then renamed).
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import tarfile
import wave
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from flashhead.errors import AudioError, ConfigError, MediaError

if TYPE_CHECKING:
    import pandas as pd

log = logging.getLogger(__name__)

FPS = 25
SAMPLE_RATE = 16000
SPLITS = ("train", "val")
MANIFEST = "manifest.parquet"
MANIFEST_COLUMNS = [
    "key",
    "shard",
    "index_in_shard",
    "offset",
    "num_frames",
    "fps",
    "duration",
    "width",
    "height",
    "source",
    "identity",
    "split",
]
_KEY_RE = re.compile(r"^[A-Za-z0-9_-]+$")
_EXTRA_RE = re.compile(r"^[a-z0-9_]+$")


@dataclass
class Clip:
    """One talking-head clip: frames, the speech that drives them, metadata and optional arrays.

    `frames` is (T, H, W, 3) uint8 RGB. `audio` is (n,) float32 in [-1, 1]; it is stored as PCM16, so
    it round-trips exactly when it is already a multiple of 1/32768. `extras` maps a name such as
    "audio_features" or "latents" to an array stored as `<key>.<name>.npy`.

    A clip read with `decode=False` (or prepared with `encode_clip`) has `frames=None` and the encoded
    MP4 in `video`; `decoded_frames()` decodes it on demand.
    """

    key: str
    frames: np.ndarray | None
    audio: np.ndarray
    sample_rate: int = SAMPLE_RATE
    meta: dict[str, Any] = field(default_factory=dict)
    extras: dict[str, np.ndarray] = field(default_factory=dict)
    video: bytes | None = None

    @property
    def fps(self) -> float:
        return float(self.meta.get("fps", FPS))

    def decoded_frames(self, start: int = 0, count: int | None = None) -> np.ndarray:
        """Frames [start, start + count) as (T, H, W, 3) uint8, decoding `video` if needed."""
        if self.frames is not None:
            return self.frames[start : None if count is None else start + count]
        if self.video is None:
            raise MediaError(f"clip {self.key} has neither frames nor encoded video")
        return decode_mp4(self.video, start=start, count=count)


@dataclass(frozen=True)
class VideoCodec:
    """How clip frames are encoded. CRF 12 is visually lossless; `lossless` stores exact RGB (libx264rgb)."""

    crf: int = 12
    preset: str = "medium"
    lossless: bool = False


# ---------------------------------------------------------------- media payloads


def encode_mp4(frames: np.ndarray, fps: float = FPS, codec: VideoCodec = VideoCodec()) -> bytes:
    """(T, H, W, 3) uint8 RGB → MP4 bytes (H.264, video only). Deterministic: x264 runs single-threaded,
    without macroblock-tree rate control."""
    import av

    _check_frames(frames, even=not codec.lossless)
    if codec.lossless:
        name, pix_fmt, opts = "libx264rgb", "rgb24", {"qp": "0"}
    else:
        name, pix_fmt, opts = "libx264", "yuv420p", {"crf": str(codec.crf)}
    # mbtree off: its lookahead reads uninitialised padding, so the bytes varied from run to run.
    opts |= {"preset": codec.preset, "threads": "1", "x264-params": "mbtree=0"}
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as container:
        stream = container.add_stream(name, rate=Fraction(fps).limit_denominator(1001), options=opts)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = pix_fmt
        stream.codec_context.thread_count = 1
        for frame in frames:
            if codec.lossless:
                video_frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
            else:
                video_frame = _yuv420p_frame(frame)
            container.mux(stream.encode(video_frame))
        container.mux(stream.encode())
    return buf.getvalue()


# BT.601 limited range, FFmpeg's default for RGB → YUV.
_RGB_TO_YUV = np.array(
    [[0.256788, 0.504129, 0.097906], [-0.148223, -0.290993, 0.439216], [0.439216, -0.367788, -0.071427]],
    np.float32,
)


def _yuv420p_frame(rgb: np.ndarray):
    """RGB → a yuv420p VideoFrame, converted in numpy so the bytes do not depend on swscale's build,
    flags or SIMD paths."""
    import av

    h, w = rgb.shape[:2]
    yuv = rgb.astype(np.float32) @ _RGB_TO_YUV.T + np.array([16, 128, 128], np.float32)
    chroma = yuv[..., 1:].reshape(h // 2, 2, w // 2, 2, 2).mean((1, 3))
    frame = av.VideoFrame(w, h, "yuv420p")
    planes = (yuv[..., 0], chroma[..., 0], chroma[..., 1])
    for plane, values in zip(frame.planes, planes, strict=True):
        rows = np.zeros((plane.height, plane.line_size), np.uint8)
        rows[:, : plane.width] = np.clip(np.round(values), 0, 255)
        plane.update(rows.tobytes())
    return frame


def decode_mp4(data: bytes, start: int = 0, count: int | None = None) -> np.ndarray:
    """MP4 bytes → frames [start, start + count) as (T, H, W, 3) uint8 RGB.

    PyAV decodes; where it is not installed (a bare GPU training image, say) OpenCV's FFmpeg build does.
    """
    try:
        import av
    except ImportError:
        return _decode_mp4_opencv(data, start, count)

    out: list[np.ndarray] = []
    try:
        with av.open(io.BytesIO(data)) as container:
            for i, frame in enumerate(container.decode(video=0)):
                if i < start:
                    continue
                if count is not None and len(out) >= count:
                    break
                out.append(frame.to_ndarray(format="rgb24"))
    except av.FFmpegError as e:
        raise MediaError(f"cannot decode clip video: {e}") from None
    if not out:
        raise MediaError(f"clip video has no frames at index {start}")
    return np.stack(out)


def _decode_mp4_opencv(data: bytes, start: int, count: int | None) -> np.ndarray:
    import tempfile

    try:
        import cv2
    except ImportError:
        raise MediaError("decoding clip video needs PyAV (pip install av) or OpenCV") from None
    with tempfile.NamedTemporaryFile(suffix=".mp4") as f:  # OpenCV reads files, not bytes
        f.write(data)
        f.flush()
        capture = cv2.VideoCapture(f.name)
        out: list[np.ndarray] = []
        i = 0
        while count is None or len(out) < count:
            ok, frame = capture.read()
            if not ok:
                break
            if i >= start:
                out.append(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB))
            i += 1
        capture.release()
    if not out:
        raise MediaError(f"clip video has no frames at index {start}")
    return np.stack(out)


def _probe_mp4(data: bytes) -> tuple[int, int, int]:
    import av

    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.video[0]
        frames = stream.frames or sum(1 for _ in container.demux(stream) if _.size)
        return frames, stream.codec_context.width, stream.codec_context.height


def encode_wav(audio: np.ndarray, sample_rate: int = SAMPLE_RATE) -> bytes:
    """(n,) float32 in [-1, 1] → mono PCM16 WAV bytes (values outside [-1, 1] are clipped)."""
    if audio.ndim != 1:
        raise AudioError(f"clip audio must be mono (n,), got shape {audio.shape}")
    pcm = np.clip(np.round(audio.astype(np.float64) * 32768.0), -32768, 32767).astype("<i2")
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(int(sample_rate))
        w.writeframes(pcm.tobytes())
    return buf.getvalue()


def decode_wav(data: bytes) -> tuple[np.ndarray, int]:
    """Mono PCM16 WAV bytes → ((n,) float32 in [-1, 1], sample rate)."""
    try:
        with wave.open(io.BytesIO(data), "rb") as w:
            if w.getnchannels() != 1 or w.getsampwidth() != 2:
                raise AudioError("clip audio must be mono PCM16")
            pcm = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2")
            return (pcm.astype(np.float32) / 32768.0), w.getframerate()
    except (wave.Error, EOFError) as e:
        raise AudioError(f"cannot decode clip audio: {e}") from None


def encode_clip(clip: Clip, codec: VideoCodec = VideoCodec()) -> Clip:
    """A copy of `clip` with its frames encoded into `video` (frames=None): lets pool workers do the
    expensive encode while one process writes the shards."""
    if clip.video is not None and clip.frames is None:
        return clip
    if clip.frames is None:
        raise MediaError(f"clip {clip.key} has no frames to encode")
    meta = dict(clip.meta)
    _check_frames(clip.frames, even=not codec.lossless)
    meta.update(num_frames=len(clip.frames), height=clip.frames.shape[1], width=clip.frames.shape[2])
    video = encode_mp4(clip.frames, fps=clip.fps, codec=codec)
    return Clip(clip.key, None, clip.audio, clip.sample_rate, meta, dict(clip.extras), video)


def _check_frames(frames: np.ndarray, *, even: bool) -> None:
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3 or len(frames) == 0:
        raise MediaError(f"clip frames must be (T, H, W, 3) uint8 with T >= 1, got {frames.shape} {frames.dtype}")
    if even and (frames.shape[1] % 2 or frames.shape[2] % 2):
        raise MediaError(f"yuv420p needs even frame sizes, got {frames.shape[2]}x{frames.shape[1]}")


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"clip metadata value of type {type(value).__name__} is not JSON-serialisable")


def _npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


# ---------------------------------------------------------------- writing


class ShardWriter:
    """Writes clips into `<prefix>-000000.tar`, `<prefix>-000001.tar`, ... and, on a clean close,
    `manifest.parquet`. Use as a context manager; on an exception the unfinished shard is deleted and
    no manifest is written (shards already finished stay, but are unlisted)."""

    def __init__(
        self,
        out_dir: str | os.PathLike,
        shard_max_clips: int = 256,
        shard_prefix: str = "shard",
        *,
        codec: VideoCodec = VideoCodec(),
        sample_rate: int = SAMPLE_RATE,
        overwrite: bool = False,
    ) -> None:
        if shard_max_clips < 1:
            raise ConfigError(f"shard_max_clips must be >= 1, got {shard_max_clips}")
        self.out_dir = Path(out_dir)
        self.shard_max_clips = shard_max_clips
        self.shard_prefix = shard_prefix
        self.codec = codec
        self.sample_rate = sample_rate
        self.overwrite = overwrite
        self.rows: list[dict[str, Any]] = []
        self._keys: set[str] = set()
        self._shard_index = -1
        self._tar: tarfile.TarFile | None = None
        self._tmp_path: Path | None = None
        self._in_shard = 0

    def __enter__(self) -> ShardWriter:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        existing = sorted(self.out_dir.glob(f"{self.shard_prefix}-*.tar")) + list(self.out_dir.glob(MANIFEST))
        if existing and not self.overwrite:
            raise ConfigError(f"{self.out_dir} already holds shards; pass overwrite=True to replace them")
        # A stale manifest would describe the old shards, so it goes first.
        for path in reversed(existing):
            path.unlink()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self._abort()

    def write(self, clip: Clip) -> None:
        """Append one clip (frames, or already-encoded `video`) to the current shard."""
        if not _KEY_RE.match(clip.key):
            raise ConfigError(f"clip key {clip.key!r} must be letters, digits, '-' or '_' (no dots)")
        if clip.key in self._keys:
            raise ConfigError(f"duplicate clip key {clip.key!r}")
        if clip.sample_rate != self.sample_rate:
            raise AudioError(f"clip {clip.key} audio is {clip.sample_rate} Hz; shards hold {self.sample_rate} Hz")
        for name in clip.extras:
            if not _EXTRA_RE.match(name):
                raise ConfigError(f"extra name {name!r} must be lower-case letters, digits or '_'")
        meta = dict(clip.meta)
        fps = float(meta.get("fps", FPS))
        if clip.frames is not None:
            video = encode_mp4(clip.frames, fps=fps, codec=self.codec)
            num_frames, height, width = clip.frames.shape[:3]
        elif clip.video is not None:
            video = clip.video
            num_frames, width, height = _probe_mp4(video)
        else:
            raise MediaError(f"clip {clip.key} has neither frames nor encoded video")
        mouth = meta.get("mouth_open")
        if mouth is not None and len(mouth) != num_frames:
            raise ConfigError(f"clip {clip.key}: mouth_open has {len(mouth)} values for {num_frames} frames")
        split = meta.get("split", "train")
        if split not in SPLITS:
            raise ConfigError(f"clip {clip.key}: split must be one of {SPLITS}, got {split!r}")
        meta.update(
            key=clip.key,
            fps=fps,
            num_frames=int(num_frames),
            width=int(width),
            height=int(height),
            duration=num_frames / fps,
            sample_rate=int(clip.sample_rate),
            source=meta.get("source", "unknown"),
            identity=str(meta.get("identity", "")),
            split=split,
        )
        members = [
            ("json", json.dumps(meta, sort_keys=True, ensure_ascii=False, default=_json_default).encode()),
            ("mp4", video),
            ("wav", encode_wav(np.asarray(clip.audio), clip.sample_rate)),
        ]
        members += [(f"{name}.npy", _npy_bytes(arr)) for name, arr in sorted(clip.extras.items())]

        if self._tar is None or self._in_shard >= self.shard_max_clips:
            self._next_shard()
        assert self._tar is not None
        offset = self._tar.offset
        for ext, data in members:
            info = tarfile.TarInfo(f"{clip.key}.{ext}")
            # Fixed ownership and times so identical clips give identical bytes.
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            self._tar.addfile(info, io.BytesIO(data))
        self.rows.append(
            {
                "key": clip.key,
                "shard": self._shard_name(self._shard_index),
                "index_in_shard": self._in_shard,
                "offset": offset,
                **{c: meta[c] for c in MANIFEST_COLUMNS[4:]},
            }
        )
        self._keys.add(clip.key)
        self._in_shard += 1

    def close(self) -> None:
        """Finish the open shard and write the manifest (both atomically)."""
        self._finish_shard()
        import pandas as pd

        df = pd.DataFrame(self.rows, columns=MANIFEST_COLUMNS)
        tmp = self.out_dir / (MANIFEST + ".tmp")
        df.to_parquet(tmp, index=False)
        os.replace(tmp, self.out_dir / MANIFEST)
        log.info("wrote %d clips in %d shards to %s", len(df), self._shard_index + 1, self.out_dir)

    def _shard_name(self, index: int) -> str:
        return f"{self.shard_prefix}-{index:06d}.tar"

    def _next_shard(self) -> None:
        self._finish_shard()
        self._shard_index += 1
        self._tmp_path = self.out_dir / (self._shard_name(self._shard_index) + ".tmp")
        self._tar = tarfile.open(self._tmp_path, "w", format=tarfile.USTAR_FORMAT)  # noqa: SIM115 (spans writes)
        self._in_shard = 0

    def _finish_shard(self) -> None:
        if self._tar is None:
            return
        self._tar.close()
        assert self._tmp_path is not None
        os.replace(self._tmp_path, self.out_dir / self._shard_name(self._shard_index))
        self._tar, self._tmp_path = None, None

    def _abort(self) -> None:
        if self._tar is not None:
            self._tar.close()
            assert self._tmp_path is not None
            self._tmp_path.unlink(missing_ok=True)
            self._tar, self._tmp_path = None, None


# ---------------------------------------------------------------- reading


def read_manifest(dataset_dir: str | os.PathLike) -> pd.DataFrame:
    """The manifest of a dataset folder as a DataFrame (one row per clip, columns MANIFEST_COLUMNS)."""
    import pandas as pd

    path = Path(dataset_dir) / MANIFEST
    if not path.exists():
        raise ConfigError(f"{path} not found: not a finished shard folder")
    return pd.read_parquet(path)


def list_shards(dataset_dir: str | os.PathLike, shard_prefix: str = "shard") -> list[Path]:
    """The finished shard files of a folder, in order."""
    return sorted(Path(dataset_dir).glob(f"{shard_prefix}-*.tar"))


def iter_clips(
    dir_or_shards: str | os.PathLike | Iterable[str | os.PathLike],
    *,
    split: str | None = None,
    shuffle: bool = False,
    seed: int = 0,
    decode: bool = True,
) -> Iterator[Clip]:
    """Clips of a dataset folder (read through its manifest) or of explicit shard files.

    `split` keeps only "train" or "val" clips. `shuffle` permutes shard order and the clip order inside
    each shard (deterministic in `seed`) — shard-local shuffling, as WebDataset loaders do. With
    `decode=False` frames are left encoded in `clip.video`.
    """
    if split is not None and split not in SPLITS:
        raise ConfigError(f"split must be one of {SPLITS} or None, got {split!r}")
    rng = np.random.default_rng(seed)
    if isinstance(dir_or_shards, (str, os.PathLike)) and Path(dir_or_shards).is_dir():
        df = read_manifest(dir_or_shards)
        if split is not None:
            df = df[df["split"] == split]
        root = Path(dir_or_shards)
        shards = sorted(df["shard"].unique())
        if shuffle:
            shards = [shards[i] for i in rng.permutation(len(shards))]
        for shard in shards:
            offsets = df.loc[df["shard"] == shard].sort_values("index_in_shard")["offset"].to_numpy()
            if shuffle:
                offsets = offsets[rng.permutation(len(offsets))]
            with open(root / shard, "rb") as f:
                for offset in offsets:
                    yield _read_clip_at(f, int(offset), decode)
        return

    paths = [Path(dir_or_shards)] if isinstance(dir_or_shards, (str, os.PathLike)) else list(map(Path, dir_or_shards))
    if shuffle:
        paths = [paths[i] for i in rng.permutation(len(paths))]
    for path in paths:
        with open(path, "rb") as f:
            offsets = _clip_offsets(f)
            if shuffle:
                offsets = [offsets[i] for i in rng.permutation(len(offsets))]
            for offset in offsets:
                clip = _read_clip_at(f, offset, decode)
                if split is None or clip.meta.get("split", "train") == split:
                    yield clip


def load_clip(dataset_dir: str | os.PathLike, key: str) -> Clip:
    """One clip of a dataset folder by key (random access through the manifest's byte offset)."""
    df = read_manifest(dataset_dir)
    rows = df[df["key"] == key]
    if rows.empty:
        raise ConfigError(f"no clip {key!r} in {dataset_dir}")
    row = rows.iloc[0]
    with open(Path(dataset_dir) / row["shard"], "rb") as f:
        return _read_clip_at(f, int(row["offset"]), decode=True)


def _clip_offsets(f) -> list[int]:
    f.seek(0)
    offsets, last_key = [], None
    with tarfile.open(fileobj=f, mode="r:") as tar:
        for member in tar:
            key = member.name.split(".", 1)[0]
            if key != last_key:
                offsets.append(member.offset)
                last_key = key
    return offsets


def read_clip_at(path: str | os.PathLike, offset: int, decode: bool = False) -> Clip:
    """The clip whose first member starts at byte `offset` of shard `path` (the manifest's `offset`).

    With decode=False the video stays encoded (`Clip.video` bytes, `Clip.frames` None): decode only the
    frames you need with `decode_mp4`.
    """
    with open(path, "rb") as f:
        return _read_clip_at(f, offset, decode)


def _read_clip_at(f, offset: int, decode: bool) -> Clip:
    f.seek(offset)
    parts: dict[str, bytes] = {}
    key = None
    try:
        with tarfile.open(fileobj=f, mode="r:") as tar:
            for member in tar:
                member_key, ext = member.name.split(".", 1)
                if key is None:
                    key = member_key
                elif member_key != key:
                    break
                parts[ext] = tar.extractfile(member).read()
    except (tarfile.TarError, ValueError) as e:
        raise MediaError(f"corrupt shard {getattr(f, 'name', '?')} at byte {offset}: {e}") from None
    missing = {"json", "mp4", "wav"} - parts.keys()
    if key is None or missing:
        raise MediaError(f"clip {key} in {getattr(f, 'name', '?')} lacks {sorted(missing)}")
    meta = json.loads(parts.pop("json"))
    video = parts.pop("mp4")
    audio, sample_rate = decode_wav(parts.pop("wav"))
    extras = {
        ext[: -len(".npy")]: np.load(io.BytesIO(data), allow_pickle=False)
        for ext, data in parts.items()
        if ext.endswith(".npy")
    }
    frames = decode_mp4(video) if decode else None
    return Clip(key, frames, audio, sample_rate, meta, extras, None if decode else video)
