"""The guidance gate: per row, is this prompt harmful enough to steer?

``score = <activation at the gate layer, last prompt token> . unit_direction + bias``; a row is
steered (g = 1) when its score is > 0, i.e. when the projection exceeds ``threshold = -bias``.
The layer, direction and bias come from :func:`calibrate_gate`, by one of two methods:

- ``"projection"`` (the paper): the direction is the target model's own safety vector at the gate
  layer (a harmful-minus-harmless mean difference); only the bias is fitted.
- ``"logistic"``: the direction is a logistic regression over the whole activation, fitted on the
  calibration prompts. A mean difference is dominated by whatever separates the two prompt sets
  most (style, length, topic words); a discriminative fit with hard negatives among the harmless
  prompts can weigh the features that separate harm. The threshold and layer are chosen on
  out-of-fold scores, so the false-positive budget is measured on prompts the fit did not see.
  Both are the same linear gate at run time: no extra cost per call.

>>> cal = calibrate_gate(vectors, harmful_acts, harmless_acts)   # doctest: +SKIP
>>> print(cal.table()); gate = cal.gate                           # doctest: +SKIP
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

import torch
from torch import nn

from ._files import load_tensors, naming, read_json, save_tensors, write_json
from ._provenance import check_against_model, library_version, model_record, now_iso
from .extract import Activations, Prompt, extract_activations

__all__ = ["GATE_FILES", "GATE_METHODS", "Gate", "GateCalibration", "GateLayerResult", "calibrate_gate", "calibrate_gate_from_prompts"]

GATE_FILES = ("gate.safetensors", "gate.json")
_GATE_FORMAT = "steering-gate"
GateMethod = Literal["projection", "logistic"]
GATE_METHODS: tuple[str, ...] = get_args(GateMethod)
_REDO = "calibrate the gate again (python -m steering calibrate, or Gate.save)"


@dataclass
class Gate:
    """A linear gate at one decoder layer: ``score(x) = x . direction + bias``, steer when > 0.

    ``direction`` is a unit float32 ``[H]`` vector; ``metrics`` holds the calibration figures
    (precision, recall, f1, threshold, ...); ``source`` what it was computed on (model class,
    hidden size, number of layers, chat-template hash, ...).
    """

    layer: int
    direction: torch.Tensor
    bias: float
    metrics: dict[str, float] = field(default_factory=dict)
    source: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.direction, torch.Tensor) or self.direction.dim() != 1:
            raise TypeError("Gate.direction must be a 1-D tensor [hidden]")
        if not isinstance(self.layer, int) or self.layer < 0:
            raise ValueError(f"Gate.layer must be a non-negative int, got {self.layer!r}")
        norm = float(self.direction.float().norm())
        if not math.isfinite(norm) or norm == 0.0:
            raise ValueError("Gate.direction is zero or not finite; calibrate from distinct harmful/harmless prompts")
        self.direction = (self.direction.detach().float() / norm).cpu()
        self.bias = float(self.bias)
        if not math.isfinite(self.bias):  # a NaN bias never steers, silently
            raise ValueError(f"Gate.bias must be finite, got {self.bias}")

    @property
    def threshold(self) -> float:
        """The projection above which a row is steered (``-bias``)."""
        return -self.bias

    @property
    def hidden_size(self) -> int:
        return int(self.direction.shape[0])

    @classmethod
    def from_vector(cls, vector: torch.Tensor, layer: int, bias: float = 0.0, **kwargs: Any) -> Gate:
        """A gate along ``vector`` (normalised here) at ``layer``."""
        return cls(layer=layer, direction=vector, bias=bias, **kwargs)

    def score(self, activations: torch.Tensor) -> torch.Tensor:
        """``[B]`` float32 scores for ``[B, H]`` last-prompt-token activations at the gate layer."""
        if activations.dim() != 2 or activations.shape[-1] != self.hidden_size:
            raise ValueError(f"Gate.score needs [batch, {self.hidden_size}] activations, got {tuple(activations.shape)}")
        direction = self.direction.to(activations.device)
        return activations.float() @ direction + self.bias

    def decide(self, activations: torch.Tensor) -> torch.Tensor:
        """``[B]`` float32 gate values, 1.0 where the row is steered, else 0.0."""
        return (self.score(activations) > 0).float()

    # -- persistence ------------------------------------------------------------------------

    def save(self, directory: str | Path) -> Path:
        """Write ``gate.safetensors`` (the direction) and ``gate.json`` (everything else)."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        save_tensors({"direction": self.direction.contiguous()}, out / GATE_FILES[0], metadata={"format": _GATE_FORMAT})
        meta = {"format": _GATE_FORMAT, "format_version": 1, "layer": self.layer, "bias": self.bias,
                "threshold": self.threshold, "hidden_size": self.hidden_size, "metrics": self.metrics,
                "source": self.source}
        write_json(out / GATE_FILES[1], meta, indent=2, sort_keys=True)
        return out

    @classmethod
    def load(cls, directory: str | Path) -> Gate:
        """Read a gate written by :meth:`save`."""
        d = Path(directory)
        missing = [n for n in GATE_FILES if not (d / n).is_file()]
        if missing:
            raise FileNotFoundError(f"no gate in {str(d)!r}: missing {', '.join(missing)}; run calibration first")
        with naming(d):
            return cls._load(d)

    @classmethod
    def _load(cls, d: Path) -> Gate:
        meta = read_json(d / GATE_FILES[1], fix=_REDO)
        if meta.get("format") != _GATE_FORMAT:
            raise ValueError(f"{d / GATE_FILES[1]} is not a steering gate (format={meta.get('format')!r})")
        if meta.get("format_version") != 1:
            raise ValueError(f"gate format version {meta.get('format_version')} is not supported (this library reads 1); "
                             "upgrade mllm-guardrails")
        bad = [k for k, kind in (("layer", int), ("bias", (int, float)), ("hidden_size", int))
               if isinstance(meta.get(k), bool) or not isinstance(meta.get(k), kind)]
        bad += [k for k in ("metrics", "source") if not isinstance(meta.get(k, {}), dict)]
        if bad:
            raise ValueError(f"{d / GATE_FILES[1]} has a missing or mistyped {', '.join(bad)}; {_REDO}")
        tensors = load_tensors(d / GATE_FILES[0], fix=_REDO)
        if set(tensors) != {"direction"}:
            raise ValueError(f"{d / GATE_FILES[0]} must hold exactly one tensor 'direction', found {sorted(tensors)}")
        gate = cls(layer=meta["layer"], direction=tensors["direction"], bias=meta["bias"],
                   metrics=dict(meta.get("metrics", {})), source=dict(meta.get("source", {})))
        if gate.hidden_size != meta["hidden_size"]:
            raise ValueError(f"gate direction has {gate.hidden_size} entries but gate.json says hidden size {meta['hidden_size']}")
        return gate

    def check_compatible(self, model: nn.Module, tokenizer: Any = None, *, strict_template: bool = True,
                         path: str | None = None) -> list[str]:
        """Refuse (ValueError naming each difference) a model the gate does not fit; return notes.

        Checks the hidden size, the layer index and, when ``tokenizer`` is given, the chat template.
        """
        from .layers import find_decoder_layers

        n = find_decoder_layers(model, path).num_layers
        if self.layer >= n:
            raise ValueError(f"gate incompatible with {type(model).__name__}: gate layer {self.layer} "
                             f"but the model has {n} layers (0..{n - 1})")
        record = {**self.source, "hidden_size": self.hidden_size}
        if record.get("num_layers") is None:  # a hand-made gate: only the layer index could be checked
            record["num_layers"] = n
        return check_against_model("gate", record, model, tokenizer, strict_template=strict_template, path=path)


