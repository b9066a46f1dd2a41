"""What every command line of the project does with errors (steering's here; guardrails, the
benchmarks and the demo reuse it through ``guardrails._cli``, since steering imports nothing above it).

- A mistake the user can fix (a bad argument, a missing or unreadable file, a missing package)
  prints ``error: <one line>`` on stderr and exits 2, never a traceback.
- Any other exception prints ``error: <Type>: <one line> (...)`` and exits 1.
- ``--debug`` anywhere on the command line shows the traceback instead; Ctrl-C exits 130 quietly.

>>> @entry_point
... def main(argv=None):
...     args = ArgumentParser(prog="python -m tool").parse_args(argv)
"""

from __future__ import annotations

import argparse
import functools
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn, Protocol

__all__ = ["USER_ERRORS", "ArgumentParser", "CliError", "entry_point", "one_line", "positive_int"]


class CliError(Exception):
    """A user-facing error: printed without a traceback, exit status 2."""


#: Exceptions that mean "the input was wrong" (ImportError: a package to install).
USER_ERRORS: tuple[type[BaseException], ...] = (CliError, ValueError, TypeError, OSError, ImportError)


def one_line(text: Any) -> str:
    """``text`` with every run of whitespace (newlines included) as one space."""
    return " ".join(str(text).split())


class ArgumentParser(argparse.ArgumentParser):
    """argparse with one-line errors (``error: ... (see PROG --help)``, exit 2) and a ``--debug`` flag.

    Subcommand parsers made by ``add_subparsers`` are of this class too.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # SUPPRESS: a subcommand's default must not overwrite a --debug given before the subcommand.
        self.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                          help="show the full traceback when something fails")

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {one_line(message)} (see {self.prog} --help)\n")


def positive_int(text: str) -> int:
    """argparse type: a whole number >= 1 (``--limit 0`` must not mean "all")."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, got {text!r}")
    return value


class Main(Protocol):
    """What :func:`entry_point` returns: ``main(argv=None)``, argv defaulting to ``sys.argv[1:]``."""

    def __call__(self, argv: Sequence[str] | None = None) -> int: ...


def entry_point(main: Callable[[Sequence[str] | None], int | None]) -> Main:
    """Run ``main(argv)`` with the error conventions of the module docstring; returns the exit status."""

    @functools.wraps(main)
    def run(argv: Sequence[str] | None = None) -> int:
        debug = "--debug" in (sys.argv[1:] if argv is None else list(argv))
        try:
            return int(main(argv) or 0)
        except KeyboardInterrupt:
            if debug:
                raise
            print("interrupted", file=sys.stderr)
            return 130
        except USER_ERRORS as e:
            if debug:
                raise
            print(f"error: {one_line(e) or type(e).__name__}", file=sys.stderr)
            return 2
        except Exception as e:  # noqa: BLE001 - a bug or an environment problem: still one line
            if debug:
                raise
            print(f"error: {type(e).__name__}: {one_line(e)} (unexpected; rerun with --debug for the traceback)",
                  file=sys.stderr)
            return 1

    return run
