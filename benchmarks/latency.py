"""Latency overhead of defenses against the bare model, measured in one process, runs interleaved.

    python -m benchmarks.latency --arch llava-1.5-7b --defenses system_prompt inferaligner:... \\
        --batch 1,8 --prompt-tokens 512 --new-tokens 256 --out runs/latency
    python -m benchmarks.latency --model ID_OR_PATH --defenses protector:mode=stream --api chat --out ...

How it measures:

- One process, one model. After ``--warmup`` rounds, each repeat runs bare, d1, d2, ..., peers in
  that order, so slow drifts of the machine (clocks, other load) hit every configuration alike;
  the run order is recorded in the JSON.
- Through the public API users call: ``guarded.chat`` (``--api chat``, default), or
  ``guarded.generate(**inputs)`` (``--api generate``, during-generation defenses only). The bare
  model is ``wrap(model, processor, [])`` on the same API.
- Fixed length: ``min_new_tokens = max_new_tokens = --new-tokens`` (EOS can never end a run
  early). Prompts are synthetic text sized to exactly ``--prompt-tokens`` tokens for the bare
  model, template and image tokens included (defenses that add text make the prompt longer: that
  is their cost). VLMs get one random image per row (``--image``).
- Step times come from a logits processor that timestamps every decoding step: CUDA events on GPU,
  ``time.perf_counter`` on CPU. Time to first token = call start to the first step (before-stage
  defenses + encoding + prefill); decode = the gaps between successive steps of the first generate
  call. ``total`` is the whole call (after-stage defenses and extra generations included).
- Peak memory: ``torch.cuda.max_memory_allocated`` on GPU (reset per run); on CPU the process's
  resident-set high-water mark (VmHWM, reset per run through /proc/self/clear_refs where the
  kernel allows it, else the process-lifetime maximum; the JSON says which).
- Ratios: ``median(defended) / median(bare)`` over the timed runs at the same batch size (decode:
  pooled per-step times); ``paired_total_ratio`` is the median of per-repeat ratios of adjacent runs.
- Peers (``--peers steering-vectors,repeng,steering``): PyPI steering libraries applied to the same
  model with the same per-layer vectors (``--peer-vectors DIR`` of ``steering.SteeringVectors``,
  or ``random``), run in the same interleaving as extra rows; a library that fails to import or run
  becomes a row with its error text. Their hooks are installed before the timer starts.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from guardrails._cli import ArgumentParser, entry_point

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from benchmarks.report import fmt_ms, machine_info, markdown_table, summarize, write_json  # noqa: E402

__all__ = ["LatencyConfig", "run_latency", "main", "StepClock", "synthetic_conversations", "PEERS"]

BARE = "bare"
APIS = ("chat", "generate")


@dataclass
class LatencyConfig:
    """Settings of one latency run; written into the JSON report."""

    out: str
    model: str | None = None
    arch: str | None = None
    defenses: list[str] = field(default_factory=list)
    batches: list[int] = field(default_factory=lambda: [1, 8])
    prompt_tokens: int = 512
    new_tokens: int = 256
    repeats: int = 5
    warmup: int = 1
    #: "auto": bfloat16 on CUDA, float32 on CPU
    dtype: str = "auto"
    device: str = "auto"
    api: str = "chat"
    #: "auto": one random image per row for image-text models; "on"/"off"
    image: str = "auto"
    image_size: int | None = None
    peers: list[str] = field(default_factory=list)
    #: "random" or a folder written by steering.SteeringVectors.save
    peer_vectors: str = "random"
    peer_alpha: float = 1.0
    #: decoder layers the peers steer (None: every layer the vectors cover)
    peer_layers: list[int] | None = None
    threads: int | None = None
    imports: list[str] = field(default_factory=list)
    seed: int = 0
    #: one line per timed run on stderr
    progress: bool = True

    def __post_init__(self) -> None:
        if (self.model is None) == (self.arch is None):
            raise ValueError("give exactly one of model (id, path or tiny:ARCH) and arch (see benchmarks.archs.ARCHS)")
        if self.api not in APIS:
            raise ValueError(f"api must be one of {APIS}, got {self.api!r}")
        if self.image not in ("auto", "on", "off"):
            raise ValueError(f"image must be auto, on or off, got {self.image!r}")
        if not self.batches or any((not isinstance(b, int)) or b < 1 for b in self.batches):
            raise ValueError(f"batches must be positive ints, got {self.batches}")
        for name, v, lo in (("prompt_tokens", self.prompt_tokens, 1), ("new_tokens", self.new_tokens, 2),
                            ("repeats", self.repeats, 1), ("warmup", self.warmup, 0)):
            if not isinstance(v, int) or v < lo:
                raise ValueError(f"{name} must be an int >= {lo}, got {v!r}")
        if len(set(self.defenses)) != len(self.defenses):
            raise ValueError(f"defense specs repeat in {self.defenses}")
        unknown = [p for p in self.peers if p not in PEERS]
        if unknown:
            raise ValueError(f"unknown peer(s) {unknown}; known: {', '.join(PEERS)}")


# --------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------


if TYPE_CHECKING:
    from transformers import LogitsProcessor as _LPBase
else:
    try:
        from transformers import LogitsProcessor as _LPBase
    except ImportError:  # pragma: no cover - transformers is a dependency
        _LPBase = object


class StepClock(_LPBase):
    """A logits processor that timestamps every decoding step (CUDA events on GPU, perf_counter on CPU).

    It returns the scores untouched. Call :meth:`start` right before the API call and
    :meth:`stop` right after; :meth:`result` then gives milliseconds.
    """

    def __init__(self, cuda: bool):
        self.cuda = cuda
        self.marks: list[Any] = []
        self.lengths: list[int] = []
        self._t0: Any = None
        self._t1: Any = None

    def _now(self) -> Any:
        if self.cuda:
            import torch

            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.perf_counter()

    def start(self) -> None:
        self.marks, self.lengths = [], []
        self._t0 = self._now()

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        self.marks.append(self._now())
        self.lengths.append(int(input_ids.shape[1]))
        return scores

    def stop(self) -> None:
        self._t1 = self._now()

    def _ms(self, a: Any, b: Any) -> float:
        return float(a.elapsed_time(b)) if self.cuda else (b - a) * 1e3

    def result(self) -> dict[str, Any]:
        """ttft_ms, step_ms (first generate call), total_ms, n_steps, n_generate_calls."""
        if self.cuda:
            import torch

            torch.cuda.synchronize()
        if not self.marks:
            return {"ttft_ms": None, "step_ms": [], "total_ms": self._ms(self._t0, self._t1), "n_steps": 0, "n_generate_calls": 0,
                    "prompt_tokens_seen": None}
        # A new generate call (e.g. a defense's self-check) restarts the sequence length: split there.
        segments, seg = [], [0]
        for i in range(1, len(self.lengths)):
            if self.lengths[i] == self.lengths[i - 1] + 1:
                seg.append(i)
            else:
                segments.append(seg)
                seg = [i]
        segments.append(seg)
        first = segments[0]
        steps = [self._ms(self.marks[a], self.marks[b]) for a, b in zip(first, first[1:])]
        # Logits processors see the ids before the new token is appended: the first call's length is the prompt's.
        return {"ttft_ms": self._ms(self._t0, self.marks[0]), "step_ms": steps, "total_ms": self._ms(self._t0, self._t1),
                "n_steps": len(first), "n_generate_calls": len(segments), "prompt_tokens_seen": self.lengths[0]}


class _Memory:
    """Peak memory per run: CUDA allocator peak, or the CPU process's RSS high-water mark."""

    def __init__(self, device: str):
        import torch

        self.cuda = device.startswith("cuda") and torch.cuda.is_available()
        self.device = device
        self.kind = "torch.cuda.max_memory_allocated (reset per run)" if self.cuda else self._cpu_kind()

    @staticmethod
    def _hwm_kb() -> int | None:
        try:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
        except (OSError, ValueError):
            pass
        return None

    def _cpu_kind(self) -> str:
        if self._hwm_kb() is None:
            return "CPU RSS high-water (getrusage ru_maxrss, process lifetime: not reset per run)"
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self._resettable = True
            return "CPU RSS high-water (VmHWM, reset per run via /proc/self/clear_refs)"
        except OSError:
            self._resettable = False
            return "CPU RSS high-water (VmHWM, process lifetime: the kernel refused a reset)"

    def reset(self) -> None:
        import torch

        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        elif getattr(self, "_resettable", False):
            with contextlib.suppress(OSError):
                Path("/proc/self/clear_refs").write_text("5")

    def peak_bytes(self) -> int | None:
        import torch

        if self.cuda:
            return int(torch.cuda.max_memory_allocated(self.device))
        kb = self._hwm_kb()
        if kb is None:
            import resource

            return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
        return kb * 1024


