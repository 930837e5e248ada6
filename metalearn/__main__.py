"""``python -m metalearn`` (and ``torchrun -m metalearn``) runs the CLI."""

import sys

from metalearn.cli import main

sys.exit(main())
