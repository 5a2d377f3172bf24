"""``python -m zrouter.worker``: the zrouter-worker command line (see :mod:`zrouter.worker.cli`)."""

from zrouter.worker.cli import main

raise SystemExit(main())
