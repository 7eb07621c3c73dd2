"""The Celery application of one node's agent, built from settings (DESIGN.md §5)."""

from __future__ import annotations

from celery import Celery

from services.common import tasks
from services.common.settings import Settings


def make_app(settings: Settings, node_name: str) -> Celery:
    """A Celery app consuming only `node.<name>`, with at-least-once delivery.

    Acks happen after the task ran and a worker that dies mid-task puts the
    message back, so every task must be idempotent (they check libvirt first).
    """
    queue = tasks.queue_name(node_name)
    agent = settings.agent
    app = Celery(f"nubis-agent-{node_name}", broker=settings.redis_url,
                 backend=settings.redis_url, set_as_current=False)
    app.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        task_time_limit=agent.task_time_limit,
        task_soft_time_limit=agent.task_soft_time_limit,
        task_default_queue=queue,
        task_track_started=True,
        result_expires=3600,
        broker_connection_retry_on_startup=True,
        # Redis redelivers an unacked message after this long: longer than
        # any task may run, or a slow task would run twice at once. A worker
        # starting sweeps for such messages at once, so a restarted agent
        # picks up what its predecessor died holding.
        broker_transport_options={
            "visibility_timeout": agent.redelivery_timeout or agent.task_time_limit + 60,
        },
        worker_hijack_root_logger=False,
        # No task events (received, started, succeeded: three publishes a task, some
        # 15% of an agent's CPU under boots): nubis reads none of them. A monitor
        # (`celery events`, flower) turns them on at runtime with `celery control
        # enable_events`.
        worker_send_task_events=False,
    )
    return app
