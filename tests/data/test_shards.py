from __future__ import annotations

import hashlib

import numpy as np
import pytest

from flashhead.data.shards import (
    MANIFEST,
    Clip,
    ShardWriter,
    VideoCodec,
    encode_clip,
    iter_clips,
    list_shards,
    load_clip,
    read_manifest,
)
from flashhead.errors import ConfigError


def _frames(rng: np.random.Generator, t: int = 6, h: int = 64, w: int = 96) -> np.ndarray:
    # Smooth content (a moving gradient plus a blob) compresses like real video, unlike white noise.
    y, x = np.mgrid[0:h, 0:w]
    out = np.empty((t, h, w, 3), np.uint8)
    base = rng.uniform(40, 200, size=3)
    for i in range(t):
        blob = 60 * np.exp(-((x - 10 - 3 * i) ** 2 + (y - h / 2) ** 2) / 40.0)
        for c in range(3):
            out[i, ..., c] = np.clip(base[c] + 0.8 * x + 0.5 * y * (c - 1) + blob, 0, 255)
    return out


def _clip(i: int, split: str = "train", seed: int = 0) -> Clip:
    rng = np.random.default_rng(seed * 1000 + i)
    frames = _frames(rng)
    # PCM16-representable audio round-trips exactly.
    audio = (rng.integers(-20000, 20000, size=1600) / 32768.0).astype(np.float32)
    meta = {
        "source": "synth-procedural",
        "identity": f"id{i % 3}",
        "split": split,
        "text": f"sentence {i} — ünïcödé",
        "mouth_open": [float(v) for v in rng.random(len(frames))],
        "voice": {"name": "en", "pitch": 50},
    }
    extras = {
        "audio_features": rng.standard_normal((len(frames), 8)).astype(np.float16),
        "latents": rng.standard_normal((2, 4, 4, 6)).astype(np.float32),
    }
    return Clip(f"clip-{i:04d}", frames, audio, 16000, meta, extras)


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float(10 * np.log10(255.0**2 / max(mse, 1e-12)))


def _write(out, clips, **kw) -> None:
    with ShardWriter(out, **kw) as w:
        for c in clips:
            w.write(c)


def test_round_trip_lossy(tmp_path):
    clips = [_clip(i, "val" if i == 3 else "train") for i in range(5)]
    _write(tmp_path, clips, shard_max_clips=2)
    assert [p.name for p in list_shards(tmp_path)] == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    got = list(iter_clips(tmp_path))
    assert [c.key for c in got] == [c.key for c in clips]
    for a, b in zip(clips, got, strict=True):
        np.testing.assert_array_equal(a.audio, b.audio)
        assert b.sample_rate == 16000 and b.audio.dtype == np.float32
        for k, v in a.meta.items():
            assert b.meta[k] == v, k
        assert b.meta["num_frames"] == 6 and (b.meta["height"], b.meta["width"]) == (64, 96)
        assert b.meta["fps"] == 25 and b.meta["duration"] == pytest.approx(6 / 25)
        assert b.extras.keys() == a.extras.keys()
        for k in a.extras:
            assert b.extras[k].dtype == a.extras[k].dtype
            np.testing.assert_array_equal(a.extras[k], b.extras[k])
        assert b.frames.shape == a.frames.shape and b.frames.dtype == np.uint8
        assert _psnr(a.frames, b.frames) > 38


def test_round_trip_lossless_odd_size(tmp_path):
    clip = _clip(0)
    clip.frames = _frames(np.random.default_rng(1), t=4, h=31, w=17)
    clip.meta["mouth_open"] = [0.0] * 4
    _write(tmp_path, [clip], codec=VideoCodec(lossless=True))
    np.testing.assert_array_equal(load_clip(tmp_path, clip.key).frames, clip.frames)


def test_manifest_and_random_access(tmp_path):
    clips = [_clip(i, "val" if i in (1, 4) else "train") for i in range(5)]
    _write(tmp_path, clips, shard_max_clips=2)
    df = read_manifest(tmp_path)
    assert list(df.columns)[:4] == ["key", "shard", "index_in_shard", "offset"]
    assert set(df.columns) >= {"num_frames", "duration", "width", "height", "source", "identity", "split"}
    assert df["key"].tolist() == [c.key for c in clips]
    assert df["shard"].tolist() == ["shard-000000.tar"] * 2 + ["shard-000001.tar"] * 2 + ["shard-000002.tar"]
    assert df["index_in_shard"].tolist() == [0, 1, 0, 1, 0]
    assert df["split"].tolist() == ["train", "val", "train", "train", "val"]
    assert df["identity"].tolist() == ["id0", "id1", "id2", "id0", "id1"]
    assert (df["num_frames"] == 6).all() and (df["source"] == "synth-procedural").all()
    c = load_clip(tmp_path, "clip-0003")
    assert c.key == "clip-0003" and c.meta["text"] == clips[3].meta["text"]
    with pytest.raises(ConfigError):
        load_clip(tmp_path, "nope")


