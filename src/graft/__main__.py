"""``python -m graft``: what torchrun starts in each process (``torchrun ... -m graft train ...``)."""

import sys

from graft.cli import main

sys.exit(main())
