"""The one exception type a user sees: a problem in their input, with the fix."""

from typing import Any

from .privacy import mask_text


class WorkbenchError(ValueError):
    """Bad input or an impossible setting. The message names the problem and the fix.

    The CLI prints it on one line and exits with code 2; widgets show it inline. The message is masked when
    the error is made (privacy.mask_text): a bad row quoted in it shows [EMAIL] or [PHONE], never the address.
    """

    def __init__(self, message: Any = "", *args: Any) -> None:
        super().__init__(mask_text(message) if isinstance(message, str) else message, *args)


class StopRequested(Exception):
    """Raised inside the loop when a cooperative stop was honoured (internal)."""
