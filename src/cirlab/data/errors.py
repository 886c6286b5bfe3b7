"""The one error type every dataset reader raises for missing or malformed input."""


class DataFormatError(ValueError):
    """A dataset file is missing or malformed; the message is one line naming the file and the fault."""
