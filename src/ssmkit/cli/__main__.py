"""``python -m ssmkit.cli``: the same as the ``ssmkit`` command."""

import sys

from . import main

sys.exit(main())
