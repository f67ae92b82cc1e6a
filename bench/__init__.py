"""``cq bench``: throughput, latency and memory of the whole path, against baselines measured in
the same run. It drives the producer and the workers from outside, so it may import both.

Each name is imported from its module on first use (``lazy_loader``, reading the
exports from ``__init__.pyi``): the direct baseline (``bench.direct``) runs the model
alone, and imports without Celery, Redis or SQL, which the run's pipeline imports.
"""

import lazy_loader

__getattr__, __dir__, __all__ = lazy_loader.attach_stub(__name__, __file__)
