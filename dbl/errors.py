"""Errors the user fixes, not bugs: the CLI prints them as one line (exit status 2), no traceback.

Raise ``UsageError`` for every bad option or input, in constructors (where an option is declared)
and once a run starts (data that is missing or does not fit the model, a tokenizer or judge model
that cannot be loaded, a callback paired with the wrong data module). Any other exception is a
defect in dbl and keeps its traceback (``dbl.cli``).
"""


class UsageError(ValueError):
    """Bad input found when a run starts; the message says what is wrong and how to fix it."""


class MissingDataError(UsageError, FileNotFoundError):
    """A dataset or file is not where the configuration says; the message says where to put it."""


class DivergenceError(RuntimeError):
    """Training produced a non-finite loss or gradient norm; the message names the step and block.
    Not bad input, so the CLI exits 1, but one line: the fix is a setting, not the code."""
