"""User-facing errors: one clear line, exit code 2, no traceback."""


class ArchnetError(Exception):
    """Bad input or an impossible request. The message names the problem and the fix."""

    exit_code = 2