# --------------------------------------------------------------------------------------------
# Calibration
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GateLayerResult:
    """Best threshold at one layer on the calibration prompts (harmful = positive class)."""

    layer: int
    threshold: float
    precision: float
    recall: float
    f1: float
    accuracy: float
    margin: float  # gap between the projections on either side of the threshold, in std units
    tp: int
    fp: int
    fn: int
    tn: int

    @property
    def bias(self) -> float:
        return -self.threshold

    @property
    def fpr(self) -> float:
        """Share of the harmless calibration prompts the gate fires on (false positives)."""
        return self.fp / (self.fp + self.tn) if self.fp + self.tn else 0.0


@dataclass
class GateCalibration:
    """Per-layer results, the chosen layer and the ready-to-use :class:`Gate`.

    With ``method="logistic"`` the per-layer figures are out-of-fold (each prompt scored by a fit
    that did not see it) and ``threshold`` is a cut on the logistic decision value; the gate's own
    ``threshold`` is always a projection onto its unit direction.
    """

    results: list[GateLayerResult]
    best: GateLayerResult
    gate: Gate
    method: GateMethod = "projection"
    #: per harmless prompt, in the order given: did the chosen layer fire on it (out-of-fold for "logistic")
    harmless_fired: torch.Tensor | None = None

    def fpr_on(self, rows: slice) -> float:
        """False-positive rate on a slice of the harmless prompts (e.g. the hard negatives at the end)."""
        if self.harmless_fired is None or not len(self.harmless_fired[rows]):
            raise ValueError("no harmless prompts in that slice")
        return float(self.harmless_fired[rows].float().mean())

    def table(self) -> str:
        """A plain-text table, one row per layer, the chosen one marked with '*'."""
        cut = "threshold" if self.method == "projection" else "logit cut"
        head = (f"{'layer':>5}  {cut:>10}  {'precision':>9}  {'recall':>6}  {'f1':>6}  {'acc':>6}  {'fpr':>6}  "
                f"{'margin':>7}")
        lines = [head, "-" * len(head)]
        for r in self.results:
            mark = "*" if r.layer == self.best.layer else " "
            lines.append(f"{r.layer:>4}{mark}  {r.threshold:>10.4g}  {r.precision:>9.3f}  {r.recall:>6.3f}  "
                         f"{r.f1:>6.3f}  {r.accuracy:>6.3f}  {r.fpr:>6.3f}  {r.margin:>7.3f}")
        return "\n".join(lines)

    def as_dicts(self) -> list[dict[str, Any]]:
        return [asdict(r) for r in self.results]


