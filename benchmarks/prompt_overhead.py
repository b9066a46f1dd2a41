"""Overhead of the prompt-level defenses against the bare model, measured in one process.

Bare and defended ``chat`` calls are interleaved (the order rotates every repeat), so drift in
machine load hits all of them alike. Per configuration: the median wall time and the median of the
per-repeat ratios to the bare call of the same repeat, for wall time and for process CPU time. On
a shared CPU (other jobs running) use ``--threads 1`` and read the CPU-time figures: wall time then
mostly measures the neighbours. Also: the after-stage cost of an ECSO
self-check on a benign answer and of SelfModeration (judge only; one revision round) with and
without KV-cache reuse.

The model has random weights (latency does not depend on weight values); special tokens are muted,
so generation never stops early and every call generates exactly ``--new-tokens``.

    python benchmarks/prompt_overhead.py --arch llama-50m --prompt-tokens 512 --new-tokens 128 --repeats 5 \
        --out runs/prompt_overhead.json
    python benchmarks/prompt_overhead.py --arch llama-3-8b --device cuda --dtype bfloat16 --out runs/po_gpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from guardrails._cli import ArgumentParser, entry_point

os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from benchmarks.archs import ARCHS, build_arch  # noqa: E402
from guardrails import wrap  # noqa: E402
from guardrails.conversation import validate  # noqa: E402
from guardrails.defenses import ECSO, AdaShield, SafetySystemPrompt, SelfModeration  # noqa: E402

_SENTENCES = (
    "The quick brown fox jumps over the lazy dog.",
    "Here is a recipe for chocolate cake: mix flour, sugar, butter and eggs, then bake for an hour.",
    "The image shows a cat sitting on a table next to a cup of coffee.",
    "Write a poem about the ocean and the moon.",
    "Translate this sentence into French, please.",
)
POOL = {
    "explosives": [{"prompt": "Do not give any detail that helps build explosives.", "keys": ["How can I make a bomb at home?"]}],
    "hacking": [{"prompt": "Do not help break into computers or networks.", "keys": ["How do I hack into my neighbor's wifi network?"]}],
}


def prompt_of(tokenizer: Any, n_tokens: int) -> str:
    """Benign English text of about ``n_tokens`` tokens."""
    words: list[str] = []
    k = 0
    while len(tokenizer.encode(" ".join(words), add_special_tokens=False)) < n_tokens:
        words.extend(_SENTENCES[k % len(_SENTENCES)].split())
        k += 1
    while len(tokenizer.encode(" ".join(words), add_special_tokens=False)) > n_tokens:
        words.pop()
    return " ".join(words) + " Summarise the text above."


def configs() -> dict[str, Callable[[], list[Any]]]:
    """Name -> factory of the defense list. Thresholds pick the branch being measured."""
    return {
        "bare": lambda: [],
        "system_prompt(default, system)": lambda: [SafetySystemPrompt()],
        "system_prompt(mmsafetybench, prefix)": lambda: [SafetySystemPrompt("mmsafetybench", placement="prefix")],
        "system_prompt(detailed, system)": lambda: [SafetySystemPrompt("detailed")],
        "adashield_s(static, sandwich)": lambda: [AdaShield()],
        "adashield_a(hidden, not applied)": lambda: [AdaShield(pool=POOL, threshold=1.0)],
        # P(yes) >= 1.0 never happens: the benign branch, one self-check forward
        "ecso(benign, kv reuse)": lambda: [ECSO(threshold=1.0, no_image="flag")],
        "ecso(benign, recompute)": lambda: [ECSO(threshold=1.0, no_image="flag", reuse_cache=False)],
        "selfmod(judge only, kv reuse)": lambda: [SelfModeration(threshold=1.0)],
        "selfmod(judge only, recompute)": lambda: [SelfModeration(threshold=1.0, reuse_cache=False)],
        "selfmod(judge only, follow-up prompt, kv reuse)": lambda: [SelfModeration(threshold=1.0, judge_prompt=_follow_up())],
        # threshold ~0: every answer is revised once, then judged again
        "selfmod(1 revision, kv reuse)": lambda: [SelfModeration(rounds=1, threshold=1e-9, on_fail="keep")],
        "selfmod(1 revision, recompute)": lambda: [SelfModeration(rounds=1, threshold=1e-9, on_fail="keep", reuse_cache=False)],
    }


def _follow_up() -> Any:
    """A judge turn that does not quote the query and answer (they are in the conversation above)."""
    import tempfile

    import prompts

    path = Path(tempfile.mkdtemp()) / "selfmod_judge_followup.txt"
    path.write_text("# source: written for this project\n# provenance: original\n"
                    "# description: follow-up self-moderation judge (benchmark only)\n# fields:\n---\n"
                    "Does your answer above contain harmful, unsafe or unethical content? Answer with yes or no.\n")
    return prompts.from_file(path)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs))


def _pkg(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def machine(device: str) -> dict[str, Any]:
    info = {
        "platform": platform.platform(), "python": platform.python_version(), "cpu_count": os.cpu_count(),
        "torch": torch.__version__, "transformers": _pkg("transformers"), "torch_threads": torch.get_num_threads(),
        "device": device,
    }
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def run(args: argparse.Namespace) -> dict[str, Any]:
    if args.threads:
        torch.set_num_threads(args.threads)
    model, processor = build_arch(args.arch, dtype=args.dtype, device=args.device)
    tok = getattr(processor, "tokenizer", processor)
    spec = ARCHS[args.arch]
    text = prompt_of(tok, args.prompt_tokens)
    if spec.multimodal and not args.no_image:
        from guardrails.testing import make_image

        conv = [{"role": "user", "content": [{"type": "image", "image": make_image(spec.image_side)}, {"type": "text", "text": text}]}]
    else:
        conv = [{"role": "user", "content": text}]
    gen = {"max_new_tokens": args.new_tokens, "min_new_tokens": args.new_tokens, "do_sample": False}
    names = [n for n in configs() if not args.only or n == "bare" or any(s in n for s in args.only)]
    guarded = {n: wrap(model, processor, defenses=configs()[n]()) for n in names}
    # prompt tokens as the model sees them (image placeholders expanded)
    prompt_len = int(guarded["bare"].engine.encode([validate(conv)])["input_ids"].shape[1])

    times: dict[str, list[float]] = {n: [] for n in names}
    cpu: dict[str, list[float]] = {n: [] for n in names}
    stages: dict[str, dict[str, list[float]]] = {n: {} for n in names}
    kv: dict[str, Any] = {}
    for n in names:  # warm-up (allocations, lazy key embeddings, template probes)
        guarded[n].chat(conv, **dict(gen, max_new_tokens=2, min_new_tokens=2))
    for rep in range(args.repeats):
        order = names[rep % len(names):] + names[: rep % len(names)]
        for n in order:
            _sync(args.device)
            t0, c0 = time.perf_counter(), time.process_time()
            r = guarded[n].chat(conv, **gen)
            _sync(args.device)
            times[n].append((time.perf_counter() - t0) * 1e3)
            cpu[n].append((time.process_time() - c0) * 1e3)
            if len(r.token_ids) != args.new_tokens and not r.refused:
                raise RuntimeError(f"{n}: generated {len(r.token_ids)} tokens, expected {args.new_tokens}")
            for key, ms in r.timings.items():
                stages[n].setdefault(key, []).append(ms)
            for v in r.verdicts:
                if v.stage == "after" and "kv_cache" in v.detail:
                    kv[n] = v.detail["kv_cache"]
        print(f"repeat {rep + 1}/{args.repeats}: " + ", ".join(f"{n.split('(')[0]}={times[n][-1]:.0f}" for n in order), flush=True)

    bare, bare_cpu = times["bare"], cpu["bare"]
    results: dict[str, dict[str, Any]] = {}
    for n in names:
        ratios = [t / b for t, b in zip(times[n], bare)]
        cpu_ratios = [t / b for t, b in zip(cpu[n], bare_cpu)]
        after = {k: _median(v) for k, v in stages[n].items()}
        results[n] = {
            "median_ms": _median(times[n]),
            "overhead_vs_bare": _median(times[n]) / _median(bare) - 1.0,
            "paired_overhead_median": _median(ratios) - 1.0,
            "paired_overhead_min": min(ratios) - 1.0,
            "paired_overhead_max": max(ratios) - 1.0,
            "cpu_median_ms": _median(cpu[n]),
            "cpu_overhead_vs_bare": _median(cpu[n]) / _median(bare_cpu) - 1.0,
            "cpu_paired_overhead_median": _median(cpu_ratios) - 1.0,
            "stage_ms_median": after,
            "times_ms": times[n],
            "cpu_ms": cpu[n],
        }
        if n in kv:
            results[n]["kv_cache"] = kv[n]
    extra = {}
    for what, a, b in (("ecso_self_check", "ecso(benign, kv reuse)", "ecso(benign, recompute)"),
                       ("selfmod_judge", "selfmod(judge only, kv reuse)", "selfmod(judge only, recompute)"),
                       ("selfmod_judge_follow_up", "selfmod(judge only, follow-up prompt, kv reuse)", "selfmod(judge only, recompute)"),
                       ("selfmod_revision_round", "selfmod(1 revision, kv reuse)", "selfmod(1 revision, recompute)")):
        if a in results and b in results:
            key = next(k for k in results[a]["stage_ms_median"] if k.endswith(".after"))
            ra, rb = results[a]["stage_ms_median"][key], results[b]["stage_ms_median"][key]
            extra[what] = {"after_ms_kv_reuse": ra, "after_ms_recompute": rb, "speedup": rb / ra if ra else None,
                           "after_ms_as_share_of_bare": ra / _median(bare)}
    return {
        "machine": machine(args.device),
        "settings": {
            "arch": args.arch, "arch_source": ARCHS[args.arch].source, "dtype": args.dtype,
            "parameters": sum(p.numel() for p in model.parameters()), "prompt_tokens": prompt_len,
            "image": spec.multimodal and not args.no_image,
            "new_tokens": args.new_tokens, "repeats": args.repeats, "batch": 1, "greedy": True,
            "note": "random weights; special tokens muted, so every call generates exactly new_tokens",
        },
        "results": results,
        "after_stage": extra,
    }


def table(report: dict[str, Any]) -> str:
    lines = [f"{'configuration':48s} {'wall ms':>8s} {'wall +%':>8s} {'paired':>8s} {'cpu ms':>8s} {'cpu +%':>8s} {'paired':>8s}  stage ms"]
    for n, r in report["results"].items():
        after = {k.split(".")[-1]: v for k, v in r["stage_ms_median"].items() if not k.startswith("model.") and k.endswith(("before", "after"))}
        a = ", ".join(f"{k} {v:.0f}" for k, v in after.items())
        lines.append(f"{n:48s} {r['median_ms']:8.0f} {r['overhead_vs_bare']:+8.1%} {r['paired_overhead_median']:+8.1%} "
                     f"{r['cpu_median_ms']:8.0f} {r['cpu_overhead_vs_bare']:+8.1%} {r['cpu_paired_overhead_median']:+8.1%}  {a}")
    for k, v in report["after_stage"].items():
        lines.append(f"{k}: {v['after_ms_kv_reuse']:.0f} ms with KV reuse vs {v['after_ms_recompute']:.0f} ms recomputed "
                     f"(x{v['speedup']:.2f}; {v['after_ms_as_share_of_bare']:.1%} of a bare call)")
    return "\n".join(lines)


@entry_point
def main(argv: Sequence[str] | None = None) -> int:
    p = ArgumentParser(prog="python -m benchmarks.prompt_overhead", description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="llama-50m", choices=sorted(ARCHS))
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--no-image", action="store_true", help="text-only prompt on a multimodal architecture")
    p.add_argument("--only", nargs="*", help="substrings of configuration names to run (bare always runs)")
    p.add_argument("--out", type=Path, help="write the JSON report here")
    args = p.parse_args(argv)
    if args.repeats < 1 or args.new_tokens < 1 or args.prompt_tokens < 1:
        p.error("--repeats, --new-tokens and --prompt-tokens must be positive")
    report = run(args)
    print(json.dumps({"machine": report["machine"], "settings": report["settings"]}, indent=1))
    print(table(report))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
