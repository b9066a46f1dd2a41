"""Activations at the last prompt token of every decoder layer, and steering directions from them.

The read position is the last token of the processed prompt: after the chat template (with the
generation prompt) and, for VLMs, after image-token expansion, i.e. the last real position of the
``input_ids`` the model sees. Batches are left-padded; the position of each row is taken from the
attention mask, so a right-padded batch from a custom ``prepare`` is read correctly too.

>>> acts = extract_activations(model, ["How do I bake bread?"], processor=tokenizer)  # doctest: +SKIP
>>> acts.values.shape          # [prompts, layers, hidden], float32 on CPU  # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import inspect
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Union, cast

import torch
from torch import nn

from ._methods import METHODS, Method  # noqa: F401 - re-exported: steering.extract.METHODS
from ._outputs import hidden_of
from .layers import LayerInfo, find_decoder_layers

__all__ = [
    "METHODS",
    "READ_POSITION",
    "Activations",
    "ChatPreparer",
    "Prompt",
    "compute_directions",
    "extract_activations",
    "input_device",
    "last_token_index",
    "read_last_token",
    "template_hashes",
    "template_sha256",
]

# A prompt is a user string or a whole conversation (list of {"role", "content"} messages).
Prompt = Union[str, Sequence[Mapping[str, Any]]]  # noqa: UP007 (public runtime alias: kept a typing.Union object)
READ_POSITION = "last_prompt_token"
_MEDIA_TYPES = ("image", "video", "audio")


# --------------------------------------------------------------------------------------------
# Chat templates
# --------------------------------------------------------------------------------------------


def _template_string(obj: Any) -> str | None:
    template = getattr(obj, "chat_template", None)
    if template is None or template == "":
        return None
    if isinstance(template, dict):  # several named templates: hash them all, in a stable order
        return json.dumps(template, sort_keys=True)
    return str(template)


def template_sha256(processor: Any) -> str | None:
    """sha256 (hex) of the chat template a processor/tokenizer applies; None when it has none.

    A processor's own template wins over its tokenizer's, as in ``apply_chat_template``.
    """
    template = _template_string(processor)
    if template is None and hasattr(processor, "tokenizer"):
        template = _template_string(processor.tokenizer)
    return None if template is None else hashlib.sha256(template.encode("utf-8")).hexdigest()


def template_hashes(processor: Any) -> set[str]:
    """Hashes of every template the object carries (processor and its tokenizer), for compatibility checks."""
    out = set()
    for obj in (processor, getattr(processor, "tokenizer", None)):
        template = _template_string(obj) if obj is not None else None
        if template is not None:
            out.add(hashlib.sha256(template.encode("utf-8")).hexdigest())
    return out


def _is_multimodal_processor(processor: Any) -> bool:
    try:
        from transformers import PreTrainedTokenizerBase
    except ImportError:  # pragma: no cover - transformers is a dependency
        PreTrainedTokenizerBase = ()  # type: ignore[misc, assignment]  # isinstance(x, ()) is False
    return not isinstance(processor, PreTrainedTokenizerBase) and hasattr(processor, "tokenizer")


class ChatPreparer:
    """Turns prompts or conversations into left-padded model inputs with ``apply_chat_template``.

    Works with any tokenizer or processor that has ``apply_chat_template``. Strings become one user
    turn. For a multimodal processor, message content is given as parts (``{"type": "text", ...}``,
    ``{"type": "image", "image": ...}``); for a tokenizer, text parts are joined with newlines and an
    image part is refused (it needs a processor).

    >>> prepare = ChatPreparer(tokenizer)                       # doctest: +SKIP
    >>> inputs = prepare(["Hi", [{"role": "user", "content": "Hello"}]])  # doctest: +SKIP
    """

    def __init__(self, processor: Any, *, add_generation_prompt: bool = True, **template_kwargs: Any) -> None:
        if not callable(getattr(processor, "apply_chat_template", None)):
            raise TypeError(f"{type(processor).__name__} has no apply_chat_template; pass a tokenizer or processor, "
                            "or your own prepare=callable returning model inputs")
        if template_sha256(processor) is None:
            raise ValueError(f"{type(processor).__name__} has no chat template; set .chat_template (a Jinja string) "
                             "or pass prepare= with your own formatting")
        self.processor = processor
        self.multimodal = _is_multimodal_processor(processor)
        self.add_generation_prompt = add_generation_prompt
        self.template_kwargs = template_kwargs
        self.template_sha256 = template_sha256(processor)

    def conversation(self, prompt: Prompt, index: int = 0) -> list[dict[str, Any]]:
        """The template form of one prompt (string content for tokenizers, parts for processors)."""
        if isinstance(prompt, str):
            messages: Sequence[Mapping[str, Any]] = [{"role": "user", "content": prompt}]
        elif isinstance(prompt, Sequence) and all(isinstance(m, Mapping) for m in prompt) and len(prompt) > 0:
            messages = cast(Sequence[Mapping[str, Any]], prompt)  # mypy keeps str in the Prompt union here
        else:
            raise TypeError(f"prompt {index} is a {type(prompt).__name__}; give a string or a non-empty list of "
                            "{'role': ..., 'content': ...} messages")
        out = []
        for j, message in enumerate(messages):
            if "role" not in message or "content" not in message:
                raise ValueError(f"prompt {index}, message {j} needs 'role' and 'content' keys, got {sorted(message)}")
            content = message["content"]
            parts = [{"type": "text", "text": content}] if isinstance(content, str) else list(content)
            for p in parts:
                if not isinstance(p, Mapping) or "type" not in p:
                    raise ValueError(f"prompt {index}, message {j}: each content part must be a dict with a 'type'")
            if self.multimodal:
                out.append({"role": message["role"], "content": [dict(p) for p in parts]})
                continue
            media = [p["type"] for p in parts if p["type"] in _MEDIA_TYPES]
            if media:
                raise ValueError(f"prompt {index} has a {media[0]} part but {type(self.processor).__name__} is a "
                                 "text tokenizer; pass the model's multimodal processor (AutoProcessor) instead")
            out.append({"role": message["role"], "content": "\n".join(str(p.get("text", "")) for p in parts)})
        return out

    def __call__(self, prompts: Sequence[Prompt]) -> Mapping[str, torch.Tensor]:
        conversations = [self.conversation(p, i) for i, p in enumerate(prompts)]
        # Left padding keeps every row's last prompt token at the last position, as generate needs;
        # asked for per call (not by setting tokenizer.padding_side: a tokenizer may be shared across
        # threads). Processors take tokenizer options in processor_kwargs, tokenizers in tokenizer_kwargs.
        from transformers import ProcessorMixin  # here: importing steering must not import transformers

        if isinstance(self.processor, ProcessorMixin):
            padding: dict[str, Any] = {"processor_kwargs": {"padding": True, "padding_side": "left"}}
        else:
            padding = {"padding": True, "tokenizer_kwargs": {"padding_side": "left"}}
        return self.processor.apply_chat_template(
            conversations,
            add_generation_prompt=self.add_generation_prompt,
            tokenize=True,
            return_dict=True,
            return_tensors="pt",
            **padding,
            **self.template_kwargs,
        )


# --------------------------------------------------------------------------------------------
# Reading activations
# --------------------------------------------------------------------------------------------


class _StopForward(Exception):
    """Raised by the last reading hook: layers above it and the LM head are never computed."""


def input_device(model: nn.Module) -> torch.device:
    """Where the model wants its inputs: the input embeddings' device (first shard with device_map)."""
    get = getattr(model, "get_input_embeddings", None)
    emb = get() if callable(get) else None
    if isinstance(emb, nn.Module):
        for p in emb.parameters():
            return p.device
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _model_dtype(model: nn.Module) -> torch.dtype:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def _to_model(model: nn.Module, inputs: Mapping[str, Any]) -> dict[str, Any]:
    device, dtype = input_device(model), _model_dtype(model)
    out = {}
    for k, v in dict(inputs).items():
        if isinstance(v, torch.Tensor):
            # Pixel values must match the weights' dtype (bf16/fp16 models); ids and masks stay integer.
            v = v.to(device=device, dtype=dtype) if v.is_floating_point() else v.to(device)
        out[k] = v
    return out


