"""``python -m bnlab`` (what ``torchrun ... -m bnlab train`` runs)."""

import sys

from .cli import main

sys.exit(main())
