"""The transformers-version-sensitive paths, on every tiny architecture.

Prefix-cache reuse (filled through the compat name) is checked exact on every architecture by
``test_defenses_selfmod.py::test_kv_cache_reuse_is_exact_and_saves_tokens``.

transformers 5.24 renamed the KV-cache argument (``past_key_values`` -> ``cache``); code that looked
only for the old name kept running and silently lost two safety properties (the static-cache
refusal, and a gate pre-pass that must not write into the live cache). These tests exercise each
cache path under the installed release; CI runs them against the lock and the newest releases, and
pyproject.toml turns a deprecated-argument FutureWarning from our own code into an error.
"""

from __future__ import annotations

import inspect
import warnings

import pytest
import torch
from transformers import StaticCache

from guardrails import wrap
from guardrails._compat import CACHE_KWARG, CACHE_KWARGS, get_cache, new_dynamic_cache, output_cache, without_cache
from guardrails.defenses.inferaligner import InferAligner
from guardrails.testing import ARCHITECTURES, make_image
from steering import Gate, Manifest, SteeringVectors, compute_gate, find_decoder_layers, steer

GEN = {"max_new_tokens": 4, "do_sample": False}
TEXTS = ["Tell me a story about a dragon.", "Hi"]


def _convs(t, texts=TEXTS):
    if t.is_multimodal:
        return [[{"role": "user", "content": [{"type": "image", "image": make_image(t.image_size, seed=k)},
                                              {"type": "text", "text": x}]}] for k, x in enumerate(texts)]
    return [[{"role": "user", "content": x}] for x in texts]


def _hooks(model):
    return {(n, k) for n, m in model.named_modules() for k in (*m._forward_hooks, *m._forward_pre_hooks)}


def _vectors(t, scale=4.0):
    info = find_decoder_layers(t.model)
    g = torch.Generator().manual_seed(0)
    return info, {i: torch.randn(info.hidden_size, generator=g) * scale for i in range(info.num_layers)}


def test_cache_kwarg_is_the_installed_name():
    import transformers
    from transformers.generation import GenerationMixin

    params = inspect.signature(GenerationMixin.prepare_inputs_for_generation).parameters
    assert CACHE_KWARG in params, (transformers.__version__, list(params))
    assert CACHE_KWARGS[0] == CACHE_KWARG and set(CACHE_KWARGS) == {"cache", "past_key_values"}
    sentinel = object()
    for name in CACHE_KWARGS:  # a caller may pass either name; both are found and both are removed
        assert get_cache({name: sentinel, "use_cache": True}) is sentinel
        assert without_cache({name: sentinel, "use_cache": True, "x": 1}, "use_cache") == {"x": 1}
    assert get_cache({"use_cache": True}) is None


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_forward_takes_and_returns_the_cache_by_the_compat_name(arch, tiny):
    t = tiny(arch)
    assert CACHE_KWARG in inspect.signature(t.model.forward).parameters
    inputs = t.encode(_convs(t))
    cache = new_dynamic_cache(t.model.config)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # the name we pass is not a deprecated one
        out = t.model(**inputs, **{CACHE_KWARG: cache}, use_cache=True)
    assert output_cache(out) is cache
    assert cache.get_seq_length() == inputs["input_ids"].shape[1]


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_static_cache_refused_on_every_arch(arch, tiny):
    t = tiny(arch)
    info, vectors = _vectors(t)
    inputs = t.encode(_convs(t, TEXTS[:1]))
    before = _hooks(t.model)
    # Asked for per generate call: caught at the prefill, before any token is generated.
    with pytest.raises(RuntimeError, match="StaticCache"):
        with steer(t.model, vectors, alpha=1.0):
            t.model.generate(**inputs, cache_implementation="static", **GEN)
    # A static cache handed in under the installed name (what a user's code passes).
    cache = StaticCache(config=t.model.config, max_cache_len=inputs["input_ids"].shape[1] + 8)
    with pytest.raises(RuntimeError, match="StaticCache"):
        with steer(t.model, vectors, alpha=1.0):
            t.model.generate(**inputs, **{CACHE_KWARG: cache}, **GEN)
    # Through the defense: refused before generate starts, the defense named.
    manifest = Manifest(model_class=type(t.model).__name__, name_or_path="tiny", hidden_size=info.hidden_size,
                        num_layers=info.num_layers, layer_path=info.path, layer_indices=sorted(vectors),
                        method="mean_diff")
    sv = SteeringVectors(vectors=vectors, manifest=manifest)
    guarded = wrap(t.model, t.processor, [InferAligner(sv, gate_source="none", alpha=1.0, strict_template=False)])
    with pytest.raises(RuntimeError, match="InferAligner: .*StaticCache"):
        guarded.chat(_convs(t, TEXTS[:1]), **{CACHE_KWARG: cache}, **GEN)
    with pytest.raises(RuntimeError, match="InferAligner: cache_implementation='static'"):
        guarded.chat(_convs(t, TEXTS[:1]), cache_implementation="static", **GEN)
    assert _hooks(t.model) == before


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_gate_pre_pass_leaves_the_live_cache_untouched(arch, tiny):
    """Steered layers before the gate layer: the gate is read by a pre-pass that must not write the cache."""
    t = tiny(arch)
    info, vectors = _vectors(t)
    gate_layer = info.num_layers - 1
    inputs = t.encode(_convs(t))
    probe = Gate.from_vector(vectors[gate_layer], layer=gate_layer, bias=0.0)
    scores, _ = compute_gate(t.model, probe, inputs)
    gate = Gate.from_vector(vectors[gate_layer], layer=gate_layer, bias=-float(scores.max()) - 1.0)  # no row fires
    cache = new_dynamic_cache(t.model.config)
    with torch.no_grad(), steer(t.model, vectors, alpha=2.0, gate=gate, layers=[0]) as handle:
        t.model(**inputs, **{CACHE_KWARG: cache}, use_cache=True)
    assert handle.gate_mode == "pre-pass" and not bool(handle.gate_values.any())
    assert cache.get_seq_length() == inputs["input_ids"].shape[1]  # one prefill in it, not two
    # With no row gated, a whole cached generation is the bare one, token for token.
    bare = t.model.generate(**inputs, **GEN)
    with steer(t.model, vectors, alpha=2.0, gate=gate, layers=[0]):
        steered = t.model.generate(**inputs, **GEN)
    assert torch.equal(steered, bare)
