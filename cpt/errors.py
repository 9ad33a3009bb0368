"""The exceptions users see: a one-line message, printed by the CLI without a traceback."""


class CptError(Exception):
    """A user-facing error: bad recipe, bad data, bad checkpoint. The message names what is wrong."""

    exit_code = 2


class DivergedError(CptError):
    """Training stopped on a non-finite loss or grad norm (train.on_nonfinite); nothing was saved after
    the last good checkpoint. Its own exit code, so a job script can tell it from bad input."""

    exit_code = 3


class PeerError(CptError):
    """Another process of the run died or stopped answering (a killed or frozen node): its collectives
    failed or timed out (train.collective_timeout). The message names the last intact checkpoint; its own
    exit code, so a job script can requeue on it."""

    exit_code = 4
