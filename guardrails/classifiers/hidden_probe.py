"""HiddenStateProbe: a logistic probe on the wrapped model's own residual stream.

Features are the outputs of one decoder layer at the *answer positions*: the n states that
produced the n answer tokens, i.e. the last prompt position and answer tokens 1..n-1 (the state
at position t is what the model had when it chose token t+1). Pooled by their mean (default) or
the last one, then a scikit-learn ``LogisticRegression`` head gives P(unsafe).

Why these positions: during ``generate`` a forward hook at that layer sees exactly these states,
one per step, before the next token is known, so the probe scores a streaming answer with no
extra forward pass (:class:`HiddenCapture`). Teacher forcing the same prompt + answer (one
forward per batch, what :meth:`HiddenStateProbe.fit` and :meth:`HiddenStateProbe.predict` use)
computes the same states at the same positions; they agree to floating-point tolerance (KV-cache
decoding and a full forward sum in different orders). Text answers are re-tokenized for teacher
forcing; pass token ids (``features(..., response_ids=...)``) where the exact ids matter.

Saved as ``head.safetensors`` (coef, intercept, mean, scale; float64) + ``manifest.json`` (layer,
pooling, model name/class, hidden size, layer count, training data). No pickle.

>>> probe = HiddenStateProbe(model, processor, layer=-4).fit(queries, answers, labels, training_data="...")
>>> probe.save("probe_dir");  HiddenStateProbe.load("probe_dir", model, processor).predict(["..."], ["..."])
"""

from __future__ import annotations

import contextlib
import json
import os
import warnings
from collections.abc import Collection, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np
import torch

from guardrails.calls import ModelCalls, scoped_hook
from guardrails.classifiers.base import HarmClassifier, HarmScore
from guardrails.classifiers.embedding import LinearHead, check_n_features, read_probe_dir, sha256_file
from guardrails.config import Config
from guardrails.engine import tokenizer_lock
from steering._files import naming, save_tensors, write_json

__all__ = ["HiddenStateProbe", "HiddenProbeConfig", "HiddenCapture", "POOLINGS"]

Pooling = Literal["mean", "last"]
POOLINGS: tuple[str, ...] = get_args(Pooling)
KIND = "hidden-state-probe"
MANIFEST = "manifest.json"
HEAD_FILE = "head.safetensors"
FORMAT_VERSION = 1
FEATURES = ("decoder-layer output at the answer positions (last prompt position and answer tokens 1..n-1: "
            "the states that produced the n answer tokens), pooled")
# Per-token inputs a processor may return beside input_ids; teacher forcing re-pads them.
_PER_TOKEN = ("attention_mask", "token_type_ids", "mm_token_type_ids")


def _library_version() -> str:
    try:
        from importlib.metadata import version

        return version("mllm-guardrails")
    except Exception:  # a source checkout that is not installed
        return "0+source"



def _hidden_of(output: Any) -> torch.Tensor:
    # transformers 5 layers return a bare tensor; output[0] on it would silently pick batch row 0.
    from steering._outputs import hidden_of

    return hidden_of(output)


