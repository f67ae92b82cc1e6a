"""``python -m workers``: a worker configured from ``CQ_*`` environment variables."""

from workers.main import main

main()
