"""The one exception type users see for bad input: a one-line message that says what to do."""


class VitslimError(ValueError):
    """Bad input to vitslim (model, option, data or checkpoint); the message says how to fix it."""
