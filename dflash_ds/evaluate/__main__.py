"""``python -m dflash_ds.evaluate``: ``dflash-ds eval`` (what the demo and the launchers run on every rank)."""

import sys

from .cli import main

sys.exit(main())
