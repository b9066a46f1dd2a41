"""Core invariants of wrap() / GuardedModel on every tiny architecture."""

from __future__ import annotations

import pytest
import torch

from guardrails import Defense, GuardedResult, Verdict, wrap
from guardrails.testing import ARCHITECTURES, make_image

GREEDY = {"max_new_tokens": 6, "do_sample": False}


def hook_snapshot(model: torch.nn.Module) -> dict:
    """Every forward (pre-)hook on every module, by module and hook id."""
    snap = {}
    for name, m in model.named_modules():
        snap[name] = (
            tuple(m._forward_hooks.keys()),
            tuple(m._forward_pre_hooks.keys()),
        )
    return snap


def conversations(t, n=2):
    """n conversations of different lengths; on VLMs the first carries an image."""
    convs = [
        [{"role": "user", "content": "Tell me a short story about a helpful robot and its friends."}],
        [{"role": "user", "content": "Hi"}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is the capital of France?"}],
    ][:n]
    if t.is_multimodal:
        convs[0] = [{"role": "user", "content": [{"type": "image", "image": make_image(t.image_size, seed=1)},
                                                 {"type": "text", "text": "Describe the image."}]}]
    return convs


def bare_tokens(t, convs):
    """The bare model's greedy new tokens per row, encoded independently of the library."""
    inputs = t.encode(convs)
    with torch.no_grad():
        out = t.model.generate(**inputs, **GREEDY, pad_token_id=t.tokenizer.pad_token_id)
    return out[:, inputs["input_ids"].shape[1]:]


class Recorder(Defense):
    """Implements all three stages, records what it saw, optionally refuses or raises."""

    def __init__(self, refuse_rows=(), raise_in=None, name=None):
        super().__init__(name)
        self.refuse_rows, self.raise_in = set(refuse_rows), raise_in
        self.seen: dict[str, list[int]] = {}
        self.batch_sizes: list[int] = []

    def _before(self, ctx, rows):
        self.seen["before"] = [r.index for r in rows]
        if self.raise_in == "before":
            raise RuntimeError("boom before")
        out = []
        for r in rows:
            if r.index in self.refuse_rows:
                r.refuse("REFUSED", by=self.name)
                out.append(Verdict(flagged=True, action="refuse", score=1.0))
            else:
                out.append(None)
        return out

    def _during(self, ctx, stack):
        layer = ctx.engine.model.get_input_embeddings()
        h = layer.register_forward_pre_hook(lambda mod, args: self.batch_sizes.append(args[0].shape[0]))
        stack.callback(h.remove)
        if self.raise_in == "during":
            raise RuntimeError("boom during")

    def _after(self, ctx, rows):
        self.seen["after"] = [r.index for r in rows]
        if self.raise_in == "after":
            raise RuntimeError("boom after")
        return [Verdict(score=0.0) for _ in rows]


@pytest.fixture(params=ARCHITECTURES)
def t(request, tiny):
    return tiny(request.param)


def test_no_defenses_gives_bare_tokens_and_batch_equals_single(t):
    convs = conversations(t, 3)
    bare = bare_tokens(t, convs)
    g = wrap(t.model, t.processor)
    results = g.chat(convs, **GREEDY)
    assert all(isinstance(r, GuardedResult) for r in results) and len(results) == 3
    for k, r in enumerate(results):
        expected = [x for x in bare[k].tolist() if x not in g.engine.stop_token_ids]
        assert r.token_ids == expected[: len(r.token_ids)] and len(r.token_ids) > 0
        solo = g.chat(convs[k], **GREEDY)
        assert isinstance(solo, GuardedResult)
        assert solo.token_ids == r.token_ids, f"row {k}: left-padded batch differs from one-by-one"
        assert r.text == t.tokenizer.decode(r.token_ids, skip_special_tokens=True)
        assert "model.generate" in r.timings and not r.refused and r.original_text is None


def test_generate_is_a_drop_in(t):
    inputs = t.encode(conversations(t, 2))
    with torch.no_grad():
        expected = t.model.generate(**inputs, **GREEDY)
    g = wrap(t.model, t.processor, defenses=[])
    got = g.generate(**inputs, **GREEDY)
    assert type(got) is type(expected)
    assert torch.equal(got, expected)


def test_every_row_gets_a_verdict_and_refused_rows_never_reach_the_model(t):
    convs = conversations(t, 3)
    a, b = Recorder(refuse_rows={1}), Recorder()
    before = hook_snapshot(t.model)
    g = wrap(t.model, t.processor, defenses=[a, b])
    assert b.name == "Recorder#2"
    results = g.chat(convs, **GREEDY)
    assert hook_snapshot(t.model) == before
    # the refused row was never generated: batches had 2 rows, not 3
    assert a.batch_sizes and set(a.batch_sizes) == {2}
    assert b.seen["before"] == [0, 2] and b.seen["after"] == [0, 2]
    assert results[1].refused and results[1].text == "REFUSED" and results[1].token_ids == []
    for r in results:
        stages = {(v.defense, v.stage) for v in r.verdicts}
        assert stages == {(d, s) for d in ("Recorder", "Recorder#2") for s in ("before", "during", "after")}
        assert all(v.latency_ms >= 0 for v in r.verdicts)
    assert results[1].verdicts_of("Recorder")[0].action == "refuse"
    assert "refused by Recorder" in results[1].verdicts_of("Recorder#2")[0].detail["skipped"]
    assert {"Recorder.before", "Recorder.during", "Recorder.after"} <= set(results[0].timings)
    # a refused row does not change the other rows' answers
    bare = wrap(t.model, t.processor).chat([convs[0], convs[2]], **GREEDY)
    assert [results[0].token_ids, results[2].token_ids] == [r.token_ids for r in bare]


@pytest.mark.parametrize("stage", ["before", "during", "after"])
def test_no_hook_left_after_an_exception(t, stage):
    before = hook_snapshot(t.model)
    g = wrap(t.model, t.processor, defenses=[Recorder(), Recorder(raise_in=stage)])
    with pytest.raises(RuntimeError, match=f"boom {stage}"):
        g.chat(conversations(t, 2), **GREEDY)
    assert hook_snapshot(t.model) == before
    # the wrapper is usable again after the failure
    g.defenses[1].raise_in = None
    assert len(g.chat(conversations(t, 2), **GREEDY)) == 2
    assert g.unwrap() is t.model
    assert hook_snapshot(t.model) == before
    with pytest.raises(RuntimeError, match="unwrapped"):
        g.chat(conversations(t, 1))


def test_stream_matches_chat_and_cleans_up(t):
    conv = conversations(t, 1)[0]
    g = wrap(t.model, t.processor, defenses=[Recorder(name="R")])
    expected = g.chat(conv, **GREEDY)
    before = hook_snapshot(t.model)
    s = g.stream(conv, **GREEDY)
    chunks = list(s)
    assert len(chunks) >= 1 and "".join(chunks) == expected.text
    assert s.result.token_ids == expected.token_ids
    assert {(v.defense, v.stage) for v in s.result.verdicts} == {("R", "before"), ("R", "during"), ("R", "after")}
    # leaving the stream early stops generation and removes the hooks
    s2 = g.stream(conv, max_new_tokens=50, do_sample=False)
    it = iter(s2)
    next(it)
    it.close()
    assert hook_snapshot(t.model) == before
    assert len(g.chat(conv, **GREEDY).token_ids) > 0  # not left busy


def test_disabled_and_forwarding(tiny):
    t = tiny("llama")
    convs = conversations(t, 2)
    g = wrap(t.model, t.processor, defenses=[Recorder(refuse_rows={0})])
    with g.disabled():
        rs = g.chat(convs, **GREEDY)
    assert not rs[0].refused and rs[0].verdicts == []
    assert g.chat(convs, **GREEDY)[0].refused
    assert g.config is t.model.config and g.device == t.model.device
    assert "Recorder" in repr(g)


class HoldBack(Defense):
    supports_streaming = False

    def _after(self, ctx, rows):
        for r in rows:
            r.rewrite(r.text.upper() + "!")
        return [Verdict(action="rewrite") for _ in rows]


def test_stream_holds_back_for_whole_answer_defenses(tiny):
    t = tiny("llama")
    conv = conversations(t, 1)[0]
    g = wrap(t.model, t.processor, defenses=[HoldBack()])
    s = g.stream(conv, **GREEDY)
    chunks = list(s)
    assert len(chunks) == 1 and chunks[0] == s.result.text and s.result.text.endswith("!")
    assert s.result.original_text is not None and s.result.text == s.result.original_text.upper() + "!"
    assert "held back" in s.result.verdicts[0].detail["stream"]


def test_generate_refuses_conversation_defenses(tiny):
    t = tiny("llama")
    g = wrap(t.model, t.processor, defenses=[Recorder()])
    with pytest.raises(ValueError, match="use chat\\(\\) or stream\\(\\)"):
        g.generate(**t.encode(conversations(t, 1)), **GREEDY)


class DuringOnly(Defense):
    def _during(self, ctx, stack):
        pass

    def _during_verdicts(self, ctx, rows):
        return [Verdict(score=float(r.index)) for r in rows]


def test_generate_runs_during_stages_and_records_verdicts(tiny):
    t = tiny("gpt2")
    g = wrap(t.model, t.processor, defenses=[DuringOnly()])
    with g.record() as calls:
        g.generate(**t.encode(conversations(t, 2)), **GREEDY)
    assert [c.mode for c in calls] == ["generate"]
    assert [[v.score for v in vs] for vs in calls[0].verdicts] == [[0.0], [1.0]]
    assert not hasattr(g, "last_verdicts")  # no per-wrapper state: verdicts belong to the call


# -- bad input --------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "bad, exc, match",
    [
        ("hello", TypeError, "list of messages"),
        ([], TypeError, "non-empty list"),
        ([{"content": "x"}], ValueError, "role None"),
        ([{"role": "robot", "content": "x"}], ValueError, "role 'robot'"),
        ([{"role": "user"}], ValueError, "missing 'content'"),
        ([{"role": "user", "content": 5}], TypeError, "content must be"),
        ([{"role": "user", "content": [{"type": "audio"}]}], ValueError, "'audio' is not supported"),
        ([{"role": "user", "content": [{"type": "image"}]}], ValueError, "needs 'image'"),
        ([{"role": "system", "content": "x"}], ValueError, "no user message"),
        ([{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}], ValueError, "ends with an assistant"),
    ],
)
def test_malformed_messages(tiny, bad, exc, match):
    t = tiny("llama")
    with pytest.raises(exc, match=match):
        wrap(t.model, t.processor).chat(bad)


