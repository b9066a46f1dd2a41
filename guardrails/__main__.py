"""``python -m guardrails <command>``: screen images, train and run detectors, list defenses, fetch models, serve."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

from guardrails._cli import ArgumentParser, entry_point

# Set before transformers is imported anywhere: with the Hub unreachable, a load retries for minutes.
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

#: modules that add subcommands through a ``register(subparsers)`` function
COMMAND_MODULES = ("guardrails.ocr.cli", "guardrails.classifiers.cli", "guardrails.models_cli", "guardrails.server.cli")


def _list_defenses(args: argparse.Namespace) -> int:
    from guardrails.spec import REGISTRY

    for name, target in sorted(REGISTRY.items()):
        print(f"{name:<16} {target}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="python -m guardrails", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("defenses", help="list the defense names a --defenses spec can use")
    p.set_defaults(func=_list_defenses)
    for module in COMMAND_MODULES:
        importlib.import_module(module).register(sub)
    return parser


@entry_point
def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; a bad argument or file prints one ``error:`` line and returns 2 (see guardrails._cli)."""
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
