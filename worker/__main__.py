"""``python -m worker``: the zrouter-worker command line (see :mod:`worker.cli`)."""

from worker.cli import main

raise SystemExit(main())
