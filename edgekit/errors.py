"""The error hierarchy every user-facing failure goes through.

Each error carries three parts so the CLI can print one actionable line::

    error: <what> (<where>). To resolve, <how>.

``where`` names the file, YAML path/line, stage or node; ``how`` says what to change.
The CLI exits with :attr:`EdgekitError.exit_code` (2) and prints a traceback only
with ``--debug``.
"""

from __future__ import annotations


class EdgekitError(Exception):
    """Base class: a failure the user can act on."""

    exit_code = 2

    def __init__(self, what: str, *, where: str | None = None, how: str | None = None):
        self.what = what.rstrip(".")
        self.where = where
        self.how = how.rstrip(".") if how else None
        super().__init__(self.one_line())

    def one_line(self) -> str:
        text = self.what
        if self.where:
            text += f" ({self.where})"
        text += "."
        if self.how:
            text += f" To resolve, {self.how}."
        return text


class RecipeError(EdgekitError):
    """The recipe file is malformed, misspelled or inconsistent."""


class TargetError(EdgekitError):
    """A target profile is unknown or invalid."""


class ModelError(EdgekitError):
    """The model source is missing, unsupported or unreadable."""


class DataError(EdgekitError):
    """Calibration/evaluation text is missing or too short."""


class StageError(EdgekitError):
    """A stage failed for a reason the user can fix (not a bug)."""


class ParityError(StageError):
    """An exported model disagrees with its PyTorch reference beyond tolerance."""


class OutputError(EdgekitError):
    """The output location cannot be written."""


class EngineError(EdgekitError):
    """A TensorRT engine cannot be planned, built or loaded as asked."""


class SignatureError(EdgekitError):
    """A bundle is unsigned, modified since signing, or signed by a key this device does not trust."""


class DeployError(EdgekitError):
    """A deploy cannot start (bad host list, bundle, option) or a device refused or failed a step."""


class ValidateError(EdgekitError):
    """``edgekit validate`` cannot run as asked (bad bundle, prompts, options or output)."""
