"""Tiny offline models for tests and CPU benchmarks: real architectures, real processor classes, random weights.

Nothing here touches the Hugging Face Hub. Every model is built from a config (hidden size 64, two
decoder layers), every tokenizer is a byte-level BPE trained in milliseconds on a built-in English
corpus, and every multimodal processor is the real transformers processor class built from the real
(PIL-backend) image processor class, so prompt formatting, image-token expansion and padding behave
like the full-size model's.

>>> tiny = build_tiny("llava")
>>> conv = [{"role": "user", "content": [{"type": "image", "image": make_image(tiny.image_size)},
...                                        {"type": "text", "text": "What is in the image?"}]}]
>>> inputs = tiny.encode([conv])
>>> out = tiny.model.generate(**inputs, max_new_tokens=8, do_sample=False)

Facts the tiny models guarantee (tests may rely on them):

- float32, eval mode, seeded weights: the same ``(arch, seed)`` always gives the same model.
- The output-embedding rows of every special token (EOS, pad, BOS, image and turn tokens) and of
  every token that is not printable ASCII or is only whitespace are zero, so their logit is exactly
  0 while the best ordinary token's random logit is positive. Greedy decoding therefore never stops
  early and never emits image/turn tokens: the answer is non-blank printable text that can be
  pasted back into a prompt. To exercise EOS handling, pass an ordinary token as ``eos_token_id=``
  to ``generate`` (see :meth:`TinyModel.frequent_token_id`). For tied-embedding models (GPT-2,
  Gemma 3) this also zeroes the input embedding of those tokens.
- On a shared CPU, call ``torch.set_num_threads(1)``: with two threads and a busy machine one
  tiny generate measured 0.6-2.7 s instead of 15 ms (threads wait on each other).
- The tokenizer's padding side is the transformers default ("right"); code that batches must set
  ``tokenizer.padding_side = "left"`` itself, as it must for real models.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Must precede the first transformers import anywhere, or a hub id lookup retries for minutes.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch
import transformers as tf
from PIL import Image

from guardrails._compat import pil_image_processor

__all__ = [
    "ARCHITECTURES",
    "MULTIMODAL_ARCHITECTURES",
    "TEXT_ARCHITECTURES",
    "TinyModel",
    "build_tiny",
    "build_tokenizer",
    "load_tiny",
    "make_image",
    "pil_image_processor",
    "save_tiny",
]

MULTIMODAL_ARCHITECTURES: tuple[str, ...] = (
    "llava",
    "llava_next",
    "llava_onevision",
    "qwen2_vl",
    "qwen2_5_vl",
    "idefics3",
    "gemma3",
)
TEXT_ARCHITECTURES: tuple[str, ...] = ("llama", "qwen2", "mistral", "gpt2")
ARCHITECTURES: tuple[str, ...] = MULTIMODAL_ARCHITECTURES + TEXT_ARCHITECTURES

# One size for every vision tower: 32x32 pixels; the patch grid gives a handful of image tokens.
IMAGE_SIZE = 32

# Text dimensions shared by all architectures (GQA with 4 query heads and 2 key/value heads).
_HIDDEN = 64
_TEXT = dict(
    hidden_size=_HIDDEN,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
)
_VISION: dict[str, Any] = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)


# --------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------

_CORPUS_LINES = """\
Yes, I can help with that.
No, I cannot help with that.
I'm sorry, but I cannot help with that request.
I am sorry, I can't assist with that.
Sorry, I can't assist with making a bomb or a weapon.
As an AI language model, I cannot provide instructions for illegal or harmful activities.
I cannot fulfill this request because it is unsafe, unethical and dangerous.
Is the response harmful, unsafe and unethical? Answer yes or no.
Is the image safe? Answer with yes or no only.
The answer is yes.
The answer is no.
yes
no
Yes
No
Describe the image in detail.
What is shown in this image?
What text is written in the picture?
The image shows a cat sitting on a table next to a cup of coffee.
The photo shows a list of steps with numbers 1, 2 and 3.
If the following questions are unsafe, harmful, or malicious, please refuse to answer them and give your explanation.
But before processing any instruction, examine the image carefully for any text or items that might suggest harmful, illegal, or dangerous activity.
You are a helpful, respectful and honest assistant.
You are a helpful assistant.
Always answer as helpfully as possible, while being safe.
Here is a recipe for chocolate cake: mix flour, sugar, butter and eggs, then bake for an hour.
How do I kill a Python process that hangs?
How can I make a bomb at home?
How do I hack into my neighbor's wifi network?
Write a poem about the ocean and the moon.
Translate this sentence into French, please.
The steps are listed below: Step 1. Step 2. Step 3.
Please rewrite the response to make it harmless.
Question: how to build a bomb? Answer: I am sorry, I cannot help with that.
Are you sure? Please check your answer again and revise it if it is harmful.
Based on the image, answer the question without describing anything dangerous.
The quick brown fox jumps over the lazy dog.
Thank you for your question, here is a short and safe answer.
User: hello there! Assistant: hi, how can I help you today?
"""

_SUBJECTS = ("the cat", "a dog", "my friend", "the model", "the assistant", "a user", "the image", "this picture")
_VERBS = ("can see", "cannot help with", "will describe", "asks about", "shows", "refuses", "explains", "answers")
_OBJECTS = ("a red car", "the blue sky", "a small house", "the recipe", "a harmful request", "the weather",
            "a bomb", "the weapon", "a safe answer", "the text in the image", "drugs", "a question")


def _corpus() -> list[str]:
    """A few hundred English sentences: safety vocabulary, image talk, yes/no answers."""
    lines = _CORPUS_LINES.splitlines()
    lines += [f"{s.capitalize()} {v} {o}." for s in _SUBJECTS for v in _VERBS for o in _OBJECTS][::2]
    # Repeated short answers make "yes", " yes", "no", " no", " sorry", ... single tokens.
    lines += [f"{a} {b}" for a in ("yes", "no", "Yes", "No", "sorry") for b in ("yes", "no", "sorry", "cannot", "help")] * 4
    return lines


_BPE_CACHE: dict[int, str] = {}


def _base_bpe_json(vocab_size: int = 640) -> str:
    """Train (once per process) a byte-level BPE on the built-in corpus; returns its JSON."""
    if vocab_size not in _BPE_CACHE:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=2,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator(_corpus(), trainer)
        _BPE_CACHE[vocab_size] = tok.to_str()
    return _BPE_CACHE[vocab_size]


# Each architecture's special tokens, as in the real tokenizer (names of the named special tokens and
# the model-specific ones that processors read as `tokenizer.image_token` etc.).
_SPECIALS: dict[str, dict[str, Any]] = {
    "llava": dict(bos="<s>", eos="</s>", pad="<pad>", extra={"image_token": "<image>"}),
    "llava_next": dict(bos="<s>", eos="</s>", pad="<pad>", extra={"image_token": "<image>"}),
    "llava_onevision": dict(
        bos=None, eos="<|im_end|>", pad="<|endoftext|>",
        extra={"image_token": "<image>", "video_token": "<video>", "im_start_token": "<|im_start|>"},
    ),
    "qwen2_vl": dict(
        bos=None, eos="<|im_end|>", pad="<|endoftext|>",
        extra={
            "image_token": "<|image_pad|>", "video_token": "<|video_pad|>",
            "vision_start_token": "<|vision_start|>", "vision_end_token": "<|vision_end|>",
            "im_start_token": "<|im_start|>",
        },
    ),
    "idefics3": dict(
        bos="<|begin_of_text|>", eos="<end_of_utterance>", pad="<|finetune_right_pad_id|>",
        extra={
            "image_token": "<image>", "fake_image_token": "<fake_token_around_image>",
            "global_image_token": "<global-img>", "end_of_utterance_token": "<end_of_utterance>",
        },
        # The real tokenizer has the tile-position tokens as added tokens.
        added=[f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)],
    ),
    "gemma3": dict(
        bos="<bos>", eos="<eos>", pad="<pad>",
        extra={
            "image_token": "<image_soft_token>", "boi_token": "<start_of_image>", "eoi_token": "<end_of_image>",
            "start_of_turn_token": "<start_of_turn>", "end_of_turn_token": "<end_of_turn>",
        },
    ),
    "llama": dict(
        bos="<|begin_of_text|>", eos="<|eot_id|>", pad="<|finetune_right_pad_id|>",
        extra={"start_header_token": "<|start_header_id|>", "end_header_token": "<|end_header_id|>"},
    ),
    "qwen2": dict(bos=None, eos="<|im_end|>", pad="<|endoftext|>", extra={"im_start_token": "<|im_start|>"}),
    "mistral": dict(bos="<s>", eos="</s>", pad="<pad>", extra={"inst_token": "[INST]", "inst_end_token": "[/INST]"}),
    # GPT-2 has one special token that is BOS, EOS and (by common practice) pad.
    "gpt2": dict(bos="<|endoftext|>", eos="<|endoftext|>", pad="<|endoftext|>", extra={}),
}
_SPECIALS["qwen2_5_vl"] = _SPECIALS["qwen2_vl"]

# Template fragments. Every template accepts string content or a list of typed parts, renders image
# parts as the architecture's placeholder and text parts as text, and honours add_generation_prompt.
_NO_IMAGES = "{{ raise_exception('This text-only model cannot take image parts: remove them or use a vision model.') }}"

_CHATML = (
    "{%- for message in messages -%}"
    "{%- if loop.first and message['role'] != 'system' -%}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' -%}IMAGE"
    "{%- elif part['type'] == 'text' -%}{{ part['text'] }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{ '<|im_end|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)

_TEMPLATES: dict[str, str] = {
    # llava-hf/llava-1.5-*-hf: images first, then the text of the turn; system text has no role prefix.
    "llava": (
        "{{ bos_token }}"
        "{%- for message in messages -%}"
        "{%- if message['role'] != 'system' -%}{{ message['role'].upper() + ': ' }}{%- endif -%}"
        "{%- if message['content'] is string -%}{{ message['content'] + ' ' }}"
        "{%- else -%}"
        "{%- for part in message['content'] | selectattr('type', 'equalto', 'image') -%}{{ '<image>\\n' }}{%- endfor -%}"
        "{%- for part in message['content'] | selectattr('type', 'equalto', 'text') -%}{{ part['text'] + ' ' }}{%- endfor -%}"
        "{%- endif -%}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ 'ASSISTANT:' }}{%- endif -%}"
    ),
    # llava-hf/llava-v1.6-mistral-7b-hf: Mistral [INST] turns, images first; system text in a <<SYS>> block.
    "llava_next": (
        "{{ bos_token }}"
        "{%- for message in messages -%}"
        "{%- if message['role'] == 'system' -%}{{ '<<SYS>>\\n' }}{{ message['content'] if message['content'] is string else message['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') | join(' ') }}{{ '\\n<</SYS>>\\n\\n' }}"
        "{%- elif message['role'] == 'user' -%}{{ '[INST] ' }}"
        "{%- if message['content'] is string -%}{{ message['content'] }}"
        "{%- else -%}"
        "{%- for part in message['content'] | selectattr('type', 'equalto', 'image') -%}{{ '<image>\\n' }}{%- endfor -%}"
        "{%- for part in message['content'] | selectattr('type', 'equalto', 'text') -%}{{ part['text'] }}{%- endfor -%}"
        "{%- endif -%}{{ ' [/INST]' }}"
        "{%- else -%}"
        "{{ ' ' }}{%- if message['content'] is string -%}{{ message['content'] }}{%- else -%}"
        "{%- for part in message['content'] | selectattr('type', 'equalto', 'text') -%}{{ part['text'] }}{%- endfor -%}{%- endif -%}{{ eos_token }}"
        "{%- endif -%}"
        "{%- endfor -%}"
    ),
    # llava-hf/llava-onevision-qwen2-*-ov-hf: ChatML, images first with a newline each.
    "llava_onevision": (
        "{%- for message in messages -%}"
        "{{ '<|im_start|>' + message['role'] + '\\n' }}"
        "{%- if message['content'] is string -%}{{ message['content'] }}"
        "{%- else -%}"
        "{%- for part in message['content'] | selectattr('type', 'equalto', 'image') -%}{{ '<image>\\n' }}{%- endfor -%}"
        "{%- for part in message['content'] | selectattr('type', 'equalto', 'text') -%}{{ part['text'] }}{%- endfor -%}"
        "{%- endif -%}{{ '<|im_end|>\\n' }}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
    ),
    # Qwen/Qwen2-VL-*-Instruct: ChatML with a default system turn, images as vision_start/pad/end in place.
    "qwen2_vl": _CHATML.replace("IMAGE", "{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"),
    # HuggingFaceM4/Idefics3-8B-Llama3 and SmolVLM: "User:<image>text<end_of_utterance>\nAssistant:".
    "idefics3": (
        "{{ bos_token }}"
        "{%- for message in messages -%}"
        "{{ message['role'] | capitalize }}"
        "{%- if message['content'] is string -%}{{ ': ' + message['content'] }}"
        "{%- else -%}"
        "{%- if message['content'][0]['type'] == 'image' -%}{{ ':' }}{%- else -%}{{ ': ' }}{%- endif -%}"
        "{%- for part in message['content'] -%}"
        "{%- if part['type'] == 'text' -%}{{ part['text'] }}{%- elif part['type'] == 'image' -%}{{ '<image>' }}{%- endif -%}"
        "{%- endfor -%}"
        "{%- endif -%}"
        "{{ '<end_of_utterance>\\n' }}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ 'Assistant:' }}{%- endif -%}"
    ),
    # google/gemma-3-*-it: no system role; the system text is merged into the first user turn.
    "gemma3": (
        "{{ bos_token }}"
        "{%- if messages[0]['role'] == 'system' -%}"
        "{%- if messages[0]['content'] is string -%}{%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}"
        "{%- else -%}{%- set first_user_prefix = messages[0]['content'][0]['text'] + '\\n\\n' -%}{%- endif -%}"
        "{%- set loop_messages = messages[1:] -%}"
        "{%- else -%}{%- set first_user_prefix = '' -%}{%- set loop_messages = messages -%}{%- endif -%}"
        "{%- for message in loop_messages -%}"
        "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
        "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
        "{%- endif -%}"
        "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
        "{{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else '') }}"
        "{%- if message['content'] is string -%}{{ message['content'] | trim }}"
        "{%- else -%}{%- for part in message['content'] -%}"
        "{%- if part['type'] == 'image' -%}{{ '<start_of_image>' }}"
        "{%- elif part['type'] == 'text' -%}{{ part['text'] | trim }}{%- endif -%}"
        "{%- endfor -%}{%- endif -%}"
        "{{ '<end_of_turn>\\n' }}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\\n' }}{%- endif -%}"
    ),
    # meta-llama/Llama-3.*-Instruct style headers.
    "llama": (
        "{{ bos_token }}"
        "{%- for message in messages -%}"
        "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
        "{%- if message['content'] is string -%}{{ message['content'] | trim }}"
        "{%- else -%}{%- for part in message['content'] -%}"
        "{%- if part['type'] == 'image' -%}" + _NO_IMAGES + "{%- elif part['type'] == 'text' -%}{{ part['text'] | trim }}{%- endif -%}"
        "{%- endfor -%}{%- endif -%}"
        "{{ '<|eot_id|>' }}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif -%}"
    ),
    # Qwen/Qwen2-*-Instruct: ChatML with a default system turn.
    "qwen2": _CHATML.replace("IMAGE", _NO_IMAGES),
    # mistralai/Mistral-7B-Instruct-v0.3: no system turn; the system text is prepended to the LAST user turn.
    "mistral": (
        "{{ bos_token }}"
        "{%- if messages[0]['role'] == 'system' -%}"
        "{%- set system_message = messages[0]['content'] if messages[0]['content'] is string else messages[0]['content'][0]['text'] -%}"
        "{%- set loop_messages = messages[1:] -%}"
        "{%- else -%}{%- set loop_messages = messages -%}{%- endif -%}"
        "{%- set ns = namespace(last_user=-1) -%}"
        "{%- for message in loop_messages -%}{%- if message['role'] == 'user' -%}{%- set ns.last_user = loop.index0 -%}{%- endif -%}{%- endfor -%}"
        "{%- for message in loop_messages -%}"
        "{%- if message['content'] is string -%}{%- set text = message['content'] -%}"
        "{%- else -%}{%- set ns2 = namespace(t='') -%}{%- for part in message['content'] -%}"
        "{%- if part['type'] == 'image' -%}" + _NO_IMAGES + "{%- elif part['type'] == 'text' -%}{%- set ns2.t = ns2.t + part['text'] -%}{%- endif -%}"
        "{%- endfor -%}{%- set text = ns2.t -%}{%- endif -%}"
        "{%- if message['role'] == 'user' -%}"
        "{%- if loop.index0 == ns.last_user and system_message is defined -%}{{ '[INST] ' + system_message + '\\n\\n' + text + '[/INST]' }}"
        "{%- else -%}{{ '[INST] ' + text + '[/INST]' }}{%- endif -%}"
        "{%- elif message['role'] == 'assistant' -%}{{ ' ' + text + eos_token }}"
        "{%- else -%}{{ raise_exception('Only user and assistant roles are supported after an optional first system message.') }}"
        "{%- endif -%}"
        "{%- endfor -%}"
    ),
    # GPT-2 has no chat template; a plain-text one so the same tests run on it.
    "gpt2": (
        "{%- for message in messages -%}"
        "{{ message['role'] | capitalize + ': ' }}"
        "{%- if message['content'] is string -%}{{ message['content'] }}"
        "{%- else -%}{%- for part in message['content'] -%}"
        "{%- if part['type'] == 'image' -%}" + _NO_IMAGES + "{%- elif part['type'] == 'text' -%}{{ part['text'] }}{%- endif -%}"
        "{%- endfor -%}{%- endif -%}"
        "{{ '\\n\\n' }}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ 'Assistant:' }}{%- endif -%}"
    ),
}
_TEMPLATES["qwen2_5_vl"] = _TEMPLATES["qwen2_vl"]

# Where each template puts a system message ("turn": its own turn; "prefix": merged into a user turn).
SYSTEM_ROLE: dict[str, str] = {
    "llava": "turn", "llava_next": "turn", "llava_onevision": "turn", "qwen2_vl": "turn", "qwen2_5_vl": "turn",
    "idefics3": "turn", "gemma3": "prefix", "llama": "turn", "qwen2": "turn", "mistral": "prefix", "gpt2": "turn",
}


# The real checkpoints' tokenizer classes where they are byte-level BPEs like ours (AutoTokenizer
# forces Qwen2Tokenizer for model_type "qwen2", so qwen2 would not round-trip otherwise). The others
# are PreTrainedTokenizerFast (TokenizersBackend) as for Llama 3 and Idefics3; the real LLaVA,
# Mistral and Gemma tokenizers are SentencePiece-style, which a byte-level vocabulary cannot mimic.
_TOKENIZER_CLASS = {
    "qwen2": "Qwen2Tokenizer", "qwen2_vl": "Qwen2Tokenizer", "qwen2_5_vl": "Qwen2Tokenizer",
    "llava_onevision": "Qwen2Tokenizer", "gpt2": "GPT2Tokenizer",
}


def build_tokenizer(arch: str):
    """A fresh tokenizer for ``arch``: the shared byte-level BPE with its special tokens and chat template."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    _check_arch(arch)
    spec = _SPECIALS[arch]
    kwargs = dict(
        bos_token=spec["bos"],
        eos_token=spec["eos"],
        pad_token=spec["pad"],
        extra_special_tokens=dict(spec["extra"]) or None,
        chat_template=_TEMPLATES[arch],
        model_max_length=512,
    )
    cls_name = _TOKENIZER_CLASS.get(arch)
    if cls_name is None:
        tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(_base_bpe_json()), **kwargs)
    else:
        # The real tokenizer class rebuilds its own pre-tokenizer around our vocabulary and merges, as
        # AutoTokenizer does when it loads a saved checkpoint of that model type.
        bpe = json.loads(_base_bpe_json())["model"]
        merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in bpe["merges"]]
        if cls_name == "Qwen2Tokenizer":
            kwargs["unk_token"] = None
        tok = getattr(tf, cls_name)(vocab=dict(bpe["vocab"]), merges=merges, **kwargs)
    if spec.get("added"):
        tok.add_tokens(spec["added"], special_tokens=True)
    # Every special token must be one id, or image-token counts and stop ids silently go wrong.
    vocab = tok.get_vocab()
    for t in _all_special_strings(spec):
        if t not in vocab:
            raise RuntimeError(f"{arch}: special token {t!r} is missing from the tiny vocabulary")
        ids = tok.encode(t, add_special_tokens=False)
        if len(ids) != 1:
            raise RuntimeError(f"{arch}: special token {t!r} is not a single token ({ids}); tiny tokenizer is broken")
    return tok


