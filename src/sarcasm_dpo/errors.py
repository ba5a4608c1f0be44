"""The one exception type a user should ever see.

Anything raised as UserError is a problem with the input or the settings: the CLI prints its
message as one paragraph and exits with code 2, without a traceback. Everything else is a bug.
"""


class UserError(Exception):
    """Bad input or bad settings; the message says what was found and what to do."""

    exit_code = 2
