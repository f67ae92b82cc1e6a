"""The worker side: the Celery batch task, the resident model runtime and the batching.

This is the only package that imports torch; import its modules directly
(``workers.model``, ``workers.app``) so that importing the package stays light.
"""

__all__: list[str] = []
