"""Test-only faults in a vLLM worker's model process, switched on by ``CQ_TEST_FAULTS``.

tests/faults/ does this for the static engine; this one wraps
:meth:`engine.vllm.VllmEngine._step` (the one place vLLM runs the model) when the
model process starts, so production code knows nothing of it. The tests start a
vLLM worker with this directory on ``PYTHONPATH`` and a JSON object in
``CQ_TEST_FAULTS``. Keys:

- ``step_s``: every engine step sleeps this long (a big model's decoding step): a
  job of a few hundred tokens runs for seconds, long enough to watch and cancel.
- ``stall``: a string; a step while a row whose prompt contains it is in the engine
  sleeps ``stall_s`` seconds more (a job that runs past any short time limit).
- ``crash``: a string; a step while a row whose prompt contains it is in the engine
  SIGKILLs the model process (a job that kills its worker every time).
"""

from __future__ import annotations

import json
import os
import signal
import time
from typing import Any

_FAULTS = json.loads(os.environ.get("CQ_TEST_FAULTS") or "{}")


def _install(**_: Any) -> None:
    from engine.vllm import VllmEngine

    original = VllmEngine._step
    step_s = float(_FAULTS.get("step_s", 0))
    stall = _FAULTS.get("stall")
    stall_s = float(_FAULTS.get("stall_s", 1))

    crash = _FAULTS.get("crash")

    def slowed(self: VllmEngine) -> list[Any]:
        time.sleep(step_s)
        if stall or crash:
            prompts = {
                self.tokenizer.decode(row.request.prompt_ids) for row in self._running.values()
            }
            if crash and any(crash in prompt for prompt in prompts):
                os.kill(os.getpid(), signal.SIGKILL)
            if stall and any(stall in prompt for prompt in prompts):
                time.sleep(stall_s)
        return original(self)

    VllmEngine._step = slowed  # type: ignore[method-assign]


if _FAULTS:
    from celery import signals

    signals.worker_process_init.connect(_install, weak=False)
