"""The base of every user-facing error: one line naming the source, the key and what is valid.

The CLI prints these as ``error: <message>`` and exits 2, without a traceback; anything else is a
bug and keeps its traceback.
"""


class UserError(ValueError):
    """Bad input from the user (a config, a dataset, a weights file), explained in one line."""