def _best_threshold(pos: torch.Tensor, neg: torch.Tensor, layer: int, max_fpr: float | None = None) -> GateLayerResult:
    """Sweep every cut between sorted projections; maximise F1, ties broken by the widest gap (or,
    with ``max_fpr``, recall among cuts whose false-positive rate on the harmless prompts is at most
    ``max_fpr``, ties broken by the fewest false positives, then the widest gap)."""
    p = torch.cat([pos, neg]).double()
    labels = torch.cat([torch.ones(len(pos)), torch.zeros(len(neg))]).double()
    order = torch.argsort(p, descending=True)
    p, labels = p[order], labels[order]
    n, n_pos = len(p), len(pos)
    spread = float(p.std()) if n > 1 and float(p.std()) > 0 else 1.0
    tp_cum = torch.cat([torch.zeros(1, dtype=torch.float64), labels.cumsum(0)])  # tp when the top k are positive
    best: tuple[tuple[float, float, float], int, float] | None = None  # (key, k, gap)
    for k in range(n + 1):
        if 0 < k < n and not p[k - 1] > p[k]:
            continue  # a cut between equal projections is not realisable by a threshold
        tp = float(tp_cum[k])
        f1 = 2 * tp / (k + n_pos) if (k + n_pos) > 0 else 0.0
        gap = float(p[k - 1] - p[k]) / spread if 0 < k < n else 0.0
        key: tuple[float, float, float]
        if max_fpr is not None:
            if (k - tp) > math.floor(max_fpr * (n - n_pos) + 1e-9):  # 0.29 * 100 is 28.999...: allow 29
                continue
            key = (tp, -k, gap)  # most harmful prompts caught within the budget, then the fewest false positives
        else:
            key = (f1, gap, -k)
        if best is None or key > best[0]:
            best = (key, k, gap)
    assert best is not None  # k = 0 (fire on nothing) always meets any budget
    _, k, gap = best
    tp_k = float(tp_cum[k])
    f1 = 2 * tp_k / (k + n_pos) if (k + n_pos) > 0 else 0.0
    if k == 0:
        threshold = float(p[0]) + spread  # nothing steered
    elif k == n:
        threshold = float(p[-1]) - spread  # everything steered
    else:
        threshold = float(p[k - 1] + p[k]) / 2
    tp = int(tp_cum[k])
    fp, fn = k - tp, n_pos - tp
    tn = n - n_pos - fp
    precision = tp / k if k else 0.0
    recall = tp / n_pos if n_pos else 0.0
    return GateLayerResult(layer=layer, threshold=threshold, precision=precision, recall=recall, f1=f1,
                           accuracy=(tp + tn) / n, margin=gap, tp=tp, fp=fp, fn=fn, tn=tn)


def _directions_of(vectors: Any) -> Mapping[int, torch.Tensor]:
    if hasattr(vectors, "vectors") and isinstance(vectors.vectors, Mapping):
        return vectors.vectors
    if isinstance(vectors, Mapping):
        return vectors
    raise TypeError(f"vectors must be SteeringVectors or a mapping layer -> tensor, got {type(vectors).__name__}")


