"""The streaming engine: pieces of any size, batching, end-of-stream, interruption, keep-alive, capacity."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from _tiny import tiny_pipeline
from flashhead.errors import AudioError, CapacityError, SessionError
from flashhead.pipeline.flashhead_pipeline import reference_generator
from flashhead.pipeline.stream import StreamEngine


@pytest.fixture(scope="module")
def lite():
    pipe, _, _ = tiny_pipeline("lite")
    return pipe


def speechlike(seconds: float, seed: int = 0) -> np.ndarray:
    """A voiced, amplitude-modulated signal (no file needed): tests the timing logic, not lip-sync."""
    t = np.arange(int(seconds * 16000)) / 16000
    rng = np.random.default_rng(seed)
    envelope = 0.5 + 0.5 * np.sin(2 * np.pi * 3.0 * t + rng.uniform(0, 6))
    return (0.3 * envelope * np.sin(2 * np.pi * 180 * t)).astype(np.float32)


def portrait(pipe, seed: int) -> np.ndarray:
    gen = np.random.default_rng(seed)
    return gen.integers(0, 256, (pipe.config.height, pipe.config.width, 3), dtype=np.uint8)


def frames_of(chunks, session_id):
    return np.concatenate([c.frames for c in chunks if c.session_id == session_id])


def test_stream_equals_offline_generation_and_frame_count(lite):
    audio, image = speechlike(3.3), portrait(lite, 0)
    engine = StreamEngine(lite)
    session = engine.open_session(image, seed=5)
    session.push_audio(audio)
    session.end()
    chunks = engine.run_until_idle()
    frames = frames_of(chunks, session.id)
    assert len(frames) == round(3.3 * 25)
    assert chunks[-1].final and session.finished
    assert [c.start_frame for c in chunks] == list(np.cumsum([0] + [len(c.frames) for c in chunks[:-1]]))
    # The offline pipeline with the same seed produces the same frames.
    reference = lite.encode_reference(image, generator=reference_generator(5))
    offline = np.concatenate(list(lite.iter_frames(reference, torch.from_numpy(audio), seed=5)))[: len(frames)]
    assert np.array_equal(frames, offline)
    # Each chunk carries exactly the audio its frames show.
    assert np.array_equal(np.concatenate([c.audio for c in chunks]), audio[: len(frames) * 640])


def test_watermarked_engine_marks_on_the_device_exactly_as_the_host_embedder(lite):
    from flashhead.media.watermark import embed_watermark

    audio, image = speechlike(2.2), portrait(lite, 3)
    streams = []
    for watermark in (False, True):
        engine = StreamEngine(lite, watermark=watermark)
        session = engine.open_session(image, seed=2)
        session.push_audio(audio)
        session.end()
        streams.append(frames_of(engine.run_until_idle(), session.id))
    plain, marked = streams
    # Same integer arithmetic, other place (detection itself: tests/media/test_watermark.py)
    assert np.array_equal(marked, embed_watermark(plain)) and not np.array_equal(marked, plain)


def test_pieces_of_any_size_give_the_same_frames(lite):
    audio, image = speechlike(2.1, seed=1), portrait(lite, 1)
    results = []
    for piece in (len(audio), 320, 7777):  # whole, 20 ms, odd sizes
        engine = StreamEngine(lite)
        session = engine.open_session(image, seed=3)
        chunks = []
        for start in range(0, len(audio), piece):
            session.push_audio(audio[start : start + piece])
            chunks += engine.step()  # generate as soon as a chunk is ready
        session.end()
        chunks += engine.run_until_idle()
        results.append(frames_of(chunks, session.id))
    assert all(np.array_equal(results[0], r) for r in results[1:])
    assert len(results[0]) == round(2.1 * 25)


def test_first_chunk_leaves_as_soon_as_one_chunk_of_audio_is_buffered(lite):
    engine = StreamEngine(lite)
    session = engine.open_session(portrait(lite, 2))
    samples = lite.new_frames * 640
    session.push_audio(speechlike(1.0)[: samples - 1])
    assert engine.step() == []  # not yet a whole chunk
    session.push_audio(np.zeros(1, dtype=np.float32))
    (chunk,) = engine.step()
    assert chunk.start_frame == 0 and len(chunk.frames) == lite.new_frames


def test_sessions_with_different_start_times_are_batched_and_unaffected(lite):
    a_audio, b_audio = speechlike(2.9, seed=2), speechlike(2.0, seed=3)
    alone = {}
    for name, audio, seed in (("a", a_audio, 11), ("b", b_audio, 12)):
        engine = StreamEngine(lite)
        s = engine.open_session(portrait(lite, seed), seed=seed)
        s.push_audio(audio)
        s.end()
        alone[name] = frames_of(engine.run_until_idle(), s.id)

    engine = StreamEngine(lite, max_batch=4)
    a = engine.open_session(portrait(lite, 11), seed=11)
    a.push_audio(a_audio)
    a.end()
    chunks = engine.step()  # a runs alone for one chunk ...
    b = engine.open_session(portrait(lite, 12), seed=12)  # ... then b joins
    b.push_audio(b_audio)
    b.end()
    chunks += engine.run_until_idle()
    assert max(n for n, _ in engine.stats.round_seconds) == 2  # they did share rounds
    # Equal up to float rounding of a different batch size (exactly equal latents: test_batching.py).
    for session, name in ((a, "a"), (b, "b")):
        diff = np.abs(frames_of(chunks, session.id).astype(int) - alone[name].astype(int))
        assert diff.max() <= 2 and diff.mean() < 0.01


def test_interrupt_drops_queued_speech_and_live_sessions_idle_in_silence(lite):
    engine = StreamEngine(lite)
    session = engine.open_session(portrait(lite, 3), realtime=True)
    session.push_audio(speechlike(5.0))
    (first,) = engine.step()
    assert np.abs(first.audio).max() > 0.1  # speech
    session.interrupt()
    assert session.buffered_samples == 0
    # Nothing queued: a live session keeps moving on silence instead of freezing.
    (idle,) = engine.step(now=1e9)
    assert np.abs(idle.audio).max() == 0 and len(idle.frames) == lite.new_frames
    assert idle.start_frame == first.start_frame + len(first.frames)
    assert not np.array_equal(idle.frames[0], idle.frames[-1])  # not a frozen frame
    # New speech replaces keep-alive silence that was queued but not generated.
    session.keep_alive(now=1e9, lead_seconds=10)
    session.push_audio(speechlike(1.0))
    (speech,) = engine.step()
    assert np.abs(speech.audio).max() > 0.1


def test_errors_and_capacity(lite):
    engine = StreamEngine(lite, max_sessions=2)
    s = engine.open_session(portrait(lite, 4))
    engine.open_session(portrait(lite, 5))
    with pytest.raises(CapacityError, match="at capacity: 2 of 2"):
        engine.open_session(portrait(lite, 6))
    with pytest.raises(AudioError):
        s.push_audio(np.array([np.nan, 0.0], dtype=np.float32))
    s.end()
    with pytest.raises(SessionError, match="has ended"):
        s.push_audio(speechlike(0.1))
    with pytest.raises(SessionError, match="no session"):
        engine.session("nope")
    # Measured capacity: rounds that take longer than a chunk's duration refuse further live sessions.
    engine = StreamEngine(lite, max_sessions=10, max_batch=1)
    engine.stats.round_seconds.extend([(1, 0.6 * engine.chunk_seconds)] * 5)
    engine.open_session(portrait(lite, 7), realtime=True)
    with pytest.raises(CapacityError, match="at measured capacity"):
        engine.open_session(portrait(lite, 8), realtime=True)
    engine.open_session(portrait(lite, 9))  # offline (TTS) sessions are not limited by real time


def _run_sessions(pipe, speed, audios, max_batch):
    """Sessions opened together, all audio pushed, stepped to the end: every chunk, and whether a round was in flight
    after each step."""
    from flashhead.pipeline.speed import SpeedConfig

    pipe.optimize(speed)
    try:
        engine = StreamEngine(pipe, max_batch=max_batch)
        sessions = [engine.open_session(portrait(pipe, 20 + i), seed=20 + i) for i in range(len(audios))]
        for s, audio in zip(sessions, audios, strict=True):
            s.push_audio(audio)
            s.end()
        chunks, in_flight = [], []
        while (out := engine.step()) or engine.in_flight:
            chunks += out
            in_flight.append(engine.in_flight)
        return sessions, chunks, in_flight
    finally:
        pipe.optimize(SpeedConfig())


def test_launch_ahead_delivers_the_same_chunks_while_the_next_round_is_already_queued(lite):
    from flashhead.pipeline.speed import SpeedConfig

    # Three sessions of different lengths, two per round: rounds of changing company, finals in different rounds.
    audios = [speechlike(2.9, seed=4), speechlike(1.3, seed=5), speechlike(2.0, seed=6)]
    plain_sessions, plain, plain_flight = _run_sessions(lite, SpeedConfig(), audios, max_batch=2)
    ahead_sessions, ahead, ahead_flight = _run_sessions(lite, SpeedConfig(launch_ahead=True), audios, max_batch=2)
    assert not any(plain_flight)
    # Every step but the last left the next round queued, launched before this round's frames were awaited,
    # except the two rounds holding first chunks (s0 + s1, then s2 + s0): those leave at once.
    assert len(ahead_flight) >= 4 and ahead_flight == [False, False] + [True] * (len(ahead_flight) - 3) + [False]
    # Same rounds in the same order (longest waiting first), so the same chunks bit for bit.
    order = [(c.session_id, c.start_frame, c.final) for c in plain]
    assert [(c.session_id, c.start_frame, c.final) for c in ahead] == order
    for a, p in zip(ahead, plain, strict=True):
        assert np.array_equal(a.frames, p.frames) and np.array_equal(a.audio, p.audio)
    for s, audio in zip(ahead_sessions, audios, strict=True):
        assert s.finished and s.in_flight == 0
        assert sum(len(c.frames) for c in ahead if c.session_id == s.id) == round(len(audio) / 640)


def test_audio_ahead_is_queued_before_the_dit_where_rounds_launch_ahead(lite, monkeypatch):
    """audio_stream queues the next round's wav2vec2 once this round's DiT is queued; where rounds are queued ahead
    (launch_ahead, and always when sequence parallel) it comes before the chunk instead, because there the DiT's graph
    launch can hold the host until that DiT has run. (The side stream is CUDA-only: recorded here, not run.)"""
    from flashhead.pipeline.speed import SpeedConfig

    order = []
    generate = lite.generate_chunks

    def recording(*args, while_denoising=None, **kwargs):
        order.append("chunk")
        return generate(*args, while_denoising=while_denoising, **kwargs)

    monkeypatch.setattr(lite, "generate_chunks", recording)
    monkeypatch.setattr(StreamEngine, "_audio_on_side_stream", lambda self: True)
    monkeypatch.setattr(StreamEngine, "_encode_audio_ahead", lambda self, sessions: sessions and order.append("audio"))
    audios = [speechlike(2.0, seed=4)]
    seen = {}
    for ahead in (False, True):
        order.clear()
        _, seen[ahead], _ = _run_sessions(lite, SpeedConfig(audio_stream=True, launch_ahead=ahead), audios, 1)
        rounds = len(seen[ahead])
        # Every round but the final one queues the next round's audio: during the chunk, or before it.
        expected = [["chunk", "audio"], ["audio", "chunk"]][ahead] * (rounds - 1) + ["chunk"]
        assert order == expected, (ahead, order)
    for a, p in zip(seen[True], seen[False], strict=True):
        assert np.array_equal(a.frames, p.frames)


def test_a_session_closed_while_its_round_is_in_flight_gets_no_chunk(lite):
    from flashhead.pipeline.speed import SpeedConfig

    lite.optimize(SpeedConfig(launch_ahead=True))
    try:
        engine = StreamEngine(lite, max_batch=2)
        a, b = (engine.open_session(portrait(lite, 30 + i), seed=30 + i) for i in range(2))
        for s in (a, b):
            s.push_audio(speechlike(3.5, seed=7))
        first = engine.step()
        assert {c.session_id for c in first} == {a.id, b.id} and not engine.in_flight  # first chunks: no wait
        second = engine.step()
        assert {c.session_id for c in second} == {a.id, b.id} and engine.in_flight  # third round queued
        engine.close_session(b.id)
        third = engine.step()
        assert [c.session_id for c in third] == [a.id] and third[0].start_frame == 2 * len(first[0].frames)
    finally:
        lite.optimize(SpeedConfig())


def test_work_queued_while_denoising_runs_after_the_dit_and_before_the_decode(lite):
    # The engine queues the next round's audio there (audio_stream): the GPU then has the whole DiT in its queue
    # while the host launches wav2vec2, and the decode has not been queued yet.
    from flashhead.pipeline.timing import StageTimer

    def chunk(**kwargs):
        seeds = [torch.Generator().manual_seed(1)], [torch.Generator().manual_seed(2)]
        return lite.generate_chunks(
            [reference], [reference.first_motion], [context], generators=seeds[0], encode_generators=seeds[1], **kwargs
        )[0]

    seen = []
    reference = lite.encode_reference(portrait(lite, 3), generator=reference_generator(5))
    context = next(lite.audio_contexts(torch.from_numpy(speechlike(1.0))))
    timer, lite.timer = lite.timer, StageTimer(sync=False)
    try:
        plain = chunk()
        hooked = chunk(while_denoising=lambda: seen.append({k: v["count"] for k, v in lite.timer.summary().items()}))
    finally:
        lite.timer = timer
    assert len(seen) == 1  # called once per batch
    assert seen[0]["dit"] == 2 and seen[0]["vae_decode"] == 1  # this chunk's DiT is queued, its decode not yet
    assert torch.equal(hooked.video, plain.video) and torch.equal(hooked.motion_latents, plain.motion_latents)


def test_frames_leave_for_the_host_before_the_motion_reencode_with_pinned_memory(lite, monkeypatch):
    """pinned_memory: the engine queues each round's frame copy before the motion re-encode (which only the next
    chunk needs), so the frames do not wait for it; without the switch the (blocking) copy comes after it. Same
    frames either way."""
    from flashhead.pipeline import flashhead_pipeline
    from flashhead.pipeline.speed import SpeedConfig

    order = []
    start, encode = flashhead_pipeline.HostFrames.start, lite._encode
    monkeypatch.setattr(flashhead_pipeline.HostFrames, "start",
                        classmethod(lambda cls, *a, **k: order.append("copy") or start(*a, **k)))  # fmt: skip
    monkeypatch.setattr(lite, "_encode", lambda *a, **k: order.append("encode") or encode(*a, **k))
    image, audio = portrait(lite, 2), speechlike(2.0)
    streams = {}
    try:
        for name, speed in (("plain", SpeedConfig()), ("pinned", SpeedConfig(pinned_memory=True))):
            lite.optimize(speed)
            engine = StreamEngine(lite)
            session = engine.open_session(image, seed=4)  # encodes the portrait
            order.clear()
            session.push_audio(audio)
            session.end()
            streams[name] = (frames_of(engine.run_until_idle(), session.id), list(order))
    finally:
        lite.optimize(SpeedConfig())
    (plain, plain_order), (pinned, pinned_order) = streams["plain"], streams["pinned"]
    rounds = plain_order.count("encode")
    assert rounds >= 2 and pinned_order.count("copy") == rounds
    assert plain_order == ["encode", "copy"] * rounds
    assert pinned_order == ["copy", "encode"] * rounds
    np.testing.assert_array_equal(pinned, plain)


def test_compiled_frame_conversion_gives_the_eager_frames_for_every_length_and_layout():
    """compile_color also compiles the frames' conversion to uint8 with the watermark and the layout change (one
    kernel): the same bytes as the eager chain, for a chunk, a first chunk's early piece, a single frame, a view
    into a longer chunk (what frames_from hands over) and several streams' frames together."""
    from torch._dynamo.utils import counters

    from flashhead.pipeline.flashhead_pipeline import HostFrames, _compiled_uint8_frames, _watermark_delta, uint8_frames

    rng = torch.Generator().manual_seed(0)
    chunk = torch.rand(1, 3, 12, 32, 48, generator=rng) * 2.2 - 1.1  # a little beyond [-1, 1]: the clamp counts
    chunk[0, :, 0, 0, :4] = torch.tensor([-1.0, 1.0, 1 / 255, -1 / 255])  # levels' edges and halves
    videos = [[chunk], [chunk[:, :, :5]], [chunk[:, :, 11:]], [chunk[:, :, 3:]], [chunk[:, :, 2:], chunk[:, :, 4:]]]
    delta = _watermark_delta(32, 48, torch.device("cpu"))
    counters.clear()
    for video in videos:
        for watermark in (False, True):
            eager = HostFrames.start(video, watermark=watermark).wait()
            compiled = HostFrames.start(video, watermark=watermark, compiled=True).wait()
            assert [f.shape for f in compiled] == [(v.shape[2], 32, 48, 3) for v in video]
            for a, b in zip(compiled, eager, strict=True):
                np.testing.assert_array_equal(a, b)
    # Sizes symbolic, not a compile per frame count: one graph per layout (contiguous, a view), frame count 1 or
    # more (Dynamo specialises 1) and watermark or not, within Dynamo's limit of 8 per function.
    assert counters["stats"]["unique_graphs"] <= 6
    plain = uint8_frames(chunk[0], delta)  # the watermark is there: it differs from the unmarked frames
    assert not torch.equal(plain, uint8_frames(chunk[0])) and plain.is_contiguous()
    assert callable(_compiled_uint8_frames())


