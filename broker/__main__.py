import sys

from zrouter.broker.cli import main

sys.exit(main())