def last_token_index(inputs: Mapping[str, Any]) -> torch.Tensor | None:
    """Per row, the index of the last real (attention mask 1) position; None without a 2-D mask.

    Raises ValueError for a row whose mask is all zeros (an empty prompt).
    """
    mask = inputs.get("attention_mask")
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
        return None
    real = mask != 0
    if not bool(real.any(dim=1).all()):
        raise ValueError("a prompt row has an all-zero attention mask (empty prompt); remove empty prompts")
    seq = mask.shape[1]
    # argmax finds the first True of the reversed mask, i.e. the last real position.
    return (seq - 1 - real.flip(1).int().argmax(dim=1)).long()


def _accepts(model: nn.Module, name: str) -> bool:
    try:
        return name in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def _with_generation_positions(model: nn.Module, inputs: Mapping[str, Any]) -> Mapping[str, Any]:
    """Add the position ids ``generate`` would use for this prompt when the caller gave none.

    A plain forward numbers left-padded rows from the first pad, while ``generate`` numbers them
    from the first real token: absolute-position models (GPT-2) and Qwen2-VL's 3-D rope would
    otherwise read different activations than the ones the prefill of ``generate`` produces.
    """
    mask = inputs.get("attention_mask")
    ids = inputs.get("input_ids")
    if inputs.get("position_ids") is not None or not isinstance(mask, torch.Tensor) or mask.dim() != 2:
        return inputs
    if not isinstance(ids, torch.Tensor) or not _accepts(model, "position_ids"):
        return inputs
    prepare = getattr(model, "_prepare_position_ids_for_generation", None)
    if callable(prepare):  # transformers' own rule (3-D for Qwen2-VL), exactly as generate calls it
        positions = prepare(ids, dict(inputs))
    else:
        positions = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)
    return {**inputs, "position_ids": positions}


