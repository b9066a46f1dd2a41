"""Per-call state and the concurrency contract (guardrails.guarded's module docstring), on a tiny model.

The first tests are the defects a user saw (streams stepped from two threads, ``disabled()`` leaking
into other threads, a steering wrapper changing a bare wrapper's answers, an abandoned stream
steering a plain ``model.generate``); the soak test then mixes every kind of call across threads.
Every call has a timeout: a deadlock fails the test instead of hanging it.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from guardrails import Defense, wrap
from guardrails.calls import model_lock
from guardrails.defenses import SafetySystemPrompt
from guardrails.defenses.inferaligner import InferAligner
from steering import extract_steering_vectors

GEN = {"max_new_tokens": 6, "do_sample": False}
LONG = {"max_new_tokens": 24, "do_sample": False}
TIMEOUT = 120  # seconds for any one call: far above what a tiny model needs, so only a deadlock trips it
PROMPTS = ["Tell me a short story about a robot.", "What is the capital of France?", "Hi", "Write a poem."]
ALPHA = 200.0  # the tiny model's mean-difference vectors are short: scale them up to change tokens


def conv(i: int) -> list[dict]:
    return [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}]


def hook_ids(model: torch.nn.Module) -> set:
    out = set()
    for m in model.modules():
        out.update((id(m), "fwd", k) for k in m._forward_hooks)
        out.update((id(m), "pre", k) for k in m._forward_pre_hooks)
    return out


def stream_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "guardrails-stream"]


def wait_for_no_stream_threads(limit: float = TIMEOUT) -> None:
    end = time.monotonic() + limit
    while stream_threads() and time.monotonic() < end:
        time.sleep(0.02)
    assert not stream_threads(), "a stream's worker thread is still alive"


@pytest.fixture(scope="module")
def t(tiny):
    return tiny("llama")


@pytest.fixture(scope="module")
def steered(t):
    """InferAligner steering every row, strongly enough that its answers differ from the bare model's."""
    vectors = extract_steering_vectors(t.model, PROMPTS[:2], PROMPTS[2:], processor=t.tokenizer, progress=False)
    return wrap(t.model, t.processor, [InferAligner(vectors, gate_source="none", alpha=ALPHA)])


@pytest.fixture(scope="module")
def bare(t):
    return wrap(t.model, t.processor, [])


@pytest.fixture(scope="module")
def bare_texts(bare):
    return {i: bare.chat(conv(i), **GEN).text for i in range(len(PROMPTS))}


def test_steering_changes_answers(steered, bare_texts):
    """Precondition of the tests below: otherwise 'equals the bare answer' would prove nothing."""
    assert any(steered.chat(conv(i), **GEN).text != bare_texts[i] for i in range(len(PROMPTS)))


def test_stream_stepped_from_two_threads_then_chat_from_a_third(t, bare):
    reference = bare.chat(conv(0), **LONG).text
    it = iter(bare.stream(conv(0), **LONG))
    chunks: list[str] = []
    with ThreadPoolExecutor(2) as pool:
        while True:
            # Each step runs on one of two workers, alternately, as a thread-pool server does.
            got = pool.submit(lambda: next(it, None)).result(timeout=TIMEOUT)
            if got is None:
                break
            chunks.append(got)
    assert "".join(chunks) == reference
    with ThreadPoolExecutor(1) as pool:
        assert pool.submit(bare.chat, conv(1), **GEN).result(timeout=TIMEOUT).text == bare.chat(conv(1), **GEN).text
    assert not model_lock(t.model).locked()


def test_disabled_applies_to_the_calling_thread_only(t):
    g = wrap(t.model, t.processor, [SafetySystemPrompt()])
    inside, done = threading.Event(), threading.Event()

    def hold_disabled() -> None:
        with g.disabled():
            inside.set()
            done.wait(TIMEOUT)

    a = threading.Thread(target=hold_disabled)
    a.start()
    try:
        assert inside.wait(TIMEOUT)
        r = g.chat(conv(1), **GEN)  # this thread never entered disabled()
        assert r.verdicts_of("SafetySystemPrompt") and r.conversation[0]["role"] == "system"
        with g.disabled():
            assert g.chat(conv(1), **GEN).verdicts == []
        assert g.chat(conv(1), **GEN).verdicts  # the block ended in this thread
    finally:
        done.set()
        a.join(TIMEOUT)


