"""``python -m training``: the headless trainer (see training/cli.py)."""
import sys

from .cli import main

sys.exit(main())