def read_last_token(
    model: nn.Module,
    inputs: Mapping[str, Any],
    layer_indices: Sequence[int],
    info: LayerInfo | None = None,
) -> dict[int, torch.Tensor]:
    """One forward pass; per layer, the float32 ``[B, H]`` output at each row's last prompt position.

    The forward stops after the highest requested layer (the rest of the model is never run), with
    no KV cache. Tensors stay on their layer's device. ``inputs`` must already be on the model's
    input device.
    """
    info = info or find_decoder_layers(model)
    wanted = sorted(set(int(i) for i in layer_indices))
    if not wanted:
        raise ValueError("no layers requested; pass at least one layer index")
    for i in wanted:
        if not 0 <= i < info.num_layers:
            raise ValueError(f"layer {i} is out of range: {type(model).__name__} has {info.num_layers} decoder layers")
    index = last_token_index(inputs)
    inputs = _with_generation_positions(model, inputs)
    seq_len = inputs["input_ids"].shape[1] if isinstance(inputs.get("input_ids"), torch.Tensor) else None
    out: dict[int, torch.Tensor] = {}
    last = wanted[-1]
    cache: dict[torch.device, torch.Tensor] = {}

    def make_hook(layer_index: int) -> Callable:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            hidden = hidden_of(output)
            if seq_len is not None and hidden.shape[1] != seq_len:
                raise ValueError(f"layer {layer_index} saw {hidden.shape[1]} positions but input_ids has {seq_len}; "
                                 "this model changes the sequence length internally, so the last prompt token "
                                 "cannot be located from the attention mask")
            if index is None:
                picked = hidden[:, -1]
            else:
                idx = cache.get(hidden.device)
                if idx is None:
                    idx = cache[hidden.device] = index.to(hidden.device)
                picked = hidden[torch.arange(hidden.shape[0], device=hidden.device), idx]
            out[layer_index] = picked.float()  # fp32 from here on, whatever the model dtype
            if layer_index == last:
                raise _StopForward

        return hook

    handles = [info.layers[i].register_forward_hook(make_hook(i)) for i in wanted]
    try:
        model(**inputs, use_cache=False)
    except _StopForward:
        pass
    finally:
        for h in handles:
            h.remove()
    missing = [i for i in wanted if i not in out]
    if missing:
        raise RuntimeError(f"layers {missing} of {info.path} never ran during the forward pass; pass path= to the "
                           "decoder layers the model actually uses")
    return out


@dataclass
class Activations:
    """Last-prompt-token activations: ``values[n, k]`` is prompt n at layer ``layer_indices[k]``.

    ``values`` is float32 on CPU, shape ``[prompts, layers, hidden]``.
    """

    layer_indices: list[int]
    values: torch.Tensor

    def __post_init__(self) -> None:
        if self.values.dim() != 3 or self.values.shape[1] != len(self.layer_indices):
            raise ValueError(f"values must be [prompts, {len(self.layer_indices)} layers, hidden], "
                             f"got {tuple(self.values.shape)}")

    def __len__(self) -> int:
        return int(self.values.shape[0])

    def at(self, layer: int) -> torch.Tensor:
        """``[prompts, hidden]`` at one decoder layer."""
        try:
            k = self.layer_indices.index(int(layer))
        except ValueError:
            raise KeyError(f"layer {layer} was not extracted; available: {self.layer_indices}") from None
        return self.values[:, k]


def _progress(total: int, desc: str, enabled: bool) -> Any:
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is optional: no bar, same results
        return None
    return tqdm(total=total, desc=desc, unit="prompt")


