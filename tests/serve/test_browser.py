"""The page in headless Chromium: upload a portrait, stream (fake) microphone speech, watch the avatar.

Needs Debian's chromium at /usr/bin/chromium (`apt-get install chromium`) and the `playwright` package (its
driver only: no browser is downloaded). Chromium's fake capture device plays a speech WAV as the microphone.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from _tiny import tiny_pipeline
from _util import MEDIA

from ._serving import serve

CHROMIUM = Path("/usr/bin/chromium")
WAV = MEDIA / "audio" / "speech_en_radio31_16k_8s.wav"
PORTRAIT = MEDIA / "portraits" / "cc0_woman_dark_skin_frontal.jpg"

pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason="needs /usr/bin/chromium (apt-get install chromium)")
sync_api = pytest.importorskip("playwright.sync_api", reason="needs the playwright package")

# A checksum of the mirrored frame's pixels: it changes whenever a new frame is drawn.
CANVAS_HASH = """() => {
  const c = document.getElementById('view');
  if (!c.width) return null;
  const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
  let h = 0;
  for (let i = 0; i < d.length; i += 3) h = (h * 31 + d[i]) | 0;
  return h;
}"""


@pytest.fixture(scope="module")
def browser():
    args = [
        "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
        f"--use-file-for-fake-audio-capture={WAV}", "--headless", "--no-sandbox", "--disable-gpu",
        "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run",
        "--autoplay-policy=no-user-gesture-required", "--allow-loopback-in-peer-connection",
    ]  # fmt: skip
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=args)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def server():
    pytest.importorskip("flashhead.media.face", reason="the page uploads a photo: needs face detection")
    pipe, _, _ = tiny_pipeline("lite", height=64, width=64)  # small enough for one CPU core to keep up
    with serve(pipe) as srv:
        yield srv


def open_page(browser, server):
    page = browser.new_page()
    page.goto(server.url + "/")
    page.set_input_files("#portrait-file", str(PORTRAIT))
    page.wait_for_function("window.flashhead.portraitId || window.flashhead.stats.errors.length", timeout=60_000)
    assert not page.evaluate("window.flashhead.stats.errors")
    return page


def watch(page, seconds: float) -> set:
    hashes = set()
    for _ in range(int(seconds / 0.1)):
        hashes.add(page.evaluate(CANVAS_HASH))
        page.wait_for_timeout(100)
    return hashes - {None}


def test_microphone_over_webrtc(browser, server):
    page = open_page(browser, server)
    page.click("#start")  # microphone + WebRTC are the defaults
    page.wait_for_function("window.flashhead.stats.framesShown >= 25 || window.flashhead.stats.errors.length",
                           timeout=60_000)  # fmt: skip
    hashes = watch(page, 3.0)  # the fake microphone is speaking
    page.click("#stop")
    page.wait_for_function("window.flashhead.stats.done || window.flashhead.stats.errors.length", timeout=60_000)
    stats = page.evaluate("window.flashhead.stats")
    print(json.dumps({"transport": "webrtc", "first_frame_ms": round(stats["firstFrameMs"]),
                      "chunk_latency_ms": stats["chunkLatencies"], "fps": stats["fps"],
                      "frames_shown": stats["framesShown"], "distinct_frames_in_3s": len(hashes)}))  # fmt: skip
    assert not stats["errors"]
    assert stats["done"]["reason"] == "end" and stats["done"]["frames"] >= stats["framesShown"] - 2
    assert len(hashes) >= 10, "the avatar did not move while speech played"
    assert stats["firstFrameMs"] is not None and stats["chunkLatencies"]
    assert _closed_soon(server)  # the server hung up after `done`
    page.close()


def test_file_over_websocket(browser, server, tmp_path):
    short = tmp_path / "speech_3s.wav"  # keep the test short: the first 3 s of the WAV
    _trim_wav(WAV, short, seconds=3.0)
    page = open_page(browser, server)
    page.check("input[name=source][value=file]")
    page.check("input[name=transport][value=websocket]")
    page.set_input_files("#audio-file", str(short))
    page.click("#start")
    page.wait_for_function("window.flashhead.stats.done || window.flashhead.stats.errors.length", timeout=60_000)
    # `done` comes when the last chunk was sent; the page plays them in real time against its audio clock.
    page.wait_for_function("window.flashhead.stats.framesShown >= 70", timeout=10_000)
    stats = page.evaluate("window.flashhead.stats")
    print(json.dumps({"transport": "websocket", "first_frame_ms": round(stats["firstFrameMs"]),
                      "client_latency_ms": [round(x) for x in stats["clientLatencies"]],
                      "frames_shown": stats["framesShown"]}))  # fmt: skip
    assert not stats["errors"]
    assert stats["done"]["frames"] == 75
    page.close()


def _closed_soon(server) -> bool:
    from ._serving import wait_until

    return wait_until(lambda: not server.service.hub.sessions, timeout=10)


def _trim_wav(source: Path, target: Path, seconds: float) -> None:
    import wave

    with wave.open(str(source)) as f:
        params = f.getparams()
        frames = f.readframes(int(seconds * f.getframerate()))
    with wave.open(str(target), "wb") as out:
        out.setparams(params)
        out.writeframes(frames)