# --------------------------------------------------------------------------------------------
# Prompts of an exact length
# --------------------------------------------------------------------------------------------


def _single_token_words(tok: Any, limit: int = 256) -> list[str]:
    """Words (with their leading space) that the tokenizer writes as exactly one token, in id order."""
    words = []
    for i in range(min(len(tok), 20000)):
        s = tok.decode([i])
        if len(s) > 2 and s[0] == " " and s[1:].isalpha() and s[1:].isascii() and tok.encode(s, add_special_tokens=False) == [i]:
            words.append(s)
            if len(words) >= limit:
                break
    if len(words) < 8:
        raise ValueError(f"{type(tok).__name__}: found only {len(words)} single-token words; cannot size prompts exactly")
    return words


def synthetic_conversations(engine: Any, batch: int, n_tokens: int, image: Any = None) -> list[list[dict[str, Any]]]:
    """``batch`` user turns whose encoded prompt (template, image tokens included) is exactly ``n_tokens`` long.

    Rows differ in their words (rotated word lists) but not in length, so the batch has no padding.
    """
    words = _single_token_words(engine.tokenizer)

    def conv(text: str) -> list[dict[str, Any]]:
        parts: list[dict[str, Any]] = [{"type": "text", "text": text}]
        if image is not None:
            parts.insert(0, {"type": "image", "image": image})
        return [{"role": "user", "content": parts}]

    def length(c: list[dict[str, Any]]) -> int:
        return int(engine.encode([c])["input_ids"].shape[1])

    out = []
    for b in range(batch):
        def text(k: int, b: int = b) -> str:
            return "Text:" + "".join(words[(b * 7 + i) % len(words)] for i in range(k))

        base = length(conv(text(0)))
        if base > n_tokens:
            raise ValueError(f"the chat template{' and image' if image is not None else ''} alone take {base} tokens, more "
                             f"than --prompt-tokens {n_tokens}; raise --prompt-tokens")
        k = n_tokens - base
        for _ in range(20):
            got = length(conv(text(k)))
            if got == n_tokens:
                break
            k = max(0, k + n_tokens - got)
        else:
            raise RuntimeError(f"could not size a prompt to exactly {n_tokens} tokens (last try {got}); the tokenizer merges "
                               "across words")
        out.append(conv(text(k)))
    enc = engine.encode(out)
    if enc["input_ids"].shape[1] != n_tokens or not bool(enc["attention_mask"].all()):
        raise RuntimeError(f"batched prompts are not all exactly {n_tokens} tokens (got {tuple(enc['input_ids'].shape)})")
    return out


