"""InferAligner: add safety steering vectors to flagged rows while they generate (Wang et al. 2024).

Algorithm (DESIGN.md 3.3, arXiv 2401.11206): per row, a guidance gate ``g`` is decided once from
the prefill, the projection of the wrapped (target) model's last-prompt-token activation at the gate
layer onto a unit direction, plus a bias (the paper's direction is the target's own safety vector;
``steering.calibrate_gate(method="logistic")`` fits one, which separates harm where the vector
follows prompt style: benchmarks/RESULTS.md); then at the output of every steered
decoder layer, at all positions, ``x_l <- x_l + alpha * g * theta_l``. ``theta`` are safety steering
vectors, taken from an aligned model of the same architecture ("cross-model guidance") or from the
target itself. The hooks are :func:`steering.steer`; this module adapts them into a during-stage
defense, so it works in ``chat`` (batched, left-padded), ``stream`` and ``generate(**inputs)``.

>>> sv = SteeringVectors.load("vectors/aligned")            # theta from the aligned model
>>> gate = Gate.load("gates/target")                        # calibrated on the target's own vectors
>>> guarded = wrap(target, tokenizer, defenses=[InferAligner(sv, gate, alpha=4.0, layers=[8, 9, 10])])
>>> guarded.chat(conversation).verdicts_of("InferAligner")[0].action      # "steer" or "pass"

Mixed batches cost nothing extra: the gate is a ``[B, 1, 1]`` tensor, un-gated rows add exact
zeros (their tokens equal the bare model's). Compiled models and static caches are refused at
``wrap()`` and again at each call (compiled graphs can skip Python hooks, or keep their effect
after removal). Another defense that runs the same model inside the same generate call (e.g. in a
logits processor) would see the steering hooks too.
"""

from __future__ import annotations

import contextlib
import math
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal, cast, get_args

from guardrails._compat import STATIC_CACHE_IMPLEMENTATIONS, get_cache, is_static_cache
from guardrails.config import Config
from guardrails.defense import CallContext, Defense, Row
from guardrails.results import Verdict
from steering import Gate, SteeringVectors, check_steerable, find_decoder_layers, steer
from steering.extract import template_hashes

#: where the gate comes from, as resolved in the config ("auto" in ``__init__`` picks one of these)
GateSource = Literal["given", "vectors", "none"]
GATE_SOURCES: tuple[str, ...] = ("auto", *get_args(GateSource))
Scale = Literal["absolute", "relative"]
Positions = Literal["all", "generated"]

_HOOKS_FILE = os.path.join("steering", "hooks.py")


#: calibrated vectors + gate shipped per fetched model (see the README in each folder)
PRESET_DIR = Path(__file__).resolve().parent / "presets" / "inferaligner"


def presets() -> list[str]:
    """Names of the models with a shipped InferAligner calibration."""
    return sorted(p.name for p in PRESET_DIR.glob("*") if (p / "manifest.json").is_file()) if PRESET_DIR.is_dir() else []


def _short(h: str | None) -> str | None:
    return None if h is None else h[:12]


@dataclass(frozen=True)
class InferAlignerConfig(Config):
    """Validated settings; see :class:`InferAligner`.

    ``alpha_origin`` / ``layers_origin`` say where the values came from ("argument", "manifest"
    when recorded in the vectors' manifest ``extra``, or "default").
    """

    alpha: float
    layers: tuple[int, ...]
    gate_source: GateSource
    strict_template: bool = True
    path: str | None = None
    alpha_origin: str = "argument"
    layers_origin: str = "argument"
    #: "absolute" adds alpha * theta_l (the paper); "relative" measures alpha against each layer's
    #: activation norm and splits it over the steered layers (steering.hooks.addends says why)
    scale: Scale = "absolute"
    #: "all" positions (the paper) or "generated" (last prompt position and the answer only)
    positions: Positions = "all"

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not math.isfinite(self.alpha):
            raise ValueError(f"alpha must be a finite number, got {self.alpha!r}")
        if self.alpha == 0:
            raise ValueError("alpha=0 steers nothing; give the strength (e.g. alpha=4.0) or leave InferAligner out")
        object.__setattr__(self, "alpha", float(self.alpha))
        if not self.layers:
            raise ValueError("no layers to steer; pass layers= with at least one layer the vectors cover")
        if not isinstance(self.strict_template, bool):
            raise TypeError(f"strict_template must be True or False, got {self.strict_template!r}")


