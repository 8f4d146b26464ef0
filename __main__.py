"""``python -m shardgrad``: the same command as ``shardgrad`` (see cli.py)."""

import sys

from shardgrad.cli import main

sys.exit(main())
