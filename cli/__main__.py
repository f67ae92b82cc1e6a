"""``python -m cli``: the same as the ``cq`` console script."""

from cli import main

main()
