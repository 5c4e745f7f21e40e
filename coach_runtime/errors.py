"""The one exception type for failures a user causes (bad file, bad flag, dead server).

Library code raises `UserError("what is wrong; what to do")`; the `coach` command prints it as a
single line and exits with code 2, never a traceback. Everything else is a bug and keeps its trace.
"""


class UserError(Exception):
    """A user-caused failure, shown as one line by the CLI (exit code 2)."""

    exit_code = 2
