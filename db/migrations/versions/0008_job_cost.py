"""Keep each job's estimated cost in its row, for the backlog signal autoscalers read.

``jobs.cost_prompt_tokens`` and ``jobs.cost_new_tokens`` are what the producer estimated
at submit (``completion_queue.fair.job_cost``: the prompt's characters ÷ 4, and
``max_new_tokens * n``). ``ix_jobs_backlog`` covers the sums over queued and running rows
per model and tenant; ``ix_jobs_finished_at`` the rows finished in the last minute.
Unfinished rows that exist get their estimate here.

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-28
"""

from __future__ import annotations

import math
from typing import Any

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

#: completion_queue.fair's estimate, spelled out: a migration must not change with the code.
CHARS_PER_TOKEN = 4
DEFAULT_NEW_TOKENS = 16

JOBS = sa.table(
    "jobs",
    sa.column("id", sa.Uuid),
    sa.column("status", sa.String),
    sa.column("prompt", sa.Text),
    sa.column("messages", sa.JSON),
    sa.column("params", sa.JSON),
    sa.column("cost_prompt_tokens", sa.Integer),
    sa.column("cost_new_tokens", sa.Integer),
)


def _estimate(prompt: str | None, messages: Any, params: Any) -> tuple[int, int]:
    chars = len(prompt or "") + sum(len(str(m.get("content", ""))) for m in messages or [])
    params = params or {}
    new = int(params.get("max_new_tokens") or DEFAULT_NEW_TOKENS) * int(params.get("n") or 1)
    return math.ceil(chars / CHARS_PER_TOKEN), new


def upgrade() -> None:
    with op.batch_alter_table("jobs") as jobs:
        jobs.add_column(sa.Column("cost_prompt_tokens", sa.Integer()))
        jobs.add_column(sa.Column("cost_new_tokens", sa.Integer()))
        jobs.create_index(
            "ix_jobs_backlog",
            ["status", "model", "tenant", "cost_prompt_tokens", "cost_new_tokens"],
        )
        jobs.create_index("ix_jobs_finished_at", ["finished_at"])
    bind = op.get_bind()
    rows = bind.execute(
        sa.select(JOBS.c.id, JOBS.c.prompt, JOBS.c.messages, JOBS.c.params).where(
            JOBS.c.status.in_(("queued", "running"))
        )
    ).all()
    for job_id, prompt, messages, params in rows:
        prompt_tokens, new_tokens = _estimate(prompt, messages, params)
        bind.execute(
            JOBS.update()
            .where(JOBS.c.id == job_id)
            .values(cost_prompt_tokens=prompt_tokens, cost_new_tokens=new_tokens)
        )


def downgrade() -> None:
    with op.batch_alter_table("jobs") as jobs:
        jobs.drop_index("ix_jobs_finished_at")
        jobs.drop_index("ix_jobs_backlog")
        jobs.drop_column("cost_new_tokens")
        jobs.drop_column("cost_prompt_tokens")