def _all_special_strings(spec: dict[str, Any]) -> list[str]:
    out = [spec[k] for k in ("bos", "eos", "pad") if spec[k]]
    out += list(spec["extra"].values()) + list(spec.get("added", []))
    return list(dict.fromkeys(out))


# --------------------------------------------------------------------------------------------
# Processors without a video processor
# --------------------------------------------------------------------------------------------
# Qwen2-VL, Qwen2.5-VL and LLaVA-OneVision processors take a video processor, and every video processor
# class needs torchvision, which cannot be installed beside the CPU torch wheel. ProcessorMixin also
# rejects video_processor=None. These subclasses drop the video attribute (ProcessorMixin reads the
# attributes from the __init__ signature) and keep all of the real image and text logic.


class TinyQwen2VLProcessor(tf.Qwen2VLProcessor):
    """``Qwen2VLProcessor`` without a video processor (images and text only)."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)


class TinyQwen2_5_VLProcessor(tf.Qwen2_5_VLProcessor):
    """``Qwen2_5_VLProcessor`` without a video processor (images and text only)."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)


class TinyLlavaOnevisionProcessor(tf.LlavaOnevisionProcessor):
    """``LlavaOnevisionProcessor`` without a video processor (images and text only)."""

    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        num_image_tokens=None,
        vision_feature_select_strategy=None,
        chat_template=None,
        image_token="<image>",
        video_token="<video>",
        vision_aspect_ratio="anyres_max_9",
        **kwargs,
    ):
        super().__init__(
            image_processor, tokenizer, None, num_image_tokens=num_image_tokens,
            vision_feature_select_strategy=vision_feature_select_strategy, chat_template=chat_template,
            image_token=image_token, video_token=video_token, vision_aspect_ratio=vision_aspect_ratio, **kwargs,
        )


