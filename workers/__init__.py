"""The queue side of a worker: the Celery batch task, flushes, the runner, progress, metrics.

It runs an engine (``engine/``), which it builds in the model process; the
engine never imports it. Import its modules directly (``workers.app``,
``workers.main``) so that importing the package stays light.
"""

__all__: list[str] = []