# --------------------------------------------------------------------------------------------
# Peers: other steering libraries on the same model with the same vectors
# --------------------------------------------------------------------------------------------


@dataclass
class PeerContext:
    """What a peer adapter gets: the model, its decoder-layer path, vectors per layer, alpha."""

    model: Any
    layers_path: str
    vectors: dict[int, Any]
    alpha: float


def _peer_steering_vectors(ctx: PeerContext) -> tuple[str, Callable[[], contextlib.AbstractContextManager]]:
    """PyPI ``steering-vectors``: SteeringVector(...).apply(model, multiplier=alpha) around each call."""
    from importlib.metadata import version

    from steering_vectors import SteeringVector

    layer = next(iter(ctx.model.parameters()))
    sv = SteeringVector(layer_activations={i: v.to(layer.device, layer.dtype) for i, v in ctx.vectors.items()},
                        layer_type="decoder_block")
    config = {"decoder_block": ctx.layers_path + ".{num}"}
    return version("steering-vectors"), lambda: sv.apply(ctx.model, layer_config=config, multiplier=ctx.alpha)


def _peer_repeng(ctx: PeerContext) -> tuple[str, Callable[[], contextlib.AbstractContextManager]]:
    """PyPI ``repeng``: ControlModel(model, layers) + set_control(ControlVector, coeff=alpha), undone after each call."""
    from importlib.metadata import version

    import numpy as np
    from repeng import ControlModel, ControlVector  # 0.4.0 fails here under NumPy 2 (np.float_)

    directions = {i: v.float().cpu().numpy().astype(np.float32) for i, v in ctx.vectors.items()}
    vector = ControlVector(model_type=ctx.model.config.model_type, directions=directions)

    @contextlib.contextmanager
    def apply() -> Iterator[None]:
        control = ControlModel(ctx.model, list(directions))
        try:
            control.set_control(vector, coeff=ctx.alpha)
            yield
        finally:
            control.reset()
            control.unwrap()

    return version("repeng"), apply


