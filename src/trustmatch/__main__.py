"""``python -m trustmatch`` (and ``torchrun -m trustmatch train ...``) run the CLI."""

from trustmatch.cli import console_main

console_main()
