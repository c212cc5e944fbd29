"""``python -m trustmatch`` (and ``torchrun -m trustmatch train ...``) run the CLI."""

import sys

from trustmatch.cli import main

sys.exit(main())
