"""Protector: post and stream modes, the detoxifier, re-screening, stream() hold-back, the hidden-state probe."""

from __future__ import annotations

import pytest
import torch

import prompts
from guardrails import wrap
from guardrails.classifiers.base import HarmClassifier, HarmScore
from guardrails.classifiers.hidden_probe import HiddenStateProbe
from guardrails.defenses.protector import Detoxifier, Protector
from guardrails.spec import build_defenses
from guardrails.testing import make_image

N_NEW = 24
GREEDY = {"max_new_tokens": N_NEW, "do_sample": False}
QUERIES = ["Tell me a short story about a helpful robot and its friends.", "Hi", "Write a poem about the ocean and the moon."]


def convs(t, n=2, image=False):
    out = [[{"role": "user", "content": q}] for q in QUERIES[:n]]
    if image and t.is_multimodal:
        out[0] = [{"role": "user", "content": [{"type": "image", "image": make_image(t.image_size, seed=1)},
                                               {"type": "text", "text": QUERIES[0]}]}]
    return out


class MarkerDetector(HarmClassifier):
    """P(unsafe) = 1 when the text contains ``marker`` (or always, with marker=""); records every call."""

    name = "marker-test-detector"

    def __init__(self, marker: str):
        self.marker = marker
        self.calls: list[tuple[list[str], list[str | None] | None]] = []

    def _predict(self, texts, queries):
        self.calls.append((list(texts), None if queries is None else list(queries)))
        return [HarmScore(1.0 if self.marker in x else 0.0, categories=["test"] if self.marker in x else []) for x in texts]


class FixedDetox(Detoxifier):
    """Rewrites every answer to a fixed text, recording what it was given."""

    def __init__(self, text: str):
        super().__init__()
        self.text, self.seen = text, []

    def rewrite(self, calls, queries, answers):
        self.seen.append((list(queries), list(answers)))
        return [self.text] * len(answers)


def hook_snapshot(model):
    return {n: (tuple(m._forward_hooks), tuple(m._forward_pre_hooks)) for n, m in model.named_modules()}


@pytest.fixture(scope="module")
def setup(tiny):
    """The tiny llama, its bare greedy answers for 2 rows, and a marker only row 0 produces (found here, not hard-coded)."""
    t = tiny("llama")
    bare = wrap(t.model, t.processor).chat(convs(t, 2), **GREEDY)
    tok = t.tokenizer
    ids0 = bare[0].token_ids
    for j in range(4, len(ids0)):
        piece = tok.decode([ids0[j]]).strip()
        if len(piece) >= 3 and piece not in bare[1].text and piece not in tok.decode(ids0[:j]):
            return t, bare, piece, j
    pytest.fail(f"no usable marker in the tiny model's answer {bare[0].text!r}")


def fire_point(t, ids, marker, every):
    """The first multiple of ``every`` whose decoded prefix contains the marker."""
    for n in range(every, len(ids) + 1, every):
        if marker in t.tokenizer.decode(ids[:n]):
            return n
    return None


def test_post_mode_rewrites_only_flagged_rows_and_gives_the_detector_the_query(setup):
    t, bare, marker, _ = setup
    det, detox = MarkerDetector(marker), FixedDetox("A safe answer.")
    g = wrap(t.model, t.processor, [Protector(det, detoxifier=detox, mode="post")])
    r0, r1 = g.chat(convs(t, 2), **GREEDY)
    assert r0.text == "A safe answer." and r0.original_text == bare[0].text and not r0.refused
    assert r0.token_ids == bare[0].token_ids  # post mode never touches generation
    assert r1.text == bare[1].text and r1.original_text is None and r1.token_ids == bare[1].token_ids
    v0, v1 = r0.verdicts_of("Protector")[-1], r1.verdicts_of("Protector")[-1]
    assert (v0.flagged, v0.action, v0.score, v0.threshold, v0.categories) == (True, "rewrite", 1.0, 0.5, ["test"])
    assert v0.detail["fired_at"] == len(bare[0].token_ids) and v0.detail["fired_in"] == "after"
    assert v0.detail["original_text"] == bare[0].text
    assert v0.detail["detoxifier"]["outcome"] == "rewritten" and v0.detail["detoxifier"]["rescreen_score"] == 0.0
    assert (v1.flagged, v1.action, v1.score) == (False, "pass", 0.0)
    # First call: both answers with their queries; second: the rewrite of row 0 only (re-screen).
    assert det.calls[0] == ([bare[0].text, bare[1].text], QUERIES[:2])
    assert det.calls[1] == (["A safe answer."], QUERIES[:1])
    assert detox.seen == [([QUERIES[0]], [bare[0].text])]  # batched over flagged rows only


