"""Steering vectors per decoder layer, saved as safetensors plus a JSON manifest (never pickle).

>>> sv = extract_steering_vectors(model, harmful, harmless, processor=tokenizer)  # doctest: +SKIP
>>> sv.save("vectors/"); sv = SteeringVectors.load("vectors/")                    # doctest: +SKIP
>>> sv.check_compatible(target_model, target_tokenizer, strict_template=False)     # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from ._files import load_tensors, naming, read_json, save_tensors, write_json
from ._provenance import check_against_model, library_version, model_record, now_iso
from .extract import METHODS, READ_POSITION, Activations, Method, Prompt, compute_directions, extract_activations
from .gate import GATE_FILES, Gate

__all__ = ["MANIFEST_FILE", "TENSOR_FILE", "Manifest", "SteeringVectors", "extract_steering_vectors"]

TENSOR_FILE = "vectors.safetensors"
MANIFEST_FILE = "manifest.json"
_FORMAT = "steering-vectors"
_REDO = "extract the vectors again (python -m steering extract, or SteeringVectors.save)"


@dataclass
class Manifest:
    """Provenance of a set of steering vectors; written as ``manifest.json``."""

    model_class: str
    name_or_path: str
    hidden_size: int
    num_layers: int
    layer_path: str
    layer_indices: list[int]
    method: str
    normalization: str = "none"
    read_position: str = READ_POSITION
    chat_template_sha256: str | None = None
    num_harmful: int = 0
    num_harmless: int = 0
    model_type: str = ""
    dtype: str = ""
    library_version: str = field(default_factory=library_version)
    created: str = field(default_factory=now_iso)
    format: str = _FORMAT
    format_version: int = 1
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Manifest:
        """Validate and build; unknown keys are kept under ``extra`` (written by a newer version)."""
        if data.get("format") != _FORMAT:
            raise ValueError(f"not a steering-vectors manifest (format={data.get('format')!r})")
        if data.get("format_version") != 1:
            raise ValueError(f"manifest format version {data.get('format_version')} is not supported (this library "
                             "reads 1); upgrade mllm-guardrails")
        names = {f.name for f in fields(cls)}
        missing = [n for n in ("model_class", "name_or_path", "hidden_size", "num_layers", "layer_path",
                               "layer_indices", "method") if n not in data]
        if missing:
            raise ValueError(f"manifest lacks {', '.join(missing)}; it was not written by SteeringVectors.save")
        known = {k: v for k, v in data.items() if k in names}
        extra = dict(known.pop("extra", {}) or {})
        extra.update({k: v for k, v in data.items() if k not in names})
        for name in ("hidden_size", "num_layers"):
            if not isinstance(known[name], int) or known[name] < 1:
                raise ValueError(f"manifest {name} must be a positive integer, got {known[name]!r}")
        if not isinstance(known["layer_indices"], list) or not all(isinstance(i, int) for i in known["layer_indices"]):
            raise ValueError(f"manifest layer_indices must be a list of integers, got {known['layer_indices']!r}")
        return cls(**known, extra=extra)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class SteeringVectors:
    """One float32 ``[H]`` vector per decoder layer, its manifest and optionally a :class:`Gate`."""

    vectors: dict[int, torch.Tensor]
    manifest: Manifest
    gate: Gate | None = None

    def __post_init__(self) -> None:
        if not self.vectors:
            raise ValueError("SteeringVectors needs at least one layer vector")
        clean: dict[int, torch.Tensor] = {}
        for layer, v in self.vectors.items():
            if not isinstance(v, torch.Tensor) or v.dim() != 1 or v.shape[0] != self.manifest.hidden_size:
                shape = tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
                raise ValueError(f"vector for layer {layer} has shape {shape}; expected ({self.manifest.hidden_size},)")
            if not bool(torch.isfinite(v).all()):
                # A NaN or inf vector turns every steered activation into NaN: the model answers '!!!!'.
                raise ValueError(f"vector for layer {layer} holds NaN or infinite values; {_REDO}")
            if not 0 <= int(layer) < self.manifest.num_layers:
                raise ValueError(f"layer {layer} is out of range for a model with {self.manifest.num_layers} layers")
            clean[int(layer)] = v.detach().float().cpu()
        self.vectors = dict(sorted(clean.items()))
        if sorted(self.manifest.layer_indices) != list(self.vectors):
            raise ValueError(f"manifest layer_indices {self.manifest.layer_indices} disagree with the vectors' layers "
                             f"{list(self.vectors)}")

    @property
    def layers(self) -> list[int]:
        return list(self.vectors)

    def __getitem__(self, layer: int) -> torch.Tensor:
        return self.vectors[layer]

    def __len__(self) -> int:
        return len(self.vectors)

    @classmethod
    def from_activations(
        cls,
        model: nn.Module,
        harmful: Activations,
        harmless: Activations,
        *,
        method: Method = "mean_diff",
        normalize: Literal["none", "unit"] = "none",
        processor: Any = None,
        chat_template_sha256: str | None = None,
        path: str | None = None,
    ) -> SteeringVectors:
        """Vectors from already-extracted activations of ``model`` (recorded in the manifest)."""
        vectors = compute_directions(harmful, harmless, method, normalize)
        record = model_record(model, path, processor)
        if chat_template_sha256 is not None:
            record["chat_template_sha256"] = chat_template_sha256
        dtype = next((str(p.dtype).replace("torch.", "") for p in model.parameters() if p.is_floating_point()), "")
        # Mean last-token activation norm per layer over both sets: what scale='relative' measures alpha against.
        norms = {str(layer): float(torch.cat([harmful.values[:, k], harmless.values[:, k]]).float().norm(dim=-1).mean())
                 for k, layer in enumerate(harmful.layer_indices) if layer in vectors}
        manifest = Manifest(**record, layer_indices=list(vectors), method=method, normalization=normalize,
                            num_harmful=len(harmful), num_harmless=len(harmless), dtype=dtype,
                            extra={"activation_norms": norms})
        return cls(vectors=vectors, manifest=manifest)

    # -- persistence ------------------------------------------------------------------------

    def save(self, directory: str | Path) -> Path:
        """Write ``vectors.safetensors`` + ``manifest.json`` (and the gate files when a gate is attached).

        Gate files left in ``directory`` by an earlier save are removed when no gate is attached, so a
        later :meth:`load` cannot pick up a stale gate.
        """
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        tensors = {f"layer.{i}": v.contiguous() for i, v in self.vectors.items()}
        save_tensors(tensors, out / TENSOR_FILE, metadata={"format": _FORMAT})
        write_json(out / MANIFEST_FILE, self.manifest.to_dict(), indent=2, sort_keys=True)
        if self.gate is not None:
            self.gate.save(out)
        else:
            for name in GATE_FILES:
                (out / name).unlink(missing_ok=True)
        return out

    @classmethod
    def load(cls, directory: str | Path, *, with_gate: bool = True) -> SteeringVectors:
        """Read what :meth:`save` wrote; the gate too when present and ``with_gate``."""
        d = Path(directory)
        if not d.is_dir():
            raise FileNotFoundError(f"steering vectors folder {str(d)!r} does not exist")
        missing = [n for n in (TENSOR_FILE, MANIFEST_FILE) if not (d / n).is_file()]
        if missing:
            raise FileNotFoundError(f"{str(d)!r} is not a steering-vectors folder: missing {', '.join(missing)}")
        with naming(d):
            manifest = Manifest.from_dict(read_json(d / MANIFEST_FILE, fix=_REDO))
            tensors = load_tensors(d / TENSOR_FILE, fix=_REDO)
            vectors: dict[int, torch.Tensor] = {}
            for key, value in tensors.items():
                prefix, _, index = key.partition(".")
                if prefix != "layer" or not index.isdigit():
                    raise ValueError(f"unexpected tensor {key!r} in {d / TENSOR_FILE}; expected 'layer.<index>' keys")
                vectors[int(index)] = value
            gate = Gate.load(d) if with_gate and all((d / n).is_file() for n in GATE_FILES) else None
            return cls(vectors=vectors, manifest=manifest, gate=gate)

    # -- checks -----------------------------------------------------------------------------

    def check_compatible(self, model: nn.Module, tokenizer: Any = None, *, strict_template: bool = True,
                         path: str | None = None) -> list[str]:
        """Refuse a model these vectors do not fit; return notes on tolerated differences.

        Raises ValueError naming every hard mismatch ("hidden size 4096 in vectors vs 2048 in
        model", number of layers; with ``tokenizer``, the chat-template hash unless
        ``strict_template=False``, which warns instead). A different model class, name or layer path
        is allowed (cross-model guidance: vectors from an aligned model of the same architecture)
        and reported in the returned notes. Also checks an attached gate.
        """
        notes = check_against_model("vectors", self.manifest.to_dict(), model, tokenizer,
                                    strict_template=strict_template, path=path)
        if self.gate is not None:
            notes += self.gate.check_compatible(model, tokenizer, strict_template=strict_template, path=path)
        return notes

    def with_gate(self, gate: Gate | None) -> SteeringVectors:
        """The same vectors with ``gate`` attached (hidden sizes must agree)."""
        if gate is not None and gate.hidden_size != self.manifest.hidden_size:
            raise ValueError(f"hidden size {gate.hidden_size} in gate vs {self.manifest.hidden_size} in vectors")
        return SteeringVectors(vectors=dict(self.vectors), manifest=self.manifest, gate=gate)


    def with_choice(self, calibration: Any) -> SteeringVectors:
        """The same vectors with a :class:`~steering.tune.SteeringCalibration`'s choice recorded in the
        manifest (``extra``: alpha, layers, scale, positions and every trial), which InferAligner reads.

        Refuses a calibration with no fluent candidate: a configuration that garbles is never written.
        """
        best = calibration.best
        if best is None:
            raise ValueError("no steering candidate was fluent on the calibration prompts (every one garbled or raised "
                             "the bare model's NLL too much); try smaller alphas or other layers\n" + calibration.table()
                             + "\nnothing was recorded")
        extra = {**self.manifest.extra, "alpha": best.alpha, "layers": list(best.layers), "scale": best.scale,
                 "positions": best.positions, "steering_calibration": calibration.to_dict()}
        manifest = Manifest(**{**self.manifest.to_dict(), "extra": extra})
        return SteeringVectors(vectors=dict(self.vectors), manifest=manifest, gate=self.gate)


def extract_steering_vectors(
    model: nn.Module,
    harmful: Sequence[Prompt],
    harmless: Sequence[Prompt],
    *,
    processor: Any = None,
    prepare: Callable[[Sequence[Prompt]], Mapping[str, Any]] | None = None,
    layers: Sequence[int] | None = None,
    method: Method = "mean_diff",
    normalize: Literal["none", "unit"] = "none",
    batch_size: int = 8,
    progress: bool = True,
    path: str | None = None,
) -> SteeringVectors:
    """Read last-prompt-token activations for both prompt sets and turn them into vectors.

    See :func:`steering.extract.extract_activations` for ``processor``/``prepare`` and
    :func:`steering.extract.compute_directions` for ``method``/``normalize``. With ``prepare``, the
    chat-template hash recorded is ``prepare.template_sha256`` when it has one, else none.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if method != "mean_diff" and len(harmful) != len(harmless):  # fail before any forward pass
        raise ValueError(f"method {method!r} pairs prompts: got {len(harmful)} harmful vs {len(harmless)} harmless; "
                         "give equal counts or use method='mean_diff'")
    kw = dict(processor=processor, prepare=prepare, layers=layers, batch_size=batch_size, progress=progress, path=path)
    pos = extract_activations(model, harmful, desc="harmful", **kw)
    neg = extract_activations(model, harmless, desc="harmless", **kw)
    template = None if processor is not None else getattr(prepare, "template_sha256", None)
    return SteeringVectors.from_activations(model, pos, neg, method=method, normalize=normalize, processor=processor,
                                            chat_template_sha256=template, path=path)