def _peer_steering(ctx: PeerContext) -> tuple[str, Callable[[], contextlib.AbstractContextManager]]:
    """This project's ``steering.steer`` with no gate: the hook cost InferAligner builds on."""
    import steering

    return str(getattr(steering, "__version__", "?")), lambda: steering.steer(ctx.model, ctx.vectors, alpha=ctx.alpha,
                                                                                path=ctx.layers_path)


#: peer name -> adapter (returns (library version, factory of a context manager that steers the model))
PEERS: dict[str, Callable[[PeerContext], tuple[str, Callable[[], contextlib.AbstractContextManager]]]] = {
    "steering-vectors": _peer_steering_vectors,
    "repeng": _peer_repeng,
    "steering": _peer_steering,
}


def _installed_version(peer: str) -> str | None:
    """The installed distribution's version even when importing it fails (None when not installed)."""
    if peer == "steering":
        return None
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(peer)
    except PackageNotFoundError:
        return "not installed"


def peer_vectors(source: str, model: Any, *, layers: Sequence[int] | None = None, seed: int = 0) -> tuple[dict[int, Any], str, str]:
    """(vectors per layer, decoder-layer path, description) from a SteeringVectors folder or random unit vectors."""
    import torch

    from steering import find_decoder_layers

    info = find_decoder_layers(model)
    if source == "random":
        g = torch.Generator().manual_seed(seed)
        chosen = list(range(info.num_layers)) if layers is None else list(layers)
        vecs = {}
        for i in chosen:
            v = torch.randn(info.hidden_size, generator=g)
            vecs[i] = v / v.norm()
        desc = f"random unit vectors (seed {seed}) on layers {chosen[0]}..{chosen[-1]} ({len(chosen)} layers)"
    else:
        from steering import SteeringVectors

        sv = SteeringVectors.load(source, with_gate=False)
        sv.check_compatible(model, strict_template=False)
        chosen = sv.layers if layers is None else list(layers)
        missing = [i for i in chosen if i not in sv.vectors]
        if missing:
            raise ValueError(f"{source} has no vectors for layers {missing}; it covers {sv.layers}")
        vecs = {i: sv.vectors[i] for i in chosen}
        desc = f"SteeringVectors from {source} (method {sv.manifest.method}) on {len(chosen)} layers"
    bad = [i for i in vecs if not 0 <= i < info.num_layers]
    if bad:
        raise ValueError(f"layers {bad} are out of range: the model has {info.num_layers} decoder layers")
    return vecs, info.path, desc


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------


@dataclass
class _Config:
    """One row of the table: bare, a defense spec, or a peer."""

    name: str
    kind: str  # "bare" | "defense" | "peer"
    guarded: Any = None
    context: Callable[[], contextlib.AbstractContextManager] | None = None
    version: str | None = None
    error: str | None = None


def _load(cfg: LatencyConfig, device: str, dtype: Any) -> tuple[Any, Any, str, int | None]:
    """(model, processor, description, image side) for --model or --arch."""
    if cfg.arch is not None:
        from benchmarks.archs import ARCHS, build_arch

        model, proc = build_arch(cfg.arch, dtype=dtype, device=device, seed=cfg.seed)
        spec = ARCHS[cfg.arch]
        return model, proc, f"arch:{cfg.arch} (random weights; {spec.source})", spec.image_size
    assert cfg.model is not None
    if cfg.model.startswith("tiny:"):
        from guardrails.testing import build_tiny

        tiny = build_tiny(cfg.model.split(":", 1)[1], seed=cfg.seed)
        return tiny.model.to(device=device, dtype=dtype), tiny.processor, f"{cfg.model} (guardrails.testing, random weights)", tiny.image_size
    from guardrails import load

    model, proc = load(cfg.model, dtype=dtype)
    return model.to(device), proc, cfg.model, None


