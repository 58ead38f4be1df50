"""``python -m sharify`` runs the command line (also under ``torchrun -m sharify``)."""

import sys

from .cli import main

sys.exit(main())
