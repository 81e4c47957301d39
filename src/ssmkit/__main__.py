"""``python -m ssmkit`` (and ``torchrun ... -m ssmkit train ...``): the same as the ``ssmkit`` command."""

import sys

from .cli import main

sys.exit(main())
