"""``python -m guardrails screen``: OCR the text inside images and screen it with a harm classifier."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from guardrails._cli import USER_ERRORS, CliError, one_line, threshold
from steering._files import expand_user


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "screen",
        help="read text inside images (OCR) and flag harmful instructions",
        epilog="Relative image paths in a --batch file are resolved against the folder of that file.",
        description="One input (--image ... [--text]) or many (--batch FILE.jsonl with lines "
        '{"id": ..., "images": [paths], "text": optional}). One output line per input, in input order; '
        'a bad input gets {"id", "error"} and the run goes on.',
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--image", nargs="+", help="image file(s) of one input, read in order and joined")
    src.add_argument("--batch", help="JSONL file of inputs")
    p.add_argument("--text", default="", help="the user's typed text that goes with --image")
    p.add_argument("--with-user-text", action="store_true",
                   help="judge the typed text together with the image text (off: the default detector flags "
                   "some benign typed prompts, e.g. FigStep's, so only the image text is judged)")
    p.add_argument("--engine", default="auto", choices=("auto", "rapidocr", "tesseract"),
                   help="OCR engine: auto (rapidocr, else tesseract), rapidocr, tesseract")
    p.add_argument("--detector", default="default", help="'default' or a saved detector folder")
    p.add_argument("--threshold", type=threshold, default=0.5, help="P(unsafe) in (0, 1] at or above which an input is flagged")
    p.add_argument("--json", action="store_true", help="JSON lines instead of a table")
    p.set_defaults(func=run)


def _inputs(args: argparse.Namespace) -> list[dict[str, Any]]:
    if args.image:
        return [{"id": 0, "images": args.image, "text": args.text}]
    path = expand_user(args.batch)
    if not path.is_file():
        raise CliError(f"--batch file {str(path)!r} does not exist")
    items = []
    # Lines end at "\n" only (str.splitlines would also cut at U+2028, which JSON strings may hold),
    # and each is decoded alone: one bad line is one error row, not a lost run.
    for n, raw in enumerate(path.read_bytes().split(b"\n"), 1):
        if not raw.strip():
            continue
        try:
            line = raw.decode("utf-8")
            item = json.loads(line)
            if not isinstance(item, dict):
                raise ValueError("each line must be a JSON object")
        except ValueError as e:
            items.append({"id": f"line {n}", "error": f"line {n} is not a JSON object: {e}"})
            continue
        item.setdefault("id", f"line {n}")
        items.append(item)
    return items


def run(args: argparse.Namespace) -> int:
    import warnings

    from PIL import Image

    from guardrails.defenses.ocr_screen import OCRScreen

    # Our own pixel cap (guardrails.ocr.images) refuses such images with a clear per-row error;
    # PIL's warning for them would only add a second, unrelated line on stderr. This process only.
    warnings.simplefilter("ignore", Image.DecompressionBombWarning)

    screen = OCRScreen.from_spec("classify", threshold=args.threshold, engine=args.engine, detector=args.detector,
                                 with_user_text=args.with_user_text)
    # Built now, not at the first row: a missing OCR engine or detector is one error, not one per row.
    _ = screen.ocr, screen.classifier
    inputs = _inputs(args)
    base = expand_user(args.batch).parent if args.batch else None
    failures = 0
    for item in inputs:
        out = screen_item(screen, item, base)
        failures += "error" in out
        if args.json:
            print(json.dumps(out, ensure_ascii=False), flush=True)
        elif "error" in out:
            print(f"{out['id']}\tERROR\t{out['error']}", flush=True)
        else:
            text = out["ocr_text"].replace("\n", " ")
            score = "-" if out["score"] is None else f"{out['score']:.3f}"
            print(f"{out['id']}\t{'FLAGGED' if out['flagged'] else 'ok'}\t{score}\t{out['latency_ms']:.0f} ms\t{text[:80]}", flush=True)
    # Exit 1 when any input failed, so scripts notice; every input still got its line.
    return 1 if failures else 0


def screen_item(screen: Any, item: dict[str, Any], base: Path | None) -> dict[str, Any]:
    """One output line for one input: the screen's result, or ``{"id", "error"}``; never raises.

    Relative image paths are resolved against ``base`` (the --batch file's folder).
    """
    out: dict[str, Any] = {"id": item["id"]}
    try:
        if "error" in item:
            raise ValueError(item["error"])
        images = item.get("images")
        if not isinstance(images, list) or not images or not all(isinstance(x, str) for x in images):
            raise ValueError('"images" must be a non-empty list of file paths')
        text = item.get("text") or ""
        if not isinstance(text, str):
            raise ValueError('"text" must be a string')
        out.update(screen.screen([str(_resolve(x, base)) for x in images], text).to_dict())
    except USER_ERRORS as e:
        out["error"] = one_line(e)
    except Exception as e:  # noqa: BLE001 - an engine failing on one image must not end the run
        out["error"] = f"{type(e).__name__}: {one_line(e)}"
    return out


def _resolve(image: str, base: Path | None) -> Path | str:
    """A --batch path relative to the batch file's folder; URLs are left for the image loader to refuse."""
    from guardrails.ocr.images import url_error

    if url_error(image):
        return image
    p = expand_user(image)
    return p if p.is_absolute() or base is None else base / p


if __name__ == "__main__":
    from guardrails.__main__ import main

    sys.exit(main(["screen", *sys.argv[1:]]))
