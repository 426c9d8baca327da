"""``python -m vmlab.tools`` is the ``vmlab`` command."""
import sys

from vmlab.tools.cli import main

sys.exit(main())
