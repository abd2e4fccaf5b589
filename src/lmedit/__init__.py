"""lmedit: edit facts and behaviours in language models with small, reversible, measured weight changes."""

__version__ = "0.1.0"

from lmedit.errors import EditFailure, InputError, LmeditError

__all__ = ["__version__", "LmeditError", "InputError", "EditFailure"]
