"""resfit's own error types: a user's mistake, told in one line, apart from resfit's bugs.

The CLI prints a :class:`ResfitError` as ``resfit CMD: error: MESSAGE`` and exits 2; anything
else is a bug and keeps its traceback. Each type also derives from the built-in exception a
Python caller would expect (``ValueError`` for bad values, ``RuntimeError`` for a run that
cannot go on), so ``except ValueError`` in user code keeps working.

Imports nothing: every module may raise these.
"""

from __future__ import annotations


class ResfitError(Exception):
    """A problem with the user's input or environment; the message says what to do."""


class ConfigError(ResfitError, ValueError):
    """An option has a bad value; the message names the option (``--lr``) and what it takes."""


class DataError(ResfitError, ValueError):
    """The data cannot be used as given; the message names the path or row and what to do."""


class WeightsError(ResfitError, RuntimeError):
    """Weights cannot be found, downloaded, verified or loaded into the model."""


class RunError(ResfitError, ValueError):
    """A run folder is missing, incomplete or of another kind than asked for."""


class TrainingError(ResfitError, RuntimeError):
    """Training cannot go on (NaN loss, nothing to train ...); the message says why."""


class ExportError(ResfitError, RuntimeError):
    """An export failed or its result does not match the model."""


class MissingExtraError(ResfitError, ImportError):
    """An optional dependency is missing; the message gives the one-line install command."""

    def __init__(self, package: str, extra: str) -> None:
        super().__init__(f"this needs {package}: pip install 'resfit[{extra}]'")
        self.package, self.extra = package, extra
