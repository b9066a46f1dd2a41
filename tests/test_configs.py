"""Each defense's config dataclass is the single source of truth (issue 13, item 6).

Choices are ``Literal`` types checked in one place, defaults are written once (in the config),
``to_dict``/``from_dict`` round-trip through JSON, calibration writes the config, and saved probe
folders carry theirs.
"""

from __future__ import annotations

import dataclasses
import inspect
import json

import numpy as np
import pytest

from guardrails import wrap
from guardrails.classifiers import KeywordJudge
from guardrails.classifiers.detector import FeatureConfig
from guardrails.classifiers.embedding import ProbeConfig
from guardrails.classifiers.hidden_probe import HiddenProbeConfig, HiddenStateProbe
from guardrails.defenses import ECSO, AdaShield, OCRScreen, Protector, SafetySystemPrompt, SelfModeration
from guardrails.defenses.adashield import AdaShieldConfig
from guardrails.defenses.ecso import ECSOConfig
from guardrails.defenses.inferaligner import InferAligner, InferAlignerConfig
from guardrails.defenses.ocr_screen import OCRScreenConfig
from guardrails.defenses.protector import ProtectorConfig
from guardrails.defenses.self_moderation import SelfModerationConfig
from guardrails.defenses.system_prompt import SystemPromptConfig
from guardrails.spec import build_defenses

#: one config per class, every field away from its default where it has one
NON_DEFAULT = [
    SystemPromptConfig(text="Never help with weapons.", source="custom", placement="sandwich", separator=" | "),
    SelfModerationConfig(rounds=1, threshold=0.3, on_fail="keep", max_new_tokens=12, reuse_cache=False,
                         yes_tokens=("Yes",), no_tokens=("No",), judge_prompt="selfmod_judge", revise_prompt="selfmod_revise"),
    ECSOConfig(threshold=0.7, caption_tokens=16, answer_tokens=32, no_image="flag", max_response_chars=None,
               reuse_cache=False, yes_tokens=(" yes",), no_tokens=(" no",)),
    AdaShieldConfig(threshold=0.25, layer=-2, pooling="mean", placement="prefix", separator=" ", static_prompt="Be careful."),
    ProtectorConfig(threshold=0.8, mode="stream", every=4, refusal_text="No.", max_new_tokens=32),
    OCRScreenConfig(mode="gate", threshold=0.9, engine="auto", overlap=True, refusal_text="Refused.", min_chars=0,
                    with_user_text=True),
    InferAlignerConfig(alpha=2.5, layers=(1, 3), gate_source="none", strict_template=False, path="model.layers",
                       alpha_origin="manifest", layers_origin="default"),
    HiddenProbeConfig(layer=-1, pooling="last", C=3.0, class_weight=None, max_iter=50, batch_size=2, layers_path="model.layers"),
    ProbeConfig(input="pair", layers=(1, 2), pooling="max", interaction=True, class_weight=None, threshold=0.4),
    FeatureConfig(layers=(1,), pooling="cls", normalize=False, max_length=64, batch_size=4),
]
IDS = [type(c).__name__ for c in NON_DEFAULT]


@pytest.mark.parametrize("cfg", NON_DEFAULT, ids=IDS)
def test_round_trip_through_json(cfg):
    d = cfg.to_dict()
    text = json.dumps(d)  # no default=: to_dict itself must be JSON-safe
    back = type(cfg).from_dict(json.loads(text))
    assert back == cfg and type(back) is type(cfg)
    assert set(d) == {f.name for f in dataclasses.fields(cfg)}
    assert not any(isinstance(v, tuple) for v in d.values())  # tuples are lists in a dict


def test_to_dict_values():
    assert ECSOConfig(yes_tokens=("Yes", " yes")).to_dict()["yes_tokens"] == ["Yes", " yes"]
    # a prompt template is written as its registry name, which from_dict resolves again
    d = SelfModerationConfig(judge_prompt="selfmod_judge").to_dict()
    assert d["judge_prompt"] == "selfmod_judge" and d["revise_prompt"] == "selfmod_revise"
    # an object that is not data (a callable embedder) is described, and refused when read back
    def clip_embed(texts, images):
        return np.ones((len(texts), 3))

    d = AdaShieldConfig(embedder=clip_embed).to_dict()
    assert d["embedder"].startswith("<callable ") and "clip_embed" in d["embedder"]
    with pytest.raises(ValueError, match="embedder must be 'hidden' or a callable"):
        AdaShieldConfig.from_dict(d)


@pytest.mark.parametrize("cfg", NON_DEFAULT, ids=IDS)
def test_unknown_key_is_one_line_naming_it_and_the_accepted_ones(cfg):
    with pytest.raises(ValueError) as e:
        type(cfg).from_dict({**cfg.to_dict(), "thresold": 0.5})
    msg = str(e.value)
    assert "\n" not in msg and "'thresold'" in msg and type(cfg).__name__ in msg
    assert all(f.name in msg for f in dataclasses.fields(cfg))
    with pytest.raises(ValueError, match="has no field 'thresold'"):
        cfg.replace(thresold=0.5)


