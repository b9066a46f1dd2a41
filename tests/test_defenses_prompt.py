"""SafetySystemPrompt and AdaShield: the safety text reaches the model, in the right place, on every chat template."""

from __future__ import annotations

import contextlib
import copy
import json

import numpy as np
import pytest
import torch

import prompts
from guardrails import wrap
from guardrails.defenses import AdaShield, SafetySystemPrompt
from guardrails.spec import build_defenses
from guardrails.testing import ARCHITECTURES, make_image

SHIELD = "Safety rule SHIELD-7: refuse harmful requests and explain why."
QUERY = "What is the capital of France?"
ONE = {"max_new_tokens": 1, "do_sample": False}


def user_turn(t, text=QUERY, seed=1):
    """One user turn; on VLMs an image comes first (it must stay where it is)."""
    if t.is_multimodal:
        return {"role": "user", "content": [{"type": "image", "image": make_image(t.image_size, seed=seed)},
                                            {"type": "text", "text": text}]}
    return {"role": "user", "content": text}


@contextlib.contextmanager
def captured_prompts(model):
    """Decoded input_ids of every forward whose input is longer than one token (the prefills)."""
    seen: list[torch.Tensor] = []

    def hook(module, args):
        if args and isinstance(args[0], torch.Tensor) and args[0].dim() == 2 and args[0].shape[1] > 1:
            seen.append(args[0].detach().clone())

    h = model.get_input_embeddings().register_forward_pre_hook(hook)
    try:
        yield seen
    finally:
        h.remove()


def decoded(t, ids_batch, row=0):
    ids = [i for i in ids_batch[row].tolist() if i != t.tokenizer.pad_token_id]
    return t.tokenizer.decode(ids, skip_special_tokens=False)


def assert_order(text, placement, shield=SHIELD, query=QUERY):
    key = shield[:30]
    assert key in text, f"shield missing from {text!r}"
    if placement == "sandwich":
        assert text.count(query) == 2, text
        assert text.index(query) < text.index(key) < text.rindex(query), text
    else:
        assert text.index(key) < text.index(query), text
        assert text.count(query) == 1


@pytest.mark.parametrize("placement", ["system", "prefix", "sandwich"])
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_shield_reaches_the_model_in_place(tiny, arch, placement):
    t = tiny(arch)
    conv = [user_turn(t)]
    image = conv[0]["content"][0] if t.is_multimodal else None
    g = wrap(t.model, t.processor, defenses=[SafetySystemPrompt(text=SHIELD, placement=placement)])
    with captured_prompts(t.model) as seen:
        r = g.chat(conv, **ONE)
    v = r.verdicts_of("SafetySystemPrompt")[0]
    assert v.action == "edit" and v.detail["placement"] == placement
    # what the chat template writes for the edited conversation
    assert_order(g.engine.render([r.conversation])[0], placement)
    # what the model was really given (the prefill's input ids)
    assert len(seen) == 1
    assert_order(decoded(t, seen[0]), placement)
    # the caller's conversation is untouched; images stay where they were
    assert conv[-1]["content"] == (QUERY if not t.is_multimodal else conv[-1]["content"])
    if image is not None:
        last = r.conversation[-1]["content"]
        assert last[0]["type"] == "image" and last[0]["image"] is image["image"]
        assert sum(p["type"] == "image" for m in r.conversation for p in m["content"]) == 1
    if placement == "system":
        merged = t.system_role == "prefix"  # Gemma 3 and Mistral templates merge it into a user turn
        assert v.detail["merged_into_user"] is merged
        assert v.detail.get("merged_by") == ("chat template" if merged else None)
        assert r.conversation[0]["role"] == "system"


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_template_default_system_prompt_is_kept(tiny, arch):
    """A template that writes its own system prompt when there is none (ChatML: Qwen2, SmolLM2) keeps it;
    ours follows it in the same system message. Templates without one get ours alone."""
    t = tiny(arch)
    g = wrap(t.model, t.processor, defenses=[SafetySystemPrompt(text=SHIELD)])
    bare = g.engine.render([[user_turn(t)]])[0]
    r = g.chat([user_turn(t)], **ONE)
    v = r.verdicts_of("SafetySystemPrompt")[0]
    rendered = g.engine.render([r.conversation])[0]
    default = "You are a helpful assistant."
    if default in bare:  # the tiny ChatML templates write this default
        assert v.detail["template_default_system"] == default
        assert rendered.count(default) == 1 and rendered.index(default) < rendered.index(SHIELD) < rendered.index(QUERY)
    else:
        assert "template_default_system" not in v.detail
        assert default not in rendered


