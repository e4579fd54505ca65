"""The WebRTC transport (aiortc): the browser's audio track in, the avatar's video and audio tracks out.

Signalling is one HTTP round trip (POST /v1/webrtc/offer with a complete, non-trickle offer). The browser's
microphone (or a file played through WebAudio) arrives as Opus, is resampled to 16 kHz mono and pushed into
a live (realtime) session. Generated chunks leave as two tracks of one media stream, so the browser plays them
in sync: video frames stamped `start_frame + i` at 25 fps and 20 ms audio frames cut from the chunk's audio,
both paced by one `PlaybackClock`. A data channel named "control" carries `end` / `interrupt` from the page and
per-chunk stats, `done` and `error` from the server.
"""

from __future__ import annotations

import asyncio
import fractions
import json
import logging
from collections import deque
from collections.abc import Callable

import av
import numpy as np
from aiortc import MediaStreamTrack, RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError

from flashhead.serve.protocol import SAMPLE_RATE, WebRTCAnswer, WebRTCOffer
from flashhead.serve.sessions import Delivery, LiveSession, SessionFailure, SessionHub

logger = logging.getLogger(__name__)

VIDEO_CLOCK = 90000
AUDIO_FRAME = SAMPLE_RATE // 50  # 20 ms
LATE_SECONDS = 0.2  # a frame this late (generation stalled) moves the clock instead of being rushed out


def restrict_ice_addresses(addresses: list[str] | None) -> None:
    """Gather ICE host candidates only on `addresses` (None: every interface, aiortc's default).

    A server bound to 127.0.0.1 must not open media ports on public interfaces; aiortc has no option for this,
    so the address lookup of its ICE library is replaced (process-wide).
    """
    import aioice.ice

    original = getattr(restrict_ice_addresses, "_original", None) or aioice.ice.get_host_addresses
    restrict_ice_addresses._original = original  # type: ignore[attr-defined]
    if addresses is None:
        aioice.ice.get_host_addresses = original
        return
    fixed = list(addresses)

    def host_addresses(use_ipv4: bool, use_ipv6: bool) -> list[str]:
        return [a for a in fixed if (use_ipv6 if ":" in a else use_ipv4)]

    aioice.ice.get_host_addresses = host_addresses


class PlaybackClock:
    """Maps stream time (seconds since the session's first frame) to event-loop time, for both tracks."""

    def __init__(self) -> None:
        self._origin: float | None = None

    async def wait_until(self, stream_time: float) -> None:
        loop = asyncio.get_running_loop()
        now = loop.time()
        if self._origin is None:
            self._origin = now - stream_time
        delay = self._origin + stream_time - now
        if delay < -LATE_SECONDS:  # generation fell behind: resume from now rather than burst the backlog
            self._origin -= delay
        elif delay > 0:
            await asyncio.sleep(delay)


class AvatarPlayer:
    """Splits a live session's chunks into paced video frames and 20 ms audio frames.

    Either track pulls the next chunk from the session's bounded queue when its own buffer is empty, so the
    player holds at most about one chunk beyond what the slower track has played.
    """

    def __init__(self, live: LiveSession, fps: int, on_chunk: Callable[[Delivery], None]):
        self.live = live
        self.fps = fps
        self.on_chunk = on_chunk
        self.clock = PlaybackClock()
        self.video = AvatarVideoTrack(self)
        self.audio = AvatarAudioTrack(self)
        self._frames: deque[tuple[int, np.ndarray]] = deque()
        self._audio: deque[np.ndarray] = deque()  # int16 pieces of AUDIO_FRAME samples
        self._audio_index = 0
        self._pull_lock = asyncio.Lock()
        self.final_frame: int | None = None  # set once the final chunk is in the buffers
        self.failure: SessionFailure | None = None
        self.video_finished = asyncio.Event()

    async def _pull(self) -> None:
        async with self._pull_lock:
            if self.final_frame is not None or self.failure is not None:
                return
            try:
                delivery = await self.live.queue.get()
            except SessionFailure as failure:
                self.failure = failure
                return
            chunk = delivery.chunk
            self._frames.extend((chunk.start_frame + i, f) for i, f in enumerate(chunk.frames))
            pcm = (np.clip(chunk.audio, -1, 1) * 32767).round().astype(np.int16)
            self._audio.extend(pcm[i : i + AUDIO_FRAME] for i in range(0, len(pcm), AUDIO_FRAME))
            self.live.frames_sent += len(chunk.frames)
            if chunk.final:
                self.final_frame = chunk.start_frame + len(chunk.frames)
            self.on_chunk(delivery)

    def _exhausted(self) -> bool:
        return self.final_frame is not None or self.failure is not None

    async def next_video(self) -> av.VideoFrame:
        while not self._frames:
            if self._exhausted():
                self.video_finished.set()
                raise MediaStreamError
            await self._pull()
        index, pixels = self._frames.popleft()
        await self.clock.wait_until(index / self.fps)
        frame = av.VideoFrame.from_ndarray(pixels, format="rgb24")
        frame.pts = index * VIDEO_CLOCK // self.fps
        frame.time_base = fractions.Fraction(1, VIDEO_CLOCK)
        return frame

    async def next_audio(self) -> av.AudioFrame:
        while not self._audio:
            if self._exhausted():
                raise MediaStreamError
            await self._pull()
        piece = self._audio.popleft()
        if len(piece) < AUDIO_FRAME:
            piece = np.pad(piece, (0, AUDIO_FRAME - len(piece)))
        index = self._audio_index
        self._audio_index += 1
        await self.clock.wait_until(index * AUDIO_FRAME / SAMPLE_RATE)
        frame = av.AudioFrame.from_ndarray(piece[None, :], format="s16", layout="mono")
        frame.sample_rate = SAMPLE_RATE
        frame.pts = index * AUDIO_FRAME
        frame.time_base = fractions.Fraction(1, SAMPLE_RATE)
        return frame