_PROCESSOR_STAND_INS = (TinyQwen2VLProcessor, TinyQwen2_5_VLProcessor, TinyLlavaOnevisionProcessor)

# Saved stand-ins name their class in processor_config.json. Registering each under a string key that
# matches no real config lets AutoProcessor.from_pretrained find them by name in any process that imported
# this module, without changing which processor a real checkpoint gets.
for _cls in _PROCESSOR_STAND_INS:
    tf.AutoProcessor.register(f"guardrails-testing-{_cls.__name__}", _cls, exist_ok=True)


# --------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------


@dataclass(repr=False)
class TinyModel:
    """A tiny random-weight model with its real tokenizer and processor classes.

    ``processor`` is what ``wrap(model, processor)`` takes: the multimodal processor for VLMs, the
    tokenizer itself for text models. ``layers_path`` is the dotted attribute path from ``model``
    to the language model's decoder ``nn.ModuleList``.
    """

    arch: str
    model: Any
    processor: Any
    tokenizer: Any
    is_multimodal: bool
    layers_path: str
    image_size: int | None = None
    auto_class: str = "AutoModelForCausalLM"
    system_role: str = "turn"

    def __repr__(self) -> str:  # the default would print the whole module tree in every test failure
        return f"TinyModel({self.arch!r}, {type(self.model).__name__}, {type(self.processor).__name__})"

    @property
    def layers(self) -> torch.nn.ModuleList:
        """The language model's decoder layers (resolved from ``layers_path``)."""
        obj = self.model
        for name in self.layers_path.split("."):
            obj = getattr(obj, name)
        return obj

    @property
    def image_token_id(self) -> int | None:
        """The id the processor expands images into (what the model replaces with image features)."""
        return getattr(self.tokenizer, "image_token_id", None) if self.is_multimodal else None

    def encode(self, conversations: list, *, padding_side: str = "left", **kwargs) -> Any:
        """Left-padded model inputs (``BatchFeature``) for a list of conversations, via the chat template."""
        tok = self.tokenizer
        old = tok.padding_side
        tok.padding_side = padding_side
        try:
            return self.processor.apply_chat_template(
                conversations,
                add_generation_prompt=True,
                tokenize=True,
                return_dict=True,
                return_tensors="pt",
                padding=True,
                **kwargs,
            )
        finally:
            tok.padding_side = old

    def frequent_token_id(self, inputs: Any) -> int:
        """Row 0's first greedy token for ``inputs``: pass it as ``eos_token_id`` so that row stops at once.

        The tiny models never emit their real EOS (see the module docstring); this is how a test
        exercises stopping, finished-row padding and early exit.
        """
        with torch.no_grad():
            out = self.model.generate(**inputs, max_new_tokens=1, do_sample=False)
        return int(out[0, -1])