def parse_layers(value: Any) -> list[int] | None:
    """Layers from Python or a spec string: ``3``, ``[8, 9]``, ``"8;9;10"``, ``"8-10"`` (inclusive), ``"all"``/None.

    Spec strings separate options with commas, so lists there use ``;`` or a ``-`` range.
    """
    if value is None or value == "all":
        return None
    if isinstance(value, bool):
        raise TypeError(f"layers must be layer indices, got {value!r}")
    if isinstance(value, int):
        return [value]
    if isinstance(value, str):
        out: list[int] = []
        for part in filter(None, (p.strip() for p in value.replace(";", " ").split())):
            lo, dash, hi = part.partition("-")
            try:
                out.extend(range(int(lo), int(hi) + 1) if dash else [int(lo)])
            except ValueError:
                raise ValueError(f"cannot read layers {value!r}: use '8;9;10', '8-10' or 'all'") from None
        if not out:
            raise ValueError(f"layers {value!r} names no layer; use '8;9;10', '8-10' or 'all'")
        return out
    if isinstance(value, Sequence):
        if not all(isinstance(i, int) and not isinstance(i, bool) for i in value):
            raise TypeError(f"layers must be integers, got {list(value)!r}")
        return [int(i) for i in value]
    raise TypeError(f"layers must be an int, a list of ints or a string like '8;9;10', got {type(value).__name__}")


