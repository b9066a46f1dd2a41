"""Load test of the guarded server: N concurrent clients on loopback, a fixed number of requests.

    python -m benchmarks.serve_load --model tiny:qwen2 --defenses protector --clients 8 --requests 48 --out runs/serve
    python -m benchmarks.serve_load --model qwen2.5-coder-0.5b-instruct --defenses protector --max-tokens 32 ...

One process, one model, five settings: {bare (``--defenses none``), guarded} x {batching on
(``--max-batch``), off (1)}, plus guarded streamed requests (streams run one at a time, so batching
does not apply to them). The settings are interleaved in ``--rounds`` rounds (each round sends
``--requests / --rounds`` requests per setting), so a change in the machine's load falls on every
setting alike; requests/s is the setting's requests over its summed wall time, p50/p95 over all
its requests, and the per-round requests/s are kept to show the spread. Every request must get exactly one answer (status 200, its own id, one trace
per answer, as many verdicts as the pipeline has stages for it); anything else fails the run, so a
figure is never computed from a partial set. Reports requests/s and p50/p95 latency per setting,
with the machine and versions, as JSON and a markdown table.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from guardrails._cli import ArgumentParser, entry_point, positive_int

if TYPE_CHECKING:
    from openai.types.chat import ChatCompletion, ChatCompletionChunk, ChatCompletionMessageParam

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from benchmarks.report import machine_info, markdown_table, percentile, write_json  # noqa: E402

#: prompts the clients send in turn: benign questions of varied length (their answers do not matter here)
PROMPTS = [
    "Give me three tips for a good night's sleep.",
    "What is the capital of France, and why is it famous?",
    "Explain what a linked list is in two sentences.",
    "Write a haiku about autumn leaves.",
    "How do I boil an egg?",
    "Summarise the plot of Romeo and Juliet.",
    "What are the health benefits of walking every day?",
    "Translate 'good morning' into Spanish and French.",
]


@dataclass
class Setting:
    name: str
    guarded: bool
    max_batch: int
    stream: bool = False


def settings(max_batch: int) -> list[Setting]:
    return [Setting("bare, batching off", False, 1), Setting(f"bare, batching on ({max_batch})", False, max_batch),
            Setting("guarded, batching off", True, 1), Setting(f"guarded, batching on ({max_batch})", True, max_batch),
            Setting("guarded, streamed", True, max_batch, stream=True)]


def run_setting(model: Any, processor: Any, defenses: list, s: Setting, *, clients: int, requests: int,
                max_tokens: int, timeout_s: float) -> dict[str, Any]:
    """Serve, fire ``requests`` requests from ``clients`` threads, check every answer, return the figures."""
    import openai

    from guardrails import wrap
    from guardrails.server.app import create_app
    from guardrails.server.config import ServerConfig
    from guardrails.server.testing import running_server

    guarded = wrap(model, processor, defenses=defenses if s.guarded else [])
    app = create_app(guarded, ServerConfig(model_name="bench", max_batch=s.max_batch, max_queue=max(64, requests),
                                           max_tokens_limit=max_tokens, default_max_tokens=max_tokens,
                                           request_timeout_s=timeout_s))
    with running_server(app) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=timeout_s)

        def one(i: int) -> tuple[float, str, dict]:
            messages: list[ChatCompletionMessageParam] = [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}]
            t0 = time.perf_counter()
            last: ChatCompletion | ChatCompletionChunk
            if s.stream:
                last = list(client.chat.completions.create(model="bench", messages=messages, max_tokens=max_tokens,
                                                           temperature=0, stream=True))[-1]
            else:
                last = client.chat.completions.create(model="bench", messages=messages, max_tokens=max_tokens, temperature=0)
            # openai's models keep unknown fields (extra="allow"): model_extra is a dict, typed dict | None
            return time.perf_counter() - t0, last.id, (last.model_extra or {})["guardrails"]

        one(0)  # warm-up (first-call allocations, the detector's first batch), not counted
        sizes_before = len(app.state.worker.batch_sizes)
        t0 = time.perf_counter()
        with ThreadPoolExecutor(clients) as pool:
            out = list(pool.map(one, range(requests), timeout=timeout_s * requests))
        wall = time.perf_counter() - t0
        sizes = app.state.worker.batch_sizes[sizes_before:]
    ids = {rid for _, rid, _ in out}
    per_answer = {len(g["verdicts"]) for _, _, g in out if not g["refused"]}
    if len(out) != requests or len(ids) != requests or sum(sizes) != requests or len(per_answer) > 1:
        raise RuntimeError(f"{s.name}: {len(out)} answers, {len(ids)} distinct ids, {sum(sizes)} rows in the model calls "
                           f"and verdict counts {sorted(per_answer)} for {requests} requests: not one answer each")
    return {"wall_s": wall, "latencies": [x for x, _, _ in out], "sizes": sizes, "refused": sum(g["refused"] for _, _, g in out)}


def summarize_setting(s: Setting, rounds: list[dict[str, Any]], clients: int) -> dict[str, Any]:
    lat = [x for r in rounds for x in r["latencies"]]
    sizes = [b for r in rounds for b in r["sizes"]]
    wall = sum(r["wall_s"] for r in rounds)
    return {"setting": s.name, "guarded": s.guarded, "max_batch": s.max_batch, "stream": s.stream, "requests": len(lat),
            "clients": clients, "wall_s": wall, "requests_per_s": len(lat) / wall,
            "requests_per_s_by_round": [len(r["latencies"]) / r["wall_s"] for r in rounds],
            "p50_s": percentile(lat, 50), "p95_s": percentile(lat, 95), "mean_batch": sum(sizes) / len(sizes),
            "calls": len(sizes), "refused": sum(r["refused"] for r in rounds)}


@entry_point
def main(argv: Sequence[str] | None = None) -> int:
    p = ArgumentParser(prog="python -m benchmarks.serve_load", description=__doc__)
    p.add_argument("--model", default="tiny:qwen2", help="what guardrails.load takes, or a fetched model name")
    p.add_argument("--defenses", default="protector", help="the guarded pipeline (default: protector)")
    p.add_argument("--clients", type=positive_int, default=8)
    p.add_argument("--requests", type=positive_int, default=48)
    p.add_argument("--max-tokens", type=positive_int, default=32)
    p.add_argument("--max-batch", type=positive_int, default=8)
    p.add_argument("--rounds", type=positive_int, default=3, help="interleaved rounds (each gets --requests / --rounds per setting)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per request before the run fails")
    p.add_argument("--only", nargs="*", help="run only the settings whose name starts with one of these")
    p.add_argument("--out", default="runs/serve_load")
    args = p.parse_args(argv)

    import torch

    from guardrails.loading import load_for_chat
    from guardrails.spec import build_defenses

    defenses = build_defenses(args.defenses)
    model, processor = load_for_chat(args.model, progress=lambda line: print(line, file=sys.stderr))
    chosen = [s for s in settings(args.max_batch) if not args.only or any(s.name.startswith(o) for o in args.only)]
    per_round = max(1, args.requests // args.rounds)
    runs: dict[str, list[dict[str, Any]]] = {s.name: [] for s in chosen}
    for r in range(args.rounds):
        for s in chosen:
            print(f"[serve_load] round {r + 1}/{args.rounds}: {s.name} ...", file=sys.stderr, flush=True)
            runs[s.name].append(run_setting(model, processor, defenses, s, clients=args.clients, requests=per_round,
                                            max_tokens=args.max_tokens, timeout_s=args.timeout))
    rows = [summarize_setting(s, runs[s.name], args.clients) for s in chosen]
    result = {"model": args.model, "defenses": args.defenses, "max_tokens": args.max_tokens, "greedy": True, "rounds": args.rounds,
              "torch_threads": torch.get_num_threads(), "machine": machine_info(), "rows": rows}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "serve_load.json", result)
    table = markdown_table(["setting", "requests", "requests/s", "requests/s by round", "p50 s", "p95 s", "mean batch", "refused"],
                           [[r["setting"], r["requests"], f"{r['requests_per_s']:.2f}",
                             " / ".join(f"{x:.2f}" for x in r["requests_per_s_by_round"]), f"{r['p50_s']:.2f}",
                             f"{r['p95_s']:.2f}", f"{r['mean_batch']:.1f}", r["refused"]] for r in rows])
    (out / "serve_load.md").write_text(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