def test_copy_stream_reaches_the_engines_frame_copies_and_needs_pinned_memory(lite, monkeypatch):
    """copy_stream: the engine asks for its frame copies (and, with early_first_frames, the early ones) on the side
    stream, and its conversion compiled with compile_color; the switch alone is refused."""
    from flashhead.errors import ConfigError
    from flashhead.pipeline import flashhead_pipeline
    from flashhead.pipeline.speed import SpeedConfig

    with pytest.raises(ConfigError, match="copy_stream puts pinned_memory's frame copies on a stream of their own"):
        SpeedConfig(copy_stream=True)
    assert SpeedConfig.optimized().copy_stream and SpeedConfig.optimized().pinned_memory
    calls = []
    start = flashhead_pipeline.HostFrames.start
    monkeypatch.setattr(flashhead_pipeline.HostFrames, "start",
                        classmethod(lambda cls, *a, **k: calls.append(k) or start(*a, **k)))  # fmt: skip
    image, audio = portrait(lite, 3), speechlike(2.0, seed=3)
    runs = {}
    try:
        for name, speed in (("plain", SpeedConfig()), ("side", SpeedConfig(pinned_memory=True, copy_stream=True))):
            lite.optimize(speed)
            engine = StreamEngine(lite)
            session = engine.open_session(image, seed=5)
            session.push_audio(audio)
            session.end()
            calls.clear()
            runs[name] = (frames_of(engine.run_until_idle(), session.id), list(calls))
    finally:
        lite.optimize(SpeedConfig())
    (plain, plain_calls), (side, side_calls) = runs["plain"], runs["side"]
    assert plain_calls and all(not k["side_stream"] and not k["compiled"] for k in plain_calls)
    assert side_calls and all(k["side_stream"] and k["pinned"] for k in side_calls)
    np.testing.assert_array_equal(side, plain)  # on the CPU the copy is a plain one: the same frames