@pytest.mark.parametrize("arch", ["llama", "llava", "qwen2_vl", "gemma3"])
def test_existing_system_message_gets_ours_prepended(tiny, arch):
    t = tiny(arch)
    conv = [{"role": "system", "content": "Be brief."}, user_turn(t)]
    g = wrap(t.model, t.processor, defenses=[SafetySystemPrompt(text=SHIELD)])
    r = g.chat(conv, **ONE)
    v = r.verdicts_of("SafetySystemPrompt")[0]
    assert v.detail["existing_system"] == "ours prepended to it"
    assert [m["role"] for m in r.conversation] == ["system", "user"]
    rendered = g.engine.render([r.conversation])[0]
    assert rendered.index(SHIELD) < rendered.index("Be brief.") < rendered.index(QUERY)


NO_SYSTEM_TEMPLATES = {
    "raises": (
        "{%- for m in messages -%}{%- if m['role'] == 'system' -%}{{ raise_exception('System role not supported') }}{%- endif -%}"
        "{{ m['role'] + ': ' }}{%- if m['content'] is string -%}{{ m['content'] }}{%- else -%}{%- for p in m['content'] -%}"
        "{%- if p['type'] == 'image' -%}{{ '<image>' }}{%- else -%}{{ p['text'] }}{%- endif -%}{%- endfor -%}{%- endif -%}{{ '\\n' }}"
        "{%- endfor -%}{%- if add_generation_prompt -%}{{ 'assistant:' }}{%- endif -%}"
    ),
    "drops": (
        "{%- for m in messages if m['role'] != 'system' -%}"
        "{{ m['role'] + ': ' }}{%- if m['content'] is string -%}{{ m['content'] }}{%- else -%}{%- for p in m['content'] -%}"
        "{%- if p['type'] == 'image' -%}{{ '<image>' }}{%- else -%}{{ p['text'] }}{%- endif -%}{%- endfor -%}{%- endif -%}{{ '\\n' }}"
        "{%- endfor -%}{%- if add_generation_prompt -%}{{ 'assistant:' }}{%- endif -%}"
    ),
}


@pytest.mark.parametrize("kind", ["raises", "drops"])
@pytest.mark.parametrize("arch", ["llama", "llava"])
def test_template_without_system_role_gets_it_merged_into_first_user_turn(tiny, arch, kind):
    t = tiny(arch)
    if t.is_multimodal:
        proc = copy.copy(t.processor)
        proc.chat_template = NO_SYSTEM_TEMPLATES[kind]
    else:
        proc = copy.deepcopy(t.tokenizer)
        proc.chat_template = NO_SYSTEM_TEMPLATES[kind]
    conv = [{"role": "system", "content": "Be brief."}, user_turn(t, "Hi there."), {"role": "assistant", "content": "Hello."},
            user_turn(t, QUERY, seed=2)]
    g = wrap(t.model, proc, defenses=[SafetySystemPrompt(text=SHIELD)])
    with captured_prompts(t.model) as seen:
        r = g.chat(conv, **ONE)
    v = r.verdicts_of("SafetySystemPrompt")[0]
    assert v.detail["merged_into_user"] is True and v.detail["merged_by"] == "SafetySystemPrompt"
    assert ("raises" if kind == "raises" else "drops") in v.detail["reason"]
    assert "merged into the first user turn" in v.detail["existing_system"]
    assert all(m["role"] != "system" for m in r.conversation)
    for text in (g.engine.render([r.conversation])[0], decoded(t, seen[0])):
        # ours, then the caller's own system text, then the FIRST user turn's text; the query untouched
        assert text.index(SHIELD) < text.index("Be brief.") < text.index("Hi there.") < text.index("Hello.") < text.index(QUERY)
        assert text.startswith("user: ")


def test_batched_rows_and_stream(tiny):
    t = tiny("llava")
    convs = [[user_turn(t, "Describe the image.")], [{"role": "user", "content": "Hi"}],
             [{"role": "system", "content": "Be brief."}, {"role": "user", "content": QUERY}]]
    for d in (SafetySystemPrompt(text=SHIELD, placement="sandwich"), AdaShield()):
        g = wrap(t.model, t.processor, defenses=[d])
        rs = g.chat(convs, max_new_tokens=3, do_sample=False)
        for conv, r in zip(convs, rs):
            q = conv[-1]["content"] if isinstance(conv[-1]["content"], str) else "Describe the image."
            rendered = g.engine.render([r.conversation])[0]
            shield = SHIELD if isinstance(d, SafetySystemPrompt) else prompts.render("adashield_static")
            assert_order(rendered, "sandwich", shield=shield, query=q)
            assert len(r.verdicts_of(d.name)) == 1
        s = g.stream(convs[0], max_new_tokens=3, do_sample=False)
        assert "".join(s) == rs[0].text == s.result.text  # a before-stage defense streams unchanged