def run_latency(cfg: LatencyConfig) -> dict[str, Any]:
    """Run the interleaved measurement; writes ``latency.json`` and ``latency.md`` to ``cfg.out``; returns the report."""
    import torch

    from benchmarks.archs import parameter_count, resolve_dtype
    from benchmarks.safety import import_plugins
    from guardrails import wrap
    from guardrails.spec import build_defenses
    from guardrails.testing import make_image

    import_plugins(cfg.imports)
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    device = cfg.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for but CUDA is not available; pass --device cpu")
    cuda = device.startswith("cuda")
    dtype = resolve_dtype(cfg.dtype if cfg.dtype != "auto" else ("bfloat16" if cuda else "float32"))
    torch.manual_seed(cfg.seed)
    model, processor, model_desc, image_side = _load(cfg, device, dtype)
    model.eval()

    configs = [_Config(BARE, "bare", guarded=wrap(model, processor, []))]
    for spec in cfg.defenses:
        if spec.strip() in ("none", "bare", ""):
            continue  # the bare model is always measured
        guarded = wrap(model, processor, build_defenses(spec))
        if cfg.api == "generate":
            for d in guarded.defenses:
                d.check_mode("generate")  # fails now, naming the stages generate() cannot run
        configs.append(_Config(spec, "defense", guarded=guarded))
    peer_info: dict[str, Any] = {}
    if cfg.peers:
        vecs, layers_path, desc = peer_vectors(cfg.peer_vectors, model, layers=cfg.peer_layers, seed=cfg.seed)
        peer_info = {"vectors": desc, "alpha": cfg.peer_alpha, "layers": sorted(vecs), "layers_path": layers_path,
                     "note": "peer hooks are installed before the timer starts and removed after it stops"}
        before = _model_state(model, layers_path)
        for name in cfg.peers:
            row = _Config(f"peer:{name}", "peer", guarded=configs[0].guarded)
            try:
                row.version, row.context = PEERS[name](PeerContext(model, layers_path, vecs, cfg.peer_alpha))
                # One short call proves the library can run on this model before it enters the timing.
                with row.context():
                    _call(configs[0].guarded, cfg, _probe_inputs(configs[0].guarded, cfg, image_side, make_image), 2, None)
            except Exception as e:  # an honest result: this library does not run here
                row.error, row.context = f"{type(e).__name__}: {e}", None
                row.version = row.version or _installed_version(name)
            if _model_state(model, layers_path) != before:
                raise RuntimeError(f"peer {name} left hooks or replaced layers on the model; later rows would not be "
                                   "measured on the bare model, so the run stops here")
            configs.append(row)

    engine = configs[0].guarded.engine
    use_image = engine.multimodal and cfg.image != "off"
    if cfg.image == "on" and not engine.multimodal:
        raise ValueError(f"--image on, but {type(model).__name__} is a text-only model")
    side = cfg.image_size or image_side or 336
    memory = _Memory(device)
    runs: list[dict[str, Any]] = []
    live = [c for c in configs if c.error is None]
    # Everything alive now (model, libraries) moves to the permanent generation, so the collection
    # before each run only scans that run's garbage (a full collection here took ~0.3 s under load).
    gc.collect()
    gc.freeze()
    try:
        _measure(cfg, live, engine, use_image, side, cuda, memory, runs, make_image)
    finally:
        gc.unfreeze()

    report = {
        "settings": {**asdict(cfg), "device_resolved": device, "dtype_resolved": str(dtype).replace("torch.", ""),
                     "timer": "CUDA events" if cuda else "time.perf_counter", "memory": memory.kind,
                     "image": f"{side}x{side} random" if use_image else None,
                     "fixed_length": "min_new_tokens = max_new_tokens = new_tokens"},
        "model": {"description": model_desc, "class": type(model).__name__, "parameters": parameter_count(model)},
        "configs": [{"name": c.name, "kind": c.kind, "version": c.version, "status": "failed" if c.error else "ok",
                     "error": c.error} for c in configs],
        "peers": peer_info or None,
        "machine": machine_info(device),
        "runs": runs,
        "results": summarize_runs(runs, [c.name for c in live], cfg.batches, cfg.new_tokens),
    }
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "latency.json", report)
    (out / "latency.md").write_text(latency_markdown(report), encoding="utf-8")
    return report