def test_two_wrappers_on_one_model_see_only_their_own_defenses(steered, bare, bare_texts):
    stop = threading.Event()
    steered_texts = {i: steered.chat(conv(i), **GEN).text for i in range(len(PROMPTS))}
    seen_steered: list[bool] = []

    def loop() -> None:
        k = 0
        while not stop.is_set():
            seen_steered.append(steered.chat(conv(k), **GEN).text == steered_texts[k % len(PROMPTS)])
            k += 1

    with ThreadPoolExecutor(1) as pool:
        fut = pool.submit(loop)
        try:
            got = [bare.chat(conv(i), **GEN).text for i in range(10)]
        finally:
            stop.set()
        fut.result(timeout=TIMEOUT)
    assert got == [bare_texts[i % len(PROMPTS)] for i in range(10)]
    assert seen_steered and all(seen_steered)


def test_abandoned_stream_does_not_steer_a_plain_generate(t, steered, bare_texts):
    before = hook_ids(t.model)
    inputs = t.encode([conv(1)])
    with torch.no_grad():
        reference = t.model.generate(**inputs, **GEN, pad_token_id=t.tokenizer.pad_token_id)
    it = iter(steered.stream(conv(0), max_new_tokens=64, do_sample=False))
    next(it)  # broken out of, still referenced: its generation may still be running
    with torch.no_grad():
        plain = t.model.generate(**inputs, **GEN, pad_token_id=t.tokenizer.pad_token_id)
    assert torch.equal(plain, reference)
    wait_for_no_stream_threads()  # the worker ends by itself and gives hooks and lock back
    assert hook_ids(t.model) == before and not model_lock(t.model).locked()
    assert steered.chat(conv(1), **GEN).text != bare_texts[1] or steered.chat(conv(0), **GEN).text != bare_texts[0]
    del it


def test_closed_or_collected_stream_stops_at_once(t, bare):
    before = hook_ids(t.model)
    it = iter(bare.stream(conv(0), max_new_tokens=200, do_sample=False))
    next(it)
    it.close()
    assert not stream_threads() and hook_ids(t.model) == before
    it = iter(bare.stream(conv(0), max_new_tokens=200, do_sample=False))
    next(it)
    del it  # garbage-collected: the generator's finally stops the worker
    wait_for_no_stream_threads(10)


def test_nested_call_from_inside_a_defense_does_not_deadlock(t, bare, bare_texts):
    class Nested(Defense):
        def _after(self, ctx, rows):
            # a defense calling another wrapper on the same model from its stage (same thread, lock held)
            self.inner = bare.chat(conv(2), **GEN).text
            return None

    d = Nested()
    g = wrap(t.model, t.processor, [d])
    with ThreadPoolExecutor(1) as pool:
        r = pool.submit(g.chat, conv(1), **GEN).result(timeout=TIMEOUT)
    assert r.text == bare_texts[1] and d.inner == bare_texts[2]


# -- several sequences per row ------------------------------------------------------------------

def test_num_return_sequences_is_refused_by_chat_and_stream(bare):
    with pytest.raises(ValueError, match="one answer per conversation.*num_return_sequences=2"):
        bare.chat([conv(0), conv(1)], num_beams=2, num_return_sequences=2, **GEN)
    with pytest.raises(ValueError, match="num_return_sequences=3"):
        bare.stream(conv(0), num_return_sequences=3, do_sample=True)


def test_beams_keep_rows_aligned(bare):
    both = bare.chat([conv(0), conv(1)], num_beams=2, **GEN)
    alone = [bare.chat(conv(i), num_beams=2, **GEN) for i in (0, 1)]
    assert [r.token_ids for r in both] == [r.token_ids for r in alone]


class Watch(Defense):
    """A during-only defense that changes nothing and reports one verdict per input row."""

    def _during(self, ctx, stack):
        pass


def test_generate_with_several_sequences_is_a_drop_in(t):
    g = wrap(t.model, t.processor, [Watch()])
    inputs = t.encode([conv(0), conv(1)])
    kw = {"num_beams": 2, "num_return_sequences": 2, **GEN, "pad_token_id": t.tokenizer.pad_token_id}
    with g.record() as calls:
        out = g.generate(**inputs, **kw)
    with torch.no_grad():
        reference = t.model.generate(**inputs, **kw)
    assert out.shape[0] == 4 and torch.equal(out, reference)
    assert [len(v) for v in calls[0].verdicts] == [1, 1]  # one verdict row per input row


# -- the soak test ----------------------------------------------------------------------------

class Boom(Defense):
    """Raises inside the during stage, after installing a hook (which must still be removed)."""

    def _during(self, ctx, stack):
        h = ctx.engine.model.register_forward_hook(ctx.scoped(lambda m, a, o: None))
        stack.callback(h.remove)
        raise RuntimeError("boom inside a defense")