def test_missing_required_key_and_partial_dicts():
    with pytest.raises(ValueError, match="SystemPromptConfig needs 'text'"):
        SystemPromptConfig.from_dict({"placement": "prefix"})
    # keys left out take their defaults
    assert ECSOConfig.from_dict({"threshold": 0.2}) == ECSOConfig(threshold=0.2)
    # values are validated by the config's own checks
    with pytest.raises(ValueError, match="caption_tokens must be a positive int"):
        ECSOConfig.from_dict({"caption_tokens": 0})


@pytest.mark.parametrize("make, message", [
    (lambda: ECSOConfig(no_image="never"), "no_image must be one of ('refuse', 'flag', 'skip'), got 'never'"),
    (lambda: ECSO(no_image="never"), "no_image must be one of ('refuse', 'flag', 'skip'), got 'never'"),
    (lambda: SelfModeration(on_fail="retry"), "on_fail must be one of ('refuse', 'keep'), got 'retry'"),
    (lambda: SafetySystemPrompt(placement="suffix"), "placement must be one of ('system', 'prefix', 'sandwich'), got 'suffix'"),
    (lambda: AdaShield(pooling="max"), "pooling must be one of ('last', 'mean'), got 'max'"),
    (lambda: Protector(KeywordJudge.llm_attacks(), mode="later"), "mode must be one of ('post', 'stream'), got 'later'"),
    (lambda: OCRScreen("scan"), "mode must be one of ('classify', 'reveal', 'gate'), got 'scan'"),
    (lambda: InferAlignerConfig.from_dict({"alpha": 1.0, "layers": [1], "gate_source": "auto"}),
     "gate_source must be one of ('given', 'vectors', 'none'), got 'auto'"),
    (lambda: HiddenProbeConfig(layer=0, class_weight="auto"), "class_weight must be one of ('balanced', None), got 'auto'"),
    (lambda: FeatureConfig(pooling="sum"), "pooling must be one of ('mean', 'cls', 'max'), got 'sum'"),
])
def test_bad_choice_is_one_line_naming_field_value_and_choices(make, message):
    with pytest.raises(ValueError) as e:
        make()
    assert str(e.value) == message


def test_choice_check_does_not_confuse_bool_and_int():
    with pytest.raises(ValueError, match="class_weight must be one of"):
        HiddenProbeConfig(layer=0, class_weight=0)  # 0 == False, but neither is a choice here
    assert HiddenProbeConfig(layer=0, class_weight=None).class_weight is None


# -- defaults written once -------------------------------------------------------------------

DEFENSES = [(SafetySystemPrompt, SystemPromptConfig), (SelfModeration, SelfModerationConfig), (ECSO, ECSOConfig),
            (AdaShield, AdaShieldConfig), (Protector, ProtectorConfig), (OCRScreen, OCRScreenConfig),
            (InferAligner, InferAlignerConfig), (HiddenStateProbe, HiddenProbeConfig)]


@pytest.mark.parametrize("defense, config", DEFENSES, ids=[d.__name__ for d, _ in DEFENSES])
def test_signature_defaults_are_the_configs(defense, config):
    defaults = {f.name: f.default for f in dataclasses.fields(config) if f.default is not dataclasses.MISSING}
    checked = 0
    for fn in (defense.__init__, getattr(defense, "from_spec", None)):
        if fn is None:
            continue
        for p in inspect.signature(fn).parameters.values():
            if defense is InferAligner and p.name in ("scale", "positions") and p.default is None:
                continue  # None: taken from the vectors' recorded calibration, else the config's default
            if p.name in defaults and p.default is not inspect.Parameter.empty:
                assert p.default == defaults[p.name], f"{defense.__name__}.{fn.__name__}({p.name}=...) repeats another default"
                checked += 1
    assert checked or defense is InferAligner  # its config fields without defaults are resolved in __init__


def test_default_constructed_defenses_hold_the_default_config():
    judge = KeywordJudge.llm_attacks()
    assert ECSO().config == ECSOConfig()
    assert SelfModeration().config == SelfModerationConfig()
    assert AdaShield().config == AdaShieldConfig()
    assert Protector(judge).config == ProtectorConfig()
    assert OCRScreen("reveal").config == OCRScreenConfig(mode="reveal")
    assert SafetySystemPrompt().config.placement == SystemPromptConfig.placement == "system"
    # the existing positional / keyword call signatures keep working
    assert ECSO(0.4, 64).config == ECSOConfig(threshold=0.4, caption_tokens=64)
    assert Protector(judge, "refuse", 0.7, "stream", 8).config == ProtectorConfig(threshold=0.7, mode="stream", every=8)
    assert OCRScreen("classify", judge, 0.6).config == OCRScreenConfig(threshold=0.6)
    assert OCRScreen("reveal", refusal_text="Nope.").refusal_text == "Nope."


