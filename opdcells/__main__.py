"""``python -m opdcells COMMAND ...`` (see :mod:`opdcells.cli`)."""
import sys

from .cli import main

sys.exit(main())