@dataclass(frozen=True)
class HiddenProbeConfig(Config):
    """Validated settings of a :class:`HiddenStateProbe`.

    layer: decoder layer index (negative counts from the end); its output is read.
    pooling: "mean" over the answer positions or the "last" one.
    C, class_weight, max_iter: scikit-learn ``LogisticRegression`` settings (features standardised).
    batch_size: rows per teacher-forced forward. layers_path: dotted path to the decoder layers
    when ``steering.layers.find_decoder_layers`` cannot find them.
    """

    layer: int
    pooling: Pooling = "mean"
    C: float = 1.0
    class_weight: Literal["balanced"] | None = "balanced"
    max_iter: int = 2000
    batch_size: int = 8
    layers_path: str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.layer, bool) or not isinstance(self.layer, int):
            raise TypeError(f"layer must be an int (a decoder layer index, negative counts from the end), got {self.layer!r}")
        if isinstance(self.C, bool) or not isinstance(self.C, (int, float)) or not self.C > 0:
            raise ValueError(f"C must be a positive number (inverse regularisation strength), got {self.C!r}")
        for name in ("max_iter", "batch_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if self.layers_path is not None and not (isinstance(self.layers_path, str) and self.layers_path):
            raise ValueError(f"layers_path must be a dotted path such as 'model.layers' or None, got {self.layers_path!r}")


class _Head(LinearHead):
    """The shared logistic head, evaluated in torch on the activations' own device (float64)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self._torch: dict[torch.device, tuple[torch.Tensor, ...]] = {}

    def proba(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        """P(unsafe) for feature rows ``x`` [B, H] on any device."""
        if x.dim() != 2 or x.shape[1] != self.n_features:
            raise ValueError(f"features have shape {tuple(x.shape)}; this head expects (n, {self.n_features})")
        if x.device not in self._torch:
            self._torch[x.device] = tuple(torch.as_tensor(a, device=x.device) for a in (self.coef, self.mean, self.scale))
        coef, mean, scale = self._torch[x.device]
        return torch.sigmoid(((x.double() - mean) / scale) @ coef + self.intercept)


class HiddenCapture:
    """Pooled answer-position activations of one ``generate`` call, per row, kept by a forward hook.

    The hook stores each step's last-position state as *pending*; :meth:`observe` (call it once per
    step after the token is chosen, e.g. from a StoppingCriteria) adds it to the row's pool only if
    the row is still answering (no stop/pad token yet), so a finished or stopped row's padding steps
    never count. Everything stays on the layer's device; nothing syncs with the host.
    """

    def __init__(self, batch: int, hidden: int, device: torch.device, stop_ids: Collection[int], layer_desc: str):
        self.batch, self.hidden, self.layer_desc = batch, hidden, layer_desc
        self.sum = torch.zeros(batch, hidden, dtype=torch.float32, device=device)
        self.last = torch.zeros(batch, hidden, dtype=torch.float32, device=device)
        self.count = torch.zeros(batch, dtype=torch.long, device=device)
        self.alive = torch.ones(batch, dtype=torch.bool, device=device)
        self.stop_ids = torch.tensor(sorted(set(int(i) for i in stop_ids)), dtype=torch.long, device=device)
        self.pending: torch.Tensor | None = None
        self.forwards = 0

    def hook(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        h = _hidden_of(output)
        if h.shape[0] != self.batch:
            raise RuntimeError(
                f"the probe's hook at {self.layer_desc} saw a batch of {h.shape[0]} rows for {self.batch} prompts; "
                "beam search, num_return_sequences > 1 and assisted decoding are not supported with a HiddenStateProbe"
            )
        self.pending = h[:, -1, :].detach().float()
        self.forwards += 1

    def observe(self, input_ids: torch.Tensor) -> None:
        """Commit the pending state of every row whose newest token is an answer token."""
        if self.pending is None:
            raise RuntimeError(
                f"the probe's forward hook at {self.layer_desc} did not run for this generation step: compiled "
                "decoding (torch.compile, a static cache, CUDA graphs) skips Python hooks; set "
                "model.generation_config.disable_compile = True or cache_implementation='dynamic'"
            )
        tok = input_ids[:, -1].to(self.stop_ids.device)
        ok = self.alive & ~torch.isin(tok, self.stop_ids)
        p = self.pending.to(self.sum.device)
        self.sum += p * ok[:, None]
        self.last = torch.where(ok[:, None], p, self.last)
        self.count += ok
        self.alive = ok
        self.pending = None

    def stop(self, rows: torch.Tensor) -> None:
        """Rows (bool mask) that stop now: later steps never add to their pool."""
        self.alive &= ~rows.to(self.alive.device)

    def pooled(self, pooling: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(features [B, H] float32, answer-token counts [B]) as of the last :meth:`observe`."""
        if pooling == "mean":
            return self.sum / self.count.clamp(min=1)[:, None].float(), self.count
        return self.last, self.count


