"""Errors of the bridge process that reach the user as one line."""


class UserError(Exception):
    """A mistake the user can fix (bad flag, missing file, unavailable transport); exit code 2."""