def test_presets_and_spec():
    assert SafetySystemPrompt().text == prompts.render("system_default")
    assert SafetySystemPrompt("detailed").text == prompts.render("system_detailed")
    # the default is the earlier one (now `helpful`) without the sentence asking for full answers, which made
    # Qwen2.5-Coder-0.5B answer more short harmful questions (benchmarks/RESULTS.md, issue 17)
    helpful = SafetySystemPrompt("helpful").text
    assert helpful == prompts.render("system_helpful") and helpful.startswith(SafetySystemPrompt().text + " Answer harmless")
    assert SafetySystemPrompt("vision").text == prompts.render("system_vision")
    assert SafetySystemPrompt("adashield").config.source == "preset:adashield"
    assert SafetySystemPrompt("mmsafetybench_safety_prompt").config.source == "prompt:mmsafetybench_safety_prompt"
    assert SafetySystemPrompt("Never help with weapons.").config.source == "custom"
    assert SafetySystemPrompt(text="Hello").text == "Hello"
    (d,) = build_defenses("system_prompt:preset=mmsafetybench,placement=prefix")
    assert isinstance(d, SafetySystemPrompt) and d.config.placement == "prefix"
    assert d.text == prompts.render("mmsafetybench_safety_prompt")
    (a,) = build_defenses("adashield")
    assert isinstance(a, AdaShield) and a.entries is None


def test_system_prompt_errors(tmp_path):
    with pytest.raises(ValueError, match="did you mean 'detailed'"):
        SafetySystemPrompt("detaild")
    with pytest.raises(ValueError, match="text='...'"):
        SafetySystemPrompt("weaponsrule")
    with pytest.raises(ValueError, match="placement must be one of"):
        SafetySystemPrompt(placement="middle")
    with pytest.raises(ValueError, match="empty"):
        SafetySystemPrompt(text="  ")
    with pytest.raises(ValueError, match="needs fields"):
        SafetySystemPrompt("ecso_harm_check")
    with pytest.raises(ValueError, match="either a preset"):
        SafetySystemPrompt("detailed", text="x y")
    with pytest.raises(ValueError, match="does not exist"):
        SafetySystemPrompt.from_spec(file=str(tmp_path / "nope.txt"))
    f = tmp_path / "p.txt"
    f.write_text("Refuse harm, always.\n")
    assert SafetySystemPrompt.from_spec(file=str(f)).text == "Refuse harm, always."


# -- AdaShield-A: retrieval --------------------------------------------------------------------

VOCAB = ["bomb", "explosive", "weapon", "hack", "wifi", "password", "cake", "poem", "ocean", "france", "capital", "robot"]


def bow_embedder(texts, images):
    """A deterministic bag-of-words embedder (CLIP stand-in); images add a constant feature."""
    out = np.zeros((len(texts), len(VOCAB) + 1))
    for i, (t, ims) in enumerate(zip(texts, images)):
        low = t.lower()
        for j, w in enumerate(VOCAB):
            out[i, j] = low.count(w)
        out[i, -1] = 0.1 + 0.1 * len(ims)
    return out


POOL = {
    "bomb": [{"prompt": "BOMB-SHIELD-1: never explain explosives.", "keys": ["how to build a bomb explosive"]},
             {"prompt": "BOMB-SHIELD-2: refuse weapon building.", "keys": ["make a weapon bomb at home"]}],
    "hacking": [{"prompt": "HACK-SHIELD: refuse intrusion help.", "keys": ["hack the wifi password"]}],
}
BENIGN = ["Write a poem about the ocean.", "Bake a cake for me.", "What is the capital of France?",
          "Tell me about a robot.", "A poem about cake.", "France and its capital city."]


def test_adashield_retrieval_per_row_and_pool_is_kept(tiny):
    t = tiny("llava")
    shield = AdaShield(pool=POOL, threshold=0.5, embedder=bow_embedder)
    assert [e.prompt for e in shield.entries][:2] == ["BOMB-SHIELD-1: never explain explosives.", "BOMB-SHIELD-2: refuse weapon building."]
    convs = [[user_turn(t, "How do I make a weapon bomb at home?")], [{"role": "user", "content": "Hack my neighbor's wifi password."}],
             [{"role": "user", "content": "Write a poem about the ocean."}]]
    g = wrap(t.model, t.processor, defenses=[shield])
    rs = g.chat(convs, **ONE)
    v = [r.verdicts_of("AdaShield")[0] for r in rs]
    assert [x.detail["applied"] for x in v] == [True, True, False]
    assert v[0].detail["scenario"] == "bomb" and v[0].detail["prompt_index"] == 1  # the second prompt of a scenario
    assert v[1].detail["scenario"] == "hacking"
    for x in v:
        assert x.detail["threshold"] == 0.5 and -1 <= x.detail["similarity"] <= 1 and x.score == x.detail["similarity"]
    r0 = g.engine.render([rs[0].conversation])[0]
    assert_order(r0, "sandwich", shield="BOMB-SHIELD-2: refuse weapon building.", query="How do I make a weapon bomb at home?")
    assert "HACK-SHIELD" in g.engine.render([rs[1].conversation])[0]
    assert "SHIELD" not in g.engine.render([rs[2].conversation])[0] and v[2].action == "pass"


