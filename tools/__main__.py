"""``python -m tools`` is the ``vmlab`` command."""
import sys

from tools.cli import main

sys.exit(main())
