"""The front's Ray Serve request router: each request to the replica that will finish it soonest.

Ray Serve instantiates it (``request_router_class``) in the process that holds the ``DeploymentHandle``:
the front, where :class:`edge_server.cluster.RayEngine` keeps the :class:`~edge_server.cluster.LoadBoard`
(each replica's queue and steps left, per family, from the events it streams back). A replica the board has
not heard from is ranked by the routing stats it reports to Ray Serve (``record_routing_stats``). A request
for a family is ranked by that family's projection, plus the cold start where a replica does not hold it
loaded (``LoadBoard.finish_s``). Other calls (the front's ``describe``) go to replicas the board has not
heard from first, so that the front hears every replica before it serves. Imports Ray: loaded only by Ray
Serve, once the ``cluster`` extra is installed.
"""

from __future__ import annotations

from typing import Any

from ray.serve.request_router import FIFOMixin, PendingRequest, ReplicaID, RequestRouter, RunningReplica

from edge_server.cluster import LoadBoard, WireRequest, board_for


def _wire(pending: PendingRequest | None) -> WireRequest | None:
    if pending is not None and pending.args and isinstance(pending.args[0], WireRequest):
        return pending.args[0]
    return None


def request_steps(pending: PendingRequest | None) -> int:
    """The edge steps of the request being routed (its plan's split), 1 when it carries no plan."""
    wire = _wire(pending)
    return max(int(wire.plan.split), 1) if wire is not None else 1


def request_family(pending: PendingRequest | None) -> str | None:
    """The family id of the request being routed (None: it names none, or is not a request)."""
    wire = _wire(pending)
    return wire.family if wire is not None else None


class SoonestFinishRouter(FIFOMixin, RequestRouter):
    """Ranks the replicas by when the request would finish its edge steps there (``LoadBoard.finish_s``)."""

    def initialize_state(self, board: str = "rise-edge", **kwargs: Any) -> None:
        self._board_name = board
        self._fallback = LoadBoard(max_batch=8)  # a handle outside the front: routing stats only

    def _board(self) -> LoadBoard:
        return board_for(getattr(self, "_board_name", "rise-edge")) or self._fallback

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        super().update_replicas(replicas)
        self._board().set_live({r.replica_id.unique_id for r in replicas})

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        board, steps, wire = self._board(), request_steps(pending_request), _wire(pending_request)
        if wire is None:  # describe and the like: replicas not heard from first, then the least loaded
            ranked = sorted(candidate_replicas, key=lambda r: (
                board.has_heard(r.replica_id.unique_id), board.finish_s(r.replica_id.unique_id, 1, r.routing_stats),
                r.replica_id.unique_id))
            return [[replica] for replica in ranked]
        ranked = sorted(candidate_replicas, key=lambda r: (
            board.finish_s(r.replica_id.unique_id, steps, r.routing_stats, wire.family), r.replica_id.unique_id))
        # Counted on the first choice now (Ray Serve calls on_request_routed only on its rejection path), so the
        # next request routed before this one's replica answers sees it; its ``accepted`` event replaces it.
        board.routed(wire.key, ranked[0].replica_id.unique_id, steps, wire.family)
        return [[replica] for replica in ranked]

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        self._board().died(replica_id.unique_id)
