"""Command-line conventions for guardrails, the benchmarks and the demo: those of :mod:`steering._cli`
(one-line ``error:`` messages, exit 2, ``--debug``), plus guardrails' own argument types."""

from __future__ import annotations

import argparse

from steering._cli import USER_ERRORS, ArgumentParser, CliError, entry_point, one_line, positive_int

__all__ = ["USER_ERRORS", "ArgumentParser", "CliError", "entry_point", "one_line", "positive_int", "threshold"]


def threshold(text: str) -> float:
    """argparse type: a P(unsafe) threshold in the range every defense uses (see ``check_threshold``)."""
    from guardrails.results import check_threshold

    try:
        return check_threshold(float(text), "the threshold")
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e) if "probability" in str(e) else f"{text!r} is not a number") from None