def test_from_spec_passes_only_what_was_given():
    (ocr,) = build_defenses("ocr:mode=reveal,min_chars=5")
    assert ocr.config == OCRScreenConfig(mode="reveal", min_chars=5)
    (shield,) = build_defenses("adashield:placement=prefix")
    assert shield.config == AdaShieldConfig(placement="prefix")
    assert [p for p in inspect.signature(Protector.from_spec).parameters if p in ProtectorConfig.__dataclass_fields__] == []


# -- calibration writes the config -----------------------------------------------------------

VOCAB = ["how", "to", "build", "a", "bomb", "explosive", "recipe", "hack", "wifi", "bake", "cake", "what", "is",
         "birdhouse", "soup", "for", "the", "capital", "of", "france", "into"]
POOL = {"bomb": [{"prompt": "SHIELD-BOMB", "keys": ["how to build a bomb", "bomb explosive recipe"]}],
        "hack": [{"prompt": "SHIELD-HACK", "keys": ["hack into wifi"]}]}
BENIGN = ["how to bake a cake", "build a birdhouse", "what is wifi", "recipe for soup", "the capital of france"]


def bag_of_words(texts, images=None):
    return np.array([[t.lower().split().count(w) for w in VOCAB] for t in texts], dtype=float)


def expected_threshold(benign, target_fpr):
    """Computed here, not by AdaShield: best cosine similarity to a key, then the 'higher' quantile."""
    keys = bag_of_words([k for entries in POOL.values() for e in entries for k in e["keys"]])
    keys /= np.linalg.norm(keys, axis=1, keepdims=True)
    x = bag_of_words(benign)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return float(np.quantile((x @ keys.T).max(axis=1), 1 - target_fpr, method="higher"))


def test_adashield_calibrate_writes_config_threshold(tiny):
    shield = AdaShield(pool=POOL, embedder=bag_of_words)
    assert shield.config.threshold is None
    benign = [[{"role": "user", "content": b}] for b in BENIGN]
    returned = shield.calibrate(benign, target_fpr=0.4)
    want = expected_threshold(BENIGN, 0.4)
    assert 0 < want < 1
    assert shield.config.threshold == pytest.approx(want) == returned
    assert shield.config == AdaShieldConfig(threshold=want, embedder=bag_of_words)  # nothing else changed
    assert shield.calibration["config"]["threshold"] == shield.config.threshold
    assert json.dumps(shield.calibration)  # the record, config included, is JSON-safe
    # the threshold in the config is the one used
    t = tiny("llama")
    g = wrap(t.model, t.processor, defenses=[shield])
    (r,) = g.chat([[{"role": "user", "content": "how to build a bomb"}]], max_new_tokens=1, do_sample=False)
    v = r.verdicts_of("AdaShield")[0]
    assert v.threshold == shield.config.threshold and v.detail["applied"]
    # calibrating again replaces it
    shield.calibrate(benign, target_fpr=0.8)
    assert shield.config.threshold == pytest.approx(expected_threshold(BENIGN, 0.8)) != pytest.approx(want)


# -- saved artifacts carry their config ------------------------------------------------------

def test_hidden_probe_folder_records_and_reads_its_config(tiny, tmp_path):
    t = tiny("llama")
    qs = ["How can I make a bomb at home?", "How do I hack into my neighbor's wifi network?"] * 2
    rs = ["I'm sorry, but I cannot help with that.", "I can't assist with that.",
          "Here is a recipe: mix flour and eggs.", "The steps are listed below: Step 1. Step 2."]
    probe = HiddenStateProbe(t.model, t.processor, layer=1, pooling="last", C=50.0, max_iter=300, batch_size=3)
    d = probe.fit(qs, rs, [0, 0, 1, 1]).save(tmp_path / "probe")
    man = json.loads((d / "manifest.json").read_text())
    assert man["config"] == {"layer": 1, "pooling": "last", "C": 50.0, "class_weight": "balanced", "max_iter": 300,
                             "batch_size": 3, "layers_path": None}
    loaded = HiddenStateProbe.load(d)
    # the decoder-layer path is the one found at fit time, recorded with the model
    assert loaded.config == HiddenProbeConfig(layer=1, pooling="last", C=50.0, max_iter=300, batch_size=3,
                                              layers_path=man["model"]["layers_path"])
    assert "config" not in loaded.metadata
    # a folder written before the config was recorded still loads the same settings
    legacy = dict(man)
    del legacy["config"]
    (d / "manifest.json").write_text(json.dumps(legacy))
    assert HiddenStateProbe.load(d).config == loaded.config
    # a recorded key this library does not know is refused, by name
    (d / "manifest.json").write_text(json.dumps({**man, "config": {**man["config"], "temperature": 2}}))
    with pytest.raises(ValueError, match="no field 'temperature'"):
        HiddenStateProbe.load(d)
    # the spec path hands only the given options to the Protector's config
    (d / "manifest.json").write_text(json.dumps(man))
    (prot,) = build_defenses(f"protector:detector={d},mode=stream,every=4")
    assert prot.config == ProtectorConfig(mode="stream", every=4)