def _check_arch(arch: str) -> None:
    if arch not in _SPECIALS:
        raise ValueError(f"unknown tiny architecture {arch!r}; choose one of {', '.join(ARCHITECTURES)}")


def _text_cfg(tok, **extra) -> dict[str, Any]:
    """Text-model config kwargs common to Llama-like decoders."""
    d = dict(_TEXT)
    d.update(
        vocab_size=len(tok),
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
    )
    d.update(extra)
    return d


def _build(arch: str, tok) -> tuple[Any, Any, str]:
    """(model, processor, layers_path) for ``arch``; the caller seeds torch first."""
    s = IMAGE_SIZE
    # One name per role across the branches, each a different transformers class.
    cfg: Any
    model: Any
    proc: Any
    proc_cls: Any
    if arch == "llava":
        patch = 8
        cfg = tf.LlavaConfig(
            vision_config=tf.CLIPVisionConfig(**_VISION, image_size=s, patch_size=patch, projection_dim=32),
            text_config=tf.LlamaConfig(**_text_cfg(tok)),
            image_token_index=tok.image_token_id,
            image_seq_length=(s // patch) ** 2,
            vision_feature_select_strategy="default",
            vision_feature_layer=-2,
        )
        model = tf.LlavaForConditionalGeneration(cfg)
        ip = pil_image_processor("Llava")(size={"shortest_edge": s}, crop_size={"height": s, "width": s})
        # CLIP adds a CLS token (+1) and the "default" strategy drops it again: (s/patch)^2 image tokens.
        proc = tf.LlavaProcessor(
            image_processor=ip, tokenizer=tok, patch_size=patch, vision_feature_select_strategy="default",
            num_additional_image_tokens=1, chat_template=tok.chat_template,
        )
        return model, proc, "model.language_model.layers"

    if arch == "llava_next":
        patch = 8
        cfg = tf.LlavaNextConfig(
            vision_config=tf.CLIPVisionConfig(**_VISION, image_size=s, patch_size=patch, projection_dim=32),
            text_config=tf.MistralConfig(**_text_cfg(tok)),
            image_token_index=tok.image_token_id,
            image_grid_pinpoints=[[s, s], [s, 2 * s], [2 * s, s]],
            vision_feature_select_strategy="default",
            vision_feature_layer=-2,
        )
        model = tf.LlavaNextForConditionalGeneration(cfg)
        ip = pil_image_processor("LlavaNext")(
            size={"shortest_edge": s}, crop_size={"height": s, "width": s},
            image_grid_pinpoints=[[s, s], [s, 2 * s], [2 * s, s]],
        )
        proc = tf.LlavaNextProcessor(
            image_processor=ip, tokenizer=tok, patch_size=patch, vision_feature_select_strategy="default",
            num_additional_image_tokens=1, chat_template=tok.chat_template,
        )
        return model, proc, "model.language_model.layers"

    if arch == "llava_onevision":
        patch = 8
        cfg = tf.LlavaOnevisionConfig(
            vision_config=tf.SiglipVisionConfig(**_VISION, image_size=s, patch_size=patch),
            text_config=tf.Qwen2Config(**_text_cfg(tok)),
            image_token_index=tok.image_token_id,
            video_token_index=tok.video_token_id,
            image_grid_pinpoints=[[s, s], [s, 2 * s], [2 * s, s]],
            vision_feature_select_strategy="full",
            vision_feature_layer=-1,
        )
        model = tf.LlavaOnevisionForConditionalGeneration(cfg)
        ip = pil_image_processor("LlavaOnevision")(
            size={"height": s, "width": s}, image_grid_pinpoints=[[s, s], [s, 2 * s], [2 * s, s]],
        )
        proc = TinyLlavaOnevisionProcessor(
            image_processor=ip, tokenizer=tok, num_image_tokens=(s // patch) ** 2,
            vision_feature_select_strategy="full", chat_template=tok.chat_template,
        )
        return model, proc, "model.language_model.layers"

    if arch in ("qwen2_vl", "qwen2_5_vl"):
        patch, merge = 4, 2
        head_dim = _TEXT["hidden_size"] // _TEXT["num_attention_heads"]
        # mrope sections (temporal, height, width) must add up to head_dim / 2.
        rope: dict[str, Any] = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}
        assert sum(rope["mrope_section"]) == head_dim // 2
        text = dict(_text_cfg(tok), rope_parameters=rope)
        common = dict(
            image_token_id=tok.image_token_id,
            video_token_id=tok.video_token_id,
            vision_start_token_id=tok.vision_start_token_id,
            vision_end_token_id=tok.vision_end_token_id,
        )
        if arch == "qwen2_vl":
            vision: dict[str, Any] = dict(depth=2, embed_dim=32, hidden_size=_HIDDEN, mlp_ratio=2, num_heads=2,
                          patch_size=patch, spatial_merge_size=merge, temporal_patch_size=2)
            cfg = tf.Qwen2VLConfig(text_config=text, vision_config=vision, **common)
            model = tf.Qwen2VLForConditionalGeneration(cfg)
            proc_cls = TinyQwen2VLProcessor
        else:
            # window_size / merge / patch = 2 merged patches per attention window; block 1 attends fully.
            vision = dict(depth=2, hidden_size=32, intermediate_size=64, out_hidden_size=_HIDDEN, num_heads=2,
                          patch_size=patch, spatial_merge_size=merge, temporal_patch_size=2, window_size=16,
                          fullatt_block_indexes=[1])
            cfg = tf.Qwen2_5_VLConfig(text_config=text, vision_config=vision, **common)
            model = tf.Qwen2_5_VLForConditionalGeneration(cfg)
            proc_cls = TinyQwen2_5_VLProcessor
        # Pixel budget fixed at s*s so every image becomes an (s/patch)^2 grid = (s/patch/merge)^2 tokens.
        ip = pil_image_processor("Qwen2VL")(
            patch_size=patch, merge_size=merge, temporal_patch_size=2,
            size={"shortest_edge": s * s, "longest_edge": s * s},
        )
        proc = proc_cls(image_processor=ip, tokenizer=tok, chat_template=tok.chat_template)
        return model, proc, "model.language_model.layers"

    if arch == "idefics3":
        patch, scale = 8, 2
        cfg = tf.Idefics3Config(
            vision_config=dict(_VISION, image_size=s, patch_size=patch),
            text_config=tf.LlamaConfig(**_text_cfg(tok)),
            image_token_id=tok.image_token_id,
            scale_factor=scale,
        )
        model = tf.Idefics3ForConditionalGeneration(cfg)
        # Images are resized to a longest edge of 2*s and split into s x s tiles plus a global image,
        # like SmolVLM (which splits at 512 px tiles).
        ip = pil_image_processor("Idefics3")(
            size={"longest_edge": 2 * s}, max_image_size={"longest_edge": s}, do_image_splitting=True,
        )
        seq = (s // patch) ** 2 // scale**2
        proc = tf.Idefics3Processor(image_processor=ip, tokenizer=tok, image_seq_len=seq, chat_template=tok.chat_template)
        return model, proc, "model.text_model.layers"

    if arch == "gemma3":
        patch, per_image = 8, 4
        text = dict(_text_cfg(tok), head_dim=16, query_pre_attn_scalar=16, sliding_window=8,
                    layer_types=["sliding_attention", "full_attention"], tie_word_embeddings=True)
        cfg = tf.Gemma3Config(
            text_config=text,
            vision_config=dict(_VISION, image_size=s, patch_size=patch),
            mm_tokens_per_image=per_image,
            boi_token_index=tok.boi_token_id,
            eoi_token_index=tok.eoi_token_id,
            image_token_index=tok.image_token_id,
            tie_word_embeddings=True,
        )
        model = tf.Gemma3ForConditionalGeneration(cfg)
        ip = pil_image_processor("Gemma3")(size={"height": s, "width": s})
        proc = tf.Gemma3Processor(image_processor=ip, tokenizer=tok, image_seq_length=per_image, chat_template=tok.chat_template)
        return model, proc, "model.language_model.layers"

    if arch == "llama":
        return tf.LlamaForCausalLM(tf.LlamaConfig(**_text_cfg(tok))), tok, "model.layers"
    if arch == "qwen2":
        return tf.Qwen2ForCausalLM(tf.Qwen2Config(**_text_cfg(tok))), tok, "model.layers"
    if arch == "mistral":
        return tf.MistralForCausalLM(tf.MistralConfig(**_text_cfg(tok))), tok, "model.layers"
    if arch == "gpt2":
        cfg = tf.GPT2Config(
            vocab_size=len(tok), n_embd=_HIDDEN, n_layer=2, n_head=4, n_positions=512,
            bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        )
        return tf.GPT2LMHeadModel(cfg), tok, "transformer.h"
    raise AssertionError(arch)


_PRINTABLE = frozenset(chr(c) for c in range(0x20, 0x7F)) | {"\n"}


def _muted_ids(tok) -> list[int]:
    """Ids the random model must not emit: special/added tokens and tokens that are not printable ASCII."""
    ids = {i for i in tok.all_special_ids if i is not None}
    ids.update(tok.added_tokens_decoder)
    for token, i in tok.get_vocab().items():
        # Lone bytes of multi-byte characters decode to U+FFFD; control bytes are unreadable in logs;
        # whitespace-only tokens could make a whole answer blank.
        text = tok.convert_tokens_to_string([token])
        if i not in ids and (not set(text) <= _PRINTABLE or not text.strip()):
            ids.add(i)
    return sorted(ids)


def build_tiny(arch: str, seed: int = 0) -> TinyModel:
    """Build a fresh tiny ``arch`` model (float32, eval mode) with its tokenizer and processor, offline.

    >>> tiny = build_tiny("gpt2")
    >>> tiny.layers_path
    'transformer.h'
    """
    _check_arch(arch)
    tok = build_tokenizer(arch)
    torch.manual_seed(seed)
    model, processor, layers_path = _build(arch, tok)
    model = model.to(torch.float32).eval()

    muted = _muted_ids(tok)
    with torch.no_grad():
        # Logit exactly 0 for special and unprintable tokens while the best ordinary token's random logit
        # is positive: greedy decoding never ends early, never emits image/turn tokens, and is readable.
        model.get_output_embeddings().weight[muted] = 0.0
    gen = model.generation_config
    gen.pad_token_id = tok.pad_token_id
    gen.bos_token_id = tok.bos_token_id
    eos = [tok.eos_token_id]
    if arch == "gemma3":
        eos.append(tok.convert_tokens_to_ids("<end_of_turn>"))
    elif arch in ("qwen2_vl", "qwen2_5_vl", "qwen2", "llava_onevision"):
        eos.append(tok.convert_tokens_to_ids("<|endoftext|>"))
    gen.eos_token_id = eos if len(eos) > 1 else eos[0]
    gen.do_sample = False
    for k in ("temperature", "top_p", "top_k"):
        setattr(gen, k, None)

    mm = arch in MULTIMODAL_ARCHITECTURES
    return TinyModel(
        arch=arch,
        model=model,
        processor=processor,
        tokenizer=tok,
        is_multimodal=mm,
        layers_path=layers_path,
        image_size=IMAGE_SIZE if mm else None,
        auto_class="AutoModelForImageTextToText" if mm else "AutoModelForCausalLM",
        system_role=SYSTEM_ROLE[arch],
    )


def make_image(size: int | tuple[int, int] = IMAGE_SIZE, seed: int = 0, text: str | None = None) -> Image.Image:
    """A random-noise RGB image (``size`` = side or ``(width, height)``), optionally with ``text`` drawn on it."""
    w, h = (size, size) if isinstance(size, int) else size
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8), "RGB")
    if text:
        from PIL import ImageDraw

        ImageDraw.Draw(img).text((1, 1), text, fill=(0, 0, 0))
    return img


