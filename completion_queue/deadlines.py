"""What a job still queued at its deadline is failed with, wherever it is caught: by the
worker that would have claimed it, or by the reaper when no worker serves its model."""

from __future__ import annotations

from completion_queue.errors import BatchExpired, DeadlineExceeded
from db import DeadlineErrors, error_dict

#: OpenAI's message for a batch request that its completion window closed on.
WINDOW_MESSAGE = "This request could not be executed before the completion window expired."

DEADLINE_ERRORS = DeadlineErrors(
    deadline=error_dict(DeadlineExceeded("the job was not started by its deadline")),
    window=error_dict(BatchExpired(WINDOW_MESSAGE)),
)