@dataclass(frozen=True)
class _Signature:
    """What a probe must match in a model: recorded at fit time, checked at bind time."""

    name: str
    model_class: str
    hidden_size: int
    num_layers: int
    layers_path: str

    @classmethod
    def of(cls, model: Any, info: Any) -> _Signature:
        cfg = getattr(model, "config", None)
        return cls(str(getattr(cfg, "_name_or_path", "") or ""), type(model).__name__, int(info.hidden_size),
                   int(info.num_layers), str(info.path))


class HiddenStateProbe(HarmClassifier):
    """Logistic probe on one decoder layer of the wrapped model itself; P(unsafe) per answer.

    Offline (``predict``/``fit``) it teacher-forces (query, response) pairs, one forward per batch;
    inside :class:`~guardrails.defenses.protector.Protector` it reads the activations the answer's
    own generation produced (:meth:`capture`), so screening costs no extra forward.

    ``bind(model, processor)`` attaches it to a model (the constructor does when given one) and
    checks that the model matches what the probe was fitted on (hidden size, layer count).
    """

    name = "hidden-state-probe"
    version = "1"

    def __init__(self, model: Any = None, processor: Any = None, *, layer: int, pooling: Pooling = HiddenProbeConfig.pooling,
                 layers_path: str | None = HiddenProbeConfig.layers_path, C: float = HiddenProbeConfig.C,
                 class_weight: Literal["balanced"] | None = HiddenProbeConfig.class_weight, max_iter: int = HiddenProbeConfig.max_iter,
                 batch_size: int = HiddenProbeConfig.batch_size, name: str | None = None):
        self.config = HiddenProbeConfig(layer=layer, pooling=pooling, C=C, class_weight=class_weight, max_iter=max_iter,
                                        batch_size=batch_size, layers_path=layers_path)
        if name is not None:
            self.name = name
        self.head: _Head | None = None
        #: the model the head was fitted on (None until fit or load)
        self.signature: _Signature | None = None
        self.metadata: dict[str, Any] = {}
        self.model: Any = None
        self.engine: Any = None
        self.layer_index: int | None = None
        self._info: Any = None
        if model is not None:
            self.bind(model, processor)
        elif processor is not None:
            raise ValueError("processor given without a model; pass HiddenStateProbe(model, processor, layer=...)")

    # -- binding -------------------------------------------------------------------------------
    def bind(self, model: Any, processor: Any = None) -> HiddenStateProbe:
        """Attach to ``model`` (and its processor, needed for teacher forcing); returns self.

        Raises ValueError when the model's hidden size or decoder layer count differs from the
        model the probe was fitted on; warns when only the recorded model name differs.
        """
        info, index, mismatch = self._match(model)
        if mismatch:
            warnings.warn(mismatch, stacklevel=2)
        self.model, self._info, self.layer_index = model, info, index
        if processor is not None:
            from guardrails.engine import Engine

            self.engine = Engine(model, processor)
        return self

    def check(self, model: Any) -> None:
        """Raise as :meth:`bind` would for ``model``, without binding (a wrap-time check)."""
        self._match(model)

    def _match(self, model: Any) -> tuple[Any, int, str | None]:
        """(layer info, layer index, name-mismatch warning) for ``model``; raises when it does not fit."""
        from steering.layers import find_decoder_layers

        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"a HiddenStateProbe reads a torch model's activations; got {type(model).__name__}")
        info = find_decoder_layers(model, self.config.layers_path)
        sig = _Signature.of(model, info)
        want = self.signature
        mismatch = None
        if want is not None:
            if sig.hidden_size != want.hidden_size or sig.num_layers != want.num_layers:
                raise ValueError(
                    f"this probe was fitted on {want.model_class} {want.name!r} (hidden size {want.hidden_size}, "
                    f"{want.num_layers} decoder layers) but {sig.model_class} has hidden size {sig.hidden_size} and "
                    f"{sig.num_layers} layers; fit a probe on this model (HiddenStateProbe(model, processor, layer=...).fit(...))"
                )
            if want.name and sig.name and want.name != sig.name:
                mismatch = (f"HiddenStateProbe was fitted on {want.name!r} and is now bound to {sig.name!r} "
                            "(same shapes); its scores mean nothing unless the weights are the same")
        layer = self.config.layer
        if not -info.num_layers <= layer < info.num_layers:
            raise ValueError(f"layer={layer} is out of range: {sig.model_class} has {info.num_layers} decoder layers "
                             f"(at {info.path}); use 0..{info.num_layers - 1} or a negative index")
        index = layer % info.num_layers
        if want is not None and self.metadata.get("layer") is not None and index != self.metadata["layer"]:
            raise ValueError(f"layer {index} differs from the layer the head was fitted on ({self.metadata['layer']})")
        return info, index, mismatch

    def _require_bound(self, engine: Any = None) -> Any:
        if self.model is None:
            raise RuntimeError("this HiddenStateProbe is not bound to a model: call probe.bind(model, processor) "
                               "(Protector.bind does it when wrap() is called)")
        engine = engine or self.engine
        if engine is None:
            raise RuntimeError("teacher forcing needs the model's processor or tokenizer: probe.bind(model, processor)")
        calls = ModelCalls.of(engine)
        assert calls is not None  # engine is not None
        if calls.model is not self.model:
            raise ValueError("the engine given belongs to another model than the one this probe is bound to")
        return calls

    @property
    def layer_module(self) -> torch.nn.Module:
        """The decoder layer whose output is read (bound probes only)."""
        if self.model is None:
            raise RuntimeError("this HiddenStateProbe is not bound to a model: call probe.bind(model, processor)")
        return self._info[self.layer_index]

    @property
    def layer_desc(self) -> str:
        return f"{self._info.path}[{self.layer_index}]" if self._info is not None else f"layer {self.config.layer}"

    # -- features ------------------------------------------------------------------------------
    @contextlib.contextmanager
    def capture(self, batch: int, stop_ids: Collection[int], scope: Any = None) -> Iterator[HiddenCapture]:
        """A :class:`HiddenCapture` whose hook is installed for the block and removed after it; with
        ``scope`` (a call context) it records only that call's forwards."""
        if self.model is None:
            raise RuntimeError("bind the probe to the model first: probe.bind(model, processor)")
        from steering.layers import layer_device

        layer = self._info[self.layer_index]
        cap = HiddenCapture(batch, self._info.hidden_size, layer_device(layer), stop_ids, self.layer_desc)
        handle = layer.register_forward_hook(cap.hook if scope is None else scoped_hook(scope, cap.hook))
        try:
            yield cap
        finally:
            handle.remove()

    def pooled(self, conversations: Sequence[Any], response_ids: Sequence[Sequence[int]], *,
               engine: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher-forced (features [n, H] float32, answer-token counts [n]): one forward per batch.

        Each row is the conversation's prompt (chat template, generation prompt) followed by its
        response ids; rows are right-padded so every real token keeps the position it has unpadded
        (which is what left-padded ``generate`` reproduces from the attention mask).
        """
        engine = self._require_bound(engine)
        if len(conversations) != len(response_ids):
            raise ValueError(f"got {len(conversations)} conversations but {len(response_ids)} responses")
        feats, counts = [], []
        bs = self.config.batch_size
        for s in range(0, len(conversations), bs):
            f, c = self._pooled_batch(engine, list(conversations[s:s + bs]), [list(r) for r in response_ids[s:s + bs]])
            feats.append(f)
            counts.append(c)
        if not feats:
            return torch.zeros(0, self._info.hidden_size), torch.zeros(0, dtype=torch.long)
        return torch.cat(feats), torch.cat(counts)

    def _pooled_batch(self, calls: ModelCalls, convs: list[Any], responses: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        enc = calls.engine.encode(convs)
        ids, am = enc["input_ids"], enc["attention_mask"]
        for k, v in enc.items():
            if k not in ("input_ids", *_PER_TOKEN) and isinstance(v, torch.Tensor) and v.dim() == 2 and v.shape == ids.shape:
                raise NotImplementedError(f"the processor returned a per-token input {k!r} that teacher forcing does not know "
                                          "how to extend over the response; report it with the model class")
        pad = getattr(calls.engine.tokenizer, "pad_token_id", None)
        pad = 0 if pad is None else int(pad)
        rows, starts = [], []
        for b in range(ids.shape[0]):
            real = am[b].bool()
            prompt = ids[b][real]
            # The state at the last answer token is never needed (it would choose the token after the answer).
            resp_t = torch.tensor(responses[b][:-1], dtype=ids.dtype, device=ids.device)
            rows.append((real, torch.cat([prompt, resp_t])))
            starts.append(int(prompt.shape[0]) - 1)
        T = max(int(seq.shape[0]) for _, seq in rows)
        inputs: dict[str, Any] = {k: v for k, v in enc.items() if k not in ("input_ids", *_PER_TOKEN)}
        new_ids = torch.full((len(rows), T), pad, dtype=ids.dtype, device=ids.device)
        new_am = torch.zeros((len(rows), T), dtype=am.dtype, device=am.device)
        extra = {k: torch.zeros((len(rows), T), dtype=enc[k].dtype, device=enc[k].device)
                 for k in _PER_TOKEN[1:] if isinstance(enc.get(k), torch.Tensor)}
        for b, (real, seq) in enumerate(rows):
            n = seq.shape[0]
            new_ids[b, :n] = seq
            new_am[b, :n] = 1
            for k, t in extra.items():
                p = enc[k][b][real]  # response tokens are text: type 0
                t[b, : p.shape[0]] = p
        box: dict[str, torch.Tensor] = {}

        def hook(module: torch.nn.Module, args: Any, output: Any) -> None:
            box["h"] = _hidden_of(output).detach()

        layer = self._info[self.layer_index]
        handle = layer.register_forward_hook(calls.scoped(hook))
        try:
            with calls.using():
                self.model(input_ids=new_ids, attention_mask=new_am, **extra, **inputs, use_cache=False)
        finally:
            handle.remove()
        h = box["h"].float()
        feats = torch.zeros(len(rows), h.shape[-1], dtype=torch.float32, device=h.device)
        counts = torch.zeros(len(rows), dtype=torch.long)
        for b, resp in enumerate(responses):
            n = len(resp)
            if n == 0:
                continue  # no answer positions: zero features, count 0 (scored as empty)
            span = h[b, starts[b]: starts[b] + n]
            feats[b] = span.mean(0) if self.config.pooling == "mean" else span[-1]
            counts[b] = n
        return feats, counts

    def features(self, queries: Sequence[str | Any | None], responses: Sequence[str] | None = None, *,
                 response_ids: Sequence[Sequence[int]] | None = None, engine: Any = None) -> np.ndarray:
        """Teacher-forced pooled features, float32 (n, hidden size).

        ``queries``: a string (one user turn), a conversation (list of messages, images allowed)
        or None (an empty user turn). Give ``responses`` as text (tokenized without special
        tokens) or ``response_ids`` as token ids, not both.
        """
        engine = self._require_bound(engine)
        convs = [_conversation(q, i) for i, q in enumerate(queries)]
        ids = self._response_ids(engine.engine, responses, response_ids, len(convs))
        return self.pooled(convs, ids, engine=engine)[0].cpu().numpy()

    @staticmethod
    def _response_ids(engine: Any, responses: Sequence[str] | None, response_ids: Any, n: int) -> list[list[int]]:
        if (responses is None) == (response_ids is None):
            raise ValueError("give either responses (texts) or response_ids (token ids)")
        if response_ids is not None:
            out = [list(map(int, r)) for r in response_ids]
        else:
            if isinstance(responses, str):
                raise TypeError("responses must be a list of strings, not one string")
            assert responses is not None  # exactly one of the two is given (checked above)
            with tokenizer_lock(engine.tokenizer):
                out = [engine.tokenizer.encode(r, add_special_tokens=False) for r in responses]
        if len(out) != n:
            raise ValueError(f"got {n} queries but {len(out)} responses")
        return out

    # -- training --------------------------------------------------------------------------------
    def fit(self, queries: Sequence[str | Any | None], responses: Sequence[str] | None, labels: Sequence[int], *,
            response_ids: Sequence[Sequence[int]] | None = None, training_data: str | dict[str, Any] | None = None,
            engine: Any = None) -> HiddenStateProbe:
        """Fit the logistic head on labelled (query, response) pairs (1 = unsafe, 0 = safe); returns self.

        ``training_data`` (a description or a JSON-able dict: source, license, split) goes into the manifest.
        """
        from sklearn.linear_model import LogisticRegression

        y = np.asarray([int(v) for v in labels])
        if len(y) != len(queries):
            raise ValueError(f"got {len(queries)} queries but {len(y)} labels")
        if not set(y.tolist()) <= {0, 1}:
            raise ValueError("labels must be 0 (safe) or 1 (unsafe)")
        if len(set(y.tolist())) < 2:
            raise ValueError("labels hold a single class; a probe needs both safe (0) and unsafe (1) examples")
        try:
            json.dumps(training_data)
        except TypeError as e:
            raise TypeError(f"training_data must be a string or a JSON-serialisable dict ({e})") from None
        X = self.features(queries, responses, response_ids=response_ids, engine=engine).astype(np.float64)
        mean, scale = X.mean(0), X.std(0)
        scale = np.where(scale > 1e-8, scale, 1.0)  # constant features stay as they are, never divide by 0
        c = self.config
        clf = LogisticRegression(C=c.C, class_weight=c.class_weight, max_iter=c.max_iter)
        clf.fit((X - mean) / scale, y)
        self.head = _Head(clf.coef_[0], float(clf.intercept_[0]), mean, scale)
        self.signature = _Signature.of(self.model, self._info)
        self.metadata = {
            "layer": self.layer_index,
            "training_data": training_data if training_data is not None else "not recorded (pass training_data= to fit)",
            "n_train": int(len(y)),
            "n_train_unsafe": int(y.sum()),
            "train_accuracy": float(clf.score((X - mean) / scale, y)),
        }
        return self

    # -- scoring ---------------------------------------------------------------------------------
    def proba(self, features: torch.Tensor, counts: torch.Tensor) -> list[float | None]:
        """P(unsafe) per pooled feature row; None where the answer is empty (no positions to pool)."""
        if self.head is None:
            raise RuntimeError("this probe has no head yet: call fit(...) or HiddenStateProbe.load(dir)")
        p = self.head.proba(features).cpu().tolist()
        return [None if int(c) == 0 else float(x) for x, c in zip(p, counts.tolist())]

    def score_pooled(self, features: torch.Tensor, counts: torch.Tensor) -> list[HarmScore]:
        """HarmScores from pooled features (from :meth:`capture` or :meth:`pooled`); empty answers score 0."""
        out = []
        for p, n in zip(self.proba(features, counts), counts.tolist()):
            detail: dict[str, Any] = {"layer": self.layer_index, "pooling": self.config.pooling, "n_tokens": int(n)}
            if p is None:
                detail["empty"] = "no answer tokens: nothing to score"
            out.append(HarmScore(0.0 if p is None else p, detail=detail))
        return out

    def score_conversations(self, conversations: Sequence[Any], responses: Sequence[str], *, engine: Any = None) -> list[HarmScore]:
        """Teacher-forced scores of ``responses`` as answers to full ``conversations`` (images included)."""
        engine = self._require_bound(engine)
        ids = self._response_ids(engine.engine, responses, None, len(conversations))
        return self.score_pooled(*self.pooled(list(conversations), ids, engine=engine))

    def _predict(self, texts: list[str], queries: list[str | None] | None) -> list[HarmScore]:
        if self.head is None:
            raise RuntimeError("this probe has no head yet: call fit(...) or HiddenStateProbe.load(dir)")
        qs = queries if queries is not None else [None] * len(texts)
        return self.score_conversations([_conversation(q, i) for i, q in enumerate(qs)], texts)

    def describe(self) -> dict[str, str]:
        return {**super().describe(), "layer": str(self.layer_index if self.layer_index is not None else self.config.layer),
                "pooling": self.config.pooling}

    # -- persistence -----------------------------------------------------------------------------
    def manifest(self) -> dict[str, Any]:
        if self.head is None or self.signature is None:
            raise RuntimeError("nothing to describe: fit the probe first")
        c = self.config
        return {
            "format_version": FORMAT_VERSION,
            "kind": KIND,
            "name": self.name,
            "library_version": _library_version(),
            "model": asdict(self.signature),
            "layer": self.metadata["layer"],
            "pooling": c.pooling,
            "features": FEATURES,
            "fit": {"C": c.C, "class_weight": c.class_weight, "max_iter": c.max_iter, "standardize": True,
                    "estimator": "sklearn.linear_model.LogisticRegression"},
            "batch_size": c.batch_size,
            "config": c.to_dict(),  # what load() reads; the keys above stay for readers of format 1
            "head_file": HEAD_FILE,
            "n_features": self.head.n_features,
            **{k: v for k, v in self.metadata.items() if k != "layer"},
        }

    def save(self, directory: str | os.PathLike) -> Path:
        """Write ``head.safetensors`` + ``manifest.json`` (with the head's sha256); returns the folder."""
        man = self.manifest()
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        save_tensors(self.head.tensors(), d / HEAD_FILE)  # type: ignore[union-attr]
        man["head_sha256"] = sha256_file(d / HEAD_FILE)
        write_json(d / MANIFEST, man, indent=1)
        return d

    @classmethod
    def load(cls, directory: str | os.PathLike, model: Any = None, processor: Any = None) -> HiddenStateProbe:
        """Load a saved probe; bound to ``model`` when given (checked against the manifest), else unbound."""
        with naming(directory):
            man, tensors = read_probe_dir(directory)
            if man.get("kind") != KIND:
                raise ValueError(f"{directory} holds a {man.get('kind')!r}, not a {KIND}")
            head_path = Path(directory) / man.get("head_file", HEAD_FILE)
            fit = man.get("fit", {})
            sig = _Signature(**man["model"])
            # The layer as resolved at fit time (the config may count from the end).
            fixed = {"layer": int(man["layer"]), "layers_path": sig.layers_path}
            if "config" in man:
                cfg = HiddenProbeConfig.from_dict({**man["config"], **fixed})
            else:  # saved before the config was recorded: read the format-1 keys
                legacy = {k: fit[k] for k in ("C", "class_weight", "max_iter") if k in fit}
                legacy.update({k: man[k] for k in ("pooling", "batch_size") if k in man})
                cfg = HiddenProbeConfig.from_dict({**legacy, **fixed})
            probe = cls(layer=cfg.layer, name=man.get("name"))
            probe.config = cfg
            probe.head = _Head.from_tensors(tensors)
            check_n_features(directory, man.get("n_features"), probe.head.n_features, "the head")
            if probe.head.n_features != sig.hidden_size:
                raise ValueError(f"{head_path} has {probe.head.n_features} weights but the manifest says hidden size {sig.hidden_size}")
            probe.signature = sig
            skip = {"format_version", "kind", "name", "library_version", "model", "pooling", "features", "fit", "batch_size",
                    "config", "head_file", "n_features", "head_sha256"}
            probe.metadata = {k: v for k, v in man.items() if k not in skip}
            if model is not None:
                probe.bind(model, processor)
            return probe


def _conversation(query: Any, i: int) -> list[dict[str, Any]]:
    """A query as the conversation whose answer is scored: str -> one user turn, None -> an empty one."""
    from guardrails import conversation as conv_mod

    if query is None:
        return conv_mod.validate([{"role": "user", "content": ""}], i)
    if isinstance(query, str):
        return conv_mod.validate([{"role": "user", "content": query}], i)
    if isinstance(query, (list, tuple)):
        return conv_mod.validate(query, i)
    raise TypeError(f"queries[{i}] is {type(query).__name__}; give a string, a conversation (list of messages) or None")
