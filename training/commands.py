"""What every command line of `training` shares: one-line usage errors, the help format and the
guard that turns expected failures into one line on stderr and an exit code.

Exit codes: 0 done, 1 a runtime error (message on stderr), 2 a usage error, 3 refused (a refresh's
quality guard kept the current version), 130 interrupted.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Callable
from typing import NoReturn

from index.encoder_file import EncoderError
from training import distributed as dist
from training.checkpoint import CheckpointError
from training.data.datasets import DataError
from training.errors import CommandRefused, TrainingError

EXIT_RUNTIME_ERROR = 1
EXIT_USAGE = 2
EXIT_REFUSED = 3
EXIT_INTERRUPTED = 130
EXPECTED_ERRORS = (DataError, TrainingError, CheckpointError, EncoderError, ValueError, OSError)


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (`prog: error: ...`) instead of usage + error."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see --help)\n")


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Shows every flag's effective default unless its help names one."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.default is argparse.SUPPRESS or action.nargs == 0:
            return text
        return f"{text} (default: %(default)s)".lstrip()


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> str:
    return f"warning: {message}\n"


def run_guarded(run: Callable[[], int]) -> int:
    """Run a command: expected failures become one line on stderr and exit 1, a refusal exit 3,
    Ctrl-C exit 130; the process group (torchrun) is torn down either way."""
    warnings.formatwarning = _one_line_warning
    try:
        return run()
    except CommandRefused as exc:
        print(f"refused: {exc}", file=sys.stderr)
        return EXIT_REFUSED
    except EXPECTED_ERRORS as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_RUNTIME_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        dist.cleanup()
