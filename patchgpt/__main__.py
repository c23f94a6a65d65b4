"""``python -m patchgpt`` (and ``torchrun -m patchgpt``) runs the command line."""

import sys

from .cli import main

sys.exit(main())
