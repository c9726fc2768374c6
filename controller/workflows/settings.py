"""Settings of the studio's Celery workflows (configuration layer).

Read from `GPU_WORKFLOWS_*` environment variables (`GPU_WORKFLOWS_BROKER_URL`, ...), with the
defaults a Mac mini beside its own Redis and controller needs. `celery_config()` turns them into
Celery's settings: JSON only, hard and soft time limits, late acknowledgement that a lost worker
turns into a redelivery, and a visibility timeout long enough that no running or waiting task is
handed out twice.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

from pydantic import Field, PrivateAttr, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from gpu_common.layered_settings import check_base_url, read_token_file

ENV_PREFIX = "GPU_WORKFLOWS_"


class WorkflowSettings(BaseSettings):
    """Where the broker, the result backend and the controller are, and the task limits."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="forbid", frozen=True)

    broker_url: str = Field(default="redis://127.0.0.1:6379/0", description="Celery broker (Redis)")
    result_backend: str = Field(
        default="redis://127.0.0.1:6379/1",
        description="Celery result backend; Redis, since chords and the run records need it",
    )
    controller_url: str = Field(default="http://127.0.0.1:8766", description="the controller")
    controller_token: SecretStr | None = Field(
        default=None, description="the controller's bearer token"
    )
    controller_token_file: Path | None = Field(
        default=None,
        description="a file holding the controller's bearer token (launchd, systemd: no secret "
        "in the service definition)",
    )
    concurrency: int = Field(default=2, ge=1, le=64, description="worker processes")
    time_limit_s: float = Field(default=600.0, gt=0, description="hard limit per task")
    soft_time_limit_s: float = Field(
        default=540.0, gt=0, description="soft limit per task: the node cancels its job and fails"
    )
    visibility_timeout_s: float = Field(
        default=3600.0,
        gt=0,
        description=(
            "an unacknowledged task is handed to another worker after this long; it must exceed "
            "the hard limit and the longest hold countdown"
        ),
    )
    restore_interval_s: float = Field(
        default=10.0, gt=0, description="how often a worker looks for tasks of lost workers"
    )
    request_timeout_s: float = Field(
        default=60.0, gt=0, description="one HTTP call to the controller"
    )
    hold_wait_s: float = Field(
        default=10.0,
        ge=0,
        description="how long an image node waits for a held job before giving its slot back",
    )
    hold_retry_s: float = Field(
        default=5.0, gt=0, description="countdown before asking again when the hold gives none"
    )
    hold_retry_max_s: float = Field(
        default=60.0, gt=0, description="longest countdown taken from a hold's Retry-After"
    )
    hold_timeout_s: float = Field(
        default=3600.0, gt=0, description="a job held longer than this is cancelled; the node fails"
    )
    result_expires_s: int = Field(
        default=86400, ge=60, description="how long results and run records are kept"
    )
    agent_modules: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="modules that register the studio's node agents, imported at worker start",
    )

    @field_validator("agent_modules", mode="before")
    @classmethod
    def _split_modules(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("controller_url")
    @classmethod
    def _check_url(cls, value: str) -> str:
        return check_base_url(value)

    @field_validator("broker_url", "result_backend")
    @classmethod
    def _check_redis(cls, value: str) -> str:
        if not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("must be a redis:// (or rediss://, unix://) URL")
        return value

    _file_token: SecretStr | None = PrivateAttr(default=None)

    @model_validator(mode="after")
    def _read_token_file(self) -> WorkflowSettings:
        if self.controller_token_file is not None:
            if self.controller_token is not None:
                raise ValueError("set controller_token or controller_token_file, not both")
            self._file_token = read_token_file(self.controller_token_file.expanduser())
        return self

    @model_validator(mode="after")
    def _check_limits(self) -> WorkflowSettings:
        if self.soft_time_limit_s >= self.time_limit_s:
            raise ValueError("soft_time_limit_s must be below time_limit_s")
        longest = max(self.time_limit_s, self.hold_retry_max_s)
        if self.visibility_timeout_s <= longest:
            raise ValueError(
                f"visibility_timeout_s ({self.visibility_timeout_s:g}) must exceed the hard time "
                f"limit and the longest hold countdown ({longest:g}), or a task still running "
                "or waiting would be handed to a second worker"
            )
        return self

    def token(self) -> str | None:
        """The controller's token (given, or read from its file), or None."""
        token = self.controller_token or self._file_token
        return token.get_secret_value() if token else None

    def celery_config(self) -> dict[str, Any]:
        """Celery's settings for these values."""
        return {
            "broker_url": self.broker_url,
            "result_backend": self.result_backend,
            "task_serializer": "json",
            "result_serializer": "json",
            "accept_content": ["json"],
            "result_accept_content": ["json"],
            "task_time_limit": self.time_limit_s,
            "task_soft_time_limit": self.soft_time_limit_s,
            # Acknowledged after the task, and a worker that dies mid-task has its message put
            # back: the node runs again (and reattaches to its image job, see the key).
            "task_acks_late": True,
            "task_reject_on_worker_lost": True,
            "task_track_started": True,
            # One task reserved per process: with late acks a prefetched task would wait
            # behind a long one instead of going to a free worker.
            "worker_prefetch_multiplier": 1,
            "worker_concurrency": self.concurrency,
            "worker_cancel_long_running_tasks_on_connection_loss": False,
            "broker_connection_retry_on_startup": True,
            "broker_transport_options": {
                "visibility_timeout": self.visibility_timeout_s,
                "unacked_restore_interval": self.restore_interval_s,
                "unacked_restore_throttle": 1,
                "socket_timeout": self.request_timeout_s,
                "socket_connect_timeout": 5.0,
            },
            "result_backend_always_retry": True,
            "result_backend_max_retries": 20,
            "redis_socket_timeout": self.request_timeout_s,
            "redis_socket_connect_timeout": 5.0,
            "redis_retry_on_timeout": True,
            "result_expires": self.result_expires_s,
            "imports": ["controller.workflows.tasks", *self.agent_modules],
        }
