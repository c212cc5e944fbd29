"""One exception type for bad user input, so the CLI can print one line and exit 2."""


class UserError(Exception):
    """Bad input from the user: the message names the file or value and the fix.

    ``everywhere``: every process of a torchrun run raises this same error (a file operation of the
    main process, shared with the others), so the CLI prints it once, from the main process.
    """

    everywhere = False