def _measure(cfg: LatencyConfig, live: list[_Config], engine: Any, use_image: bool, side: int, cuda: bool,
             memory: _Memory, runs: list[dict[str, Any]], make_image: Callable[..., Any]) -> None:
    """Warm-up, then the interleaved timed runs (bare, d1, d2, ... per repeat), per batch size."""

    def run(c: _Config, payload: Any, batch: int, rep: int | None) -> dict[str, Any] | None:
        try:
            return _timed(c, cfg, payload, cuda, memory)
        except Exception as e:
            if c.kind != "peer":
                raise  # a failure of this library or of a defense must never be hidden
            # A peer library that breaks mid-run becomes a failed row; its partial timings are dropped.
            when = "warm-up" if rep is None else f"repeat {rep}"
            c.error = f"failed during timing (batch {batch}, {when}): {type(e).__name__}: {e}"
            live.remove(c)
            runs[:] = [r for r in runs if r["config"] != c.name]
            return None

    order = 0
    for batch in cfg.batches:
        image = make_image(side, seed=cfg.seed) if use_image else None
        convs = synthetic_conversations(engine, batch, cfg.prompt_tokens, image)
        payload = engine.encode(convs) if cfg.api == "generate" else convs
        for _ in range(cfg.warmup):
            for c in list(live):
                run(c, payload, batch, None)
        for rep in range(cfg.repeats):
            for c in list(live):
                rec = run(c, payload, batch, rep)
                if rec is not None:
                    rec.update(config=c.name, batch=batch, repeat=rep, order=order)
                    order += 1
                    runs.append(rec)
                    if cfg.progress:
                        print(f"batch {batch} repeat {rep + 1}/{cfg.repeats} {c.name}: total {rec['total_ms']:.0f} ms, "
                              f"TTFT {rec['ttft_ms']:.0f} ms", file=sys.stderr, flush=True)


def _model_state(model: Any, layers_path: str) -> tuple[Any, ...]:
    """Identity of the decoder layers and every forward hook on the model (to prove a peer cleaned up)."""
    from steering.layers import resolve_path

    layers = cast(Iterable[object], resolve_path(model, layers_path))  # a decoder-layers path: an nn.ModuleList
    hooks = tuple(sorted((n, k) for n, m in model.named_modules() for k in (*m._forward_hooks, *m._forward_pre_hooks)))
    return tuple(id(x) for x in layers), hooks


def _probe_inputs(guarded: Any, cfg: LatencyConfig, image_side: int | None, make_image: Callable[..., Any]) -> Any:
    image = make_image(image_side or 336) if guarded.engine.multimodal and cfg.image != "off" else None
    parts: list[dict[str, Any]] = [{"type": "text", "text": "Hello"}]
    if image is not None:
        parts.insert(0, {"type": "image", "image": image})
    convs = [[{"role": "user", "content": parts}]]
    return guarded.engine.encode(convs) if cfg.api == "generate" else convs


def _call(guarded: Any, cfg: LatencyConfig, payload: Any, n_new: int, clock: StepClock | None) -> Any:
    kw: dict[str, Any] = {"max_new_tokens": n_new, "min_new_tokens": n_new, "do_sample": False}
    if clock is not None:
        kw["logits_processor"] = [clock]
    if cfg.api == "generate":
        kw.setdefault("pad_token_id", getattr(guarded.engine.tokenizer, "pad_token_id", None))
        return guarded.generate(**payload, **kw)
    return guarded.chat(payload, **kw)


