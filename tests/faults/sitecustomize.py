"""Test-only faults inside a worker's model process, switched on by ``CQ_TEST_FAULTS``.

The chaos tests start a worker with this directory on ``PYTHONPATH`` and a JSON
object in ``CQ_TEST_FAULTS``; Python imports this module at start-up, and it
wraps ``StaticEngine._run_model`` (the one call into the model) when the model
process starts. Production code knows nothing of it. Keys:

- ``poison``: a string; a batch holding a prompt that contains it raises, every time.
- ``crash``: a string; a batch holding a prompt that contains it SIGKILLs the model
  process, every time (as a segfault in a kernel would).
- ``oom_above_rows``: a batch of more rows than this raises ``torch.OutOfMemoryError``,
  as CUDA does when a batch does not fit.
- ``slow``: a string; a batch holding a prompt that contains it sleeps ``slow_s``
  seconds before generating (a long generation on a big model).
- ``crawl_s``: every forward pass of the model sleeps this long (a big model's
  decoding step), under either engine: a long job for tests of progress and cancel.
- ``ignore_cancels``: the worker never stops a cancelled job's rows (its cancel checks
  are off): the cancel tests must fail against it.
- ``load_s``: the model process sleeps this long when it starts, before it loads the
  model (a big model's load from disk).
- ``hold_restore_mutex``: the worker's main process, at its first restore sweep,
  takes kombu's ``unacked_mutex`` as a sweep does, logs ``cq test: holding
  unacked_mutex`` and stalls there, so a test can kill it mid-sweep.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from typing import Any

_FAULTS = json.loads(os.environ.get("CQ_TEST_FAULTS") or "{}")


def _install(**_: Any) -> None:
    time.sleep(float(_FAULTS.get("load_s", 0)))
    import torch

    from engine.static import StaticEngine

    original = StaticEngine._run_model

    def faulty(self: StaticEngine, **kwargs: Any) -> Any:
        input_ids = kwargs["input_ids"]
        rows = int(input_ids.shape[0])
        if "oom_above_rows" in _FAULTS and rows > int(_FAULTS["oom_above_rows"]):
            raise torch.OutOfMemoryError(f"CUDA out of memory (simulated for {rows} rows)")
        prompts = self.tokenizer.batch_decode(input_ids, skip_special_tokens=True)
        crash = _FAULTS.get("crash")
        if crash and any(crash in prompt for prompt in prompts):
            os.kill(os.getpid(), signal.SIGKILL)
        slow = _FAULTS.get("slow")
        if slow and any(slow in prompt for prompt in prompts):
            time.sleep(float(_FAULTS.get("slow_s", 60)))
        poison = _FAULTS.get("poison")
        if poison and any(poison in prompt for prompt in prompts):
            raise RuntimeError(f"poisoned prompt {poison!r} (simulated model failure)")
        return original(self, **kwargs)

    StaticEngine._run_model = faulty  # type: ignore[method-assign]
    crawl_s = float(_FAULTS.get("crawl_s", 0))
    if crawl_s:
        loaded = StaticEngine.__init__

        def load_then_crawl(self: StaticEngine, *args: Any, **kwargs: Any) -> None:
            loaded(self, *args, **kwargs)
            forward = self.model.forward

            def crawling(*args: Any, **kwargs: Any) -> Any:
                time.sleep(crawl_s)
                return forward(*args, **kwargs)

            self.model.forward = crawling

        StaticEngine.__init__ = load_then_crawl  # type: ignore[method-assign]
    if _FAULTS.get("ignore_cancels"):
        from workers.progress import RowView

        RowView.to_stop = lambda self: []  # type: ignore[method-assign]


def _hold_restore_mutex() -> None:
    from kombu.transport import redis as kombu_redis

    def stalled(self: Any, *args: Any, **kwargs: Any) -> None:
        with self.channel.conn_or_acquire() as client:
            lock = client.lock(self.unacked_mutex_key, timeout=self.unacked_mutex_expire)
            lock.acquire(blocking=True)
            print("cq test: holding unacked_mutex", file=sys.stderr, flush=True)
            time.sleep(3600)

    kombu_redis.QoS.restore_visible = stalled


if _FAULTS:
    from celery import signals

    signals.worker_process_init.connect(_install, weak=False)
    if _FAULTS.get("hold_restore_mutex"):
        _hold_restore_mutex()
