"""``python -m vitslim`` (and ``torchrun -m vitslim``) runs the command-line tool."""
import sys

from vitslim.cli import main

sys.exit(main())
