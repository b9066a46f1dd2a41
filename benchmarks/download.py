"""Fetch the public safety datasets from their original repositories into the layout the loaders read.

    python -m benchmarks.download figstep xstest advbench --dest data/
    python -m benchmarks.download all --dest data/
    python -m benchmarks.download --list

Files come from GitHub (raw URLs at pinned commits where known) and Hugging Face; text files
with a known SHA-256 are verified after download (``--no-verify`` skips that). Files already
present with the right hash are kept, so an interrupted download resumes.

Not exercised in this project's CI: its machines reach package registries only, so the network
path here has never run against the real hosts in tests (the URL table, the destination layout
and the error handling are tested offline with a stubbed opener). A network failure raises
ConnectionError naming the URL and where to put the file by hand.

MM-SafetyBench's images are distributed as an archive linked from its README (not a stable raw
URL): this helper fetches the question files and says where to unpack the images.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import sys
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.datasets import DATASETS, MMSAFETYBENCH_SCENARIOS
from guardrails._cli import ArgumentParser, entry_point

__all__ = ["RemoteFile", "Source", "SOURCES", "download", "main", "plan"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RemoteFile:
    """One file: where it comes from, where it goes (relative to ``dest``), its SHA-256 if known."""

    url: str
    path: str
    sha256: str | None = None


@dataclass(frozen=True)
class Source:
    """Everything one dataset name needs; ``manual`` says what must be fetched by hand."""

    name: str
    files: tuple[RemoteFile, ...]
    manual: str | None = None


def _gh(repo: str, commit: str, path: str) -> str:
    return f"https://raw.githubusercontent.com/{repo}/{commit}/{path}"


FIGSTEP = ("ThuCCSLab/FigStep", "0861b17b3d67887c06ee3534ec65b3012f9becb7")
XSTEST = ("paul-rottger/exaggerated-safety", "d7bb5bd738c1fcbc36edd83d5e7d1b71a3e2d84d")
# andyrdt/refusal_direction keeps verbatim raw downloads of several upstream files at a fixed
# commit; the upstreams themselves are fetched there from moving branches, so this is the pin.
REFUSAL_DIRECTION = ("andyrdt/refusal_direction", "9d852fae1a9121c78b29142de733cb1340770cc3")
ALPACA = ("tatsu-lab/stanford_alpaca", "761dc5bfbdeeffa89b8bff5d038781a4055f796a")
# No pinned commit of MM-SafetyBench was obtainable here: its default branch is used.
MMSAFETYBENCH = ("isXinLiu/MM-SafetyBench", "main")
JBB_BENIGN_URL = "https://huggingface.co/datasets/JailbreakBench/JBB-Behaviors/resolve/main/data/benign-behaviors.csv"


def _figstep(tiny: bool) -> Source:
    csv_name, img_dir, per_cat = ("SafeBench-Tiny.csv", "SafeBench-Tiny", 5) if tiny else ("safebench.csv", "SafeBench", 50)
    sha = {"SafeBench-Tiny.csv": "e5f85f7d0323fe2e4afa99f6715ee97c2581d93856af4728a72fdec94338e867",
           "safebench.csv": "8e47f40b9b490fa2ca1393cdceb6081e9928848646f4b45fdd43726be941b394"}[csv_name]
    files = [RemoteFile(_gh(*FIGSTEP, f"data/question/{csv_name}"), f"figstep_safebench/{csv_name}", sha), _FIGSTEP_LICENSE]
    # 10 categories x 50 (Tiny: x 5) tasks, named query_ForbidQI_<category>_<task>_6.png upstream
    for cat in range(1, 11):
        for task in range(1, per_cat + 1):
            name = f"query_ForbidQI_{cat}_{task}_6.png"
            files.append(RemoteFile(_gh(*FIGSTEP, f"data/images/{img_dir}/{name}"), f"figstep_safebench/images/{img_dir}/{name}"))
    return Source("figstep_tiny" if tiny else "figstep", tuple(files))


_FIGSTEP_LICENSE = RemoteFile(_gh(*FIGSTEP, "LICENSE"), "figstep_safebench/LICENSE",
                              "5088bccd6b0e78c19d0bdbf3153995e8ab4897627f01ae2615fcf0e1c4eff3b9")
_RD_LICENSE = RemoteFile(_gh(*REFUSAL_DIRECTION, "LICENSE"), "harmful_prompt_sets/refusal_direction_LICENSE")


def _rd(raw_name: str, path: str, sha: str) -> tuple[RemoteFile, RemoteFile]:
    return RemoteFile(_gh(*REFUSAL_DIRECTION, f"dataset/raw/{raw_name}"), path, sha), _RD_LICENSE


def _sources() -> dict[str, Source]:
    xstest_files = (
        RemoteFile(_gh(*XSTEST, "xstest_prompts.csv"), "xstest/xstest_prompts.csv",
                   "11783fb294ed017473ee53c207d71f2161c7672c8d0b037501e78387f801cb5a"),
        RemoteFile(_gh(*XSTEST, "LICENSE"), "xstest/LICENSE", "9e5f1b3c610b9c2da5c313bf81d577a7d1acec686bdb0384edefa6df0f90cd94"),
    )
    out = [
        _figstep(tiny=False),
        _figstep(tiny=True),
        Source("figstep_benign", (
            RemoteFile(_gh(*FIGSTEP, "data/question/benign_sentences_without_harmful_phase.csv"),
                       "figstep_safebench/benign_sentences_without_harmful_phase.csv",
                       "3a4d660f9b66a7750ce91c199c0a5719f2465816c73d28eee1642cecb691d034"),
            _FIGSTEP_LICENSE)),
        Source("xstest", xstest_files),
        Source("xstest_safe", xstest_files),
        Source("advbench", _rd("advbench.csv", "advbench_alpaca/harmful_behaviors.csv",
                               "6cd1a5c63c07610d7eb67307772ee5606017ee950b5770ab288a2c487489d3e1")),
        # The full Alpaca data (about 22 MB); the loader keeps its no-input rows.
        Source("alpaca", (RemoteFile(_gh(*ALPACA, "alpaca_data.json"), "advbench_alpaca/alpaca_data.json"),
                          RemoteFile(_gh(*ALPACA, "DATA_LICENSE"), "advbench_alpaca/ALPACA_DATA_LICENSE"))),
        Source("harmbench_val", _rd("harmbench_val.csv", "harmful_prompt_sets/harmbench_val.csv",
                                    "7bfaaa5e2b9b95002c89e2d33c019f58e9e8496e2fc65d368f1eeb8179e69534")),
        Source("harmbench_test", _rd("harmbench_test.csv", "harmful_prompt_sets/harmbench_test.csv",
                                     "75d257b3e7428c52eb7b0154318f455af3e01b09a3794b5e2f3d36054f3c0e29")),
        Source("jailbreakbench", _rd("jailbreakbench.csv", "harmful_prompt_sets/jailbreakbench.csv",
                                     "45e9a8923b28f547bb372fbaa9af7df8b38c818a80ae50c3bab97704197ff516")),
        Source("jailbreakbench_benign", (RemoteFile(JBB_BENIGN_URL, "harmful_prompt_sets/jailbreakbench_benign.csv"),)),
        Source("strongreject", _rd("strongreject.csv", "harmful_prompt_sets/strongreject.csv",
                                   "4dd70357e4ff8b5d0ba5ebafecab5d6dd5633ce8046e3dd1c8bd93e64de44381")),
        Source("malicious_instruct", _rd("malicious_instruct.txt", "harmful_prompt_sets/malicious_instruct.txt",
                                         "a64d69dd1004aac4a23aaff3748fb8f17161893f74db36f45b8bc849eb1bcce5")),
        Source("mm_safetybench",
               tuple(RemoteFile(_gh(*MMSAFETYBENCH, f"data/processed_questions/{s}.json"), f"mm_safetybench/processed_questions/{s}.json")
                     for s in MMSAFETYBENCH_SCENARIOS),
               manual="MM-SafetyBench's images are not fetched: download the image archive linked from "
                      "https://github.com/isXinLiu/MM-SafetyBench (README, 'Dataset') and unpack it so that images lie at "
                      "{dest}/mm_safetybench/imgs/<scenario>/{{SD,TYPO,SD_TYPO}}/<id>.jpg (or pass image_dir= to the loader)"),
    ]
    return {s.name: s for s in out}


#: dataset name -> :class:`Source`; one entry per name in ``benchmarks.datasets.DATASETS``.
SOURCES: dict[str, Source] = _sources()


def plan(name: str, dest: str | os.PathLike) -> list[tuple[str, Path]]:
    """(url, target path) pairs ``download(name, dest)`` would fetch; no network."""
    if name not in SOURCES:
        raise ValueError(f"unknown dataset {name!r}; downloadable: {', '.join(SOURCES)} (or 'all')")
    return [(f.url, Path(dest) / f.path) for f in SOURCES[name].files]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _urlopen(url: str, timeout: float) -> Any:
    req = urllib.request.Request(url, headers={"User-Agent": "mllm-guardrails-benchmarks"})
    return urllib.request.urlopen(req, timeout=timeout)  # noqa: S310 - fixed https URLs from the table


def _fetch(remote: RemoteFile, target: Path, *, verify: bool, timeout: float, opener: Callable[[str, float], Any]) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    part = target.with_name(target.name + ".part")
    try:
        with opener(remote.url, timeout) as resp, open(part, "wb") as f:
            shutil.copyfileobj(resp, f)
    except urllib.error.HTTPError as e:
        part.unlink(missing_ok=True)
        raise ConnectionError(
            f"{remote.url} answered HTTP {e.code} ({e.reason}): the file moved or the pinned commit is gone; "
            f"fetch it from the dataset's repository by hand and place it at {target}"
        ) from e
    except (urllib.error.URLError, OSError, TimeoutError) as e:
        part.unlink(missing_ok=True)
        raise ConnectionError(
            f"could not download {remote.url} ({e}). This helper needs internet access to GitHub / Hugging Face; "
            f"without it, fetch the file by other means and place it at {target}"
        ) from e
    if verify and remote.sha256 and (got := _sha256(part)) != remote.sha256:
        part.unlink(missing_ok=True)
        raise ValueError(
            f"{remote.url}: SHA-256 {got} differs from the pinned {remote.sha256}; the upstream file changed or the "
            "download was altered. Pass verify=False (CLI: --no-verify) to accept it anyway"
        )
    os.replace(part, target)  # atomic: an interrupted download never leaves a half file under the real name


def download(
    name: str,
    dest: str | os.PathLike,
    *,
    verify: bool = True,
    overwrite: bool = False,
    timeout: float = 60.0,
    opener: Callable[[str, float], Any] | None = None,
) -> list[Path]:
    """Download dataset ``name`` into ``dest`` (the layout ``load_dataset(name, data_dir=dest)`` reads).

    Returns the files now present. Existing files are kept when their hash matches (or none is
    pinned) unless ``overwrite``. ``opener(url, timeout)`` returns a readable context manager
    (default: urllib), replaceable for offline tests. Raises ConnectionError on network failure.
    """
    pairs = plan(name, dest)
    source = SOURCES[name]
    opener = opener or _urlopen
    done = []
    for remote, (_, target) in zip(source.files, pairs):
        if target.is_file() and not overwrite and (not verify or not remote.sha256 or _sha256(target) == remote.sha256):
            done.append(target)
            continue
        _fetch(remote, target, verify=verify, timeout=timeout, opener=opener)
        done.append(target)
    if source.manual:
        log.warning("%s: %s", name, source.manual.format(dest=Path(dest)))
    return done


@entry_point
def main(argv: Iterable[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m benchmarks.download", description=__doc__.split("\n")[0])
    parser.add_argument("names", nargs="*", help=f"dataset names, or 'all': {', '.join(SOURCES)}")
    parser.add_argument("--dest", help="data folder to write (then pass it as --data / data_dir=)")
    parser.add_argument("--list", action="store_true", help="list the datasets with license and source, then exit")
    parser.add_argument("--no-verify", action="store_true", help="accept files whose SHA-256 differs from the pinned one")
    parser.add_argument("--overwrite", action="store_true", help="download again even if the file is present")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds per request (default 60)")
    args = parser.parse_args(None if argv is None else list(argv))
    if args.list:
        for n, info in DATASETS.items():
            print(f"{n:24s} {info.license:40s} {info.source}")
        return 0
    if not args.names or not args.dest:
        parser.error("give dataset NAME(s) (or 'all') and --dest DIR; --list shows the names")
    names = list(SOURCES) if args.names == ["all"] else args.names
    unknown = [n for n in names if n not in SOURCES]
    if unknown:
        parser.error(f"unknown dataset(s) {unknown}; choose from {', '.join(SOURCES)} or 'all'")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        for n in dict.fromkeys(names):  # keep order, drop repeats
            files = download(n, args.dest, verify=not args.no_verify, overwrite=args.overwrite, timeout=args.timeout)
            print(f"{n}: {len(files)} file(s) under {args.dest}")
    except (ConnectionError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
