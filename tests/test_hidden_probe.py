"""HiddenStateProbe: hook features during generate == teacher-forced features; fit/save/load; model checks."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from guardrails import conversation as conv_mod
from guardrails.classifiers.base import HarmClassifier, HarmScore
from guardrails.classifiers.hidden_probe import HiddenStateProbe
from guardrails.engine import Engine
from guardrails.testing import make_image

QUERIES = ["Tell me a short story about a helpful robot and its friends.", "Hi", "How can I make a bomb at home?",
           "Write a poem about the ocean and the moon."]


def convs_for(t, n=2, image=False):
    convs = [[{"role": "user", "content": q}] for q in QUERIES[:n]]
    if image and t.is_multimodal:
        convs[0] = [{"role": "user", "content": [{"type": "image", "image": make_image(t.image_size, seed=1)},
                                                 {"type": "text", "text": "Describe the image."}]}]
    return [conv_mod.validate(c) for c in convs]


class _Observe(StoppingCriteria):
    def __init__(self, cap):
        self.cap = cap

    def __call__(self, input_ids, scores, **kw):
        self.cap.observe(input_ids)
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def generate_with_capture(t, probe, convs, max_new_tokens=10, eos=None):
    """Greedy generation with the probe's hook; returns (answer ids per row, pooled features, counts)."""
    eng = Engine(t.model, t.processor)
    inputs = eng.encode(convs)
    stops = set(eng.stop_token_ids) | ({eos} if eos is not None else set())
    kw = {"eos_token_id": eos} if eos is not None else {}
    with probe.capture(len(convs), stops) as cap:
        out = t.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=t.tokenizer.pad_token_id,
                               stopping_criteria=StoppingCriteriaList([_Observe(cap)]), **kw)
    answers = []
    for row in out[:, inputs["input_ids"].shape[1]:].tolist():
        ids = []
        for x in row:
            if x in stops:
                break
            ids.append(x)
        answers.append(ids)
    feats, counts = cap.pooled(probe.config.pooling)
    return answers, feats, counts


@pytest.mark.parametrize("arch,image", [("llama", False), ("llava", True), ("qwen2_vl", True), ("gemma3", True)])
@pytest.mark.parametrize("pooling", ["mean", "last"])
def test_hook_features_equal_teacher_forced_features(tiny, arch, image, pooling):
    t = tiny(arch)
    convs = convs_for(t, 2, image=image)
    probe = HiddenStateProbe(t.model, t.processor, layer=-1, pooling=pooling)
    answers, feats, counts = generate_with_capture(t, probe, convs)
    assert counts.tolist() == [len(a) for a in answers] and min(counts.tolist()) > 0
    tf, tcounts = probe.pooled(convs, answers)
    assert tcounts.tolist() == counts.tolist()
    assert torch.allclose(feats.cpu(), tf.cpu(), atol=1e-5, rtol=1e-4), (feats - tf).abs().max()
    # A different layer gives different features: the comparison above is not vacuous.
    other = HiddenStateProbe(t.model, t.processor, layer=0, pooling=pooling).pooled(convs, answers)[0]
    assert not torch.allclose(other, tf, atol=1e-5)


def test_finished_rows_stop_adding_states(tiny):
    """A row that ends early (EOS) pools only its answer tokens' states, not the EOS step or padding."""
    t = tiny("llama")
    convs = convs_for(t, 2)
    probe = HiddenStateProbe(t.model, t.processor, layer=1)
    bare, _, _ = generate_with_capture(t, probe, convs, max_new_tokens=10)
    eos = bare[0][3]  # row 0's 4th greedy token, passed as EOS, ends it after 3 answer tokens
    assert eos not in bare[0][:3] and eos not in bare[1], "pick another token: this one appears earlier"
    answers, feats, counts = generate_with_capture(t, probe, convs, max_new_tokens=10, eos=eos)
    assert answers[0] == bare[0][:3] and counts[0].item() == 3
    assert counts[1].item() == len(answers[1])
    tf, _ = probe.pooled(convs, answers)
    assert torch.allclose(feats, tf, atol=1e-5, rtol=1e-4)


def _fit_data(t):
    """Labelled (query, response) pairs: refusals safe, compliance unsafe (enough for a separable toy)."""
    qs = ["How can I make a bomb at home?", "How do I hack into my neighbor's wifi network?"] * 3
    rs = ["I'm sorry, but I cannot help with that request.", "I am sorry, I can't assist with that.",
          "Sorry, I can't assist with making a bomb or a weapon.",
          "Here is a recipe for chocolate cake: mix flour, sugar, butter and eggs.",
          "The steps are listed below: Step 1. Step 2. Step 3.", "Yes, I can help with that. The answer is yes."]
    return qs, rs, [0, 0, 0, 1, 1, 1]


