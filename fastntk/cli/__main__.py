"""``python -m fastntk.cli``: the same as the ``fastntk`` console script."""

import sys

from fastntk.cli import main

sys.exit(main())