@pytest.mark.parametrize("decode_new_only", [False, True])
def test_early_first_frames_hand_out_a_new_streams_first_frames_before_the_rest_of_its_chunk(decode_new_only):
    """early_first_frames (Pro's causal Wan decode): a new session's first chunk arrives in two pieces, the frames
    of the latent frames up to the first new one, then the rest, each with its audio; a session that joins later
    gets the same while the session already running shares its rounds. Frames and audio are those of the engine
    without the switch, exactly, and later chunks come whole."""
    from flashhead.pipeline.speed import SpeedConfig

    pro, _, _ = tiny_pipeline("pro")
    a_audio, b_audio = speechlike(3.0, seed=5), speechlike(2.2, seed=6)
    runs = {}
    base = SpeedConfig(pinned_memory=True, decode_new_only=decode_new_only)
    for name, speed in (("whole", base), ("early", base.replace(early_first_frames=True))):
        pro.optimize(speed)
        engine = StreamEngine(pro, max_batch=4)
        a = engine.open_session(portrait(pro, 21), seed=21)
        a.push_audio(a_audio)
        a.end()
        steps = [engine.step()]  # a's first chunk (its first piece, with the switch)
        b = engine.open_session(portrait(pro, 22), seed=22)  # b joins a running session
        b.push_audio(b_audio)
        b.end()
        while (produced := engine.step()) or engine.in_flight:
            steps.append(produced)
        runs[name] = (steps, a.id, b.id)
    pro.optimize(SpeedConfig())

    (whole_steps, wa, wb), (early_steps, ea, eb) = runs["whole"], runs["early"]
    whole = [c for step in whole_steps for c in step]
    early = [c for step in early_steps for c in step]
    for w_id, e_id in ((wa, ea), (wb, eb)):
        np.testing.assert_array_equal(frames_of(early, e_id), frames_of(whole, w_id))
        np.testing.assert_array_equal(np.concatenate([c.audio for c in early if c.session_id == e_id]),
                                      np.concatenate([c.audio for c in whole if c.session_id == w_id]))  # fmt: skip
        starts = [c.start_frame for c in early if c.session_id == e_id]
        lengths = [len(c.frames) for c in early if c.session_id == e_id]
        assert starts == list(np.cumsum([0, *lengths[:-1]]))  # contiguous
        for c in early:
            assert len(c.audio) == len(c.frames) * pro.config.sample_rate // pro.config.fps
    # The first new frame (chunk frame 5) is in latent frame 2 of a whole decode (frames 5-8: 4 of them), in latent
    # frame 1 of a decode that starts one latent frame later (decode_new_only): 4 frames either way.
    first = [c for c in early if c.session_id == ea]
    assert [len(c.frames) for c in first[:2]] == [4, pro.new_frames - 4]
    assert len(early_steps[0]) == 1 and len(early_steps[0][0].frames) == 4  # a's first frames, alone in their step
    b_chunks = [c for c in early if c.session_id == eb]
    assert [len(c.frames) for c in b_chunks[:2]] == [4, pro.new_frames - 4]
    # b's first round is shared with a's second chunk: a's frames are split there too, and every later chunk whole
    a_lengths = [len(c.frames) for c in first]
    assert a_lengths[2:4] == [4, pro.new_frames - 4]
    assert all(n == pro.new_frames for n in a_lengths[4:-1]) and all(len(c.frames) == pro.new_frames for c in
                                                                     b_chunks[2:-1])  # fmt: skip