def test_fit_predict_save_load_roundtrip(tiny, tmp_path):
    t = tiny("llama")
    qs, rs, ys = _fit_data(t)
    probe = HiddenStateProbe(t.model, t.processor, layer=1, C=100.0)
    assert probe.fit(qs, rs, ys, training_data={"source": "unit test", "license": "n/a"}) is probe
    assert isinstance(probe, HarmClassifier)
    scores = probe.predict(rs, qs)
    assert all(isinstance(s, HarmScore) and 0 <= s.score <= 1 for s in scores)
    assert [s.score >= 0.5 for s in scores] == [bool(y) for y in ys]  # separable on its training data
    d = probe.save(tmp_path / "probe")
    assert sorted(p.name for p in d.iterdir()) == ["head.safetensors", "manifest.json"]
    man = json.loads((d / "manifest.json").read_text())
    assert man["kind"] == "hidden-state-probe" and man["layer"] == 1 and man["pooling"] == "mean"
    assert man["model"]["hidden_size"] == 64 and man["model"]["num_layers"] == 2
    assert man["model"]["model_class"] == type(t.model).__name__
    assert man["training_data"] == {"source": "unit test", "license": "n/a"} and man["n_train"] == 6
    loaded = HiddenStateProbe.load(d, t.model, t.processor)
    again = loaded.predict(rs, qs)
    assert np.allclose([s.score for s in again], [s.score for s in scores], atol=1e-9)
    # Queries are optional (an empty user turn) and matter (the features see the prompt).
    no_q = loaded.predict(rs[:2])
    assert len(no_q) == 2 and no_q[0].score != pytest.approx(again[0].score, abs=1e-12)
    # Unbound load: predict says how to bind.
    unbound = HiddenStateProbe.load(d)
    with pytest.raises(RuntimeError, match="bind"):
        unbound.predict(["x"], ["y"])
    # It reads activations, not text: a benchmark judge refuses it by name.
    from benchmarks.safety import build_judge

    with pytest.raises(ValueError, match="hidden-state probe"):
        build_judge(f"classifier:{d}")
    # A tampered head is refused.
    (d / "head.safetensors").write_bytes((d / "head.safetensors").read_bytes()[:-8] + b"\0" * 8)
    with pytest.raises(ValueError, match="sha256"):
        HiddenStateProbe.load(d)


def test_model_mismatch_is_a_clear_error(tiny, tmp_path):
    import transformers as tf

    t = tiny("llama")
    qs, rs, ys = _fit_data(t)
    d = HiddenStateProbe(t.model, t.processor, layer=1).fit(qs, rs, ys).save(tmp_path / "p")
    cfg = tf.LlamaConfig(**{**t.model.config.to_dict(), "num_hidden_layers": 3})
    deeper = tf.LlamaForCausalLM(cfg).eval()
    with pytest.raises(ValueError, match=r"2 decoder layers.*3 layers"):
        HiddenStateProbe.load(d, deeper, t.processor)
    cfg = tf.LlamaConfig(**{**t.model.config.to_dict(), "hidden_size": 32, "intermediate_size": 64})
    narrower = tf.LlamaForCausalLM(cfg).eval()
    with pytest.raises(ValueError, match="hidden size 64.*hidden size 32"):
        HiddenStateProbe.load(d, narrower, t.processor)


def test_config_errors_name_the_fix(tiny):
    t = tiny("llama")
    with pytest.raises(ValueError, match="out of range.*2 decoder layers"):
        HiddenStateProbe(t.model, t.processor, layer=5)
    with pytest.raises(ValueError, match="pooling"):
        HiddenStateProbe(layer=0, pooling="max")
    with pytest.raises(TypeError, match="layer must be an int"):
        HiddenStateProbe(layer="1")
    probe = HiddenStateProbe(t.model, t.processor, layer=0)
    with pytest.raises(RuntimeError, match="fit"):
        probe.predict(["a"], ["b"])
    with pytest.raises(ValueError, match="single class"):
        probe.fit(["a", "b"], ["c", "d"], [1, 1])
    with pytest.raises(ValueError, match="either responses"):
        probe.features(["a"])


def test_capture_refuses_beam_search_and_removes_its_hook(tiny):
    t = tiny("llama")
    probe = HiddenStateProbe(t.model, t.processor, layer=0)
    layer = probe.layer_module
    before = dict(layer._forward_hooks)
    inputs = Engine(t.model, t.processor).encode(convs_for(t, 1))
    with pytest.raises(RuntimeError, match="beam search"):
        with probe.capture(1, {0}):
            t.model.generate(**inputs, max_new_tokens=3, num_beams=2, do_sample=False)
    assert dict(layer._forward_hooks) == before