def test_self_detoxifier_prompt_has_question_and_answer(setup):
    """Default detoxifier: the wrapped model, prompt mllm_protector_detoxify with the query and the answer."""
    t, bare, marker, _ = setup
    g = wrap(t.model, t.processor, [Protector(MarkerDetector(marker), mode="post")])
    seen = []
    real = g.engine.run_generate

    def spy(inputs, kw, streamer=None):
        seen.append((g.engine.tokenizer.batch_decode(inputs["input_ids"], skip_special_tokens=False), kw))
        return real(inputs, kw, streamer)

    g.engine.run_generate = spy  # instance attribute: only this GuardedModel's engine is spied on
    r0, r1 = g.chat(convs(t, 2), **GREEDY)
    seen = seen[1:]  # the first generation is the answer itself
    assert len(seen) == 1 and len(seen[0][0]) == 1  # one batched rewrite, flagged row only
    rendered, kw = seen[0][0][0], seen[0][1]
    expected = prompts.render("mllm_protector_detoxify", query=QUERIES[0], response=bare[0].text)
    # (the Llama-3 template trims message content, so the prompt's final space is not in the render)
    assert expected.strip() in rendered and QUERIES[0] in rendered and bare[0].text in rendered
    assert kw["max_new_tokens"] == N_NEW and "stopping_criteria" not in kw and "logits_processor" not in kw
    info = r0.verdicts_of("Protector")[-1].detail["detoxifier"]
    assert info["kind"] == "self"
    # Whatever the tiny model wrote, the outcome follows the re-screen.
    if marker in info["rewrite"]:
        assert r0.refused and r0.text == prompts.render("refusal_default")
    else:
        assert r0.text == info["rewrite"] and info["outcome"] == "rewritten"
    assert r1.text == bare[1].text


def test_rewrite_still_unsafe_is_refused(setup):
    t, bare, marker, _ = setup
    det = MarkerDetector("")  # everything is unsafe, the rewrite too
    detox = FixedDetox("still harmful")
    g = wrap(t.model, t.processor, [Protector(det, detoxifier=detox, refusal_text="No.")])
    r0, r1 = g.chat(convs(t, 2), **GREEDY)
    for r, b in ((r0, bare[0]), (r1, bare[1])):
        v = r.verdicts_of("Protector")[-1]
        assert r.refused and r.text == "No." and r.original_text == b.text
        assert v.action == "refuse" and v.detail["detoxifier"]["outcome"] == "refused (rewrite still unsafe)"
        assert v.detail["detoxifier"]["rewrite"] == "still harmful" and v.detail["detoxifier"]["rescreen_score"] == 1.0
    assert det.calls[1] == (["still harmful", "still harmful"], QUERIES[:2])


def test_refuse_detoxifier_and_empty_rewrite(setup):
    t, bare, marker, _ = setup
    g = wrap(t.model, t.processor, [Protector(MarkerDetector(marker), detoxifier="refuse")])
    r0, r1 = g.chat(convs(t, 2), **GREEDY)
    assert r0.refused and r0.text == prompts.render("refusal_default") and r0.original_text == bare[0].text
    assert r0.verdicts_of("Protector")[-1].detail["detoxifier"]["outcome"] == "refused (detoxifier='refuse')"
    assert r1.text == bare[1].text
    g = wrap(t.model, t.processor, [Protector(MarkerDetector(marker), detoxifier=FixedDetox("  "))])
    r0 = g.chat(convs(t, 1)[0], **GREEDY)
    assert r0.refused and r0.verdicts_of("Protector")[-1].detail["detoxifier"]["outcome"] == "refused (empty rewrite)"