def test_wrong_models_and_defenses(tiny):
    llama, llava = tiny("llama"), tiny("llava")
    img = [{"role": "user", "content": [{"type": "image", "image": make_image(16)}, {"type": "text", "text": "x"}]}]
    with pytest.raises(ValueError, match="text-only model"):
        wrap(llama.model, llama.processor).chat(img)
    with pytest.raises(ValueError, match="needs its processor"):
        wrap(llava.model)
    with pytest.raises(TypeError, match="load one first"):
        wrap("HuggingFaceTB/SmolVLM-256M-Instruct")
    with pytest.raises(TypeError, match="pass an instance"):
        wrap(llama.model, llama.processor, defenses=[Recorder])
    with pytest.raises(TypeError, match="not a guardrails Defense"):
        wrap(llama.model, llama.processor, defenses=[object()])
    with pytest.raises(ValueError, match="chat\\(\\) and stream\\(\\) need a tokenizer"):
        wrap(llama.model).chat([{"role": "user", "content": "x"}])

    class ImageOnly(Defense):
        modalities = frozenset({"image"})

        def _before(self, ctx, rows):
            return None

    with pytest.raises(ValueError, match="needs an image-text-to-text model"):
        wrap(llama.model, llama.processor, defenses=[ImageOnly()])

    class NeedsLayers(Defense):
        needs_hidden_states = True

    class NoLayers(torch.nn.Module):
        config = None

        def generate(self):
            pass

    with pytest.raises(ValueError, match="NoLayers"):
        wrap(NoLayers(), llama.processor, defenses=[NeedsLayers()])