def test_split_filter_shuffle_and_lazy_decode(tmp_path):
    clips = [_clip(i, "val" if i % 3 == 0 else "train") for i in range(7)]
    _write(tmp_path, clips, shard_max_clips=3)
    val = [c.key for c in iter_clips(tmp_path, split="val", decode=False)]
    assert val == ["clip-0000", "clip-0003", "clip-0006"]
    train = [c.key for c in iter_clips(list_shards(tmp_path), split="train")]
    assert train == [c.key for c in clips if c.meta["split"] == "train"]
    a = [c.key for c in iter_clips(tmp_path, shuffle=True, seed=5, decode=False)]
    b = [c.key for c in iter_clips(tmp_path, shuffle=True, seed=5, decode=False)]
    assert a == b and sorted(a) == sorted(c.key for c in clips)
    lazy = next(iter_clips(tmp_path, decode=False))
    assert lazy.frames is None and lazy.video is not None
    assert lazy.decoded_frames(start=2, count=3).shape == (3, 64, 96, 3)


def test_pre_encoded_clips_match_direct_writes(tmp_path):
    clips = [_clip(i) for i in range(3)]
    _write(tmp_path / "a", clips)
    _write(tmp_path / "b", [encode_clip(c) for c in clips])
    assert (tmp_path / "a/shard-000000.tar").read_bytes() == (tmp_path / "b/shard-000000.tar").read_bytes()


def test_deterministic_bytes(tmp_path):
    for run in ("a", "b"):
        _write(tmp_path / run, [_clip(i) for i in range(4)], shard_max_clips=3)

    def digests(d):
        return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in list_shards(d)}

    assert digests(tmp_path / "a") == digests(tmp_path / "b") and len(digests(tmp_path / "a")) == 2


def test_atomic_write_on_error(tmp_path):
    with pytest.raises(RuntimeError), ShardWriter(tmp_path, shard_max_clips=2) as w:
        for i in range(3):
            w.write(_clip(i))
        raise RuntimeError("generator crashed")
    names = sorted(p.name for p in tmp_path.iterdir())
    # The finished first shard stays; the half-written second one and the manifest never appear.
    assert names == ["shard-000000.tar"]
    assert not (tmp_path / MANIFEST).exists()
    # Re-running into the same folder needs an explicit overwrite.
    with pytest.raises(ConfigError), ShardWriter(tmp_path) as w:
        pass
    _write(tmp_path, [_clip(9)], overwrite=True)
    assert read_manifest(tmp_path)["key"].tolist() == ["clip-0009"]


def test_rejects_bad_clips(tmp_path):
    bad_key = _clip(0)
    bad_key.key = "a.b"
    bad_mouth = _clip(1)
    bad_mouth.meta["mouth_open"] = [0.0]
    bad_split = _clip(2, split="test")
    for clip in (bad_key, bad_mouth, bad_split):
        with pytest.raises(ConfigError), ShardWriter(tmp_path, overwrite=True) as w:
            w.write(clip)
    assert not list(tmp_path.glob("*.tar*"))


def test_webdataset_reads_shards(tmp_path):
    wds = pytest.importorskip("webdataset")
    _write(tmp_path, [_clip(i) for i in range(3)])
    samples = list(wds.WebDataset(str(tmp_path / "shard-000000.tar"), shardshuffle=False))
    assert [s["__key__"] for s in samples] == ["clip-0000", "clip-0001", "clip-0002"]
    assert {"json", "mp4", "wav", "audio_features.npy", "latents.npy"} <= samples[0].keys()


def test_opencv_decodes_clips_when_pyav_is_missing(monkeypatch):
    import sys

    from flashhead.data.shards import decode_mp4, encode_mp4

    rng = np.random.default_rng(0)
    frames = np.repeat(rng.integers(0, 255, (1, 32, 48, 3), dtype=np.uint8), 6, axis=0)
    frames[:, :, :16] = np.arange(6, dtype=np.uint8)[:, None, None, None] * 40  # frames differ
    data = encode_mp4(frames)
    with_av = decode_mp4(data, start=2, count=3)
    monkeypatch.setitem(sys.modules, "av", None)  # `import av` now fails
    without = decode_mp4(data, start=2, count=3)
    assert without.shape == with_av.shape == (3, 32, 48, 3)
    assert np.abs(without.astype(int) - with_av.astype(int)).mean() < 3.0
