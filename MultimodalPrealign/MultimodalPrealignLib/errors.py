"""Errors that reach users. Each carries one line: what is wrong and how to fix it."""

from __future__ import annotations

#: CLI exit code for bad input / user mistakes (argparse uses 2 as well).
EXIT_BAD_INPUT = 2
#: CLI exit code when the pipeline ran but a stage failed (engine error, no overlap after search).
EXIT_FAILED = 3
#: CLI exit code when the run finished but its QA verdict is FAIL (PASS and WARN exit with 0).
EXIT_VERDICT_FAIL = 4
#: CLI exit code when the user stopped the run (Ctrl-C, SIGTERM, a cancel request): 128 + SIGINT, as shells do.
EXIT_INTERRUPTED = 130


class PrealignError(Exception):
    """Base class. ``str(err)`` is a single line: cause, then the fix."""

    exit_code = EXIT_FAILED

    def __init__(self, problem: str, fix: str | None = None):
        self.problem = problem.rstrip(". ")
        self.fix = fix.rstrip(". ") if fix else None
        super().__init__(self.one_line())

    def one_line(self) -> str:
        text = self.problem + "."
        if self.fix:
            text += " Fix: " + self.fix + "."
        return " ".join(text.split())


class InputError(PrealignError, ValueError):
    """Bad input given by the user (files, options, output folder). Exit code 2.

    Subclasses ValueError so that Slicer's logic convention (raise ValueError on bad input) holds.
    """

    exit_code = EXIT_BAD_INPUT


class RegistrationError(PrealignError, RuntimeError):
    """A stage ran and failed (for example the engine lost the overlap)."""

    exit_code = EXIT_FAILED


class Cancelled(PrealignError):
    """The user cancelled a long run (Slicer's Cancel button or a progress callback). Exit code 130."""

    exit_code = EXIT_INTERRUPTED

    def __init__(self):
        super().__init__("Cancelled by the user")
