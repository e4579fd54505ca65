"""Placement of sessions on engine replicas: sticky calls, new sessions where the most capacity is spare.

A session's state (motion latents, audio cache, reference latents) lives on one replica for its whole life, so
every call of a session names its replica (`replica=` keyword) and goes there. A new session (`exclude=`
keyword: replicas that already refused it) goes to the replica with the most measured spare capacity.

Capacity comes from each replica's `record_routing_stats` (flashhead.serve.replica.engine_capacity), which Ray
Serve polls every few seconds. Between two polls the router counts the sessions it placed itself, so a burst
of opens spreads out instead of piling onto the replica that looked emptiest at the last poll. A replica still
refuses what it cannot take, and the front end then tries the next one.

`CapacityRouter` runs inside the front end's process (Ray Serve builds one per deployment handle); `routing_view`
gives what it sees, which the front end shows on /healthz.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from typing import Any

from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica

_ROUTERS: dict[str, CapacityRouter] = {}  # deployment name -> the latest router built in this process


def routing_view(deployment: str) -> dict[str, dict]:
    """Replica id -> its latest capacity report, as this process's router sees them ({} before the first call)."""
    router = _ROUTERS.get(deployment)
    if router is None:
        return {}
    return {rid.unique_id: dict(r.routing_stats) for rid, r in list(router.curr_replicas.items())}


def rank_by_free(
    stats: Mapping[str, Mapping[str, Any]], placed: Mapping[str, Iterable[float]], exclude: Iterable[str] = ()
) -> list[str]:
    """Replica ids, most spare capacity first; ties go to the replica with fewer sessions, then by id.

    `stats`: each replica's last report (`free`, `sessions`, `measured_at`; empty when none arrived yet, read as
    idle); `placed`: times this router sent a new session to each replica (those after the report count).
    """
    excluded = set(exclude)

    def key(replica: str) -> tuple:
        report = stats.get(replica) or {}
        since = sum(t > report.get("measured_at", 0.0) for t in placed.get(replica, ()))
        free = report.get("free", float("inf")) - since
        return (-free, report.get("sessions", 0) + since, replica)

    return sorted((r for r in stats if r not in excluded), key=key)


class CapacityRouter(RequestRouter):
    """Ray Serve request router of the engine deployment (see the module docstring)."""

    def initialize_state(self, **kwargs: Any) -> None:
        self._placed: dict[str, list[float]] = {}
        # Ray Serve may pickle this class by value, which copies the module's globals: register in the real module.
        from flashhead.serve import placement

        placement._ROUTERS[self._deployment_id.name] = self

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        kwargs = pending_request.kwargs if pending_request is not None else {}
        pinned = kwargs.get("replica")
        if pinned is not None:
            # A session's replica. Once it is gone (Serve drops a dead replica and retries the call), any other
            # replica answers that the session's replica was lost, so the call fails at once instead of waiting.
            return [[by_id[pinned]]] if pinned in by_id else [candidate_replicas]
        if "exclude" not in kwargs:  # a call about no session in particular: any replica
            return [candidate_replicas]
        stats = {rid: dict(r.routing_stats) for rid, r in by_id.items()}
        ranked = rank_by_free(stats, self._placed, kwargs["exclude"]) or rank_by_free(stats, self._placed)
        if ranked:
            # Counted when chosen, not when sent: opens routed at the same moment must see each other.
            now = time.time()
            self._placed[ranked[0]] = [t for t in self._placed.get(ranked[0], []) if t > now - 60.0] + [now]
        return [[by_id[rid]] for rid in ranked]
