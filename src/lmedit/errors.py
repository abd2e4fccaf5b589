"""The two kinds of error a user can see; the CLI turns them into one line and an exit code."""


class LmeditError(Exception):
    """Base class of every error lmedit raises on purpose."""

    exit_code = 1


class InputError(LmeditError):
    """Bad input from the user (file, request, option): exit code 2, one clear line."""

    exit_code = 2


class EditFailure(LmeditError):
    """The input was fine but the work failed (e.g. a non-finite loss): exit code 1."""

    exit_code = 1


class LmeditWarning(UserWarning):
    """Something the user should know that does not stop the work (a dropped duplicate, an unverified patch).
    The CLI prints each as one line, `lmedit: warning: ...`; library users get ordinary Python warnings."""


def warn(message: str) -> None:
    """Issue an LmeditWarning attributed to lmedit's caller (one line on the CLI)."""
    import warnings

    warnings.warn(message, LmeditWarning, stacklevel=3)
