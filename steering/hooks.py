"""Install steering for exactly one call: ``x_l <- x_l + alpha * g * theta_l`` at every position.

>>> with steer(model, vectors, alpha=4.0, gate=gate) as handle:      # doctest: +SKIP
...     out = model.generate(**inputs, max_new_tokens=64)
>>> handle.gate_values      # [B] 1.0 where the row was steered      # doctest: +SKIP

The gate ``g`` can be
- ``None``: every row is steered (g = 1);
- a number or a ``[B]`` (or ``[B, 1, 1]``) tensor: fixed per row, e.g. from :func:`compute_gate`;
- a :class:`~steering.gate.Gate`: decided per row from the first forward pass inside the context
  (the prefill of ``generate``) and held for the rest of the context, whatever the cache does.

Layer ordering with a :class:`Gate`: when every steered layer is at or after the gate layer, one
hook on the gate layer reads the last prompt position during the prefill itself and the later
steered layers of the same forward use it (no extra cost). When a steered layer comes before the
gate layer, its prefill steering would need g before g exists; then the first forward runs a
*gate pre-pass* first: the model on the same inputs, without steering and without the KV cache,
stopped right after the gate layer. It costs (gate layer + 1) / num_layers of one prefill (plus the
vision tower again for image inputs), once per context, nothing per decoded token. Both modes give
the same g: it is always read from the unsteered activations at the gate layer.

Compiled execution is refused, because compiled graphs and CUDA graphs can skip Python hooks or keep
their effect after removal. What is detected, at install:
- ``model`` is a ``torch.compile`` wrapper (``OptimizedModule``), or ``model``, its decoder or a
  steered layer was compiled in place (``nn.Module.compile()``, i.e. ``_compiled_call_impl`` set),
  or its ``forward`` was replaced by a ``torch.compile``'d function;
- ``model.generation_config.cache_implementation`` names a static cache ("static",
  "offloaded_static", and the deprecated "sliding_window", "hybrid", ...) while
  ``generation_config.disable_compile`` is not True: transformers then compiles the decode step on
  GPU. Refused on CPU as well, so code tested on a laptop does not break on a GPU.
and at every forward pass inside the context:
- a KV cache (``cache``; ``past_key_values`` before transformers 5.24) that is compileable and not a
  ``DynamicCache`` (e.g. a ``StaticCache`` passed in, or ``generate(cache_implementation="static")``),
  again unless ``disable_compile``;
- the forward being traced by ``torch.compile`` (``torch.compiler.is_compiling()``): under
  ``fullgraph=True`` (transformers' default) the error surfaces as a torch._dynamo ``Unsupported``
  error that quotes this module's message; without fullgraph dynamo falls back to running the
  hook in Python, which steers correctly;
- CUDA graph capture on the current stream.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ._compat import STATIC_CACHE_IMPLEMENTATIONS, get_cache, is_static_cache, without_cache
from ._outputs import hidden_of, with_hidden
from .extract import read_last_token
from .gate import Gate
from .layers import LayerInfo, find_decoder_layers, layer_device, layer_dtype

__all__ = ["POSITIONS", "SCALES", "SteeringHandle", "activation_norms", "addends", "check_steerable", "compute_gate", "steer"]

_FIX = ("set model.generation_config.disable_compile = True (or cache_implementation = 'dynamic'); "
        "steering needs eager execution because compiled graphs can skip Python hooks")


def _is_compiled_function(fn: Any) -> bool:
    return getattr(fn, "_torchdynamo_orig_callable", None) is not None


def _compile_disabled(model: nn.Module) -> bool:
    gen = getattr(model, "generation_config", None)
    return bool(getattr(gen, "disable_compile", False))


def check_steerable(model: nn.Module, modules: Sequence[nn.Module] = ()) -> None:
    """Raise RuntimeError when ``model`` is set up to run compiled, where hooks can be skipped.

    ``modules``: further submodules (decoder, steered layers) to check for in-place compilation.
    The exact rules are in this module's docstring.
    """
    name = type(model).__name__
    optimized = getattr(getattr(torch, "_dynamo", None), "eval_frame", None)
    optimized_cls = getattr(optimized, "OptimizedModule", None)
    if optimized_cls is not None and isinstance(model, optimized_cls):
        raise RuntimeError(f"cannot steer a torch.compile'd model ({type(model._orig_mod).__name__} wrapped in "
                           "OptimizedModule): pass the original module (compiled._orig_mod) and do not compile it")
    for m in (model, *modules):
        if getattr(m, "_compiled_call_impl", None) is not None:
            raise RuntimeError(f"cannot steer {name}: {type(m).__name__} was compiled in place with .compile(); "
                               "load the model again without compiling it")
        forward = m.__dict__.get("forward") or m.__dict__.get("__call__")
        if forward is not None and _is_compiled_function(forward):
            raise RuntimeError(f"cannot steer {name}: {type(m).__name__}.forward was replaced by a torch.compile'd "
                               "function; restore the original forward")
    gen = getattr(model, "generation_config", None)
    impl = getattr(gen, "cache_implementation", None)
    if impl in STATIC_CACHE_IMPLEMENTATIONS and not _compile_disabled(model):
        raise RuntimeError(f"cannot steer {name}: generation_config.cache_implementation={impl!r} makes generate "
                           f"compile the decode step; {_FIX}")


def _runtime_check(model: nn.Module, kwargs: Mapping[str, Any], cuda: bool) -> None:
    if torch.compiler.is_compiling():
        raise RuntimeError(f"steering hooks are being traced by torch.compile ({type(model).__name__}); {_FIX}")
    if cuda and torch.cuda.is_current_stream_capturing():
        raise RuntimeError("steering hooks ran during CUDA graph capture; a replayed graph would keep or skip them. "
                           "Generate without CUDA graphs while steering")
    cache = get_cache(kwargs)
    if is_static_cache(cache) and not _compile_disabled(model):
        raise RuntimeError(f"cannot steer with a {type(cache).__name__} (a compileable static cache): generate "
                           f"compiles the decode step with it; {_FIX}")


def _as_gate_tensor(gate: Any) -> torch.Tensor:
    g = torch.as_tensor(gate).detach().float()
    if g.dim() == 0:
        return g.reshape(1)
    if g.dim() == 3 and g.shape[1:] == (1, 1):
        g = g[:, 0, 0]
    elif g.dim() == 2 and g.shape[1] == 1:
        g = g[:, 0]
    if g.dim() != 1:
        raise ValueError(f"gate must be a number, a [B] or a [B, 1, 1] tensor, got shape {tuple(g.shape)}")
    if not bool(torch.isfinite(g).all()):
        raise ValueError("gate values must be finite")
    return g


def compute_gate(model: nn.Module, gate: Gate, inputs: Mapping[str, Any], *, path: str | None = None,
                 info: LayerInfo | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scores, g)``, both ``[B]`` float32, from a forward pass stopped after the gate layer.

    ``inputs`` are model inputs (on the model's device) whose rows end at their last prompt token
    (left padding); the attention mask locates that token. Runs without cache and without
    gradients; costs (gate layer + 1) / num_layers of a full forward. Use it to decide the gate
    before ``generate`` (e.g. to skip steering when no row is flagged), then pass ``g`` to :func:`steer`.
    """
    info = info or find_decoder_layers(model, path)
    if gate.layer >= info.num_layers:
        raise ValueError(f"gate layer {gate.layer} is out of range: {type(model).__name__} has {info.num_layers} layers")
    clean = without_cache(inputs, "use_cache")  # the gate reads; it never writes the caller's cache
    with torch.no_grad():
        acts = read_last_token(model, clean, [gate.layer], info)[gate.layer]
    scores = gate.score(acts)
    return scores, (scores > 0).float()


