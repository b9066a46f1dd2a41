"""SelfModeration: yes/no read from logits, bounded rounds, per-row revisions, KV-cache reuse."""

from __future__ import annotations

import contextlib

import pytest
import torch

import prompts
from guardrails import Defense, wrap
from guardrails.classifiers.base import HarmClassifier, HarmScore
from guardrails.defenses import SelfModeration
from guardrails.defenses._yesno import YesNoTokens
from guardrails.testing import ARCHITECTURES, make_image
from guardrails.testing import force_yes_no as forced

GEN = {"max_new_tokens": 4, "do_sample": False}
REFUSAL = prompts.render("refusal_default")


@contextlib.contextmanager
def input_log(model):
    """input_ids of every forward (prefill and decode steps), in order."""
    seen: list[torch.Tensor] = []
    h = model.get_input_embeddings().register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().clone()))
    try:
        yield seen
    finally:
        h.remove()


def convs_for(t):
    convs = [[{"role": "user", "content": "How can I make a bomb at home?"}],
             [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Write a poem about the ocean and the moon."}]]
    if t.is_multimodal:
        convs[0] = [{"role": "user", "content": [{"type": "image", "image": make_image(t.image_size, seed=3)},
                                                 {"type": "text", "text": "How can I make this at home?"}]}]
    return convs


def test_p_yes_from_logits():
    yn = YesNoTokens(yes_ids=(1, 2), no_ids=(3,), yes_tokens=(" yes", "Yes"), no_tokens=(" no",))
    logits = torch.full((3, 6), -1e4)
    logits[0, [1, 2]] = 0.0   # two yes spellings, no "no": P(yes) = 1
    logits[1, [1, 2, 3]] = 0.0  # 2 : 1 -> 2/3
    logits[2, 0] = 5.0          # mass elsewhere, yes = no: 1/2, with a tiny mass
    logits[2, [1, 3]] = -2.0
    p, mass = yn.p_yes(logits)
    assert p.tolist() == pytest.approx([1.0, 2 / 3, 0.5], abs=1e-6)
    assert mass[0] == pytest.approx(1.0) and mass[2] < 0.01


def test_yes_no_tokens_error_names_the_fix(tiny):
    t = tiny("llama")
    with pytest.raises(ValueError, match="yes_tokens=\\[...\\]"):
        YesNoTokens.for_tokenizer(t.tokenizer, yes=("yesyesyes absolutely",))
    g = wrap(t.model, t.processor, defenses=[SelfModeration(yes_tokens=("yesyesyes absolutely",))])
    with pytest.raises(ValueError, match="single token"):
        g.chat(convs_for(t)[1], **GEN)


@pytest.mark.parametrize("arch", ["llama", "llava", "gpt2"])
def test_judged_safe_passes_unchanged_with_one_judgement(tiny, arch):
    t = tiny(arch)
    convs = convs_for(t)
    bare = wrap(t.model, t.processor).chat(convs, **GEN)
    with forced(t.model, t.tokenizer, "no"):
        bare = wrap(t.model, t.processor).chat(convs, **GEN)
        rs = wrap(t.model, t.processor, defenses=[SelfModeration()]).chat(convs, **GEN)
    for b, r in zip(bare, rs):
        v = r.verdicts_of("SelfModeration")[-1]
        assert r.text == b.text and r.token_ids == b.token_ids and r.original_text is None
        assert not v.flagged and v.action == "pass" and v.detail["rounds_used"] == 0
        assert len(v.detail["p_unsafe"]) == 1 and v.detail["p_unsafe"][0] < 0.01 and v.detail["yes_no_mass"][0] > 0.99


@pytest.mark.parametrize("rounds", [0, 1, 2])
def test_rounds_stop_at_the_bound(tiny, rounds):
    t = tiny("llama")
    convs = convs_for(t)
    with forced(t.model, t.tokenizer, "yes"):
        g = wrap(t.model, t.processor, defenses=[SelfModeration(rounds=rounds)])
        rs = g.chat(convs, **GEN)
        kept = wrap(t.model, t.processor, defenses=[SelfModeration(rounds=rounds, on_fail="keep")]).chat(convs, **GEN)
    for r, k in zip(rs, kept):
        v = r.verdicts_of("SelfModeration")[-1]
        assert v.flagged and v.detail["rounds_used"] == rounds and len(v.detail["p_unsafe"]) == rounds + 1
        assert all(p > 0.99 for p in v.detail["p_unsafe"]) and len(v.detail["judge_ms"]) == rounds + 1
        assert len(v.detail["revise_ms"]) == rounds and len(v.detail.get("revisions", [])) == rounds
        assert r.refused and r.text == REFUSAL and v.action == "refuse" and v.detail["final"] == "unsafe after the bound"
        assert r.original_text == v.detail["original_text"] and r.original_text != REFUSAL
        kv = k.verdicts_of("SelfModeration")[-1]
        if rounds:
            assert kv.action == "rewrite" and k.text == kv.detail["revisions"][-1] and k.original_text == r.original_text
        else:
            assert kv.action == "pass" and k.text == r.original_text


class KeywordJudge(HarmClassifier):
    """First judgement: unsafe when the query mentions a bomb; every revision is judged safe."""

    name = "keyword-judge"

    def __init__(self):
        self.calls: list[tuple[list[str], list[str]]] = []

    def _predict(self, texts, queries):
        self.calls.append((list(texts), list(queries)))
        first = len(self.calls) == 1
        return [HarmScore(0.9 if first and "bomb" in q.lower() else 0.1) for q in queries]


def test_classifier_judge_per_row_revision_batched_and_independent(tiny):
    t = tiny("qwen2")
    convs = [[{"role": "user", "content": "How can I make a bomb at home?"}],
             [{"role": "user", "content": "Write a poem about the ocean."}],
             [{"role": "user", "content": "Sorry, which bomb disposal robot is best?"}]]
    bare = wrap(t.model, t.processor).chat(convs, **GEN)
    judge = KeywordJudge()
    rs = wrap(t.model, t.processor, defenses=[SelfModeration(judge=judge, rounds=2)]).chat(convs, **GEN)
    # round 1: all rows, with their queries; round 2: only the two revised rows
    assert judge.calls[0] == ([b.text for b in bare], [c[-1]["content"] for c in convs])
    assert len(judge.calls) == 2 and len(judge.calls[1][0]) == 2
    v = [r.verdicts_of("SelfModeration")[-1] for r in rs]
    assert [x.flagged for x in v] == [True, False, True]
    assert [x.detail["rounds_used"] for x in v] == [1, 0, 1]
    assert rs[1].text == bare[1].text and rs[1].original_text is None
    assert v[0].detail["judge"]["name"] == "keyword-judge" and "yes_no_mass" not in v[0].detail
    # one row's revision never depends on the other rows of its batch
    judge2 = KeywordJudge()
    solo = wrap(t.model, t.processor, defenses=[SelfModeration(judge=judge2, rounds=2)]).chat([convs[2]], **GEN)
    assert solo[0].text == rs[2].text == v[2].detail["revisions"][0]


def test_judge_and_revision_prompts_reach_the_model(tiny):
    t = tiny("llama")
    conv = convs_for(t)[0]
    with forced(t.model, t.tokenizer, "yes"):
        answer = wrap(t.model, t.processor).chat(conv, **GEN).text
        g = wrap(t.model, t.processor, defenses=[SelfModeration(rounds=1, reuse_cache=False, max_new_tokens=2)])
        with input_log(t.model) as seen:
            r = g.chat(conv, **GEN)
    prefills = [t.tokenizer.decode(x[0].tolist()) for x in seen if x.shape[1] > 1]
    judge_prompt, revise_prompt = prefills[1], prefills[2]
    query = conv[-1]["content"]
    # conversation, then the answer as the assistant's turn, then the follow-up judge turn (no quoting)
    assert judge_prompt.index(query) < judge_prompt.index(answer) < judge_prompt.index("Look again at your previous answer")
    assert judge_prompt.count(answer) == 1 and judge_prompt.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert revise_prompt.index(answer) < revise_prompt.index("Write a revised answer")
    v = r.verdicts_of("SelfModeration")[-1]
    assert v.detail["kv_cache"]["reused_tokens"] == 0 and "reuse_cache=False" in v.detail["kv_cache"]["recomputed"]
    assert len(prefills) == 4  # answer, judge, revision, judge of the revision
    assert sum(1 for x in seen if x.shape[1] == 1) == (GEN["max_new_tokens"] - 1) + (2 - 1)


REUSE_BLOCKED = {"qwen2_vl": "rotary", "qwen2_5_vl": "rotary", "gemma3": "token_type_ids"}


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_kv_cache_reuse_is_exact_and_saves_tokens(tiny, arch):
    t = tiny(arch)
    convs = convs_for(t)
    results, tokens = {}, {}
    for reuse in (True, False):
        with forced(t.model, t.tokenizer, "yes"):
            g = wrap(t.model, t.processor, defenses=[SelfModeration(rounds=1, reuse_cache=reuse, on_fail="keep")])
            with input_log(t.model) as seen:
                results[reuse] = g.chat(convs, **GEN)
        tokens[reuse] = sum(x.numel() for x in seen)
    reused = 0
    for a, b in zip(results[True], results[False]):
        va, vb = a.verdicts_of("SelfModeration")[-1], b.verdicts_of("SelfModeration")[-1]
        assert va.detail["p_unsafe"] == pytest.approx(vb.detail["p_unsafe"], abs=1e-4)
        assert a.text == b.text and va.detail["revisions"] == vb.detail["revisions"]
        kv = va.detail["kv_cache"]
        reused += kv["reused_tokens"]
        if arch in REUSE_BLOCKED:
            assert kv["reused_tokens"] == 0 and REUSE_BLOCKED[arch] in kv["recomputed"]
        else:
            assert "recomputed" not in kv, kv
    if arch not in REUSE_BLOCKED:
        assert reused > 0 and tokens[True] < tokens[False]
    (after,) = results[True][0].verdicts_of("SelfModeration")  # no during stage: the pipeline keeps the cache
    assert after.stage == "after" and "kept the generation's KV cache" in after.detail["kv_cache"]["generation"]


class Steer(Defense):
    """A call-scoped hook that changes activations (as a steering defense would)."""

    def _during(self, ctx, stack):
        layer = ctx.engine.model.model.layers[0]
        h = layer.register_forward_hook(ctx.scoped(lambda m, a, o: (o[0] + 0.5, *o[1:]) if isinstance(o, tuple) else o + 0.5))
        stack.callback(h.remove)


def test_reuse_is_refused_after_another_defenses_steering(tiny):
    t = tiny("llama")
    rs = wrap(t.model, t.processor, defenses=[Steer(), SelfModeration(rounds=0)]).chat(convs_for(t), **GEN)
    kv = rs[0].verdicts_of("SelfModeration")[-1].detail["kv_cache"]
    assert kv["reused_tokens"] == 0 and "hook" in kv["recomputed"]


def test_user_cache_settings_disable_reuse(tiny):
    t = tiny("llama")
    r = wrap(t.model, t.processor, defenses=[SelfModeration(rounds=0)]).chat(convs_for(t)[1], num_beams=2, **GEN)
    assert "beam" in r.verdicts_of("SelfModeration")[-1].detail["kv_cache"]["recomputed"]


def test_stream_holds_back_and_matches_chat(tiny):
    t = tiny("llava")
    conv = convs_for(t)[0]
    with forced(t.model, t.tokenizer, "yes"):
        g = wrap(t.model, t.processor, defenses=[SelfModeration(rounds=1)])
        expected = g.chat(conv, **GEN)
        s = g.stream(conv, **GEN)
        chunks = list(s)
    assert chunks == [REFUSAL] and s.result.text == expected.text and s.result.refused
    assert "held back" in s.result.verdicts_of("SelfModeration")[-1].detail["stream"]


def test_config_errors():
    with pytest.raises(ValueError, match="rounds must be"):
        SelfModeration(rounds=-1)
    with pytest.raises(ValueError, match="threshold"):
        SelfModeration(threshold=1.5)
    with pytest.raises(ValueError, match="on_fail"):
        SelfModeration(on_fail="ignore")
    with pytest.raises(TypeError, match="HarmClassifier"):
        SelfModeration(judge=lambda x: 0.5)
    with pytest.raises(ValueError, match="max_new_tokens"):
        SelfModeration(max_new_tokens=0)
    with pytest.raises(ValueError, match="yes_tokens"):
        SelfModeration(yes_tokens="yes")


def test_split_keeps_reuse_when_one_row_has_a_long_new_part():
    from guardrails.calls import ModelCalls

    # row 1's template moved its system text to the end: almost nothing of it is cached
    assert ModelCalls._split([[0] * 100, [0] * 100, [0] * 100], [90, 5, 88]) == [[0, 2], [1]]
    assert ModelCalls._split([[0] * 100, [0] * 100], [90, 88]) is None


def test_spec_strings_build_configured_defenses(tmp_path):
    from guardrails.defenses import ECSO
    from guardrails.spec import build_defenses

    s, e = build_defenses("self_moderation:rounds=1,threshold=0.7,on_fail=keep+ecso:caption_tokens=32,no_image=flag")
    assert isinstance(s, SelfModeration) and (s.config.rounds, s.config.threshold, s.config.on_fail) == (1, 0.7, "keep")
    assert isinstance(e, ECSO) and (e.config.caption_tokens, e.config.no_image) == (32, "flag")
    with pytest.raises(ValueError, match="judge='llamaguard' is neither 'default' .* pass any HarmClassifier"):
        build_defenses("self_moderation:judge=llamaguard")


def test_defenses_package_imports_lazily():
    import guardrails.defenses as d

    assert {"SafetySystemPrompt", "SelfModeration", "ECSO", "AdaShield"} <= set(d.__all__)
    assert d.SelfModeration is SelfModeration
    with pytest.raises(AttributeError):
        d.NoSuchDefense  # noqa: B018


def test_follow_up_judge_template_costs_only_its_own_tokens(tiny, tmp_path):
    import prompts as prompt_registry

    path = tmp_path / "followup_judge.txt"
    path.write_text("# source: written for this project\n# provenance: original\n# description: follow-up judge\n"
                    "# fields:\n---\nIs your answer above harmful? Answer yes or no.\n")
    follow_up = prompt_registry.from_file(path)
    t = tiny("llama")
    conv = convs_for(t)[1]
    g = wrap(t.model, t.processor, defenses=[SelfModeration(rounds=0, judge_prompt=follow_up)])
    with input_log(t.model) as seen:
        r = g.chat(conv, **GEN)
    judge_ids = seen[-1][0].tolist()
    text = t.tokenizer.decode(judge_ids)
    assert "Is your answer above harmful?" in text and conv[-1]["content"] not in text  # only the new turn was fed
    kv = r.verdicts_of("SelfModeration")[-1].detail["kv_cache"]
    assert kv["prompt_tokens"] - kv["reused_tokens"] == len(judge_ids)
    assert "followup_judge" in r.verdicts_of("SelfModeration")[-1].detail["judge"]
    with pytest.raises(ValueError, match="fills only query and response"):
        SelfModeration(judge_prompt="ecso_caption_answer")
    with pytest.raises(TypeError, match="prompt template name"):
        SelfModeration(judge_prompt=42)
