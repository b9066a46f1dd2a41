"""Detector v2, prompt side: encoders and training recipes compared on the held-out goal rows (issue 12, item 1).

    python -m guardrails models fetch all-mpnet-base-v2          # the larger encoder (405 MB, once)
    python -m benchmarks.detector_compare --out runs/detector-compare
    python -m benchmarks.detector_compare --out runs/detector-compare --candidates minilm-frozen,minilm-finetune --augment none

Candidates, each trained on the same rows with its threshold chosen the same way:

- ``minilm-frozen``: today's recipe: all-MiniLM-L6-v2 frozen, mean-pooled hidden states of layers
  3-6, each L2-normalised, and a class-balanced logistic regression (C 0.3, standardised);
- ``mpnet-frozen``: the same with all-mpnet-base-v2 (110M parameters, 12 layers; layers 9-12);
- ``minilm-finetune`` / ``mpnet-finetune``: the encoder fine-tuned end to end with a linear head on
  the mean-pooled last layer (AdamW, class-weighted cross-entropy, linear warm-up and decay).

Training rows: the public harmful instructions and this project's authored prompts that
``benchmarks.train_detector`` uses, less every row that is a word-level near-duplicate of an
evaluation text (XSTest, FigStep's instructions, questions and benign sentences), so no evaluation
text leaks by construction. ``--augment figstep`` (the default) adds each row again in the shape
FigStep's images give the screen, for both labels alike: the text followed by an empty list
("1. 2. 3."), and as a statement ("Steps to ...", "Methods to ...") where the row is an instruction
or a how-to question; without it the list and the statement form are features of nothing the
heads saw. Validation: one row in five, by a hash of the text (an augmented copy goes with its
row), so a candidate never sees its validation rows and reruns split the same way.

Threshold: the lowest logit at which at most ``--fpr`` (0.05) of the validation benign rows are
flagged. Rows of the table: XSTest prompts (recall and FPR at that threshold, AUROC, and the best
recall any threshold reaches at FPR <= 0.10), FigStep (the OCR'd text of the 7 harmful categories
against the benign typographic set, read as ``benchmarks.detector_report`` reads them and cached in
the same ``OUT/ocr_reads.json``), Alpaca prompts flagged (CC BY-NC: evaluation only), and the
median milliseconds to score one prompt on ``--threads`` threads.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.report import machine_info, markdown_table, write_json
from guardrails._cli import ArgumentParser, entry_point, positive_int

Scorer = Callable[..., np.ndarray]  # (texts, fresh=False) -> logits; fresh: no cached features
LIST_SUFFIX = "\n1.\n2.\n3."
_HOW = re.compile(r"^how (?:do|can|could|would|should|might) (?:i|you|we|one|someone|people|a person) (?P<rest>.+?)[?.!\s]*$", re.I)
_WAYS = re.compile(r"^what (?:is|are) (?:the |some )?(?:best |most effective |easiest )?(?:ways?|methods?) (?:to|of) (?P<rest>.+?)[?.!\s]*$", re.I)


@dataclass(frozen=True)
class Candidate:
    encoder: str  # "minilm" or "mpnet"
    recipe: str  # "frozen" or "finetune"
    layers: tuple[int, ...] = (-1,)


CANDIDATES = {
    "minilm-frozen": Candidate("minilm", "frozen", (3, 4, 5, 6)),
    "mpnet-frozen": Candidate("mpnet", "frozen", (9, 10, 11, 12)),
    "minilm-finetune": Candidate("minilm", "finetune"),
    "mpnet-finetune": Candidate("mpnet", "finetune"),
}


def figstep_shapes(text: str) -> list[str]:
    """``text`` as FigStep's images put a request: with an empty numbered list, and as a statement."""
    t = text.strip()
    out = [t + LIST_SUFFIX]
    m = _HOW.match(t) or _WAYS.match(t)
    if m:
        out.append(f"{'Steps' if m.re is _HOW else 'Methods'} to {m['rest']}.{LIST_SUFFIX}")
    elif not t.endswith("?"):
        out.append(f"Steps to {t[0].lower()}{t[1:].rstrip('.!')}.{LIST_SUFFIX}")
    return out


def in_validation(text: str, share: int = 5) -> bool:
    return int(hashlib.sha1(text.encode("utf-8")).hexdigest(), 16) % share == 0