@dataclass
class SteeringHandle:
    """What :func:`steer` yields: the installed layers and, once known, the per-row gate.

    ``gate_values`` is the ``[B]`` g actually used (None until the first forward pass when the gate
    is a :class:`Gate`); ``gate_scores`` the raw gate scores (Gate only). ``gate_mode`` is "fixed",
    "prefill-hook" or "pre-pass" (see the module docstring). ``forward_calls`` counts forward passes.
    """

    layers: list[int]
    alpha: float
    gate_mode: str
    gate_values: torch.Tensor | None = None
    gate_scores: torch.Tensor | None = None
    forward_calls: int = 0
    notes: list[str] = field(default_factory=list)


class _Steerer:
    """The state behind one :func:`steer` context; hooks close over it."""

    def __init__(self, model: nn.Module, info: LayerInfo, addends: Mapping[int, torch.Tensor],
                 gate: Any, layers: list[int], handle: SteeringHandle, positions: str = "all") -> None:
        self.model, self.info, self.handle = model, info, handle
        self.layers = layers
        self.positions = positions
        self.bypass = False
        self.cuda = torch.cuda.is_available()  # asked once: the capture check runs every forward
        self.gate_obj: Gate | None = gate if isinstance(gate, Gate) else None
        # Each addend goes to its layer's device once, here (alpha folded in), kept fp32 until g is known.
        self.base = {i: addends[i].detach().float().to(layer_device(info.layers[i])) for i in layers}
        self.dtypes = {i: layer_dtype(info.layers[i]) for i in layers}
        # addend[i]: what layer i adds ([H] or [B, 1, H] in the layer's dtype); None = add nothing.
        self.addend: dict[int, torch.Tensor | None] = {}
        self.expanded: dict[tuple[int, int], torch.Tensor] = {}
        self.pending = self.gate_obj is not None
        if self.gate_obj is None:
            if gate is None:
                self.addend = {i: self.base[i].to(self.dtypes[i]) for i in layers}
                handle.gate_values = None
            else:
                self._set_gate(_as_gate_tensor(gate))
        else:
            self.gate_dir = self.gate_obj.direction.to(layer_device(info.layers[self.gate_obj.layer]))

    def _set_gate(self, g: torch.Tensor) -> None:
        self.handle.gate_values = g
        self.pending = False
        if not bool(g.any()):  # one sync per context: no row is steered, so the hooks add nothing
            self.addend = {i: None for i in self.layers}
            return
        per_device: dict[torch.device, torch.Tensor] = {}
        for i in self.layers:
            device = self.base[i].device
            gi = per_device.get(device)
            if gi is None:
                gi = per_device[device] = g.to(device)
            if gi.numel() == 1:
                self.addend[i] = (gi.reshape(()) * self.base[i]).to(self.dtypes[i])
            else:  # [B, 1, H]: one broadcast add per layer, no loop over rows
                self.addend[i] = (gi[:, None, None] * self.base[i]).to(self.dtypes[i])

    def _gate_from_hidden(self, hidden: torch.Tensor) -> None:
        assert self.gate_obj is not None
        scores = hidden[:, -1].float() @ self.gate_dir.to(hidden.device) + self.gate_obj.bias
        self.handle.gate_scores = scores
        self._set_gate((scores > 0).float())

    def _addend_for(self, i: int, hidden: torch.Tensor) -> torch.Tensor | None:
        add = self.addend.get(i)
        if add is None:
            return None
        if add.device != hidden.device or add.dtype != hidden.dtype:  # e.g. autocast: convert once, keep
            add = self.addend[i] = add.to(device=hidden.device, dtype=hidden.dtype)
        if add.dim() == 3 and add.shape[0] != hidden.shape[0]:
            rows, batch = add.shape[0], hidden.shape[0]
            if batch % rows:
                raise ValueError(f"the gate has {rows} rows but layer {i} saw a batch of {batch}; give one gate value "
                                 "per row, and open a new steer() context for each generate call")
            key = (i, batch)
            if key not in self.expanded:  # num_return_sequences / beams repeat each row in place
                self.expanded[key] = add.repeat_interleave(batch // rows, dim=0)
            add = self.expanded[key]
        return add

    # -- hooks ------------------------------------------------------------------------------

    def pre_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if self.bypass:
            return None
        _runtime_check(self.model, kwargs, self.cuda)
        self.handle.forward_calls += 1
        if self.pending:
            mask = kwargs.get("attention_mask")
            if isinstance(mask, torch.Tensor) and mask.dim() == 2 and not bool((mask[:, -1] != 0).all()):
                raise ValueError("the gate reads each row's last prompt position, but some rows end in padding: "
                                 "left-pad the batch (tokenizer.padding_side = 'left')")
            if self.handle.gate_mode == "pre-pass":
                inputs = dict(kwargs)
                if args:
                    inputs.setdefault("input_ids", args[0])
                self.bypass = True
                try:
                    scores, g = compute_gate(self.model, self.gate_obj, inputs, info=self.info)  # type: ignore[arg-type]
                finally:
                    self.bypass = False
                self.handle.gate_scores = scores
                self._set_gate(g)
        return None

    def layer_hook(self, i: int, steered: bool, reads_gate: bool):
        def hook(module: nn.Module, args: Any, output: Any) -> Any:
            if self.bypass:
                return None
            if reads_gate and self.pending:
                self._gate_from_hidden(hidden_of(output))  # before this layer's own steering
            if not steered:
                return None
            if self.pending:
                raise RuntimeError(f"layer {i} ran before the gate at layer {self.gate_obj.layer} was decided; "  # type: ignore[union-attr]
                                   "this is a bug in steering.hooks (please report it)")
            hidden = hidden_of(output)
            add = self._addend_for(i, hidden)
            if add is None:
                return None
            if self.positions == "generated" and hidden.shape[1] > 1:
                # Prefill: only the last prompt position (it produces the first answer token); the
                # prompt's own activations, and so its KV cache, stay those of the bare model.
                hidden = hidden.clone()
                hidden[:, -1:] += add if add.dim() == 3 else add.view(1, 1, -1)
                return with_hidden(output, hidden)
            return with_hidden(output, hidden + add)

        return hook


SCALES = ("absolute", "relative")
POSITIONS = ("all", "generated")


def activation_norms(vectors: Any) -> dict[int, float] | None:
    """Mean last-token activation norm per layer recorded at extraction, or None (older vectors)."""
    manifest = getattr(vectors, "manifest", None)
    norms = (getattr(manifest, "extra", None) or {}).get("activation_norms")
    return None if norms is None else {int(k): float(v) for k, v in norms.items()}


def addends(vectors: Any, alpha: float, layers: Sequence[int], scale: str = "absolute") -> dict[int, torch.Tensor]:
    """What each steered layer adds per row (before the gate), float32 ``[H]``.

    Why "relative": an addition to a layer's output stays in the residual stream for every later
    layer, and consecutive mean-difference vectors point the same way (cosine 0.8-0.94 between
    neighbours on Qwen2.5-0.5B), so steering k layers adds about k times one vector; their norms also
    grow with depth (0.2 to 26 there, activations 5 to 110). Absolute alpha on many layers therefore
    swamps the activations (the paper's every-layer variant writes "contacting contacting ..." there).
    """
    table, _ = _vectors_of(vectors)
    if scale == "absolute":
        return {i: float(alpha) * table[i].detach().float() for i in layers}
    if scale != "relative":
        raise ValueError(f"scale must be one of {SCALES}, got {scale!r}")
    norms = activation_norms(vectors)
    if norms is None or any(i not in norms for i in layers):
        raise ValueError("scale='relative' needs the activation norms recorded at extraction (manifest "
                         "extra['activation_norms']); extract the vectors again with this version")
    out = {}
    for i in layers:
        v = table[i].detach().float()
        n = float(v.norm())
        if n == 0 or not math.isfinite(n):
            raise ValueError(f"the vector at layer {i} is zero or not finite; it has no direction to steer along")
        out[i] = (float(alpha) * norms[i] / len(layers) / n) * v
    return out


def _only_when(when: Callable[[], bool] | None, hook: Callable[..., Any]) -> Callable[..., Any]:
    if when is None:
        return hook

    def scoped(*args: Any, **kwargs: Any) -> Any:
        return hook(*args, **kwargs) if when() else None

    return scoped


def _vectors_of(vectors: Any) -> tuple[Mapping[int, torch.Tensor], Any]:
    if hasattr(vectors, "vectors") and hasattr(vectors, "manifest"):
        return vectors.vectors, vectors
    if isinstance(vectors, Mapping):
        return {int(k): v for k, v in vectors.items()}, None
    raise TypeError(f"vectors must be SteeringVectors or a mapping layer -> [hidden] tensor, got {type(vectors).__name__}")


@contextlib.contextmanager
def steer(
    model: nn.Module,
    vectors: Any,
    alpha: float = 1.0,
    gate: Gate | torch.Tensor | float | None = None,
    layers: Sequence[int] | None = None,
    *,
    path: str | None = None,
    when: Callable[[], bool] | None = None,
    scale: str = "absolute",
    positions: str = "all",
) -> Iterator[SteeringHandle]:
    """Add ``alpha * g * theta_l`` to the output of each steered decoder layer, for this block only.

    ``vectors``: SteeringVectors (shapes checked against ``model``) or ``{layer: [H] tensor}``.
    ``layers``: which of the vectors' layers to steer (all by default). ``gate``: see the module
    docstring. Hooks are removed in ``finally``, also when the block raises. Open one context per
    ``generate`` call when the gate is a :class:`Gate` (it is decided once, at the first forward).
    ``when``: the hooks act only on forwards where it returns True (e.g. only the thread or call that
    opened the block; others sharing the model pass through unsteered).

    ``scale`` (see :func:`addends`): "absolute" adds ``alpha * theta_l`` (the paper); "relative" adds
    ``alpha / k * n_l * theta_l / |theta_l|`` over the ``k`` steered layers, ``n_l`` the mean activation
    norm recorded at extraction, so ``alpha`` is a fraction of the activation norm whatever the layer
    and however many layers are steered. ``positions``: "all" (the paper) or "generated" (the last
    prompt position and every generated one: the prompt's activations stay the bare model's).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"steer needs a torch nn.Module, got {type(model).__name__}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise TypeError(f"alpha must be a number, got {type(alpha).__name__}")
    table, sv = _vectors_of(vectors)
    info = find_decoder_layers(model, path)
    notes: list[str] = []
    if sv is not None:
        notes = sv.check_compatible(model, path=path)
    chosen = sorted(table) if layers is None else sorted(set(int(x) for x in layers))
    if not chosen:
        raise ValueError("no layers to steer; pass layers= with at least one layer index")
    absent = [i for i in chosen if i not in table]
    if absent:
        raise ValueError(f"no steering vector for layers {absent}; available: {sorted(table)}")
    for i in chosen:
        if not 0 <= i < info.num_layers:
            raise ValueError(f"layer {i} is out of range: {type(model).__name__} has {info.num_layers} decoder layers")
        v = table[i]
        if not isinstance(v, torch.Tensor) or v.shape != (info.hidden_size,):
            shape = tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
            raise ValueError(f"vector for layer {i} has shape {shape}; the model's hidden size is {info.hidden_size}")
    if isinstance(gate, Gate):
        if gate.layer >= info.num_layers or gate.hidden_size != info.hidden_size:
            raise ValueError(f"gate (layer {gate.layer}, hidden size {gate.hidden_size}) does not fit "
                             f"{type(model).__name__} ({info.num_layers} layers, hidden size {info.hidden_size})")
        mode = "prefill-hook" if min(chosen) >= gate.layer else "pre-pass"
    else:
        mode = "fixed"
    check_steerable(model, [info.layers[i] for i in chosen])

    if positions not in POSITIONS:
        raise ValueError(f"positions must be one of {POSITIONS}, got {positions!r}")
    handle = SteeringHandle(layers=chosen, alpha=float(alpha), gate_mode=mode, notes=notes)
    state = _Steerer(model, info, addends(vectors, alpha, chosen, scale), gate, chosen, handle, positions)
    hooked = set(chosen)
    if mode == "prefill-hook":
        hooked.add(gate.layer)  # type: ignore[union-attr]
    handles: list[torch.utils.hooks.RemovableHandle] = []
    try:
        handles.append(model.register_forward_pre_hook(_only_when(when, state.pre_forward), with_kwargs=True, prepend=True))
        for i in sorted(hooked):
            reads_gate = mode == "prefill-hook" and i == gate.layer  # type: ignore[union-attr]
            # prepend: run before transformers' own output-recording hooks, so returned hidden states show steering.
            handles.append(info.layers[i].register_forward_hook(
                _only_when(when, state.layer_hook(i, i in chosen, reads_gate)), prepend=True))
        yield handle
    finally:
        for h in handles:
            h.remove()
