"""The one exception type whose message is meant for the person at the keyboard."""


class WhiteboardError(Exception):
    """Bad input (file, corpus, config, checkpoint). The CLI prints the message alone and
    exits non-zero; library callers can catch it."""


class UsageError(WhiteboardError):
    """A command line or config that cannot be right (exit status 2)."""