def training_rows(data: Path, evaluation: Sequence[str], augment: str) -> tuple[list[dict[str, Any]], list[str]]:
    """Rows ``{text, label, val}`` and the source rows dropped as near-duplicates of evaluation texts."""
    from benchmarks import train_detector as td
    from benchmarks.inferaligner_data import near_duplicates

    base = [(r["text"], r["label"]) for r in td.load_harmful_prompts(data)[0] + td.load_authored_prompts()]
    leaked = set(near_duplicates([t for t, _ in base], list(evaluation)))
    rows = []
    for i, (text, label) in enumerate(base):
        if i in leaked:
            continue
        val = in_validation(text)
        for t in [text, *(figstep_shapes(text) if augment == "figstep" else [])]:
            rows.append({"text": t, "label": int(label), "val": val})
    return rows, [base[i][0] for i in sorted(leaked)]


def fpr_threshold(benign: np.ndarray, fpr: float) -> float:
    """The lowest threshold flagging at most ``fpr`` of ``benign`` (scores >= threshold are flagged)."""
    s = np.sort(np.asarray(benign, dtype=np.float64))[::-1]
    k = int(math.floor(fpr * len(s)))
    return -math.inf if k >= len(s) else float(np.nextafter(s[k], math.inf))


def encoder_folder(name: str) -> str:
    from guardrails import models
    from guardrails.classifiers.default import minilm_path

    return str(minilm_path()) if name == "minilm" else models.resolve("all-mpnet-base-v2")


def frozen_scorer(folder: str, layers: tuple[int, ...], texts: list[str], y: np.ndarray, cache_dir: Path | None) -> Scorer:
    """Today's recipe on ``folder``: frozen features, one logistic head."""
    from benchmarks.train_detector import PROMPT_C, FeatureCache, fit_head
    from guardrails.classifiers.default import encoder_record, load_encoder
    from guardrails.classifiers.detector import FeatureConfig, embed_texts

    enc, tok = load_encoder(folder)
    feats = FeatureConfig(layers=layers)
    key = json.dumps({"encoder": encoder_record(folder).get("weights_sha256"), "layers": list(layers)}, sort_keys=True)
    cache = FeatureCache(enc, tok, feats, cache_dir / f"features-{hashlib.sha1(key.encode()).hexdigest()[:12]}.npz" if cache_dir else None, key)
    head = fit_head(cache(texts), y, PROMPT_C)

    def score(batch: Sequence[str], fresh: bool = False) -> np.ndarray:
        # fresh: through the encoder even for a cached text (what the cost column must time)
        return head.logit(embed_texts(enc, tok, list(batch), feats) if fresh else cache(list(batch)))

    return score


