"""The one exception type users see: its message is a single line naming the problem."""


class SdrtError(Exception):
    """A user-facing error. The CLI prints ``error: <message>`` and exits non-zero."""


class CheckpointError(SdrtError):
    """A checkpoint or bundle that cannot be read: missing or misshapen weights, refused pickles."""