class AvatarVideoTrack(MediaStreamTrack):
    kind = "video"

    def __init__(self, player: AvatarPlayer):
        super().__init__()
        self.player = player

    async def recv(self) -> av.VideoFrame:
        return await self.player.next_video()


class AvatarAudioTrack(MediaStreamTrack):
    kind = "audio"

    def __init__(self, player: AvatarPlayer):
        super().__init__()
        self.player = player

    async def recv(self) -> av.AudioFrame:
        return await self.player.next_audio()


class WebRTCPeer:
    """One browser connection: its peer connection, live session, player and control channel."""

    def __init__(self, live: LiveSession, fps: int, on_closed: Callable[[WebRTCPeer], None]):
        self.live = live
        self.pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))  # no STUN: nothing outside is contacted
        self.player = AvatarPlayer(live, fps, self._chunk_stats)
        self.channel = None
        self._on_closed = on_closed
        self._tasks: set[asyncio.Task] = set()
        self._closed = False

        @self.pc.on("track")
        def on_track(track: MediaStreamTrack) -> None:
            if track.kind == "audio":
                self._spawn(self._receive_audio(track))

        @self.pc.on("datachannel")
        def on_datachannel(channel) -> None:
            self.channel = channel
            channel.on("message", self._control)

        @self.pc.on("connectionstatechange")
        async def on_state() -> None:
            if self.pc.connectionState in ("failed", "closed"):
                await self.close()

    def _spawn(self, coroutine) -> None:
        task = asyncio.ensure_future(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def answer(self, offer: WebRTCOffer, local_only: bool) -> WebRTCAnswer:
        sdp = offer.sdp
        if local_only:  # an mDNS candidate would make aioice multicast on the network to resolve it
            sdp = (
                "\r\n".join(
                    line for line in sdp.splitlines() if not (line.startswith("a=candidate") and ".local " in line)
                )
                + "\r\n"
            )
        await self.pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type="offer"))
        self.pc.addTrack(self.player.audio)
        self.pc.addTrack(self.player.video)
        await self.pc.setLocalDescription(await self.pc.createAnswer())
        self._spawn(self._watch_session())
        return WebRTCAnswer(sdp=self.pc.localDescription.sdp, session_id=self.live.id)

    async def _receive_audio(self, track: MediaStreamTrack) -> None:
        resampler = av.AudioResampler(format="s16", layout="mono", rate=SAMPLE_RATE)
        try:
            while True:
                frame = await track.recv()
                for out in resampler.resample(frame):
                    pcm = out.to_ndarray().reshape(-1).astype(np.float32) / 32768.0
                    self.live.push_audio(pcm, SAMPLE_RATE)
        except MediaStreamError:
            return  # the browser stopped sending
        except SessionFailure as failure:
            self.live.abort(failure)

    def _control(self, message: str | bytes) -> None:
        try:
            kind = json.loads(message).get("type")
        except (ValueError, AttributeError):
            kind = None
        if kind == "end":
            self.live.end("end")
        elif kind == "interrupt":
            self.live.interrupt()
            self._send({"type": "interrupted", "session_id": self.live.id})
        else:
            self._send({"type": "error", "code": "bad_request", "message": "control messages: end, interrupt",
                        "fatal": False})  # fmt: skip

    def _send(self, message: dict) -> None:
        if self.channel is not None and self.channel.readyState == "open":
            self.channel.send(json.dumps(message))

    def _chunk_stats(self, delivery: Delivery) -> None:
        c = delivery.chunk
        latency = None if delivery.latency is None else round(delivery.latency * 1000, 1)
        self.live.hub.metrics.chunk_sent(delivery.latency)
        self._send({"type": "chunk", "index": delivery.index, "start_frame": c.start_frame,
                    "num_frames": len(c.frames), "pts": c.pts, "latency_ms": latency, "final": c.final})  # fmt: skip

    async def _watch_session(self) -> None:
        """Report the end of the stream (after the last frame was sent) or its failure, then hang up."""
        player = self.player
        events = (player.video_finished, self.live.aborted, self.live.closed)
        waiters = [asyncio.ensure_future(e.wait()) for e in events]
        try:
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waiters:
                waiter.cancel()
        failure = player.failure or self.live.queue.failure
        if isinstance(failure, SessionFailure):
            self._send({"type": "error", "code": failure.code, "message": failure.message, "fatal": True})
        elif player.final_frame is not None:
            self._send({"type": "done", "session_id": self.live.id, "reason": self.live.end_reason or "end",
                        "frames": player.final_frame})  # fmt: skip
        await asyncio.sleep(0.5)  # let the data channel flush before the connection goes
        await self.close()

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.live.close()
        for task in list(self._tasks):
            if task is not asyncio.current_task():
                task.cancel()
        await self.pc.close()
        self._on_closed(self)


class WebRTCGateway:
    """Answers offers and keeps the open peer connections."""

    def __init__(self, hub: SessionHub, fps: int, local_only: bool):
        self.hub = hub
        self.fps = fps
        self.local_only = local_only
        self.peers: set[WebRTCPeer] = set()

    async def connect(self, offer: WebRTCOffer, portrait: np.ndarray) -> WebRTCAnswer:
        live = await self.hub.open("webrtc", portrait, seed=offer.seed, realtime=True)
        peer = WebRTCPeer(live, self.fps, self.peers.discard)
        self.peers.add(peer)
        try:
            return await peer.answer(offer, self.local_only)
        except Exception:
            await peer.close()
            raise

    async def close_all(self) -> None:
        await asyncio.gather(*(peer.close() for peer in list(self.peers)), return_exceptions=True)
