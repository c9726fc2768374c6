"""A workflow run's records in Redis (adapter layer): results, progress, jobs, revocation.

Celery's canvas orders the nodes; what they hand each other lives here, under
`gpu-workflows:<run id>:*`, kept as long as Celery keeps results:

- `results`: each finished node's result, written once (`HSETNX`): the first delivery of a
  node to finish is the one that counts, and a second delivery finds it instead of running
  again;
- `progress`: each node's latest state (pending, held, running, ...) for live views;
- `started`: when each node first started; `jobs`: the controller jobs each node made;
- `revoked`: set when the run is revoked, with the reason; `dag`: the run's DAG.
"""

from __future__ import annotations

import json
from typing import Any, Final

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

PREFIX: Final = "gpu-workflows"
# A Redis restart takes a second or two; commands are tried again for up to about 15 s.
_RETRIES: Final = 20
_BACKOFF_CAP_S: Final = 1.0


def redis_client(url: str, *, timeout_s: float) -> redis.Redis:
    """A Redis client that rides out a restart: connection errors and timeouts are retried
    with backoff, and every call is limited by `timeout_s`."""
    return redis.Redis.from_url(
        url,
        socket_timeout=timeout_s,
        socket_connect_timeout=min(timeout_s, 5.0),
        retry=Retry(ExponentialBackoff(cap=_BACKOFF_CAP_S, base=0.05), _RETRIES),
        retry_on_error=[redis.ConnectionError, redis.TimeoutError],
        health_check_interval=30,
    )


class RunStore:
    """Reads and writes the records of workflow runs. Thread-safe (redis-py's pool)."""

    def __init__(self, client: redis.Redis, *, ttl_s: int) -> None:
        self._redis = client
        self._ttl_s = ttl_s

    def close(self) -> None:
        """Close the connections."""
        self._redis.close()

    def _key(self, run_id: str, what: str) -> str:
        return f"{PREFIX}:{run_id}:{what}"

    def _hset(self, run_id: str, what: str, field: str, value: str, *, once: bool) -> bool:
        key = self._key(run_id, what)
        pipe = self._redis.pipeline()
        if once:
            pipe.hsetnx(key, field, value)
        else:
            pipe.hset(key, field, value)
        pipe.expire(key, self._ttl_s)
        first, _ = pipe.execute()
        return bool(first)

    def _hgetall(self, run_id: str, what: str) -> dict[str, str]:
        raw: dict[bytes, bytes] = self._redis.hgetall(self._key(run_id, what))  # type: ignore[assignment]
        return {k.decode(): v.decode() for k, v in raw.items()}

    # -- the DAG and revocation ---------------------------------------------------------------

    def save_dag(self, run_id: str, dag: dict[str, Any]) -> None:
        """Keep the run's DAG (for progress views)."""
        self._redis.set(self._key(run_id, "dag"), json.dumps(dag), ex=self._ttl_s)

    def dag(self, run_id: str) -> dict[str, Any] | None:
        """The run's DAG, if it was saved."""
        raw = self._redis.get(self._key(run_id, "dag"))
        return json.loads(raw) if raw else None

    def revoke(self, run_id: str, reason: str) -> None:
        """Mark the run revoked; nodes that start from now on are cancelled."""
        self._redis.set(self._key(run_id, "revoked"), reason, ex=self._ttl_s)

    def revoked(self, run_id: str) -> str | None:
        """Why the run was revoked, or None."""
        raw = self._redis.get(self._key(run_id, "revoked"))
        return raw.decode() if isinstance(raw, bytes) else None

    # -- nodes --------------------------------------------------------------------------------

    def mark_started(self, run_id: str, node_id: str, stamp: str) -> str:
        """When the node first started: `stamp` unless an earlier delivery set it already."""
        self._hset(run_id, "started", node_id, stamp, once=True)
        raw = self._redis.hget(self._key(run_id, "started"), node_id)
        return raw.decode() if isinstance(raw, bytes) else stamp

    def add_job(self, run_id: str, node_id: str, job_id: str) -> None:
        """Note a controller job of the node (a later one replaces it)."""
        self._hset(run_id, "jobs", node_id, job_id, once=False)

    def jobs(self, run_id: str) -> dict[str, str]:
        """The controller job of each node that made one."""
        return self._hgetall(run_id, "jobs")

    def set_progress(self, run_id: str, node_id: str, progress: dict[str, Any]) -> None:
        """The node's latest state (`{"state", "reason", ...}`)."""
        self._hset(run_id, "progress", node_id, json.dumps(progress), once=False)

    def progress(self, run_id: str) -> dict[str, dict[str, Any]]:
        """Each node's latest state, for nodes that have one."""
        return {k: json.loads(v) for k, v in self._hgetall(run_id, "progress").items()}

    def finish(self, run_id: str, node_id: str, result: dict[str, Any]) -> bool:
        """Record the node's result unless one is recorded already; True if this one was."""
        first = self._hset(run_id, "results", node_id, json.dumps(result), once=True)
        if first:
            self.set_progress(
                run_id, node_id, {"state": result["state"], "reason": result["reason"]}
            )
        return first

    def result(self, run_id: str, node_id: str) -> dict[str, Any] | None:
        """The node's recorded result, or None."""
        raw = self._redis.hget(self._key(run_id, "results"), node_id)
        return json.loads(raw) if raw else None

    def results(self, run_id: str) -> dict[str, dict[str, Any]]:
        """Every recorded result of the run, by node."""
        return {k: json.loads(v) for k, v in self._hgetall(run_id, "results").items()}
