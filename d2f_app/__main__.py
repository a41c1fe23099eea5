"""``python -m d2f_app``: the headless trainer (d2f_app/cli.py)."""

import sys

from .cli import main

sys.exit(main())
