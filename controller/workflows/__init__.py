"""Studio workflows on Celery and Redis: nodes and DAGs whose GPU work goes through the controller.

`app` is the Celery application (`celery -A controller.workflows worker --concurrency 2`);
`execute_workflow_node` and `execute_workflow` are its tasks; `launch_workflow` validates a DAG
and sends it; `node_agent` registers a studio agent. See `controller.workflows.dag` for the
DAG format and `controller.workflows.agents` for the built-in agents.
"""

from __future__ import annotations

from controller.workflows.agents import NodeContext, NodeFailed, NodeHeld
from controller.workflows.celery_app import WorkflowApp, app
from controller.workflows.dag import DagError
from controller.workflows.launch import (
    WorkflowRun,
    WorkflowTimeout,
    launch_workflow,
    revoke_workflow,
)
from controller.workflows.settings import WorkflowSettings
from controller.workflows.tasks import execute_workflow, execute_workflow_node

node_agent = app.agents.register

__all__ = [
    "DagError",
    "NodeContext",
    "NodeFailed",
    "NodeHeld",
    "WorkflowApp",
    "WorkflowRun",
    "WorkflowSettings",
    "WorkflowTimeout",
    "app",
    "execute_workflow",
    "execute_workflow_node",
    "launch_workflow",
    "node_agent",
    "revoke_workflow",
]
