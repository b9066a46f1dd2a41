"""``python -m guardrails serve``: the guarded OpenAI-compatible server (FastAPI on uvicorn)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from guardrails._cli import CliError, positive_int, threshold


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "serve", help="serve a guarded model over an OpenAI-compatible HTTP API, with a web chat at /",
        description="POST /v1/chat/completions (text, images, streaming), POST /v1/moderations, GET /v1/models, "
                    "GET /health, and a web chat at /. The model and the defense spec are operator input: never "
                    "take them from end users.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="hub id, local folder, fetched model name (python -m guardrails models list) or tiny:ARCH")
    src.add_argument("--moderation-only", action="store_true",
                     help="no chat model: only /v1/moderations (OCR + the harm detector), to sit in front of another server")
    p.add_argument("--defenses", default="none", help="defense spec, e.g. 'system_prompt+protector' (default: none)")
    p.add_argument("--model-name", help="the name clients send as 'model' (default: the --model value)")
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1 routes (default: no key)")
    p.add_argument("--max-batch", type=positive_int, default=8, help="requests answered by one guarded call (1: no batching)")
    p.add_argument("--max-wait-ms", type=float, default=10.0, help="how long a request waits for others to batch with")
    p.add_argument("--max-queue", type=positive_int, default=64, help="waiting requests beyond which the server answers 429")
    p.add_argument("--max-request-bytes", type=positive_int, default=16 * 1024 * 1024)
    p.add_argument("--max-image-pixels", type=positive_int, default=20_000_000)
    p.add_argument("--allow-remote-images", action="store_true", help="fetch http(s) image URLs (off: only data: URLs)")
    p.add_argument("--max-tokens-limit", type=positive_int, default=1024)
    p.add_argument("--request-timeout", type=float, default=600.0, help="seconds before an unanswered request gets 503")
    p.add_argument("--shutdown-grace", type=float, default=30.0, help="seconds a shutdown lets requests in flight finish")
    p.add_argument("--no-moderation", action="store_true", help="no /v1/moderations (saves loading the OCR engine)")
    p.add_argument("--moderation-threshold", type=threshold, default=0.5)
    p.add_argument("--dtype", default=None, help="torch dtype for the model (default: float32 on CPU, bfloat16 on GPU for fetched models)")
    p.set_defaults(func=run)


def build(args: argparse.Namespace) -> tuple[Any, Any, Any]:
    """(guarded model or None, moderator or None, ServerConfig) for the parsed arguments."""
    from guardrails.server.config import ServerConfig
    from guardrails.spec import build_defenses

    defenses = build_defenses(args.defenses)  # a bad spec fails before the model loads
    if args.moderation_only and defenses:
        raise CliError("--moderation-only serves no model, so --defenses has nothing to guard; drop one of them")
    if args.moderation_only and args.no_moderation:
        raise CliError("--moderation-only and --no-moderation leave nothing to serve")
    try:
        config = ServerConfig(model_name=None if args.moderation_only else (args.model_name or args.model), host=args.host,
                              port=args.port, api_key=args.api_key, max_batch=args.max_batch, max_wait_ms=args.max_wait_ms,
                              max_queue=args.max_queue, max_request_bytes=args.max_request_bytes,
                              max_image_pixels=args.max_image_pixels, allow_remote_images=args.allow_remote_images,
                              max_tokens_limit=args.max_tokens_limit,
                              default_max_tokens=min(256, args.max_tokens_limit), request_timeout_s=args.request_timeout,
                              shutdown_grace_s=args.shutdown_grace)
    except ValueError as e:
        raise CliError(str(e)) from None
    moderator = None
    if not args.no_moderation:
        from guardrails.server.moderation import Moderator

        moderator = Moderator(config, threshold=args.moderation_threshold)
    guarded = None
    if not args.moderation_only:
        from guardrails import wrap
        from guardrails.loading import load_for_chat

        model, processor = load_for_chat(args.model, dtype=args.dtype, progress=lambda line: print(line, file=sys.stderr))
        guarded = wrap(model, processor, defenses=defenses)
    return guarded, moderator, config


def run(args: argparse.Namespace) -> int:
    from guardrails.server.app import create_app
    from guardrails.server.testing import GuardedServer

    guarded, moderator, config = build(args)
    app = create_app(guarded, config, moderator)
    where = f"http://{config.host}:{config.port}"
    print(f"serving {config.model_name or 'moderation only'} with {guarded!r} on {where} (web chat at {where}/)",
          file=sys.stderr, flush=True)
    # SIGINT/SIGTERM: new requests get 503, those in flight finish for --shutdown-grace seconds, the
    # rest get 503, then uvicorn closes the connections (GuardedServer).
    GuardedServer(app, host=config.host, port=config.port).run()
    return 0
