"""Errors a user can cause. The CLI prints them on one line and exits with code 2."""


class FlopwiseError(Exception):
    """A problem with the user's input or environment; the message names the fix."""
