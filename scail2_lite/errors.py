"""The one user-facing error type: the CLI prints its message on one line and exits 2."""


class UserError(Exception):
    """Bad input or an unusable file. The message is shown to the user as is, so it says what to fix."""

    exit_code = 2
