"""The runtime's one user-facing exception.

`UserError` carries a one-paragraph message for the person running ternqc: a bad checkpoint, a factory that
raises, a rule that matched no module. The CLI prints it without a traceback and exits 1. Anything else
that escapes is a bug in ternqc and may show a traceback.
"""


class UserError(Exception):
    """A failure caused by the user's input (files, models, data, rules), explained in `str(self)`."""