def _timed(c: _Config, cfg: LatencyConfig, payload: Any, cuda: bool, memory: _Memory) -> dict[str, Any]:
    import torch

    clock = StepClock(cuda)
    gc.collect()  # outside the timed region: a collection inside it would land on one config by chance
    if cuda:
        torch.cuda.synchronize()
    memory.reset()
    ctx = c.context() if c.context is not None else contextlib.nullcontext()
    with ctx:
        clock.start()
        _call(c.guarded, cfg, payload, cfg.new_tokens, clock)
        clock.stop()
    rec = clock.result()
    rec["peak_memory_bytes"] = memory.peak_bytes()
    rec["decode_ms_per_token_mean"] = (sum(rec["step_ms"]) / len(rec["step_ms"])) if rec["step_ms"] else None
    return rec


def _median(xs: Sequence[float]) -> float | None:
    return summarize(xs)["median"]


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def summarize_runs(runs: Sequence[dict[str, Any]], names: Sequence[str], batches: Sequence[int], new_tokens: int) -> dict[str, Any]:
    """Per batch size and configuration: TTFT, decode per token and total (median, p95), memory, ratios to bare."""
    out: dict[str, Any] = {}
    for b in batches:
        per: dict[str, Any] = {}
        by = {n: [r for r in runs if r["batch"] == b and r["config"] == n] for n in names}
        bare = by[BARE]
        bare_steps = [s for r in bare for s in r["step_ms"]]
        for n in names:
            rs = by[n]
            steps = [s for r in rs for s in r["step_ms"]]
            ttft = [r["ttft_ms"] for r in rs if r["ttft_ms"] is not None]
            total = [r["total_ms"] for r in rs]
            paired = [_ratio(x["total_ms"], y["total_ms"]) for x, y in zip(sorted(rs, key=lambda r: r["repeat"]),
                                                                            sorted(bare, key=lambda r: r["repeat"]))]
            mem = [r["peak_memory_bytes"] for r in rs if r["peak_memory_bytes"] is not None]
            tot_med = _median(total)
            per[n] = {
                "n_runs": len(rs),
                "ttft_ms": summarize(ttft),
                "decode_ms_per_token": summarize(steps),
                "total_ms": summarize(total),
                "tokens_per_s": None if not tot_med else b * new_tokens / (tot_med / 1e3),
                "peak_memory_bytes": max(mem) if mem else None,
                "all_runs_fixed_length": all(r["n_steps"] == new_tokens for r in rs),
                "n_generate_calls": sorted({r["n_generate_calls"] for r in rs}),
                # what the model really got: defenses that add text make the prompt longer than --prompt-tokens
                "prompt_tokens_seen": sorted({r["prompt_tokens_seen"] for r in rs if r["prompt_tokens_seen"] is not None}),
                "ratio_to_bare": {
                    "decode": _ratio(_median(steps), _median(bare_steps)),
                    "ttft": _ratio(_median(ttft), _median([r["ttft_ms"] for r in bare if r["ttft_ms"] is not None])),
                    "total": _ratio(tot_med, _median([r["total_ms"] for r in bare])),
                    "paired_total": _median([p for p in paired if p is not None]),
                },
            }
        out[str(b)] = per
    return out


def _pct(r: float | None) -> str:
    return "n/a" if r is None else f"{r:.3f} ({(r - 1) * 100:+.1f}%)"


