"""The HTTP offline-job API: submit, poll, download the MP4; jobs share the engine with live sessions."""

from __future__ import annotations

import asyncio
import io
import time

import httpx
import numpy as np
import pytest
from PIL import Image

from _util import MEDIA
from flashhead.serve.limits import ServeLimits

from ._serving import serve, speech, stream_audio

pytest.importorskip("flashhead.media.video_io", reason="the MP4 writer (flashhead.media.video_io) is not there yet")
pytest.importorskip("flashhead.media.audio_io", reason="audio decoding (flashhead.media.audio_io) is not there yet")
pytest.importorskip("flashhead.media.watermark", reason="flashhead.media.watermark is not there yet")

WAV = MEDIA / "audio" / "speech_en_radio34_16k_8s.wav"


def portrait_png() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(3).integers(0, 256, (96, 96, 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def submit(server, audio: bytes, name="speech.wav", **form) -> httpx.Response:
    files = {"image": ("face.png", portrait_png()), "audio": (name, audio)}
    return httpx.post(f"{server.url}/v1/jobs", files=files, data={"crop": "false", **form}, timeout=60)


def wait_for(server, job_id: str, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    seen = []
    while time.monotonic() < deadline:
        status = httpx.get(f"{server.url}/v1/jobs/{job_id}").json()
        seen.append(status["progress"])
        if status["status"] not in ("queued", "running"):
            status["progress_seen"] = seen
            return status
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} did not finish in {timeout} s")


@pytest.fixture(scope="module")
def server(tiny_lite):
    with serve(tiny_lite, limits=ServeLimits(max_job_upload_bytes=2_000_000)) as srv:
        yield srv


def test_submit_poll_download(server, tiny_lite, tmp_path, monkeypatch):
    from flashhead.media.video_io import read_video
    from flashhead.media.watermark import detect_watermark
    from flashhead.serve.jobs import JobWriter

    generated = []  # the engine's frames (watermarked on the device) before H.264, to compare with the offline pipeline
    deliver = JobWriter.deliver
    monkeypatch.setattr(JobWriter, "deliver", lambda self, c, lat: (generated.append(c.frames), deliver(self, c, lat)))

    audio = WAV.read_bytes()
    response = submit(server, audio, seed="7")
    assert response.status_code == 202
    job = response.json()
    assert job["status"] in ("queued", "running") and job["status_url"] == f"/v1/jobs/{job['id']}"

    # A live session streams at the same time: both share the engine's batches.
    portrait_id = server.service.portraits.add(np.zeros((64, 32, 3), np.uint8)).id
    live = asyncio.run(stream_audio(server.ws_url, speech(3.0), start={"portrait_id": portrait_id}))
    assert live.done and live.frames == 75

    status = wait_for(server, job["id"])
    assert status["status"] == "done" and status["progress"] == 1.0 and status["error"] is None
    assert status["frames"] == status["total_frames"] == round(8.0 * 25)
    video = httpx.get(f"{server.url}{status['video_url']}")
    assert video.status_code == 200 and video.headers["content-type"] == "video/mp4"
    path = tmp_path / "job.mp4"
    path.write_bytes(video.content)
    frames, fps, sound = read_video(path)
    assert len(frames) == 200 and fps == 25 and frames.shape[1:] == (64, 32, 3)
    assert sound is not None and abs(len(sound[0]) / sound[1] - 8.0) < 0.1
    assert detect_watermark(path).detected  # watermarked like `flashhead generate` output

    # The same frames as the offline pipeline (`flashhead generate`) with that seed.
    png = tmp_path / "face.png"
    png.write_bytes(portrait_png())
    offline = tiny_lite(tiny_lite.prepare_image(png, crop=False), str(WAV), seed=7, watermark=True, progress=False)
    # Equal up to the float rounding of sharing a batch with the live session (the latents of a batched
    # stream equal the single-stream ones to 1e-5: tests/pipeline/test_batching.py).
    diff = np.abs(np.concatenate(generated).astype(int) - offline.frames.astype(int))
    assert diff.max() <= 2 and diff.mean() < 0.05

    # Deleting a finished job removes its result.
    assert httpx.delete(f"{server.url}/v1/jobs/{job['id']}").status_code == 200
    assert httpx.get(f"{server.url}/v1/jobs/{job['id']}").status_code == 404


def test_bad_jobs(server):
    bad = submit(server, (MEDIA / "bad" / "empty.wav").read_bytes())
    assert bad.status_code == 202  # decoding happens in the queue
    status = wait_for(server, bad.json()["id"])
    assert status["status"] == "failed" and status["error"] and "\n" not in status["error"]
    assert httpx.get(f"{server.url}/v1/jobs/{bad.json()['id']}/video").status_code == 409

    too_big = submit(server, b"\x00" * 2_100_000)
    assert too_big.status_code == 413 and too_big.json()["error"]["code"] == "too_large"
    assert httpx.get(f"{server.url}/v1/jobs/j-unknown").json()["error"]["code"] == "not_found"