def test_soak_threads_by_mixed_calls(t, steered, bare):
    """N threads x M mixed calls; every result equals its single-threaded reference, nothing is left."""
    guarded = wrap(t.model, t.processor, [SafetySystemPrompt()])
    boom = wrap(t.model, t.processor, [Boom()])
    before = hook_ids(t.model)

    def run(op: str, i: int):
        if op == "chat":
            return guarded.chat(conv(i), **GEN).text
        if op == "stream":
            s = guarded.stream(conv(i), **GEN)
            return "".join(s)
        if op == "abandon":
            it = iter(steered.stream(conv(i), max_new_tokens=32, do_sample=False))
            first = next(it)
            it.close()
            return first
        if op == "disabled":
            with guarded.disabled():
                return guarded.chat(conv(i), **GEN).text
        if op == "steered":
            return steered.chat(conv(i), **GEN).text
        if op == "bare":
            return bare.chat(conv(i), **GEN).text
        if op == "boom":
            try:
                boom.chat(conv(i), **GEN)
            except RuntimeError as e:
                return f"raised: {e}"
            return "did not raise"
        raise AssertionError(op)

    ops = ["chat", "stream", "abandon", "disabled", "steered", "bare", "boom"]
    reference = {(op, i): run(op, i) for op in ops for i in range(len(PROMPTS))}
    assert reference[("boom", 0)] == "raised: boom inside a defense"
    assert reference[("stream", 0)] == reference[("chat", 0)]
    assert reference[("disabled", 1)] == reference[("bare", 1)]

    n_threads, per_thread = 4, 7
    plan = [[(ops[(k + j) % len(ops)], (k * per_thread + j) % len(PROMPTS)) for j in range(per_thread)]
            for k in range(n_threads)]
    start = threading.Barrier(n_threads)

    def worker(calls):
        start.wait(TIMEOUT)
        return [((op, i), run(op, i)) for op, i in calls]

    with ThreadPoolExecutor(n_threads) as pool:
        futures = [pool.submit(worker, calls) for calls in plan]
        results = [r for f in futures for r in f.result(timeout=TIMEOUT * 3)]
    assert len(results) == n_threads * per_thread
    wrong = [(key, got, reference[key]) for key, got in results if got != reference[key]]
    assert not wrong, wrong
    wait_for_no_stream_threads()
    assert hook_ids(t.model) == before
    assert not model_lock(t.model).locked()


def test_a_context_copied_into_another_thread_takes_the_lock_itself(t):
    import contextvars

    lock = model_lock(t.model)
    entered = threading.Event()

    def other() -> None:
        with lock.hold():
            entered.set()

    with lock.hold():
        worker = threading.Thread(target=contextvars.copy_context().run, args=(other,))
        worker.start()
        assert not entered.wait(0.5)  # the copy does not inherit this thread's claim on the lock
    worker.join(TIMEOUT)
    assert entered.is_set()


def test_a_stream_is_recorded_where_it_was_created(bare):
    with bare.record() as calls:
        s = bare.stream(conv(1), **GEN)
    "".join(s)  # consumed outside the block
    assert [c.mode for c in calls] == ["stream"] and len(calls[0].verdicts) == 1


def test_one_tokenizer_shared_by_threads_pads_every_batch(bare):
    """transformers#47085: a fast tokenizer sets padding as shared state at each call, so a batch encoded
    while another thread encodes one text unpadded came back unpadded ("Unable to create tensor")."""
    eng = bare.engine
    convs = [[{"role": "user", "content": "Tell me a long story about robots and the sea. " * 30}],
             [{"role": "user", "content": "Hi"}]]
    want = eng.encode(convs)["input_ids"]
    word = next(w for w in ("Yes", "the", " the", "a") if len(eng.tokenizer.encode(w, add_special_tokens=False)) == 1)
    word_id = eng.token_id(word)
    some_ids = want[1].tolist()
    some_text = eng.decode(some_ids)

    def call(i: int) -> bool:
        if i % 3 == 0:
            got = eng.encode(convs)["input_ids"]
            return got.shape == want.shape and bool((got == want).all())
        if i % 3 == 1:
            return eng.token_id(word) == word_id
        return eng.decode(some_ids) == some_text

    with ThreadPoolExecutor(16) as ex:
        futures = [ex.submit(call, i) for i in range(3000)]
        errors = [repr(f.exception(TIMEOUT)) for f in futures if f.exception(TIMEOUT) is not None]
        wrong = sum(1 for f in futures if f.exception() is None and not f.result())
    assert not errors and not wrong, (len(errors), wrong, errors[:2])


def test_tokenizer_lock_is_one_per_tokenizer(t, tiny):
    from guardrails.engine import tokenizer_lock

    assert tokenizer_lock(t.processor) is tokenizer_lock(t.tokenizer)  # a processor's is its tokenizer's
    assert tokenizer_lock(t.tokenizer) is not tokenizer_lock(tiny("gpt2").tokenizer)
    with tokenizer_lock(t.tokenizer), tokenizer_lock(t.tokenizer):  # re-entrant
        pass