def test_bad_verdicts_are_errors(tiny):
    t = tiny("gpt2")

    class Short(Defense):
        def _after(self, ctx, rows):
            return [None]

    with pytest.raises(RuntimeError, match="returned 1 verdicts for 2 rows"):
        wrap(t.model, t.processor, defenses=[Short()]).chat(conversations(t, 2), **GREEDY)


def test_offline_hub_id_gives_clear_error(monkeypatch):
    from guardrails import load

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match="HF_HUB_OFFLINE is set .*hf download no-such-org.* --local-dir DIR.*pass the folder"):
        load("no-such-org/no-such-model-guardrails-test")


def test_load_round_trip(tiny, tmp_path):
    from guardrails import load
    from guardrails.testing import save_tiny

    path = save_tiny("llava", tmp_path / "llava")
    model, processor = load(str(path), dtype=torch.float32)
    t = tiny("llava")
    conv = conversations(t, 1)[0]
    assert wrap(model, processor).chat(conv, **GREEDY).token_ids == wrap(t.model, t.processor).chat(conv, **GREEDY).token_ids


def test_generate_with_several_return_sequences(tiny):
    t = tiny("llama")
    inputs = t.encode(conversations(t, 2))
    kw = dict(max_new_tokens=4, do_sample=True, num_return_sequences=2)
    torch.manual_seed(0)
    expected = t.model.generate(**inputs, **kw)
    torch.manual_seed(0)
    got = wrap(t.model, t.processor, defenses=[DuringOnly()]).generate(**inputs, **kw)
    assert got.shape[0] == 4 and torch.equal(got, expected)
