"""The model side of a call: chat templates, left-padded batches, generation and decoding.

Stateless after construction (safe to share between threads); defenses reach the model through
the call's :class:`guardrails.calls.ModelCalls`, which uses this. Every tokenizer call holds
:func:`tokenizer_lock`, which makes one tokenizer safe to share between threads.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import ProcessorMixin

from guardrails import conversation as conv_mod
from guardrails.conversation import Conversation


@dataclass
class Generation:
    """One row of a bare generation: decoded text and the new token ids (no prompt, no padding)."""

    text: str
    token_ids: list[int]


def is_multimodal(model: Any) -> bool:
    """True for image-text-to-text models (their config carries a vision tower)."""
    config = getattr(model, "config", None)
    return getattr(config, "vision_config", None) is not None


def has_image_processor(processor: Any) -> bool:
    """True for a multimodal processor (one that turns images into pixel values), False for a bare tokenizer."""
    return getattr(processor, "image_processor", None) is not None


_TOKENIZER_LOCKS: weakref.WeakKeyDictionary[Any, threading.RLock] = weakref.WeakKeyDictionary()
_TOKENIZER_LOCKS_GUARD = threading.Lock()
_FALLBACK_LOCK = threading.RLock()


def tokenizer_lock(tokenizer: Any) -> threading.RLock:
    """The one lock of ``tokenizer`` (a processor's tokenizer for a processor): hold it around each call.

    A fast tokenizer keeps its padding and truncation settings as state on one shared Rust object and
    sets them at every call, so two threads interleave: one thread's batch comes back unpadded ("Unable
    to create tensor") or with another call's padding side (transformers#47085, tokenizers#537).
    Re-entrant, so a tokenizer call nested in another of the same thread does not deadlock; held only
    for the tokenizer call, never around model code, so it cannot order against the model lock.
    """
    tokenizer = getattr(tokenizer, "tokenizer", None) or tokenizer
    with _TOKENIZER_LOCKS_GUARD:
        try:
            lock = _TOKENIZER_LOCKS.get(tokenizer)
            if lock is None:
                lock = _TOKENIZER_LOCKS[tokenizer] = threading.RLock()
        except TypeError:  # not weak-referenceable: one lock for all such objects (correct, just coarser)
            lock = _FALLBACK_LOCK
        return lock


class Engine:
    """Turns conversations into model inputs and generated ids back into text, for one model."""

    def __init__(self, model: Any, processor: Any | None):
        self.model = model
        #: None (and so the tokenizer) for a generate()-only wrapper; the chat paths check first (_require_template)
        self.processor: Any = processor
        self.multimodal = is_multimodal(model)
        if self.multimodal and processor is None:
            raise ValueError(
                f"{type(model).__name__} is a multimodal model and needs its processor: "
                "wrap(model, AutoProcessor.from_pretrained(model_id), ...)"
            )
        if self.multimodal and not has_image_processor(processor):
            # A tokenizer renders the image placeholders as text and never makes pixel_values:
            # the model would answer without ever seeing the image.
            raise ValueError(
                f"{type(model).__name__} takes images but {type(processor).__name__} has no image processor, so "
                "images would never reach the model; pass its processor, e.g. "
                "wrap(model, AutoProcessor.from_pretrained(model_id), ...), not its tokenizer"
            )
        self.tokenizer: Any = getattr(processor, "tokenizer", processor)
        if processor is not None and self.tokenizer is None:
            raise TypeError(f"processor {type(processor).__name__} has no tokenizer; pass the model's processor or tokenizer")

    # -- prompts ---------------------------------------------------------------------------
    def _require_template(self) -> None:
        if self.processor is None:
            raise ValueError(
                f"chat() and stream() need a tokenizer or processor to apply the chat template; "
                f"wrap({type(self.model).__name__}, tokenizer, ...) or use generate(**inputs)"
            )
        owner = self.processor
        template = getattr(owner, "chat_template", None) or getattr(self.tokenizer, "chat_template", None)
        if not template:
            raise ValueError(
                f"{type(owner).__name__} has no chat template; set processor.chat_template (a Jinja string) "
                "before wrapping, as transformers' apply_chat_template needs one"
            )

    def _template_inputs(self, conversations: Sequence[Conversation]) -> list[Conversation]:
        self._require_template()
        out = []
        for k, c in enumerate(conversations):
            c = conv_mod.validate(c, k, allow_assistant_last=True)
            if not self.multimodal and conv_mod.image_parts(c):
                raise ValueError(
                    f"conversation {k} has an image but {type(self.model).__name__} is a text-only model; "
                    "remove the image parts or use an image-text-to-text model"
                )
            out.append(conv_mod.to_template_form(c, self.multimodal, f"conversation {k}"))
        return out

    def render(self, conversations: Sequence[Conversation], add_generation_prompt: bool = True) -> list[str]:
        """The prompt strings exactly as the chat template writes them (before tokenization)."""
        batch = self._template_inputs(conversations)
        return [
            self.processor.apply_chat_template(c, add_generation_prompt=add_generation_prompt, tokenize=False)
            for c in batch
        ]

    def encode(self, conversations: Sequence[Conversation], continue_final_message: bool = False) -> dict[str, torch.Tensor]:
        """A left-padded batch of model inputs on the model's (first) device.

        With ``continue_final_message`` the last (assistant) message is left open, so the
        model continues it instead of starting a new turn.
        """
        batch = self._template_inputs(conversations)
        # Left padding keeps every row's last prompt token at position -1, which batched generation
        # and last-token reads rely on. Asked for per call: the tokenizer may be shared across threads.
        # Processors take tokenizer options in processor_kwargs; tokenizers in tokenizer_kwargs.
        padding: dict[str, Any]
        if isinstance(self.processor, ProcessorMixin):
            padding = {"processor_kwargs": {"padding": True, "padding_side": "left"}}
        else:
            padding = {"padding": True, "tokenizer_kwargs": {"padding_side": "left"}}
        with tokenizer_lock(self.tokenizer):
            enc = self.processor.apply_chat_template(
                batch,
                add_generation_prompt=not continue_final_message,
                continue_final_message=continue_final_message,
                tokenize=True,
                return_dict=True,
                return_tensors="pt",
                **padding,
            )
        return self._on_device(enc)

    def encode_texts(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        """A left-padded batch of raw prompt strings (no chat template)."""
        with tokenizer_lock(self.tokenizer):
            enc = self.tokenizer(list(texts), return_tensors="pt", padding=True, padding_side="left")
        return self._on_device(enc)

    def _on_device(self, enc: Any) -> dict[str, torch.Tensor]:
        device = _input_device(self.model)
        return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in dict(enc).items()}

    # -- generation ------------------------------------------------------------------------
    @property
    def stop_token_ids(self) -> set[int]:
        """EOS and padding ids of the model's generation config and the tokenizer."""
        return _token_ids(getattr(self.model, "generation_config", None), self.tokenizer)

    def stop_token_ids_for(self, generate_kwargs: dict[str, Any]) -> set[int]:
        """:attr:`stop_token_ids` plus an ``eos_token_id``/``pad_token_id`` given to this one call
        (directly or in its ``generation_config``): generate stops there, so the text must end there too."""
        return self.stop_token_ids | _token_ids(generate_kwargs.get("generation_config"), generate_kwargs)

    @property
    def pad_token_id(self) -> int | None:
        pad = getattr(self.tokenizer, "pad_token_id", None) if self.tokenizer is not None else None
        if pad is None:
            eos = getattr(self.model.generation_config, "eos_token_id", None)
            pad = eos[0] if isinstance(eos, (list, tuple)) else eos
        return pad

    def run_generate(self, inputs: dict[str, Any], kw: dict[str, Any], streamer: Any = None) -> Any:
        """``model.generate`` (inference mode, the pad token defaulted); returns what it returns."""
        kw = dict(kw)
        kw.setdefault("pad_token_id", self.pad_token_id)
        if streamer is not None:
            kw["streamer"] = streamer
        with torch.inference_mode():
            return self.model.generate(**inputs, **kw)

    def generations(self, output: Any, prompt_len: int, stops: set[int] | None = None) -> list[Generation]:
        """Decoded new tokens per row of a ``generate`` output, cut at the first stop token
        (``stops``, default :attr:`stop_token_ids`)."""
        sequences = output if isinstance(output, torch.Tensor) else output.sequences
        stops = self.stop_token_ids if stops is None else stops
        rows = []
        for seq in sequences[:, prompt_len:].tolist():
            ids = []
            for t in seq:
                if t in stops:
                    break
                ids.append(t)
            rows.append(Generation(self.decode(ids), ids))
        return rows

    def decode(self, token_ids: list[int]) -> str:
        with tokenizer_lock(self.tokenizer):
            return self.tokenizer.decode(token_ids, skip_special_tokens=True)

    def token_id(self, text: str) -> int:
        """The single token id of ``text``; an error when the tokenizer splits it."""
        with tokenizer_lock(self.tokenizer):
            ids = self.tokenizer.encode(text, add_special_tokens=False)
        if len(ids) != 1:
            raise ValueError(f"{text!r} is not a single token for {type(self.tokenizer).__name__} (got ids {ids})")
        return ids[0]


def _token_ids(*sources: Any) -> set[int]:
    """Every ``eos_token_id`` / ``pad_token_id`` (an int or a list) found on objects or in dicts."""
    ids: set[int] = set()
    for source in sources:
        for attr in ("eos_token_id", "pad_token_id"):
            v = source.get(attr) if isinstance(source, dict) else getattr(source, attr, None)
            if isinstance(v, int) and not isinstance(v, bool):
                ids.add(v)
            elif isinstance(v, (list, tuple)):
                ids.update(int(x) for x in v)
            elif isinstance(v, torch.Tensor):
                ids.update(int(x) for x in v.reshape(-1).tolist())
    return ids


def _input_device(model: Any) -> torch.device:
    # With a device_map split, inputs go where the embeddings are; model.device is that device.
    device = getattr(model, "device", None)
    return device if isinstance(device, torch.device) else torch.device("cpu")