def latency_markdown(report: dict[str, Any]) -> str:
    """Table per batch size, then failed peers, then machine and settings."""
    s, m = report["settings"], report["machine"]
    lines = [f"# Latency overhead: `{report['model']['description']}`\n",
             f"{report['model']['class']}, {report['model']['parameters'] / 1e6:.1f}M parameters, "
             f"{s['dtype_resolved']} on {s['device_resolved']}; prompt {s['prompt_tokens']} tokens, {s['new_tokens']} new tokens "
             f"(fixed), API `{s['api']}`, {s['warmup']} warm-up + {s['repeats']} timed runs per configuration, interleaved; "
             f"timer: {s['timer']}; memory: {s['memory']}.\n"]
    headers = ["batch", "configuration", "prompt tokens", "TTFT ms (median / p95)", "decode ms/token (median / p95)", "total ms (median)",
               "tokens/s", "decode vs bare", "TTFT vs bare", "total vs bare", "peak MiB"]
    rows = []
    for b, per in report["results"].items():
        for name, r in per.items():
            mem = r["peak_memory_bytes"]
            rows.append([b, f"`{name}`" + ("" if r["all_runs_fixed_length"] else " (not fixed length!)"),
                         "/".join(map(str, r["prompt_tokens_seen"])) or "n/a",
                         f"{fmt_ms(r['ttft_ms']['median'])} / {fmt_ms(r['ttft_ms']['p95'])}",
                         f"{fmt_ms(r['decode_ms_per_token']['median'])} / {fmt_ms(r['decode_ms_per_token']['p95'])}",
                         fmt_ms(r["total_ms"]["median"]), "n/a" if r["tokens_per_s"] is None else f"{r['tokens_per_s']:.1f}",
                         _pct(r["ratio_to_bare"]["decode"]), _pct(r["ratio_to_bare"]["ttft"]),
                         _pct(r["ratio_to_bare"]["total"]), "n/a" if mem is None else f"{mem / 2**20:.0f}"])
    lines.append(markdown_table(headers, rows))
    failed = [c for c in report["configs"] if c["status"] == "failed"]
    if failed:
        lines.append("Configurations that could not run (recorded as measured):\n")
        lines.append(markdown_table(["configuration", "version", "error"],
                                    [[f"`{c['name']}`", c["version"] or "n/a", c["error"]] for c in failed]))
    if report.get("peers"):
        p = report["peers"]
        lines.append(f"Peers: {p['vectors']}, alpha {p['alpha']}, layer path `{p['layers_path']}`; {p['note']}.\n")
    gpu = m["gpu"]["name"] if m["gpu"] else "none"
    lines.append(f"Machine: {m['cpu']} x{m['cpu_count']} ({m['torch_threads']} torch threads, load average "
                 f"{m['load_average_1_5_15']}), GPU {gpu}; torch {m['versions']['torch']}, transformers "
                 f"{m['versions']['transformers']}; commit {m['git_commit']}.\n")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def _int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} must be comma-separated integers, e.g. 1,8") from None


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="python -m benchmarks.latency", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="hub id, local folder, or tiny:ARCH")
    src.add_argument("--arch", help="random-weight architecture from benchmarks.archs (e.g. llava-1.5-7b, llama-50m)")
    p.add_argument("--defenses", nargs="*", action="extend", default=[], metavar="SPEC",
                   help="defense specs to compare with the bare model (always measured)")
    p.add_argument("--batch", type=_int_list, default=[1, 8], help="batch sizes, e.g. 1,8")
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--dtype", default="auto", help="auto (bfloat16 on GPU, float32 on CPU), bfloat16, float16, float32")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--api", choices=APIS, default="chat", help="chat (default) or generate (during-stage defenses only)")
    p.add_argument("--image", choices=("auto", "on", "off"), default="auto", help="one random image per row for VLMs")
    p.add_argument("--image-size", type=int, default=None)
    p.add_argument("--peers", type=lambda t: [x for x in t.split(",") if x], default=[],
                   help=f"comma-separated peer libraries: {', '.join(PEERS)}")
    p.add_argument("--peer-vectors", default="random", help="random, or a steering.SteeringVectors folder")
    p.add_argument("--peer-alpha", type=float, default=1.0, help="InferAligner's default alpha is 1.0 too")
    p.add_argument("--peer-layers", type=_int_list, default=None, help="decoder layers to steer, e.g. 8,9,10")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--import", dest="imports", action="append", default=[], metavar="MODULE_OR_FILE")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true", help="no line per timed run on stderr")
    p.add_argument("--out", required=True, help="output folder for latency.json and latency.md")
    return p


@entry_point
def main(argv: Sequence[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    cfg = LatencyConfig(out=a.out, model=a.model, arch=a.arch, defenses=a.defenses, batches=a.batch,
                        prompt_tokens=a.prompt_tokens, new_tokens=a.new_tokens, repeats=a.repeats, warmup=a.warmup,
                        dtype=a.dtype, device=a.device, api=a.api, image=a.image, image_size=a.image_size, peers=a.peers,
                        peer_vectors=a.peer_vectors, peer_alpha=a.peer_alpha, peer_layers=a.peer_layers, threads=a.threads,
                        imports=a.imports, seed=a.seed, progress=not a.no_progress)
    run_latency(cfg)
    print((Path(cfg.out) / "latency.md").read_text(encoding="utf-8"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