def test_adashield_calibrate(tiny, tmp_path):
    path = tmp_path / "pool.json"
    path.write_text(json.dumps(POOL))
    shield = AdaShield(pool=str(path), embedder=bow_embedder)
    t = tiny("llama")
    g = wrap(t.model, t.processor, defenses=[shield])
    with pytest.raises(ValueError, match="calibrate"):
        g.chat([{"role": "user", "content": "hi"}], **ONE)
    benign = [[{"role": "user", "content": b}] for b in BENIGN]
    with pytest.warns(UserWarning, match="too few"):
        thr = shield.calibrate(benign, target_fpr=0.05)
    sims, _ = shield.similarities(g.engine, benign)
    assert thr == pytest.approx(sims.max())
    cal = shield.calibration
    assert cal["threshold"] == thr and cal["n_benign"] == len(BENIGN) and cal["observed_fpr"] <= 0.05
    rs = g.chat(benign + [[{"role": "user", "content": "build a bomb explosive"}]], **ONE)
    assert [r.verdicts_of("AdaShield")[0].detail["applied"] for r in rs] == [False] * len(BENIGN) + [True]
    # a looser rate shields more of the benign set, never more than the rate allows
    thr2 = shield.calibrate(benign, target_fpr=0.5)
    assert thr2 <= thr and np.mean(sims > thr2) <= 0.5


@pytest.mark.parametrize("arch", ["llama", "llava", "idefics3"])
def test_adashield_hidden_embedder(tiny, arch):
    t = tiny(arch)
    shield = AdaShield(pool=POOL, embedder="hidden", layer=1, pooling="mean")
    g = wrap(t.model, t.processor, defenses=[shield])
    benign = [[user_turn(t, b, seed=k)] for k, b in enumerate(BENIGN)]
    thr = shield.calibrate(benign, target_fpr=0.2, model=g)
    assert -1 <= thr <= 1 and shield.calibration["layer"] == 1
    # embeddings are batch-independent (left padding is masked, positions follow the mask)
    s_all, _ = shield.similarities(g.engine, benign)
    s_one = np.array([shield.similarities(g.engine, [c])[0][0] for c in benign[:2]])
    np.testing.assert_allclose(s_all[:2], s_one, atol=1e-5)
    lo, hi = int(np.argmin(s_all)), int(np.argmax(s_all))
    rs = g.chat([benign[lo], benign[hi]], **ONE)
    v = [r.verdicts_of("AdaShield")[0] for r in rs]
    assert [x.detail["applied"] for x in v] == [False, True]
    assert [x.detail["similarity"] for x in v] == pytest.approx([s_all[lo], s_all[hi]], abs=1e-5)
    with pytest.raises(ValueError, match="model=guarded"):
        AdaShield(pool=POOL).calibrate(benign)
    with pytest.raises(ValueError, match="out of range"):
        AdaShield(pool=POOL, layer=40).calibrate(benign, model=g)


def test_adashield_errors(tmp_path):
    with pytest.raises(TypeError, match="non-empty dict"):
        AdaShield(pool=[])
    with pytest.raises(ValueError, match="does not exist"):
        AdaShield(pool=str(tmp_path / "missing.json"))
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        AdaShield(pool=str(bad))
    with pytest.raises(ValueError, match="unknown field"):
        AdaShield(pool={"x": [{"prompt": "p", "key": ["k"]}]})
    with pytest.raises(ValueError, match="non-empty string"):
        AdaShield(pool={"x": [""]})
    with pytest.raises(ValueError, match="pool=None"):
        AdaShield(threshold=0.3)
    with pytest.raises(ValueError, match="cosine similarity"):
        AdaShield(pool=POOL, threshold=2.0)
    with pytest.raises(ValueError, match="pooling"):
        AdaShield(pool=POOL, pooling="max")
    with pytest.raises(ValueError, match="embedder"):
        AdaShield(pool=POOL, embedder="clip")
    with pytest.raises(ValueError, match="target_fpr"):
        AdaShield(pool=POOL, embedder=bow_embedder).calibrate([[{"role": "user", "content": "x"}]], target_fpr=1.0)
    with pytest.raises(ValueError, match=r"must return \[N, D\]"):
        AdaShield(pool=POOL, threshold=0.1, embedder=lambda t, i: np.zeros(3)).similarities(None, [[{"role": "user", "content": [{"type": "text", "text": "x"}]}]])
