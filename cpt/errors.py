"""The one exception type users see: a one-line message, printed by the CLI without a traceback."""


class CptError(Exception):
    """A user-facing error: bad recipe, bad data, bad checkpoint. The message names what is wrong."""
