"""`flashhead serve --ray`: the server in front of two engine replicas of a local Ray cluster (CPU, flashhead-tiny).

One cluster for the module (Ray and two replicas take most of this file's time to start). The replicas run the
embedded tiny model at 64x64, one torch thread each.
"""

from __future__ import annotations

import asyncio
import functools
import json

import numpy as np
import pytest

pytest.importorskip("ray.serve")

import ray  # noqa: E402
import torch  # noqa: E402
import websockets  # noqa: E402

from flashhead.serve.cluster import RayCluster  # noqa: E402
from flashhead.serve.limits import ServeLimits  # noqa: E402
from flashhead.serve.protocol import decode_pcm  # noqa: E402
from flashhead.serve.replica import ReplicaResources, ReplicaSpec  # noqa: E402

from ._serving import ServerThread, pcm16, serve, speech, stream_audio, wait_until  # noqa: E402

SPEC = ReplicaSpec(model="tiny", size=(64, 64), max_sessions=2, max_batch=4, torch_threads=1)
REPLICAS = ReplicaResources(replicas=2, cpus=0.5, stats_period_seconds=0.5)


@pytest.fixture(scope="module")
def cluster():
    with RayCluster.connect("local", SPEC, REPLICAS, num_cpus=2) as c:
        yield c


@pytest.fixture(scope="module")
def server(cluster):
    # The front end admits more than the replicas hold, so that the replicas' own refusals are what is tested.
    with serve(cluster.engine(max_sessions=9), limits=ServeLimits(max_sessions=8)) as srv:
        yield srv


def portrait(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (64, 64, 3), dtype=np.uint8)


def placed(server: ServerThread) -> dict[str, str]:
    return dict(server.service.worker.placements)


async def hold_session(server: ServerThread, portrait_id: str):
    """A session opened and left idle (no audio): the socket, and the server's `ready` or `error` message."""
    ws = await websockets.connect(server.ws_url + "/v1/stream")
    await ws.send(json.dumps({"type": "start", "portrait_id": portrait_id, "realtime": False}))
    return ws, json.loads(await ws.recv())


@functools.cache
def local_pipeline():
    from flashhead.pipeline.flashhead_pipeline import FlashHeadPipeline

    pipe = FlashHeadPipeline.from_pretrained("tiny", device="cpu")
    pipe.config = pipe.config.replace(height=64, width=64)
    return pipe


def local_frames(image: np.ndarray, audio: np.ndarray, seed: int) -> np.ndarray:
    """The same session on a local engine in this process: the frames `flashhead serve` without --ray sends."""
    from flashhead.pipeline.stream import StreamEngine

    engine = StreamEngine(local_pipeline(), watermark=True)  # as a server's engine
    threads = torch.get_num_threads()
    torch.set_num_threads(SPEC.torch_threads)  # as the replicas: the thread count changes float32 summation order
    try:
        session = engine.open_session(image, seed=seed)
        session.push_audio(decode_pcm(pcm16(audio), "pcm_s16le"), 16000)  # what the socket carried
        session.end()
        return np.concatenate([c.frames for c in engine.run_until_idle()])
    finally:
        torch.set_num_threads(threads)


def test_sessions_spread_over_replicas_with_every_frame_and_the_local_engines_frames(server):
    ids = [server.service.portraits.add(portrait(i)).id for i in range(3)]
    audio = [speech(2.5, offset=3.1 * i) for i in range(3)]
    payloads: list[list[bytes]] = [[], [], []]

    async def run():
        return await asyncio.gather(
            *(
                stream_audio(server.ws_url, audio[i], start={"portrait_id": ids[i], "seed": i, "realtime": False,
                             "encoding": "rgb24"}, realtime_factor=None, payloads=payloads[i], timeout=60)
                for i in range(3)
            )
        )  # fmt: skip

    results = asyncio.run(run())
    for r in results:
        assert not r.errors and r.done == {"type": "done", "session_id": r.session_id, "reason": "end", "frames": 62}
        assert r.frames == round(2.5 * 25) and r.audio_samples == r.frames * 640
    replicas = placed(server)
    assert len({replicas[r.session_id] for r in results}) == 2, replicas  # both replicas took sessions

    # Same seed, portrait and audio as on a local engine. Sessions that shared a replica were batched, which
    # changes float32 summation order only; a session alone on its replica must match bit for bit.
    alone = [r for r in results if list(replicas[x.session_id] for x in results).count(replicas[r.session_id]) == 1]
    for i, r in enumerate(results):
        frames = np.frombuffer(b"".join(payloads[i]), np.uint8).reshape(-1, 64, 64, 3)
        reference = local_frames(portrait(i), audio[i], seed=i)
        assert frames.shape == reference.shape
        diff = np.abs(frames.astype(np.int16) - reference.astype(np.int16))
        if r in alone:
            assert diff.max() == 0
        else:
            assert diff.mean() < 0.5 and diff.max() <= 8, (diff.mean(), diff.max())
    health = server.service.health()
    assert set(health["replicas"]) == set(replicas.values()) and health["model"] == "flashhead-tiny"


