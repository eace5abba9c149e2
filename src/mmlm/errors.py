"""The one exception type mmlm raises for bad input from users, files or requests."""


class InputError(ValueError):
    """Bad input at a boundary (file, argument, request); the message names it and what was expected."""
