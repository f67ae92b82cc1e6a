"""What every side shares: settings, errors, names, the Celery app, local processes, the reaper.

Other packages import from here; the modules below are internal. The start edge
``completion_queue.flower_app`` is not imported here: it reads settings at import.

Each name is imported from its module on first use (``lazy_loader``, reading the
exports from ``__init__.pyi``, which type checkers read too): the engine imports
the errors from here, and must import without Celery, kombu, redis or SQLAlchemy,
which the Celery app, the reaper and the metrics modules import.
"""

import lazy_loader

__getattr__, __dir__, __all__ = lazy_loader.attach_stub(__name__, __file__)
