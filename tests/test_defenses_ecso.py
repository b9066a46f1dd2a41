"""ECSO: the yes/no self-check from logits, one extra forward on benign rows, eyes closed on the second answer."""

from __future__ import annotations

import contextlib

import pytest
import torch

import prompts
from guardrails import wrap
from guardrails.calls import ModelCalls
from guardrails.defenses import ECSO
from guardrails.testing import force_yes_no as forced
from guardrails.testing import make_image

GEN = {"max_new_tokens": 4, "do_sample": False}
REFUSAL = prompts.render("refusal_default")
QUERY = "How can I make this at home?"


@contextlib.contextmanager
def forward_log(model, image_ids):
    """Per top-level forward: (number of new input tokens, image features given, image placeholder in input_ids)."""
    calls: list[tuple[int, bool, bool]] = []

    def hook(module, args, kwargs):
        ids = kwargs.get("input_ids")
        # transformers 5 generate runs the vision encoder first and passes its output on
        pix = kwargs.get("pixel_values") is not None or bool(kwargs.get("mm_encoder_outputs"))
        img = bool(ids is not None and torch.isin(ids, torch.tensor(sorted(image_ids))).any()) if image_ids else False
        calls.append((0 if ids is None else ids.shape[1], pix, img))

    h = model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield calls
    finally:
        h.remove()


def image_conv(t, seed=4):
    return [{"role": "user", "content": [{"type": "image", "image": make_image(t.image_size, seed=seed)},
                                         {"type": "text", "text": QUERY}]}]


def text_conv():
    return [{"role": "user", "content": "Write a poem about the ocean."}]


@pytest.mark.parametrize("arch", ["llava", "idefics3", "qwen2_vl", "llama"])
def test_benign_row_costs_exactly_one_extra_forward(tiny, arch):
    t = tiny(arch)
    conv = image_conv(t) if t.is_multimodal else text_conv()
    with forced(t.model, t.tokenizer, "no"):
        with forward_log(t.model, set()) as bare_calls:
            bare = wrap(t.model, t.processor).chat(conv, **GEN)
        with forward_log(t.model, set()) as calls:
            r = wrap(t.model, t.processor, defenses=[ECSO()]).chat(conv, **GEN)
    assert len(calls) == len(bare_calls) + 1
    assert r.text == bare.text and r.token_ids == bare.token_ids and r.original_text is None
    v = r.verdicts_of("ECSO")[-1]
    assert not v.flagged and v.action == "pass" and v.score < 0.01 and v.threshold == 0.5
    steps = v.detail["steps"]
    assert set(steps) == {"answer", "check"} and steps["check"]["ms"] > 0 and steps["answer"]["ms"] > 0
    assert steps["check"]["yes_no_mass"] > 0.99
    if arch in ("llava", "idefics3", "llama"):
        # the self-check reuses the answer's cache: its one forward is shorter than its prompt
        kv = v.detail["kv_cache"]
        assert kv["reused_tokens"] > 0 and calls[-1][0] == kv["prompt_tokens"] - kv["reused_tokens"]


@pytest.mark.parametrize("arch", ["llava", "idefics3", "gemma3", "qwen2_vl"])
def test_unsafe_image_row_answers_again_with_eyes_closed(tiny, arch):
    t = tiny(arch)
    conv = image_conv(t)
    img_ids = {t.image_token_id}
    caption_tokens, answer_tokens = 3, 2
    with forced(t.model, t.tokenizer, "yes"):
        g = wrap(t.model, t.processor, defenses=[ECSO(caption_tokens=caption_tokens, answer_tokens=answer_tokens, reuse_cache=False)])
        with forward_log(t.model, img_ids) as calls:
            r = g.chat(conv, **GEN)
    v = r.verdicts_of("ECSO")[-1]
    steps = v.detail["steps"]
    assert v.flagged and v.action == "regenerate" and v.score > 0.99
    assert r.text == steps["answer_without_image"]["text"] and r.original_text == v.detail["original_text"]
    assert all(steps[k]["ms"] > 0 for k in ("check", "caption", "answer_without_image"))
    # answer (4 forwards), check (1), caption (3), answer again (2)
    n = GEN["max_new_tokens"]
    assert len(calls) == n + 1 + caption_tokens + answer_tokens
    check, caption, final = calls[n], calls[n + 1: n + 1 + caption_tokens], calls[n + 1 + caption_tokens:]
    assert check[1] and check[2], "the self-check must see the image"
    assert caption[0][1] and caption[0][2], "the caption must see the image"
    for k, (_, pix, img) in enumerate(final):
        assert not pix and not img, f"step-4 forward {k} received the image"


