"""User-facing data errors.

A `DataError` message is one line that names the file, the key or column at fault
and what would be valid. It is a `UserError` (a ValueError), which the CLI prints as
``error: <message>`` with exit status 2 and no traceback, so the message must
stand on its own.
"""

from ..errors import UserError


class DataError(UserError):
    """A problem with the user's data or data options, explained in one line."""
