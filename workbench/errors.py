"""The one exception type a user sees: a problem in their input, with the fix."""


class WorkbenchError(ValueError):
    """Bad input or an impossible setting. The message names the problem and the fix.

    The CLI prints it on one line and exits with code 2; widgets show it inline.
    """


class StopRequested(Exception):
    """Raised inside the loop when a cooperative stop was honoured (internal)."""