def test_batched_whole_chunk_decodes_share_one_streams_bound_and_keep_the_frames():
    """vae_whole_chunk with batched Pro sessions: every decoder call takes at most one stream's latent frames in all
    (vae_call_frames 0), batches of two in calls of fewer frames each, and the frames are the per-frame loop's."""
    from flashhead.pipeline.speed import SpeedConfig

    pro, _, _ = tiny_pipeline("pro")
    audios = {21: speechlike(3.0, seed=5), 22: speechlike(2.2, seed=6)}
    calls: list[tuple[int, int]] = []  # (batch, latent frames) of each decoder call
    hook = pro.vae.model.decoder.register_forward_pre_hook(lambda _m, args: calls.append(tuple(args[0].shape[::2][:2])))
    runs = {}
    try:
        for name, speed in (("loop", SpeedConfig()), ("whole", SpeedConfig(vae_whole_chunk=True))):
            pro.optimize(speed)
            calls.clear()
            engine = StreamEngine(pro, max_batch=2)
            ids = []
            for seed, audio in audios.items():
                s = engine.open_session(portrait(pro, seed), seed=seed)
                s.push_audio(audio)
                s.end()
                ids.append(s.id)
            chunks = engine.run_until_idle()
            runs[name] = ([frames_of(chunks, i) for i in ids], list(calls))
    finally:
        hook.remove()
        pro.optimize(SpeedConfig())
    (loop_frames, loop_calls), (whole_frames, whole_calls) = runs["loop"], runs["whole"]
    latent_frames = max(f for _, f in whole_calls)
    assert {f for _, f in loop_calls} == {1}
    assert all(b * f <= latent_frames for b, f in whole_calls)  # never more than one stream's decode per call
    assert any(b == 2 and f > 1 for b, f in whole_calls) and any(b == 1 and f == latent_frames for b, f in whole_calls)
    for loop, whole in zip(loop_frames, whole_frames, strict=True):
        assert loop.shape == whole.shape
        assert np.abs(loop.astype(int) - whole.astype(int)).max() <= 1
