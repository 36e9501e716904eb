"""Errors a user causes and fixes: printed as one line naming the field, the value and the fix, without a traceback.

Everything else that goes wrong is unexpected and keeps its traceback (``sample_lm_multihost.cli``).
"""


class UserError(ValueError):
    """A mistake in the config, the prompts or the output directory; the message says what to change."""


class ConfigError(UserError):
    """A config value that cannot work; the message names the field, the value and the fix."""


def first_line(error: BaseException) -> str:
    """The first line of ``error``'s message (a storage client's can run to dozens), or its type's name."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