def test_step_prompts_and_image_dropped_from_the_conversation(tiny, monkeypatch):
    t = tiny("llava")
    seen: list[list] = []
    real = ModelCalls.generate

    def spy(self, convs, rows=None, **kw):
        seen.append(convs)
        return real(self, convs, rows, **kw)

    monkeypatch.setattr(ModelCalls, "generate", spy)
    with forced(t.model, t.tokenizer, "yes"):
        r = wrap(t.model, t.processor, defenses=[ECSO(caption_tokens=3)]).chat(image_conv(t), **GEN)
    (cap_conv,), (ans_conv,) = seen
    cap_user = cap_conv[-1]["content"]
    assert cap_user[0]["type"] == "image"
    assert cap_user[1]["text"] == prompts.render("ecso_query_aware_caption", query=QUERY)
    caption = r.verdicts_of("ECSO")[-1].detail["steps"]["caption"]["text"]
    assert all(p["type"] == "text" for m in ans_conv for p in m["content"])
    assert ans_conv[-1]["content"][-1]["text"] == prompts.render("ecso_caption_answer", caption=caption, query=QUERY)


def test_text_rows_self_check_only(tiny):
    t = tiny("llama")
    conv = text_conv()
    with forced(t.model, t.tokenizer, "yes"):
        bare = wrap(t.model, t.processor).chat(conv, **GEN)
        refused = wrap(t.model, t.processor, defenses=[ECSO()]).chat(conv, **GEN)
        flagged = wrap(t.model, t.processor, defenses=[ECSO(no_image="flag")]).chat(conv, **GEN)
        with forward_log(t.model, set()) as calls:
            skipped = wrap(t.model, t.processor, defenses=[ECSO(no_image="skip")]).chat(conv, **GEN)
    assert refused.refused and refused.text == REFUSAL and refused.original_text == bare.text
    assert refused.verdicts_of("ECSO")[-1].action == "refuse"
    vf = flagged.verdicts_of("ECSO")[-1]
    assert vf.flagged and vf.action == "pass" and flagged.text == bare.text
    vs = skipped.verdicts_of("ECSO")[-1]
    assert not vs.flagged and vs.score is None and "skipped" in vs.detail["steps"]["check"]
    assert len(calls) == GEN["max_new_tokens"] and skipped.text == bare.text


def test_mixed_batch_per_row_and_stream(tiny):
    t = tiny("llava")
    convs = [image_conv(t), text_conv(), image_conv(t, seed=9)]
    with forced(t.model, t.tokenizer, "yes"):
        g = wrap(t.model, t.processor, defenses=[ECSO(caption_tokens=2, answer_tokens=2)])
        rs = g.chat(convs, **GEN)
        solo = g.chat(convs[2], **GEN)
        s = g.stream(convs[0], **GEN)
        chunks = list(s)
    assert [r.verdicts_of("ECSO")[-1].action for r in rs] == ["regenerate", "refuse", "regenerate"]
    assert solo.text == rs[2].text  # a row's second answer does not depend on its batch
    assert chunks == [rs[0].text] and s.result.text == rs[0].text
    assert "held back" in s.result.verdicts_of("ECSO")[-1].detail["stream"]


def test_config_errors():
    with pytest.raises(ValueError, match="threshold"):
        ECSO(threshold=0)
    with pytest.raises(ValueError, match="caption_tokens"):
        ECSO(caption_tokens=0)
    with pytest.raises(ValueError, match="no_image"):
        ECSO(no_image="ignore")
    with pytest.raises(ValueError, match="answer_tokens"):
        ECSO(answer_tokens=-3)