def test_a_new_session_goes_to_the_emptier_replica_and_a_full_cluster_refuses(server):
    pid = server.service.portraits.add(portrait(7)).id
    engine = server.service.engine

    async def run():
        (a, ready_a), (b, ready_b) = [await hold_session(server, pid) for _ in range(2)]
        first, second = placed(server)[ready_a["session_id"]], placed(server)[ready_b["session_id"]]
        assert first != second  # one each
        await a.close()
        # Wait for the replicas' next capacity reports: `first` now holds no session, `second` one.
        assert await asyncio.to_thread(
            wait_until, lambda: engine.replicas().get(first, {}).get("sessions") == 0
            and engine.replicas().get(second, {}).get("sessions") == 1,
        )  # fmt: skip
        c, ready_c = await hold_session(server, pid)
        assert placed(server)[ready_c["session_id"]] == first  # the emptier one

        held = [b, c] + [(await hold_session(server, pid))[0] for _ in range(2)]  # 2 sessions on each replica
        refused, error = await hold_session(server, pid)
        with pytest.raises(websockets.ConnectionClosed):
            await refused.recv()
        for ws in held:
            await ws.close()
        return error, refused.close_code

    error, code = asyncio.run(run())
    assert error["type"] == "error" and error["code"] == "capacity" and code == 1013
    assert "every engine replica is full (2 replicas" in error["message"]
    assert wait_until(lambda: not server.service.hub.sessions)


def test_a_lost_replica_ends_only_its_sessions(server):
    ids = [server.service.portraits.add(portrait(10 + i)).id for i in range(2)]
    # The router places by the replicas' capacity reports: wait until they no longer count the sessions of the tests
    # before, or a stale count can send both new sessions to the same replica.
    engine = server.service.engine
    assert wait_until(lambda: [r.get("sessions") for r in engine.replicas().values()] == [0, 0])

    async def run():
        streams = [
            asyncio.create_task(
                stream_audio(server.ws_url, speech(6.0, offset=i), start={"portrait_id": ids[i], "seed": i,
                             "realtime": False}, realtime_factor=2.0, timeout=60)
            )
            for i in range(2)
        ]  # fmt: skip
        # Once both are streaming on different replicas, kill the replica of the first.
        hub = server.service.hub
        assert await asyncio.to_thread(
            wait_until, lambda: len(hub.sessions) == 2 and set(hub.sessions) <= set(placed(server))
        )
        live = list(hub.sessions)
        replicas = placed(server)
        assert replicas[live[0]] != replicas[live[1]]
        await asyncio.sleep(1.5)
        victim = replicas[live[0]]
        ray.kill(ray.get_actor(server.service.engine.replicas()[victim]["actor_name"], namespace="serve"))
        return live, await asyncio.gather(*streams)

    live, results = asyncio.run(run())
    by_id = {r.session_id: r for r in results}
    lost, kept = by_id[live[0]], by_id[live[1]]
    assert lost.done is None and len(lost.errors) == 1 and lost.close_code == 1011
    assert "engine replica serving this session was lost" in lost.errors[0]["message"]
    assert lost.frames < 150
    assert not kept.errors and kept.done and kept.frames == 150  # every frame of the other session


def test_ranking_counts_the_sessions_placed_since_each_report():
    from flashhead.serve.placement import rank_by_free

    stats = {
        "a": {"free": 3, "sessions": 1, "measured_at": 100.0},
        "b": {"free": 2, "sessions": 2, "measured_at": 100.0},
    }
    assert rank_by_free(stats, {}) == ["a", "b"]
    assert rank_by_free(stats, {"a": [99.0, 101.0, 102.0]}) == ["b", "a"]  # two placed on `a` since its report
    assert rank_by_free(stats, {}, exclude=["a"]) == ["b"]
    assert rank_by_free({"new": {}, **stats}, {})[0] == "new"  # no report yet: an idle replica


def test_a_replica_reports_the_sessions_it_is_still_opening():
    """A report made while a session's portrait is still encoding counts it: the router, which counts only the
    sessions it placed after the report, would otherwise see that replica as emptier than it is."""
    from flashhead.pipeline.stream import StreamEngine
    from flashhead.serve.replica import engine_capacity

    engine = StreamEngine(local_pipeline(), max_sessions=3)
    engine.open_session(portrait(1), seed=0)
    settled, opening = engine_capacity(engine), engine_capacity(engine, opening=1)
    assert (settled["sessions"], settled["free"]) == (1, 2) and (opening["sessions"], opening["free"]) == (2, 1)