class InferAligner(Defense):
    """Gated safety steering during generation (during stage only; works in chat, stream and generate).

    - ``vectors``: :class:`steering.SteeringVectors` (theta per layer). From an aligned model of the
      same architecture (hidden size and layer count are checked at ``wrap()``; a different model
      class or name is allowed and noted) or from the wrapped model itself.
    - ``gate``: a :class:`steering.Gate` calibrated on the wrapped model's own safety vector
      (``steering.calibrate_gate_from_prompts(target, ...)``). With ``gate=None``, ``gate_source``
      decides: "vectors" uses the gate saved with the vectors, "none" steers every row (an
      un-gated activation addition). "auto" (default): the given gate, else the vectors' gate,
      else an error naming both options.
    - ``alpha``: strength; ``None`` takes ``manifest.extra["alpha"]`` when calibration recorded
      one, else 1.0 (mean-difference vectors: one harmful-minus-harmless mean shift).
    - ``layers``: which of the vectors' layers to steer; ``None`` takes ``manifest.extra["layers"]``
      when recorded, else every layer the vectors cover.
    - ``scale`` / ``positions``: how alpha is measured and where it is added; ``None`` takes what the
      calibration recorded (``python -m steering calibrate``), else the paper's "absolute" / "all".
      The paper's variant adds ``alpha * theta_l`` at every layer and position; on real models that
      swamps the residual stream (see ``steering.hooks.addends``): calibrate, which picks a
      "relative" scale on "generated" positions at measured layers.
    - ``strict_template``: refuse (True) or warn about (False) a chat template whose hash differs
      from the one the vectors or the gate were computed with (checked at the first call).
    - ``path``: the decoder-layer path when auto-detection fails (as ``wrap(layers_path=)``).

    Verdict per row (stage "during"): ``flagged`` = the gate fired, ``score`` = the projection onto
    the gate direction, ``threshold`` = the projection above which it fires, ``action`` "steer" or
    "pass"; ``detail`` holds alpha, the steered layers, gate layer and mode, vector and gate sources
    (model names), and the chat-template hashes.
    """

    needs_hidden_states: ClassVar[bool] = True

    def __init__(self, vectors: SteeringVectors, gate: Gate | None = None, alpha: float | None = None,
                 layers: Sequence[int] | int | str | None = None, gate_source: str = "auto", *,
                 scale: Scale | None = None, positions: Positions | None = None,
                 strict_template: bool = InferAlignerConfig.strict_template, path: str | None = InferAlignerConfig.path,
                 name: str | None = None):
        super().__init__(name)
        if not isinstance(vectors, SteeringVectors):
            raise TypeError(f"vectors must be steering.SteeringVectors (e.g. SteeringVectors.load(DIR)), "
                            f"got {type(vectors).__name__}")
        if gate is not None and not isinstance(gate, Gate):
            raise TypeError(f"gate must be a steering.Gate (e.g. Gate.load(DIR)) or None, got {type(gate).__name__}")
        if gate_source not in GATE_SOURCES:
            raise ValueError(f"gate_source must be one of {GATE_SOURCES}, got {gate_source!r}")
        if gate_source == "auto":
            gate_source = "given" if gate is not None else "vectors" if vectors.gate is not None else ""
            if not gate_source:
                raise ValueError("InferAligner has no gate: pass gate=Gate.load(DIR) (calibrated on the wrapped "
                                 "model), save the vectors with a gate attached, or pass gate_source='none' to steer "
                                 "every row")
        elif gate_source == "given" and gate is None:
            raise ValueError("gate_source='given' needs gate=...")
        elif gate_source == "vectors":
            if gate is not None:
                raise ValueError("gate_source='vectors' uses the vectors' own gate; do not also pass gate=")
            if vectors.gate is None:
                raise ValueError("gate_source='vectors' but these vectors carry no gate; pass gate=... instead")
        elif gate_source == "none" and gate is not None:
            raise ValueError("gate_source='none' steers every row; do not also pass gate= (or drop gate_source)")
        self.vectors = vectors
        self.gate: Gate | None = gate if gate_source == "given" else vectors.gate if gate_source == "vectors" else None
        if self.gate is not None and self.gate.hidden_size != vectors.manifest.hidden_size:
            raise ValueError(f"{self.name}: hidden size {self.gate.hidden_size} in gate vs "
                             f"{vectors.manifest.hidden_size} in vectors; both must come from the same architecture")
        extra = vectors.manifest.extra or {}
        alpha_origin = "argument"
        if alpha is None:
            alpha, alpha_origin = (extra["alpha"], "manifest") if "alpha" in extra else (1.0, "default")
        layers_origin = "argument"
        chosen = parse_layers(layers)
        if chosen is None:
            recorded = parse_layers(extra["layers"]) if extra.get("layers") else None
            chosen, layers_origin = (recorded, "manifest") if recorded is not None else (vectors.layers, "default")
        missing = sorted(set(chosen) - set(vectors.layers))
        if missing:
            raise ValueError(f"{self.name}: no steering vector for layers {missing}; "
                             f"the vectors cover {vectors.layers}")
        # Scale and positions follow the recorded calibration when not given (the paper's otherwise):
        # an alpha calibrated as "relative" means something else as "absolute".
        scale = scale if scale is not None else extra.get("scale", InferAlignerConfig.scale)
        positions = positions if positions is not None else extra.get("positions", InferAlignerConfig.positions)
        self.config = InferAlignerConfig(alpha=alpha, layers=tuple(sorted(set(chosen))),
                                         gate_source=cast(GateSource, gate_source),  # "auto" resolved above
                                         strict_template=strict_template, path=path, alpha_origin=alpha_origin,
                                         layers_origin=layers_origin, scale=scale, positions=positions)
        self._template_checked: set[int] = set()
        self._notes: list[str] = []

    @classmethod
    def preset(cls, model: str, **options: Any) -> InferAligner:
        """The calibrated vectors and gate shipped for a fetched model (``PRESETS``), e.g.
        ``InferAligner.preset("qwen2.5-coder-0.5b-instruct")``; ``options`` override the recorded choice."""
        folder = PRESET_DIR / model
        if not (folder / "manifest.json").is_file():
            raise ValueError(f"no InferAligner preset for {model!r}; presets: {', '.join(presets()) or 'none'} "
                             "(or calibrate your own: python -m steering extract, then python -m steering calibrate)")
        return cls(SteeringVectors.load(folder), **options)

    @classmethod
    def from_spec(cls, vectors: str | None = None, gate: str | None = None, preset: str | None = None,
                  **options: Any) -> InferAligner:
        """Spec options: ``vectors=DIR`` or ``preset=MODEL`` (one is required), ``gate=DIR``, ``alpha=4``,
        ``layers=8;9;10`` or ``8-10``, ``scale=absolute|relative``, ``positions=all|generated``,
        ``gate_source=auto|vectors|none``, ``strict_template=false``, ``path=model.layers``.

        >>> build_defenses("inferaligner:vectors=runs/sv,gate=runs/gate,alpha=4,layers=2-5")
        >>> build_defenses("inferaligner:preset=qwen2.5-coder-0.5b-instruct")
        """
        if preset:
            if vectors or gate:
                raise ValueError("inferaligner takes preset=MODEL or vectors=DIR (and gate=DIR), not both")
            return cls.preset(preset, **options)
        if not vectors:
            raise ValueError("inferaligner needs vectors=DIR (a folder written by SteeringVectors.save or "
                             "`python -m steering extract`) or preset=MODEL (" + (", ".join(presets()) or "none shipped") + ")")
        # The vectors' gate is needed unless a gate is given or gate_source excludes it (absent: "auto").
        sv = SteeringVectors.load(Path(vectors), with_gate=gate is None and options.get("gate_source") not in ("given", "none"))
        g = Gate.load(Path(gate)) if gate else None
        return cls(sv, g, **options)

    # -- properties for reports ---------------------------------------------------------------
    @property
    def alpha(self) -> float:
        return self.config.alpha

    @property
    def layers(self) -> list[int]:
        return list(self.config.layers)

    @property
    def vector_source(self) -> str:
        m = self.vectors.manifest
        return m.name_or_path or m.model_class

    @property
    def gate_model(self) -> str | None:
        if self.gate is None:
            return None
        src = self.gate.source
        found = src.get("name_or_path") or src.get("model_class")
        return None if not found else str(found)  # a hand-made gate records no model

    # -- wrap-time checks ---------------------------------------------------------------------
    def check_model(self, model: Any, multimodal: bool) -> None:
        """Refuse a model the vectors or gate do not fit, or one that runs compiled."""
        super().check_model(model, multimodal)
        try:
            info = find_decoder_layers(model, self.config.path)
        except (ValueError, TypeError) as e:
            raise ValueError(f"{self.name}: {e} (InferAligner(..., path=...) takes the same path)") from None
        errors = []
        m = self.vectors.manifest
        src = f"vectors from {self.vector_source!r}"
        if m.hidden_size != info.hidden_size:
            errors.append(f"hidden size {m.hidden_size} in {src} vs {info.hidden_size} in {type(model).__name__}")
        if m.num_layers != info.num_layers:
            errors.append(f"{m.num_layers} decoder layers in {src} vs {info.num_layers} in {type(model).__name__}")
        if self.gate is not None:
            g = self.gate
            if g.hidden_size != info.hidden_size:
                errors.append(f"hidden size {g.hidden_size} in gate vs {info.hidden_size} in {type(model).__name__}")
            n = g.source.get("num_layers")
            if n is not None and n != info.num_layers:
                errors.append(f"{n} decoder layers in the gate's model {self.gate_model!r} vs {info.num_layers} in "
                              f"{type(model).__name__}")
            if g.layer >= info.num_layers:
                errors.append(f"gate layer {g.layer} but {type(model).__name__} has {info.num_layers} layers")
        if errors:
            raise ValueError(f"{self.name} does not fit {type(model).__name__}: " + "; ".join(errors)
                             + ". Cross-model guidance needs vectors from a model of the same architecture and size; "
                               "extract them again (python -m steering extract) or calibrate a gate on this model")
        try:
            check_steerable(model, [info.layers[i] for i in self.config.layers])
        except RuntimeError as e:
            raise RuntimeError(f"{self.name}: {e}") from None

    def bind(self, model: Any, engine: Any) -> None:
        """A new wrap: notes and template checks start over."""
        info = find_decoder_layers(model, self.config.path)  # check_model found them
        m = self.vectors.manifest
        self._notes, self._template_checked = [], set()
        if m.model_class and m.model_class != type(model).__name__:
            self._notes.append(f"vectors from {m.model_class}, applied to {type(model).__name__}")
        if m.layer_path and m.layer_path != info.path:
            self._notes.append(f"vectors read at {m.layer_path}, applied at {info.path}")

    def _check_template(self, ctx: CallContext) -> None:
        """Compare the chat-template hashes once per processor (check_model does not see the processor)."""
        processor = getattr(ctx.engine, "processor", None) if ctx.engine is not None else None
        if processor is None or id(processor) in self._template_checked:
            return
        have = template_hashes(processor)
        problems = []
        records = [("vectors", self.vectors.manifest.chat_template_sha256)]
        if self.gate is not None and "chat_template_sha256" in self.gate.source:
            records.append(("gate", self.gate.source.get("chat_template_sha256")))
        for what, recorded in records:
            if recorded is not None and have and recorded not in have:
                problems.append(f"the {what} were computed with chat template sha256 {recorded[:12]}, "
                                f"the wrapped model's is {sorted(h[:12] for h in have)}")
        if problems:
            msg = f"{self.name}: " + "; ".join(problems)
            if self.config.strict_template:
                raise ValueError(msg + ". Activations read under another prompt format do not transfer; extract "
                                       "with this template, or pass strict_template=False to accept it")
            warnings.warn(msg, stacklevel=4)
            self._notes.append(msg)
        self._template_checked.add(id(processor))

    def _check_call(self, ctx: CallContext) -> None:
        """Refuse a static/compiled cache asked for in this call's generate kwargs (before generate starts)."""
        kw = ctx.generate_kwargs
        model = ctx.engine.model if ctx.engine is not None else None
        gen = getattr(model, "generation_config", None)
        disabled = bool(getattr(gen, "disable_compile", False)) or bool(
            getattr(kw.get("generation_config"), "disable_compile", False))
        impl = kw.get("cache_implementation", getattr(kw.get("generation_config"), "cache_implementation", None))
        cache = get_cache(kw)
        if not disabled and impl in STATIC_CACHE_IMPLEMENTATIONS:
            raise RuntimeError(f"{self.name}: cache_implementation={impl!r} makes generate compile the decode step, "
                               "which can skip steering hooks; pass disable_compile=True in the generation config "
                               "or use the default dynamic cache")
        if self.config.positions == "generated":
            # steering.hooks tells prefill from decoding by the number of new positions in a forward.
            multi = [k for k in ("assistant_model", "prompt_lookup_num_tokens", "prefill_chunk_size") if kw.get(k)
                     or getattr(kw.get("generation_config"), k, None) or getattr(gen, k, None)]
            if multi:
                raise ValueError(f"{self.name}: positions='generated' cannot tell generated positions from prompt ones "
                                 f"when {multi[0]} is set (several positions per forward); use positions='all' or "
                                 "drop that option")
        if not disabled and is_static_cache(cache):
            raise RuntimeError(f"{self.name}: a {type(cache).__name__} (compileable static cache) was passed; generate "
                               "compiles the decode step with it, which can skip steering hooks; use a DynamicCache")
        if model is not None:
            try:
                check_steerable(model)
            except RuntimeError as e:
                raise RuntimeError(f"{self.name}: {e}") from None

    # -- the during stage -----------------------------------------------------------------------
    def _during(self, ctx: CallContext, stack: contextlib.ExitStack) -> None:
        model = ctx.engine.model
        self._check_template(ctx)
        self._check_call(ctx)
        # Registered before steer(): on exit it runs after the hooks are removed and names this
        # defense in errors that steering's forward-time checks raise from inside generate.
        stack.push(self._name_errors)
        handle = stack.enter_context(steer(model, self.vectors, alpha=self.config.alpha, gate=self.gate,
                                           layers=self.config.layers, path=self.config.path, when=ctx.is_active,
                                           scale=self.config.scale, positions=self.config.positions))
        ctx.state[self.name] = {"handle": handle}

    def _name_errors(self, exc_type: Any, exc: BaseException | None, tb: Any) -> bool:
        if exc is None or not isinstance(exc, (RuntimeError, ValueError)) or str(exc).startswith(self.name):
            return False
        last = tb
        while last is not None and last.tb_next is not None:
            last = last.tb_next
        if last is not None and last.tb_frame.f_code.co_filename.endswith(_HOOKS_FILE):
            raise type(exc)(f"{self.name}: {exc}") from exc
        return False

    def _during_verdicts(self, ctx: CallContext, rows: list[Row]) -> list[Verdict]:
        handle = ctx.state.get(self.name, {}).get("handle")
        base = {
            "alpha": self.config.alpha,
            "alpha_origin": self.config.alpha_origin,
            "scale": self.config.scale,
            "positions": self.config.positions,
            "layers": list(self.config.layers),
            "gate_source": self.config.gate_source,
            "gate_layer": self.gate.layer if self.gate is not None else None,
            "gate_model": self.gate_model,
            "vector_source": self.vector_source,
            "vectors_template_sha256": _short(self.vectors.manifest.chat_template_sha256),
            "gate_template_sha256": None if self.gate is None else _short(self.gate.source.get("chat_template_sha256")),
        }
        if handle is not None:
            base["gate_mode"] = handle.gate_mode
        if self._notes:
            base["notes"] = list(self._notes)
        n = len(rows)
        if self.gate is None:
            return [Verdict(flagged=False, action="steer", detail={**base, "gate": "none: every row steered"})
                    for _ in rows]
        threshold = self.gate.threshold
        values = None if handle is None else handle.gate_values
        scores = None if handle is None else handle.gate_scores
        if values is None or scores is None:  # no forward pass ran inside the call
            return [Verdict(flagged=False, action="pass", threshold=threshold,
                            detail={**base, "gate": "not decided: the model ran no forward pass"}) for _ in rows]
        values, scores = values.detach().float().cpu(), scores.detach().float().cpu()
        if values.numel() == 1 and n > 1:  # not expected with a Gate, but a scalar gate is one value for all rows
            values = values.expand(n)
        if values.numel() != n:
            # generate expands rows in place (num_return_sequences, beams): copies share their row's gate
            if values.numel() % n:
                raise RuntimeError(f"{self.name}: the gate has {values.numel()} rows for a batch of {n}")
            k = values.numel() // n
            values, scores = values.view(n, k)[:, 0], scores.view(n, k)[:, 0]
        # score: the projection onto the gate direction, so that flagged <=> score > threshold
        proj = (scores - self.gate.bias).tolist()
        out = []
        for i in range(n):
            fired = bool(values[i] > 0)
            out.append(Verdict(flagged=fired, score=proj[i], threshold=threshold, action="steer" if fired else "pass",
                               detail={**base, "gate_margin": float(scores[i])}))
        return out