@pytest.mark.parametrize("every", [4, 5])
def test_stream_mode_stops_only_the_flagged_row(setup, every):
    t, bare, marker, _ = setup
    n_fire = fire_point(t, bare[0].token_ids, marker, every)
    assert n_fire is not None and n_fire < N_NEW
    det, detox = MarkerDetector(marker), FixedDetox("A safe answer.")
    before = hook_snapshot(t.model)
    g = wrap(t.model, t.processor, [Protector(det, detoxifier=detox, mode="stream", every=every)])
    r0, r1 = g.chat(convs(t, 2), **GREEDY)
    assert hook_snapshot(t.model) == before
    v0 = r0.verdicts_of("Protector")[-1]
    assert v0.detail["fired_at"] == n_fire and v0.detail["fired_in"] == "during" and v0.detail["stopped_at"] == n_fire
    assert r0.original_text == t.tokenizer.decode(bare[0].token_ids[:n_fire], skip_special_tokens=True)
    assert r0.text == "A safe answer." and v0.action == "rewrite" and v0.detail["checked_tokens"] == n_fire - every
    assert [c["tokens"] for c in v0.detail["checks"]] == list(range(every, n_fire + 1, every))
    assert [c["score"] for c in v0.detail["checks"]] == [0.0] * (n_fire // every - 1) + [1.0]
    during = [v for v in r0.verdicts if v.defense == "Protector" and v.stage == "during"][0]
    assert during.action == "stop" and during.flagged and during.detail["fired_at"] == n_fire
    assert detox.seen == [([QUERIES[0]], [r0.original_text])]
    # Row 1 generated exactly its bare tokens and passed.
    assert r1.token_ids == bare[1].token_ids and r1.text == bare[1].text and not r1.flagged
    # Checks were batched over the rows still running; after row 0 stopped only row 1 was scored.
    sizes = [len(texts) for texts, _ in det.calls]
    n_checks = N_NEW // every
    assert sizes[: n_fire // every] == [2] * (n_fire // every)
    assert sizes[n_fire // every: n_checks] == [1] * (n_checks - n_fire // every)
    # Every in-generation check saw exactly the prefix of that many tokens, with the query.
    for k, (texts, queries) in enumerate(det.calls[: n_fire // every]):
        assert texts[0] == t.tokenizer.decode(bare[0].token_ids[: (k + 1) * every], skip_special_tokens=True)
        assert queries == QUERIES[:2]


def test_stream_mode_row0_stopped_tokens(setup):
    """The stopped row's generated tokens are its bare tokens up to the firing check, none after."""
    t, bare, marker, _ = setup
    n_fire = fire_point(t, bare[0].token_ids, marker, 4)
    g = wrap(t.model, t.processor, [Protector(MarkerDetector(marker), detoxifier="refuse", mode="stream", every=4)])
    r0 = g.chat(convs(t, 2), **GREEDY)[0]
    assert r0.token_ids == bare[0].token_ids[:n_fire]
    assert r0.verdicts_of("Protector")[-1].detail["fired_at"] == len(r0.token_ids)  # 0 tokens after firing


def test_stream_mode_checks_the_tail_after_generation(setup):
    """Tokens after the last multiple of `every` are scored once the answer is complete."""
    t, bare, marker, _ = setup
    det = MarkerDetector(marker)
    g = wrap(t.model, t.processor, [Protector(det, detoxifier="refuse", mode="stream", every=100)])
    r0, r1 = g.chat(convs(t, 2), **GREEDY)
    assert r0.token_ids == bare[0].token_ids  # no check during generation (every > length)
    v0 = r0.verdicts_of("Protector")[-1]
    assert r0.refused and v0.detail["fired_in"] == "after" and v0.detail["fired_at"] == N_NEW
    assert v0.detail["checks"] == [{"tokens": N_NEW, "score": 1.0, "stage": "after"}]
    assert det.calls == [([bare[0].text, bare[1].text], QUERIES[:2])]
    assert r1.text == bare[1].text


def test_stream_mode_row_that_ends_early_is_checked_whole_after(setup):
    """A row that ends (EOS) between checks is no longer scored during generation; its tail is scored after."""
    t, bare, marker, _ = setup
    every = 4
    n_fire = fire_point(t, bare[0].token_ids, marker, every)
    ids1 = bare[1].token_ids
    k = next((k for k in (5, 6) if ids1[k] not in ids1[:k] and ids1[k] not in bare[0].token_ids[:n_fire]), None)
    if k is None:
        pytest.skip("no token of row 1 can serve as an EOS that only row 1 emits")
    det = MarkerDetector(marker)
    g = wrap(t.model, t.processor, [Protector(det, detoxifier="refuse", mode="stream", every=every)])
    r0, r1 = g.chat(convs(t, 2), **GREEDY, eos_token_id=ids1[k])  # row 1 ends at its (k+1)-th token
    assert r1.token_ids == ids1[:k] and not r1.flagged  # the EOS given to chat is cut like the configured one
    checks1 = r1.verdicts_of("Protector")[-1].detail["checks"]
    assert checks1 == [{"tokens": 4, "score": 0.0}, {"tokens": k, "score": 0.0, "stage": "after"}]
    assert r0.token_ids == bare[0].token_ids[:n_fire] and r0.refused
    assert [len(texts) for texts, _ in det.calls[: n_fire // every]] == [2] + [1] * (n_fire // every - 1)


def test_stream_api_never_shows_unchecked_text(setup):
    t, bare, marker, _ = setup
    every = 4
    n_fire = fire_point(t, bare[0].token_ids, marker, every)
    safe_prefix = t.tokenizer.decode(bare[0].token_ids[: n_fire - every], skip_special_tokens=True)
    g = wrap(t.model, t.processor, [Protector(MarkerDetector(marker), detoxifier=FixedDetox("A safe answer."),
                                              mode="stream", every=every)])
    s = g.stream(convs(t, 1)[0], **GREEDY)
    chunks = list(s)
    assert chunks[-1] == "\n\nA safe answer."
    shown = "".join(chunks[:-1])
    assert marker not in shown and safe_prefix.startswith(shown) and shown == safe_prefix
    assert s.result.text == "A safe answer." and marker in s.result.original_text
    v = s.result.verdicts_of("Protector")[-1]
    assert v.detail["stream"] == "replaced" and v.detail["fired_at"] == n_fire
    # A benign answer streams whole, in checked pieces of `every` tokens, then the checked tail.
    g = wrap(t.model, t.processor, [Protector(MarkerDetector("\x00never"), mode="stream", every=every)])
    s = g.stream(convs(t, 2)[1], **GREEDY)
    assert "".join(s) == bare[1].text and not s.result.flagged


def test_post_mode_in_stream_holds_everything_back(setup):
    t, bare, marker, _ = setup
    g = wrap(t.model, t.processor, [Protector(MarkerDetector(marker), detoxifier=FixedDetox("A safe answer."))])
    chunks = list(g.stream(convs(t, 1)[0], **GREEDY))
    assert chunks == ["A safe answer."]


def test_hooks_removed_when_the_detector_raises(setup):
    t, bare, marker, _ = setup

    class Boom(HarmClassifier):
        def _predict(self, texts, queries):
            raise RuntimeError("detector failed")

    def boom(*args, **kwargs):
        raise RuntimeError("detector failed")

    before = hook_snapshot(t.model)
    probe = HiddenStateProbe(t.model, t.processor, layer=1)
    probe.head = _constant_head(probe, 0.0)
    probe.score_pooled = boom  # fails inside generate, while the probe's hook is installed
    for det in (Boom(), probe):
        g = wrap(t.model, t.processor, [Protector(det, mode="stream", every=4)])
        with pytest.raises(RuntimeError, match="detector failed"):
            g.chat(convs(t, 2), **GREEDY)
        assert hook_snapshot(t.model) == before


def test_config_errors(setup):
    t, bare, marker, _ = setup
    det = MarkerDetector(marker)
    with pytest.raises(ValueError, match="threshold"):
        Protector(det, threshold=0)
    with pytest.raises(ValueError, match="mode"):
        Protector(det, mode="live")
    with pytest.raises(ValueError, match="every"):
        Protector(det, every=0)
    with pytest.raises(ValueError, match="detoxifier"):
        Protector(det, detoxifier="rewrite")
    with pytest.raises(TypeError, match="HarmClassifier"):
        Protector(lambda texts: 0)
    with pytest.raises(TypeError, match="instance"):
        Protector(MarkerDetector)
    with pytest.raises(ValueError, match="refusal_text"):
        Protector(det, refusal_text=" ")
    with pytest.raises(ValueError, match="no head"):
        Protector(HiddenStateProbe(t.model, t.processor, layer=0))
    with pytest.raises(ValueError, match="query.*response"):
        Detoxifier(prompt="refusal_default")
    g = wrap(t.model, t.processor, [Protector(det)])
    with pytest.raises(ValueError, match="generate"):
        g.generate(**t.encode(convs(t, 1)), max_new_tokens=2)


# -- the hidden-state probe inside Protector --------------------------------------------------


def _constant_head(probe, p):
    from guardrails.classifiers.hidden_probe import _Head, _Signature

    probe.signature = _Signature.of(probe.model, probe._info)
    probe.metadata = {"layer": probe.layer_index}
    logit = float(torch.logit(torch.tensor(p).clamp(1e-6, 1 - 1e-6)))
    return _Head(torch.zeros(64).numpy(), logit, torch.zeros(64).numpy(), torch.ones(64).numpy())


class ForwardCounter:
    def __init__(self, model):
        self.n = 0
        self.h = model.get_input_embeddings().register_forward_hook(lambda *a: self._inc())

    def _inc(self):
        self.n += 1


def test_probe_streams_without_extra_forwards_and_matches_teacher_forcing(setup):
    """Stream checks read the generation's activations: same forward count as bare, same scores as offline."""
    t, bare, marker, _ = setup
    every = 4
    probe = HiddenStateProbe(t.model, t.processor, layer=1)
    # Fit on prefixes: row 0's answer prefixes unsafe, row 1's safe (a separable toy task).
    qs, ids, ys = [], [], []
    for k in range(1, N_NEW + 1):
        for row, y in ((0, 1), (1, 0)):
            qs.append(QUERIES[row])
            ids.append(bare[row].token_ids[:k])
            ys.append(y)
    probe = HiddenStateProbe(t.model, t.processor, layer=1, C=100.0)
    probe.fit(qs, None, ys, response_ids=ids, training_data="unit test")

    counter = ForwardCounter(t.model)
    try:
        base = counter.n
        wrap(t.model, t.processor).chat(convs(t, 2), **GREEDY)
        bare_forwards = counter.n - base
        base = counter.n
        g = wrap(t.model, t.processor, [Protector(probe, detoxifier="refuse", mode="stream", every=every, threshold=1.0)])
        r0, r1 = g.chat(convs(t, 2), **GREEDY)
        assert counter.n - base == bare_forwards  # no forward beyond generation's own (threshold 1.0: nothing fires)
    finally:
        counter.h.remove()
    assert r0.token_ids == bare[0].token_ids and r1.token_ids == bare[1].token_ids
    for r, b in ((r0, bare[0]), (r1, bare[1])):
        checks = r.verdicts_of("Protector")[-1].detail["checks"]
        assert [c["tokens"] for c in checks] == list(range(every, N_NEW + 1, every))
        offline = probe.score_pooled(*probe.pooled([[{"role": "user", "content": [{"type": "text", "text": q}]}]
                                                     for q in [QUERIES[0 if b is bare[0] else 1]] * len(checks)],
                                                    [b.token_ids[: c["tokens"]] for c in checks]))
        assert [c["score"] for c in checks] == pytest.approx([s.score for s in offline], abs=1e-6)
    # Now a threshold between the rows' scores: row 0 fires at its first check above it, row 1 never.
    s0 = [c["score"] for c in r0.verdicts_of("Protector")[-1].detail["checks"]]
    s1 = [c["score"] for c in r1.verdicts_of("Protector")[-1].detail["checks"]]
    assert max(s0) > max(s1), (s0, s1)
    thr = (max(s1) + max(s0)) / 2
    first = next(i for i, s in enumerate(s0) if s >= thr)
    g = wrap(t.model, t.processor, [Protector(probe, detoxifier="refuse", mode="stream", every=every, threshold=thr)])
    r0, r1 = g.chat(convs(t, 2), **GREEDY)
    v0 = r0.verdicts_of("Protector")[-1]
    assert v0.detail["fired_at"] == (first + 1) * every and r0.refused
    assert len(r0.verdicts[0].detail["checks"]) == first + 1
    assert r1.token_ids == bare[1].token_ids and not r1.flagged


def test_probe_post_mode_reuses_generation_activations(setup):
    t, bare, marker, _ = setup
    probe = HiddenStateProbe(t.model, t.processor, layer=1)
    probe.head = _constant_head(probe, 0.9)  # every answer scores 0.9
    counter = ForwardCounter(t.model)
    try:
        g = wrap(t.model, t.processor, [Protector(probe, detoxifier=FixedDetox("A safe answer."), threshold=0.95)])
        base = counter.n
        r0, r1 = g.chat(convs(t, 2), **GREEDY)
        assert counter.n - base == N_NEW  # prefill + 23 decode steps: scoring added no forward
        v = r0.verdicts_of("Protector")[-1]
        assert v.detail["final_score_from"].startswith("generation activations") and v.score == pytest.approx(0.9)
        assert not r0.flagged
        # Flagged (threshold 0.5): the rewrite is re-screened teacher-forced (one forward), still 0.9 -> refused.
        g = wrap(t.model, t.processor, [Protector(probe, detoxifier=FixedDetox("A safe answer."), threshold=0.5)])
        base = counter.n
        r0, r1 = g.chat(convs(t, 2), **GREEDY)
        assert counter.n - base == N_NEW + 1
        assert r0.refused and r0.verdicts_of("Protector")[-1].detail["detoxifier"]["outcome"] == "refused (rewrite still unsafe)"
    finally:
        counter.h.remove()


def test_probe_bound_to_another_model_is_refused(setup, tiny):
    t, bare, marker, _ = setup
    other = tiny("qwen2")
    probe = HiddenStateProbe(other.model, other.processor, layer=0)
    probe.head = _constant_head(probe, 0.1)
    with pytest.raises(ValueError, match="another model"):
        wrap(t.model, t.processor, [Protector(probe)])


def test_from_spec_with_a_saved_probe(setup, tmp_path):
    t, bare, marker, _ = setup
    probe = HiddenStateProbe(t.model, t.processor, layer=-1)
    probe.fit([QUERIES[0], QUERIES[1]], [bare[0].text, bare[1].text], [1, 0], training_data="unit test")
    d = probe.save(tmp_path / "probe")
    (p,) = build_defenses(f"protector:detector={d},mode=stream,every=8,threshold=1.0,detoxifier=refuse,refusal_text=No")
    assert isinstance(p, Protector) and p.config.every == 8 and p.config.refusal_text == "No" and p.probe.model is None
    g = wrap(t.model, t.processor, [p])  # binds the probe to the wrapped model
    assert p.probe.model is t.model
    r = g.chat(convs(t, 1)[0], **GREEDY)
    assert len(r.verdicts_of("Protector")[-1].detail["checks"]) == N_NEW // 8
    with pytest.raises(ValueError, match="neither 'default' nor a folder"):
        build_defenses("protector:detector=/nonexistent/probe")


def test_batched_multimodal_stream(tiny):
    """LLaVA with an image in row 0: the flagged row stops, the other keeps its bare tokens."""
    t = tiny("llava")
    cs = convs(t, 2, image=True)
    bare = wrap(t.model, t.processor).chat(cs, **GREEDY)
    target = 1 if len(bare[1].token_ids) == N_NEW else 0
    other = 1 - target
    ids = bare[target].token_ids
    marker = next((p for j in range(4, len(ids)) if len(p := t.tokenizer.decode([ids[j]]).strip()) >= 2
                   and p not in bare[other].text and p not in t.tokenizer.decode(ids[:j])), None)
    assert marker is not None
    n_fire = fire_point(t, ids, marker, 4)
    g = wrap(t.model, t.processor, [Protector(MarkerDetector(marker), detoxifier="refuse", mode="stream", every=4)])
    res = g.chat(cs, **GREEDY)
    assert res[target].token_ids == ids[:n_fire] and res[target].refused
    assert res[other].token_ids == bare[other].token_ids and not res[other].flagged