def _logistic(pos: torch.Tensor, neg: torch.Tensor, C: float) -> tuple[torch.Tensor, float]:
    """A balanced logistic regression on standardised features, returned in raw activation units:
    ``(w, b)`` with decision value ``x . w + b``."""
    import numpy as np
    from sklearn.linear_model import LogisticRegression

    x = torch.cat([pos, neg]).double().numpy()
    y = np.r_[np.ones(len(pos)), np.zeros(len(neg))]
    mean, scale = x.mean(0), x.std(0)
    scale[scale == 0] = 1.0  # a constant feature carries nothing; keep it from dividing by zero
    fit = LogisticRegression(C=C, class_weight="balanced", max_iter=5000).fit((x - mean) / scale, y)
    w = fit.coef_[0] / scale
    return torch.from_numpy(w), float(fit.intercept_[0] - w @ mean)


def _out_of_fold(pos: torch.Tensor, neg: torch.Tensor, C: float, folds: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each prompt's logistic decision value from a fit on the other folds (stratified, seeded)."""
    scores = [torch.empty(len(pos), dtype=torch.float64), torch.empty(len(neg), dtype=torch.float64)]
    g = torch.Generator().manual_seed(0)
    fold_of = [torch.randperm(len(x), generator=g) % folds for x in (pos, neg)]
    for k in range(folds):
        w, b = _logistic(pos[fold_of[0] != k], neg[fold_of[1] != k], C)
        for side, x in enumerate((pos, neg)):
            held = fold_of[side] == k
            scores[side][held] = x[held].double() @ w + b
    return scores[0], scores[1]


def calibrate_gate(
    vectors: Any,
    harmful: Activations,
    harmless: Activations,
    *,
    layers: Sequence[int] | None = None,
    source: dict[str, Any] | None = None,
    max_fpr: float | None = None,
    method: GateMethod = "projection",
    C: float = 0.1,
    folds: int = 5,
) -> GateCalibration:
    """Choose the gate layer and bias with the best F1 on held-out harmful/harmless activations.

    With ``max_fpr`` the objective is recall at a false-positive rate on the harmless prompts of at
    most ``max_fpr`` (per layer; the layer with the best recall wins). Use it with hard negatives
    among the harmless prompts (benign requests that use dangerous words): F1 on two prompt sets
    that differ in style rewards a gate that learned the style, not harm.

    ``method="projection"`` (the paper): ``vectors`` (SteeringVectors or ``{layer: [H] tensor}``)
    gives the direction per layer, the target model's own safety vectors extracted from *other*
    prompts than these. ``method="logistic"``: the direction per layer is a logistic regression
    (L2 strength ``1/C``, balanced classes) on these prompts, its threshold and layer chosen on
    ``folds``-fold out-of-fold scores and the final fit made on all of them; ``vectors`` is then
    optional (it only restricts the layers and names the model in the gate's source).

    Per layer, every threshold between consecutive scores is tried; F1 ties go to the widest gap
    (in units of the scores' standard deviation), layer ties to the wider gap, then to the lower
    layer (its gate is known earliest in the forward pass).
    """
    if method not in GATE_METHODS:
        raise ValueError(f"method must be one of {GATE_METHODS}, got {method!r}")
    if method == "projection" and vectors is None:
        raise ValueError("method='projection' needs the target's own vectors; pass them or use method='logistic'")
    directions = _directions_of(vectors) if vectors is not None else None
    if max_fpr is not None and (isinstance(max_fpr, bool) or not isinstance(max_fpr, (int, float)) or not 0 <= max_fpr < 1):
        raise ValueError(f"max_fpr is a false-positive rate in [0, 1), got {max_fpr!r}")
    if len(harmful) == 0 or len(harmless) == 0:
        raise ValueError("calibration needs at least one harmful and one harmless prompt")
    if method == "logistic":
        if isinstance(C, bool) or not isinstance(C, (int, float)) or not C > 0:
            raise ValueError(f"C must be a positive number (inverse L2 strength), got {C!r}")
        if isinstance(folds, bool) or not isinstance(folds, int) or folds < 2:
            raise ValueError(f"folds must be an int >= 2, got {folds!r}")
        if min(len(harmful), len(harmless)) < folds:
            raise ValueError(f"a logistic gate with {folds} folds needs at least {folds} harmful and {folds} harmless "
                             f"prompts, got {len(harmful)} and {len(harmless)}; give more prompts or fewer folds")
    available = [layer for layer in harmful.layer_indices if layer in harmless.layer_indices
                 and (directions is None or layer in directions)]
    chosen = available if layers is None else [int(layer) for layer in layers]
    missing = [layer for layer in chosen if layer not in available]
    if missing:
        raise ValueError(f"layers {missing} lack a vector or activations (available: {available}); "
                         "extract them or pass layers= from the available ones")
    if not chosen:
        raise ValueError("no layer has both a vector and harmful/harmless activations; extract matching layers")
    results = []
    units: dict[int, torch.Tensor] = {}
    negative_scores: dict[int, torch.Tensor] = {}
    for layer in chosen:
        if method == "logistic":
            pos_s, neg_s = _out_of_fold(harmful.at(layer), harmless.at(layer), C, folds)
        else:
            assert directions is not None
            v = directions[layer].detach().float().cpu()
            norm = v.norm()
            if norm == 0 or not torch.isfinite(norm):
                raise ValueError(f"the vector at layer {layer} is zero or not finite; it cannot define a gate")
            units[layer] = v / norm
            pos_s, neg_s = harmful.at(layer) @ units[layer], harmless.at(layer) @ units[layer]
        negative_scores[layer] = neg_s
        results.append(_best_threshold(pos_s, neg_s, layer, max_fpr))
    if max_fpr is None:
        best = max(results, key=lambda r: (r.f1, r.margin, -r.layer))
    else:
        best = max(results, key=lambda r: (r.recall, -r.fpr, r.margin, -r.layer))
    metrics = {k: float(v) for k, v in asdict(best).items() if k != "layer"}
    metrics.update(num_harmful=float(len(harmful)), num_harmless=float(len(harmless)), fpr=best.fpr)
    if max_fpr is not None:
        metrics["max_fpr"] = float(max_fpr)
    if method == "logistic":
        w, b = _logistic(harmful.at(best.layer), harmless.at(best.layer), C)
        # fire when x.w + b > cut  <=>  x.(w/|w|) + (b - cut)/|w| > 0
        direction, bias = w.float(), (b - best.threshold) / float(w.norm())
        metrics.update(logit_cut=best.threshold, threshold=-bias, C=float(C), folds=float(folds))
    else:
        direction, bias = units[best.layer], best.bias
    src = dict(source or {})
    if not src and hasattr(vectors, "manifest"):
        m = vectors.manifest
        src = {k: getattr(m, k) for k in ("model_class", "name_or_path", "hidden_size", "num_layers", "layer_path",
                                          "chat_template_sha256")}
    src.setdefault("library_version", library_version())
    src.setdefault("created", now_iso())
    src["method"] = method
    gate = Gate(layer=best.layer, direction=direction, bias=bias, metrics=metrics, source=src)
    return GateCalibration(results=results, best=best, gate=gate, method=method,
                           harmless_fired=negative_scores[best.layer].double() > best.threshold)


def calibrate_gate_from_prompts(
    model: nn.Module,
    vectors: Any,
    harmful: Sequence[Prompt],
    harmless: Sequence[Prompt],
    *,
    processor: Any = None,
    prepare: Callable[[Sequence[Prompt]], Mapping[str, Any]] | None = None,
    layers: Sequence[int] | None = None,
    batch_size: int = 8,
    progress: bool = True,
    path: str | None = None,
    max_fpr: float | None = None,
    method: GateMethod = "projection",
    C: float = 0.1,
    folds: int = 5,
) -> GateCalibration:
    """:func:`calibrate_gate` on activations read from ``model`` for held-out prompts.

    ``model`` is the target (the gate uses the target's own activations); its class, sizes and
    chat-template hash are recorded in the gate. ``vectors`` may be None with ``method="logistic"``
    (then every layer is tried).
    """
    if layers is not None:
        wanted: list[int] | None = sorted(set(int(x) for x in layers))
    else:
        wanted = sorted(_directions_of(vectors)) if vectors is not None else None
    kw = dict(processor=processor, prepare=prepare, layers=wanted, batch_size=batch_size, progress=progress, path=path)
    pos = extract_activations(model, harmful, desc="harmful", **kw)
    neg = extract_activations(model, harmless, desc="harmless", **kw)
    record = model_record(model, path, processor)
    if processor is None:
        record["chat_template_sha256"] = getattr(prepare, "template_sha256", None)
    return calibrate_gate(vectors, pos, neg, layers=wanted, source=record, max_fpr=max_fpr, method=method, C=C, folds=folds)