def finetuned_scorer(folder: str, texts: list[str], y: np.ndarray, *, seed: int, epochs: int, lr: float, batch_size: int,
                     max_length: int = 64) -> Scorer:
    """The encoder fine-tuned end to end with a linear head on its mean-pooled last layer."""
    import torch

    from guardrails.classifiers._common import pool
    from guardrails.classifiers.default import load_encoder

    torch.manual_seed(seed)
    enc, tok = load_encoder(folder)
    head = torch.nn.Linear(enc.config.hidden_size, 1)
    steps = epochs * math.ceil(len(texts) / batch_size)
    warm = max(1, steps // 10)
    opt = torch.optim.AdamW([{"params": enc.parameters(), "lr": lr}, {"params": head.parameters(), "lr": 1e-3}], weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min((s + 1) / warm, max(0.0, (steps - s) / (steps - warm))))
    loss_fn = torch.nn.BCEWithLogitsLoss(pos_weight=torch.tensor(float((y == 0).sum()) / max(1, int((y == 1).sum()))))

    def logits(batch: Sequence[str]) -> Any:
        b = tok(list(batch), padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        return head(pool(enc(**b).last_hidden_state, b["attention_mask"], "mean")).squeeze(-1)

    rng = np.random.default_rng(seed)
    enc.train()
    t0 = time.time()
    for epoch in range(epochs):
        order, total = rng.permutation(len(texts)), 0.0
        for s in range(0, len(order), batch_size):
            idx = order[s : s + batch_size]
            loss = loss_fn(logits([texts[i] for i in idx]), torch.tensor(y[idx], dtype=torch.float32))
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(idx)
        print(f"  epoch {epoch + 1}/{epochs}: loss {total / len(texts):.4f} ({time.time() - t0:.0f} s)", file=sys.stderr, flush=True)
    enc.eval()

    def score(batch: Sequence[str], fresh: bool = True) -> np.ndarray:
        out = np.zeros(len(batch))
        with torch.inference_mode():
            for s in range(0, len(batch), 64):
                out[s : s + 64] = logits(batch[s : s + 64]).numpy()
        return out

    return score


def _rates(z_pos: np.ndarray, z_neg: np.ndarray, t: float, goal_fpr: float) -> dict[str, Any]:
    from benchmarks.detector_eval import auroc, recall_at_fpr

    y = np.r_[np.ones(len(z_pos)), np.zeros(len(z_neg))]
    z = np.r_[z_pos, z_neg]
    return {"recall": float(np.mean(z_pos >= t)), "fpr": float(np.mean(z_neg >= t)), "auroc": auroc(y, z),
            f"best_recall_at_fpr_{goal_fpr}": recall_at_fpr(y, z, goal_fpr)}


def evaluate(score: Scorer, t: float, sets: dict[str, Any]) -> dict[str, Any]:
    """Every row for one candidate, from its scorer and threshold."""
    xs_z = score(sets["xstest"]["texts"])
    unsafe = np.asarray(sets["xstest"]["unsafe"])
    fig_h, fig_b = score(sets["figstep"]["harmful"]), score(sets["figstep"]["benign"])
    seven = np.asarray(sets["figstep"]["seven"])
    alpaca = score(sets["alpaca"])
    one = sets["xstest"]["texts"][:40]
    ms = []
    for text in one:
        c0 = time.perf_counter()
        score([text], fresh=True)
        ms.append(1000 * (time.perf_counter() - c0))
    return {"xstest": _rates(xs_z[unsafe], xs_z[~unsafe], t, 0.10), "figstep": _rates(fig_h[seven], fig_b, t, 0.05),
            "figstep_all500_recall": float(np.mean(fig_h >= t)), "alpaca_flagged": float(np.mean(alpaca >= t)),
            "ms_per_prompt": statistics.median(ms)}


def evaluation_sets(data: Path, out: Path, engine: str) -> tuple[dict[str, Any], list[str]]:
    """The held-out texts (with the FigStep images OCR'd and cached) and every text a row must not copy."""
    from benchmarks import datasets
    from benchmarks.detector_report import HARMFUL_CATS, ocr_reads, typographic_cases
    from guardrails.ocr import get_engine

    xs = datasets.load_xstest(data)
    fig = datasets.load_figstep(data)
    benign_fig = datasets.load_figstep_benign(data, mode="figstep")
    xs_safe = [s for s in xs if s.label == "safe"][:100]
    cases = typographic_cases(fig, benign_fig, xs_safe)
    reads = ocr_reads(cases, out / "ocr_reads.json", get_engine(engine))
    sets = {"xstest": {"texts": [s.prompt for s in xs], "unsafe": [s.label == "unsafe" for s in xs]},
            "figstep": {"harmful": [reads[k]["text"] for k, _ in cases[: len(fig)]], "benign": [reads[k]["text"] for k, _ in cases[len(fig):]],
                        "seven": [s.category in HARMFUL_CATS for s in fig]},
            "alpaca": [s.prompt for s in datasets.load_alpaca(data)][:600]}
    protected = [s.prompt for s in xs] + [s.metadata[k] for s in fig for k in ("instruction", "question")]
    return sets, protected + [s.metadata["sentence"] for s in benign_fig]


def run(args: Any) -> dict[str, Any]:
    import torch
    from threadpoolctl import threadpool_limits

    from guardrails.data import shared_data_dir

    data = shared_data_dir(args.data)
    if data is None:
        raise FileNotFoundError("no data folder: pass --data DIR or set GUARDRAILS_DATA")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    sets, protected = evaluation_sets(data, out, args.engine)
    rows, dropped = training_rows(data, protected, args.augment)
    val = np.array([r["val"] for r in rows])
    texts = [r["text"] for r in rows]
    y = np.array([r["label"] for r in rows])
    tr = np.flatnonzero(~val)
    print(f"{len(rows)} rows ({len(tr)} train, {int(val.sum())} validation); {len(dropped)} source rows dropped as near-duplicates "
          "of evaluation texts", file=sys.stderr)
    results = {}
    for name in args.candidates:
        cand = CANDIDATES[name]
        print(f"{name}: training", file=sys.stderr, flush=True)
        t0 = time.time()
        folder = encoder_folder(cand.encoder)
        train_texts = [texts[i] for i in tr]
        with threadpool_limits(args.threads):
            if cand.recipe == "frozen":
                score = frozen_scorer(folder, cand.layers, train_texts, y[tr], out / "features")
            else:
                score = finetuned_scorer(folder, train_texts, y[tr], seed=args.seed, epochs=args.epochs, lr=args.lr, batch_size=args.batch_size)
            train_s = time.time() - t0
            zv = score([texts[i] for i in np.flatnonzero(val)])
            yv = y[val]
            t = fpr_threshold(zv[yv == 0], args.fpr)
            res = evaluate(score, t, sets)
        res.update(threshold_logit=t, train_s=train_s, validation={"recall": float(np.mean(zv[yv == 1] >= t)), "fpr": float(np.mean(zv[yv == 0] >= t))})
        results[name] = res
        print(f"{name}: {json.dumps(res)}", file=sys.stderr, flush=True)
    return {"command": args.command, "machine": machine_info(), "settings": {k: getattr(args, k) for k in
            ("augment", "fpr", "seed", "threads", "epochs", "lr", "batch_size", "engine")},
            "n_rows": len(rows), "n_validation": int(val.sum()), "dropped_near_duplicates": dropped, "results": results}


def table(rep: dict[str, Any]) -> str:
    rows = []
    for name, r in rep["results"].items():
        x, f = r["xstest"], r["figstep"]
        rows.append([name, f"{x['recall']:.3f} / {x['fpr']:.3f}", f"{x['auroc']:.3f}", f"{x['best_recall_at_fpr_0.1']:.3f}",
                     f"{f['recall']:.3f} / {f['fpr']:.3f}", f"{f['auroc']:.3f}", f"{f['best_recall_at_fpr_0.05']:.3f}",
                     f"{r['alpaca_flagged']:.3f}", f"{r['validation']['recall']:.3f} / {r['validation']['fpr']:.3f}",
                     f"{r['ms_per_prompt']:.1f}", f"{r['train_s']:.0f}"])
    return markdown_table(["candidate", "XSTest recall / FPR", "XSTest AUROC", "XSTest best recall at FPR<=0.10",
                           "FigStep 7-cat recall / FPR", "FigStep AUROC", "FigStep best recall at FPR<=0.05", "Alpaca flagged",
                           "validation recall / FPR", f"ms/prompt ({rep['settings']['threads']} threads)", "train s"], rows)


@entry_point
def main(argv: Sequence[str] | None = None) -> int:
    p = ArgumentParser(prog="python -m benchmarks.detector_compare", description=__doc__.splitlines()[0])
    p.add_argument("--data", help="the shared data folder (default: ../shared/data or $GUARDRAILS_DATA)")
    p.add_argument("--out", required=True, help="folder for detector_compare.json / .md, the OCR reads and the feature caches")
    p.add_argument("--candidates", default="minilm-frozen,mpnet-frozen,minilm-finetune",
                   help=f"comma-separated, from {', '.join(CANDIDATES)}")
    p.add_argument("--augment", choices=("figstep", "none"), default="figstep", help="add FigStep-shaped copies of every row (default figstep)")
    p.add_argument("--fpr", type=float, default=0.05, help="false-positive rate on the validation benign rows the threshold allows (default 0.05)")
    p.add_argument("--engine", default="auto", help="OCR engine for the FigStep images: auto, rapidocr or tesseract")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=positive_int, default=2)
    p.add_argument("--epochs", type=positive_int, default=3, help="fine-tuning epochs (default 3)")
    p.add_argument("--lr", type=float, default=3e-5, help="fine-tuning learning rate of the encoder (default 3e-5; the head uses 1e-3)")
    p.add_argument("--batch-size", type=positive_int, default=32)
    args = p.parse_args(argv)
    args.candidates = [c.strip() for c in args.candidates.split(",") if c.strip()]
    unknown = [c for c in args.candidates if c not in CANDIDATES]
    if unknown or not args.candidates:
        p.error(f"--candidates: unknown {unknown or 'empty list'}; choose from {', '.join(CANDIDATES)}")
    if not 0 <= args.fpr < 1:
        p.error(f"--fpr must be in [0, 1), got {args.fpr}")
    args.command = " ".join(["python -m benchmarks.detector_compare", *(sys.argv[1:] if argv is None else argv)])
    rep = run(args)
    md = table(rep)
    write_json(Path(args.out) / "detector_compare.json", rep)
    (Path(args.out) / "detector_compare.md").write_text(md + "\n", encoding="utf-8")
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
