"""The WebSocket API on a real server: a full session, then every kind of bad client while others stream."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import re
import socket
import sys

import httpx
import numpy as np
import pytest
import websockets
from PIL import Image

from _util import MEDIA
from flashhead.serve.limits import ServeLimits

from ._serving import pcm16, serve, speech, stream_audio, wait_until

TOKEN = "s3cret-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def png(pipe, seed=0, size=(96, 96)) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def server(tiny_lite):
    limits = ServeLimits(max_sessions=6, max_upload_bytes=200_000, max_pending_chunks=4)
    with serve(tiny_lite, token=TOKEN, limits=limits) as srv:
        yield srv


def upload(server, data: bytes, name="face.png", crop="false", headers=AUTH) -> httpx.Response:
    return httpx.post(f"{server.url}/v1/portraits", files={"file": (name, data)}, data={"crop": crop},
                      headers=headers, timeout=60)  # fmt: skip


def test_a_session_streams_every_frame_with_its_audio(server, tiny_lite):
    from flashhead.media.watermark import detect_watermark

    audio = speech(2.5)
    inline = base64.b64encode(png(tiny_lite)).decode()
    payloads: list[bytes] = []
    result = asyncio.run(
        stream_audio(server.ws_url, audio, start={"portrait": inline, "crop": False, "encoding": "rgb24"},
                     headers=AUTH, realtime_factor=None, payloads=payloads)
    )  # fmt: skip
    assert not result.errors and result.close_code == 1000
    assert result.done == {"type": "done", "session_id": result.session_id, "reason": "end", "frames": 62}
    assert result.frames == round(2.5 * 25) and result.audio_samples == result.frames * 640
    assert result.chunks[-1]["final"] and [c["index"] for c in result.chunks] == list(range(len(result.chunks)))
    h, w = tiny_lite.config.height, tiny_lite.config.width
    assert all(n == h * w * 3 for c in result.chunks for n in c["frame_bytes"])
    frames = np.frombuffer(b"".join(payloads), np.uint8).reshape(-1, h, w, 3)
    assert len(frames) == 62 and detect_watermark(frames).detected  # live frames carry the watermark too
    assert wait_until(lambda: not server.service.hub.sessions)  # closed after `done`


def test_bad_clients_get_clear_errors_while_others_keep_streaming(server, tiny_lite):
    portrait_id = upload(server, png(tiny_lite, 1)).json()["id"]
    ws_url = server.ws_url + "/v1/stream"

    async def exchange(messages: list, headers=AUTH, url=ws_url) -> tuple[list[dict], int | None]:
        """Send `messages` (dict -> JSON text, bytes -> binary) and read until the server closes."""
        received = []
        async with websockets.connect(url, additional_headers=headers) as ws:
            with contextlib.suppress(websockets.ConnectionClosed):  # the server may close before all is sent
                for m in messages:
                    await ws.send(json.dumps(m) if isinstance(m, dict) else m)
            try:
                async with asyncio.timeout(30):
                    async for message in ws:
                        if isinstance(message, str):
                            received.append(json.loads(message))
            except websockets.ConnectionClosed:
                pass
        return received, ws.close_code

    def error_of(received):
        errors = [m for m in received if m["type"] == "error"]
        assert len(errors) == 1, received
        return errors[0]

    start = {"type": "start", "portrait_id": portrait_id}

    async def run():
        good = [
            asyncio.create_task(
                stream_audio(server.ws_url, speech(4.0, offset=i), start={"portrait_id": portrait_id, "seed": i},
                             headers=AUTH, timeout=90)
            )
            for i in range(2)
        ]  # fmt: skip
        await asyncio.sleep(0.5)

        # Garbage PCM: an odd number of bytes.
        received, code = await exchange([start, b"\x01\x02\x03"])
        assert error_of(received)["code"] == "bad_audio" and "2-byte samples" in error_of(received)["message"]
        assert code == 1007
        # NaN in float32 audio.
        received, code = await exchange([start | {"format": "f32le"}, np.array([0.0, np.nan], "<f4").tobytes()])
        assert error_of(received)["code"] == "bad_audio" and "NaN" in error_of(received)["message"]
        # A declared sample rate the server does not take.
        received, code = await exchange([start | {"sample_rate": 44100}])
        assert error_of(received)["code"] == "bad_request" and "sample_rate must be 16000" in str(received)
        # Audio before `start`, an unknown portrait, an unknown message type.
        received, _ = await exchange([b"\x00\x00"])
        assert "first message must be a JSON start" in error_of(received)["message"]
        received, _ = await exchange([{"type": "start", "portrait_id": "p-nope"}])
        assert "no portrait 'p-nope'" in error_of(received)["message"]
        received, _ = await exchange([start, {"type": "dance"}])
        assert error_of(received)["code"] == "bad_request"
        # A portrait larger than the upload limit, inline.
        big = base64.b64encode(b"\x00" * 300_000).decode()
        received, code = await exchange([{"type": "start", "portrait": big}])
        assert error_of(received)["code"] == "too_large" and code == 1009
        # A wrong token, in the header or in the query.
        received, code = await exchange([start], headers={"Authorization": "Bearer wrong"})
        assert error_of(received) == {"type": "error", "code": "unauthorized", "message": "invalid bearer token",
                                      "fatal": True} and code == 1008  # fmt: skip
        received, code = await exchange([start], headers={})
        assert "missing bearer token" in error_of(received)["message"]
        received, code = await exchange([start, {"type": "end"}], headers={}, url=ws_url + f"?token={TOKEN}")
        assert [m["type"] for m in received] == ["ready", "chunk", "done"] and code == 1000  # the query form works
        assert received[1]["num_frames"] == 0 and received[1]["final"]  # no audio: an empty final chunk

        # A client that disconnects mid-stream: its session is closed on the server.
        cut = await stream_audio(server.ws_url, speech(10.0), start={"portrait_id": portrait_id}, headers=AUTH,
                                 disconnect_after=1.0)  # fmt: skip
        assert cut.done is None
        assert await asyncio.to_thread(wait_until, lambda: cut.session_id not in server.service.hub.sessions)
        assert cut.session_id not in server.service.engine.sessions

        return await asyncio.gather(*good)

    results = asyncio.run(run())
    for r in results:  # the well-behaved sessions were not disturbed
        assert not r.errors and r.done and r.done["reason"] == "end"
        assert r.frames == 100 and r.audio_samples == 100 * 640
    metrics = httpx.get(f"{server.url}/metrics", headers=AUTH).text
    assert 'flashhead_rejected_sessions_total{reason="unauthorized"}' in metrics
    assert 'flashhead_aborted_sessions_total{code="bad_audio"} 2.0' in metrics
    # every session opened on the engine timed its opening once (admission to the encoded portrait)
    opened = sum(float(v) for v in re.findall(r'^flashhead_sessions_total\{transport="[^"]+"\} (\S+)$', metrics, re.M))
    timed = re.search(r"^flashhead_session_open_seconds_count (\S+)$", metrics, re.M)
    assert opened >= 3 and float(timed[1]) == opened
    assert float(re.search(r"^flashhead_session_open_seconds_sum (\S+)$", metrics, re.M)[1]) > 0


def test_a_client_that_stops_reading_is_disconnected(server, tiny_lite):
    """Back-pressure: a client that reads nothing is cut at `max_pending_chunks`, the engine never waits."""
    portrait_id = upload(server, png(tiny_lite, 2)).json()["id"]

    async def run():
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # fill up quickly
        sock.connect(("127.0.0.1", server.port))
        url = server.ws_url + "/v1/stream"
        async with websockets.connect(
            url, sock=sock, additional_headers=AUTH, max_queue=1, compression=None, close_timeout=0.5
        ) as ws:
            start = {"type": "start", "portrait_id": portrait_id, "encoding": "rgb24"}
            await ws.send(json.dumps(start))
            ready = json.loads(await ws.recv())
            audio = pcm16(speech(100.0))
            for i in range(0, len(audio), 64000):
                await ws.send(audio[i : i + 64000])
            for _ in range(600):  # never read: wait for the server to give up on this client
                if ready["session_id"] not in server.service.hub.sessions:
                    return ready["session_id"]
                await asyncio.sleep(0.1)
            raise AssertionError("a client that does not read was never disconnected")

    asyncio.run(run())
    assert 'flashhead_aborted_sessions_total{code="slow_client"} 1.0' in server.service.metrics.render().decode()


def test_portrait_upload_limits_and_errors(server, tiny_lite):
    response = upload(server, png(tiny_lite), crop="false")
    assert response.status_code == 201
    body = response.json()
    assert body["width"] == tiny_lite.config.width and body["height"] == tiny_lite.config.height
    image = httpx.get(server.url + body["image_url"], headers=AUTH)
    assert image.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(image.content)).size == (tiny_lite.config.width, tiny_lite.config.height)

    too_big = upload(server, b"\x00" * 300_000)
    assert too_big.status_code == 413 and too_big.json()["error"]["code"] == "too_large"
    not_image = upload(server, (MEDIA / "bad" / "not_an_image.png").read_bytes())
    assert not_image.status_code == 422 and not_image.json()["error"]["code"] == "bad_image"
    assert "uploaded image" in not_image.json()["error"]["message"]  # not the server's temporary path
    assert upload(server, png(tiny_lite), headers={"Authorization": "Bearer nope"}).status_code == 401
    assert httpx.get(server.url + "/healthz").status_code == 401
    assert httpx.get(server.url + "/metrics").status_code == 401
    assert httpx.get(server.url + "/").status_code == 200  # the page itself is public; it holds no data


def test_non_face_portrait_is_refused_with_the_no_face_message(server):
    pytest.importorskip("flashhead.media.face", reason="face detection (flashhead.media.face) not available yet")
    path = MEDIA / "portraits" / "noface_coffee_cup.jpg"
    if path.stat().st_size > 200_000:
        pytest.skip("the no-face test image is larger than this server's upload limit")
    response = upload(server, path.read_bytes(), name=path.name, crop="true")
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["code"] == "no_face" and "no face found" in error["message"] and "\n" not in error["message"]


def test_health_and_capacity(tiny_lite):
    limits = ServeLimits(max_sessions=1)
    with serve(tiny_lite, limits=limits) as srv:
        health = httpx.get(srv.url + "/healthz").json()
        assert health["status"] == "ok" and health["max_sessions"] == 1 and not health["auth"] and health["webrtc"]
        portrait_id = srv.service.portraits.add(np.zeros((64, 32, 3), np.uint8)).id
        start = json.dumps({"type": "start", "portrait_id": portrait_id})

        async def run():
            async with websockets.connect(srv.ws_url + "/v1/stream") as first:
                await first.send(start)
                assert json.loads(await first.recv())["type"] == "ready"
                async with websockets.connect(srv.ws_url + "/v1/stream") as second:
                    await second.send(start)
                    error = json.loads(await second.recv())
                    with pytest.raises(websockets.ConnectionClosed):
                        await second.recv()
                    return error, second.close_code

        error, code = asyncio.run(run())
        assert error["code"] == "capacity" and "1 of 1" in error["message"] and code == 1013
        assert 'flashhead_rejected_sessions_total{reason="capacity"} 1.0' in httpx.get(srv.url + "/metrics").text
        # Without a token, a cross-site page may not drive the server through its visitor's browser.
        foreign = httpx.get(srv.url + "/healthz", headers={"Origin": "http://evil.example"})
        assert foreign.status_code == 401 and "cross-origin" in foreign.json()["error"]["message"]


def test_sessions_stream_to_the_end_with_rounds_launched_ahead():
    """The worker with launch_ahead: a round can wait in the engine with no session ready; none is lost or stuck."""
    from _tiny import tiny_pipeline
    from flashhead.pipeline.speed import SpeedConfig

    pipe = tiny_pipeline("lite")[0]  # its own pipeline: the switch must not leak into the shared one
    pipe.optimize(SpeedConfig(launch_ahead=True))
    inline = base64.b64encode(png(pipe, 4)).decode()

    async def run(srv):
        return await asyncio.gather(*(
            stream_audio(srv.ws_url, speech(seconds, offset=i), start={"portrait": inline, "crop": False, "seed": i},
                         headers=AUTH, realtime_factor=None, timeout=90)
            for i, seconds in enumerate((3.1, 1.7))
        ))  # fmt: skip

    with serve(pipe, token=TOKEN) as srv:
        results = asyncio.run(run(srv))
        for result, seconds in zip(results, (3.1, 1.7), strict=True):
            assert not result.errors and result.close_code == 1000
            assert result.done["reason"] == "end" and result.frames == round(seconds * 25)
            assert [c["index"] for c in result.chunks] == list(range(len(result.chunks)))
        assert wait_until(lambda: not srv.service.hub.sessions)
        assert srv.service.worker.engine.stats.rounds >= 2 and not srv.service.worker.engine.in_flight


def test_without_webrtc_packages_the_server_streams_and_answers_offers_with_503(tiny_lite, monkeypatch):
    """aiortc / PyAV missing (an image with FastAPI alone): the server starts, says so in /healthz, refuses WebRTC
    offers with one clear line naming the install, and streams over the WebSocket as before."""
    monkeypatch.setitem(sys.modules, "flashhead.serve.webrtc", None)  # its import now fails as without aiortc
    with serve(tiny_lite) as srv:
        assert httpx.get(srv.url + "/healthz").json()["webrtc"] is False
        portrait_id = srv.service.portraits.add(np.zeros((64, 32, 3), np.uint8)).id
        offer = {"sdp": "v=0", "type": "offer", "portrait_id": portrait_id}
        offer = httpx.post(srv.url + "/v1/webrtc/offer", json=offer)
        error = offer.json()["error"]
        assert offer.status_code == 503 and error["code"] == "unavailable"
        assert "flashhead[serve]" in error["message"] and "\n" not in error["message"]
        result = asyncio.run(stream_audio(srv.ws_url, speech(1.0), start={"portrait_id": portrait_id},
                                          realtime_factor=None))
        assert not result.errors and result.frames >= 24 and result.done is not None
