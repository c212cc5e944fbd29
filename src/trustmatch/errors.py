"""One exception type for bad user input, so the CLI can print one line and exit 2."""


class UserError(Exception):
    """Bad input from the user: the message names the file or value and the fix."""