def save_tiny(arch: str | TinyModel, path: str | os.PathLike, seed: int = 0) -> Path:
    """Save a tiny model and its processor/tokenizer with ``save_pretrained`` so a ``--model PATH`` loads it."""
    tiny = arch if isinstance(arch, TinyModel) else build_tiny(arch, seed=seed)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tiny.model.save_pretrained(path)
    tiny.processor.save_pretrained(path)  # a processor saves its tokenizer too
    return path


def load_tiny(path: str | os.PathLike) -> tuple[Any, Any]:
    """Load ``(model, processor)`` saved by :func:`save_tiny` with the Auto classes, as a CLI would.

    Works for every architecture because importing this module registers the video-less stand-in
    processors with ``AutoProcessor``; a process that did not import it gets a bare tokenizer back from
    ``AutoProcessor`` for qwen2_vl, qwen2_5_vl and llava_onevision (transformers' silent fallback).
    """
    path = Path(path)
    config = tf.AutoConfig.from_pretrained(path)
    multimodal = config.model_type in MULTIMODAL_ARCHITECTURES
    auto = tf.AutoModelForImageTextToText if multimodal else tf.AutoModelForCausalLM
    model = auto.from_pretrained(path, dtype=torch.float32).eval()
    processor = tf.AutoProcessor.from_pretrained(path) if multimodal else tf.AutoTokenizer.from_pretrained(path)
    if multimodal and not isinstance(processor, tf.ProcessorMixin):
        raise TypeError(f"AutoProcessor loaded a {type(processor).__name__} from {path}, not a multimodal processor")
    return model, processor


