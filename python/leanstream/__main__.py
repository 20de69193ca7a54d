"""``python -m leanstream``: the command line (see :mod:`leanstream.cli`)."""

import sys

from .cli import main

sys.exit(main())
