"""The routing policies of puyu/scale/routing.py on Ray Serve's request-router extension point.

Ray Serve builds one router per deployment handle, in the handle's process (the ingress), from
`RequestRouterConfig(request_router_class=..., request_router_kwargs={"policy": ..., "imbalance": ...})`. The request's
routing key travels as the `route` keyword argument of `EngineReplica.generate` (a tuple of block hashes). Load is
counted here, per replica: requests sent and not yet finished through this handle.
"""
from __future__ import annotations

from typing import Any, Optional

from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

from .routing import DEFAULT_IMBALANCE, Policy


class PuyuRouter(RequestRouter):
    """Ranks replicas with a `Policy`; Ray Serve sends the request to the first rank's replica that accepts it."""

    def initialize_state(self, policy: str = "prefix", imbalance: int = DEFAULT_IMBALANCE, **_: Any) -> None:
        self.policy = Policy(policy, imbalance)
        self.inflight: dict[ReplicaID, int] = {}

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: Optional[PendingRequest] = None) -> list[list[RunningReplica]]:
        by_id = {r.replica_id: r for r in candidate_replicas}
        chain = tuple(pending_request.kwargs.get("route") or ()) if pending_request is not None else ()
        ranked = self.policy.rank(list(by_id), self.inflight, chain)
        if ranked:
            self.policy.sent(ranked[0], chain)
        return [[by_id[r]] for r in ranked]

    def on_send_request(self, replica_id: ReplicaID) -> None:
        super().on_send_request(replica_id)
        self.inflight[replica_id] = self.inflight.get(replica_id, 0) + 1

    def on_request_completed(self, replica_id: ReplicaID, internal_request_id: str) -> None:
        if self.inflight.get(replica_id, 0) > 0:
            self.inflight[replica_id] -= 1

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        self.inflight.pop(replica_id, None)
        self.policy.forget(replica_id)