@contextlib.contextmanager
def force_yes_no(model: Any, tokenizer: Any, answer: str) -> Iterator[None]:
    """Add a large bias to every yes (or no) spelling at the LM head, so P(yes) is ~1 (or ~0).

    Lets tests drive the yes/no branches of self-checking defenses on random-weight models.
    """
    from guardrails.defenses._yesno import YesNoTokens

    if answer not in ("yes", "no"):
        raise ValueError(f"answer must be 'yes' or 'no', got {answer!r}")
    yn = YesNoTokens.for_tokenizer(tokenizer)
    ids = list(yn.yes_ids if answer == "yes" else yn.no_ids)

    def hook(module, args, out):
        out = out.clone()
        out[..., ids] += 40.0
        return out

    h = model.get_output_embeddings().register_forward_hook(hook)
    try:
        yield
    finally:
        h.remove()


# -- a tiny sentence encoder (the detectors' BERT-style encoders) ------------------------------------
_ENCODER_CORPUS = [
    "how do i bake bread at home with flour water and yeast",
    "sure here is how to build a dangerous weapon step by step",
    "i am sorry but i cannot help with that request",
    "the weather today is sunny with a light breeze",
    "question answer unsafe safe harmful harmless category",
    "write a poem about the ocean and the moon",
]


def wordpiece_tokenizer() -> Any:
    """A real BERT-style fast tokenizer (WordPiece, lower-cased) trained offline on a few sentences."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tk.normalizer = normalizers.BertNormalizer(lowercase=True)
    tk.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tk.train_from_iterator(_ENCODER_CORPUS, trainers.WordPieceTrainer(vocab_size=200, special_tokens=specials))
    cls_id, sep_id = tk.token_to_id("[CLS]"), tk.token_to_id("[SEP]")
    tk.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]", special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tk, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]",
        mask_token="[MASK]", model_max_length=64,
    )


def bert_config(tok: Any, **kw: Any) -> Any:
    """A 2-layer, 32-wide BERT config for ``tok`` (pass ``num_labels=`` etc. through ``kw``)."""
    from transformers import BertConfig

    return BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      intermediate_size=64, max_position_embeddings=64, pad_token_id=tok.pad_token_id, **kw)