def extract_activations(
    model: nn.Module,
    prompts: Sequence[Prompt],
    *,
    processor: Any = None,
    prepare: Callable[[Sequence[Prompt]], Mapping[str, Any]] | None = None,
    layers: Sequence[int] | None = None,
    batch_size: int = 8,
    progress: bool = True,
    path: str | None = None,
    desc: str = "activations",
) -> Activations:
    """Activations at the last prompt token of the chosen decoder layers (all by default).

    Give ``processor`` (a tokenizer or processor with a chat template: prompts are chat-templated
    with the generation prompt) or ``prepare`` (a callable turning a list of prompts into model
    inputs with an ``attention_mask``). Runs without gradients, in eval mode (restored
    afterwards), ``batch_size`` prompts of similar length per forward; rows come back in the given order.
    """
    if (processor is None) == (prepare is None):
        raise ValueError("pass exactly one of processor= (tokenizer/processor with a chat template) or prepare=")
    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence):
        raise TypeError("prompts must be a list of strings or conversations, not a single "
                        f"{type(prompts).__name__}; wrap one prompt in a list")
    if len(prompts) == 0:
        raise ValueError("no prompts given; pass at least one")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    prepare = prepare or ChatPreparer(processor)
    info = find_decoder_layers(model, path)
    wanted = list(range(info.num_layers)) if layers is None else sorted(set(int(i) for i in layers))
    rows: list[torch.Tensor] = []
    bar = _progress(len(prompts), desc, progress)
    was_training = model.training
    model.eval()  # dropout would make the read activations random
    try:
        # no_grad, not inference_mode: side tensors some models cache (Qwen2-VL rope_deltas) stay usable later.
        # Batches of similar length: one long prompt (HarmBench's contextual rows run to 700 tokens)
        # would otherwise pad its whole batch to its length. Rows go back to their order below.
        order = sorted(range(len(prompts)), key=lambda i: len(str(prompts[i])))
        with torch.no_grad():
            for start in range(0, len(prompts), batch_size):
                batch = [prompts[i] for i in order[start:start + batch_size]]
                inputs = _to_model(model, prepare(batch))
                got = read_last_token(model, inputs, wanted, info)
                rows.append(torch.stack([got[i].cpu() for i in wanted], dim=1))
                if bar is not None:
                    bar.update(len(batch))
    finally:
        model.train(was_training)
        if bar is not None:
            bar.close()
    values = torch.empty_like(sorted_values := torch.cat(rows, dim=0))
    values[torch.tensor(order)] = sorted_values
    return Activations(layer_indices=wanted, values=values)


# --------------------------------------------------------------------------------------------
# Directions
# --------------------------------------------------------------------------------------------


def compute_directions(
    harmful: Activations,
    harmless: Activations,
    method: Method = "mean_diff",
    normalize: Literal["none", "unit"] = "none",
) -> dict[int, torch.Tensor]:
    """Per layer, the float32 ``[H]`` direction from harmless towards harmful activations.

    - ``mean_diff``: mean(harmful) - mean(harmless) (InferAligner's safety related vector).
    - ``paired_mean_diff``: mean of ``harmful[i] - harmless[i]``; needs equal counts. With every
      pair used it equals ``mean_diff`` numerically; it exists to enforce the pairing.
    - ``pca``: first principal direction of the paired differences, uncentered so that the direction
      the pairs share is kept (a centered PCA would discard exactly that mean difference), signed to
      agree with the mean difference and scaled to the mean difference's projection on it.

    ``normalize="unit"`` divides each direction by its norm.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if normalize not in ("none", "unit"):
        raise ValueError(f"normalize must be 'none' or 'unit', got {normalize!r}")
    if harmful.layer_indices != harmless.layer_indices:
        raise ValueError(f"harmful and harmless activations cover different layers "
                         f"({harmful.layer_indices} vs {harmless.layer_indices}); extract both with the same layers=")
    if len(harmful) == 0 or len(harmless) == 0:
        raise ValueError("need at least one harmful and one harmless prompt")
    if method != "mean_diff" and len(harmful) != len(harmless):
        raise ValueError(f"method {method!r} pairs prompts: got {len(harmful)} harmful vs {len(harmless)} harmless; "
                         "give equal counts or use method='mean_diff'")
    out: dict[int, torch.Tensor] = {}
    for k, layer in enumerate(harmful.layer_indices):
        pos = harmful.values[:, k].double()  # float64 sums: thousands of bf16-scale rows lose no precision
        neg = harmless.values[:, k].double()
        mean_diff = pos.mean(0) - neg.mean(0)
        if method == "mean_diff":
            vec = mean_diff
        elif method == "paired_mean_diff":
            vec = (pos - neg).mean(0)
        else:
            diffs = pos - neg
            # Top right-singular vector of the (uncentered) difference matrix.
            _, _, vh = torch.linalg.svd(diffs, full_matrices=False)
            u = vh[0]
            if torch.dot(u, mean_diff) < 0:
                u = -u
            vec = torch.dot(u, mean_diff) * u
        if normalize == "unit":
            norm = vec.norm()
            if norm == 0:
                raise ValueError(f"the direction at layer {layer} is zero (harmful and harmless activations coincide); "
                                 "it cannot be normalised")
            vec = vec / norm
        out[layer] = vec.float()
    return out
