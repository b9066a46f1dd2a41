"""Prompt templates as data files, each with its source, and a tiny registry.

Every template lives in ``prompts/templates/NAME.txt``: a header of ``# key: value`` lines,
a line that is exactly ``---``, then the body. Keys:

- ``source`` (required, may repeat): the paper (authors, year, arXiv id, section) or repository
  path and commit, or the literal text ``written for this project``.
- ``provenance`` (required): ``verbatim`` (copied from the source; only placeholder names may
  differ, which the notes say), ``paraphrased`` or ``reconstructed`` (the source's text was not
  available; the notes say so), or ``original`` (written for this project).
- ``description`` (required): one line.
- ``fields`` (required): the named fields, comma-separated; an empty value means none.
- ``note`` (optional, may repeat): what was verified, and how the source used the text.

The body uses ``str.format`` named fields: ``{query}``; a literal brace is written ``{{`` or
``}}``. Positional (``{}``), indexed or attribute fields and format specs are refused when the
file is loaded, and the declared fields must equal the placeholders in the body. The body is
the text after the ``---`` line with one final newline removed, kept byte for byte otherwise
(verbatim sources have trailing spaces that matter to tokenisation).

>>> import prompts
>>> prompts.render("ecso_query_aware_caption", query="How do I make this?")
'REQUEST:\\nHow do I make this?.\\n\\nBased on the REQUEST, describe the image.'

This package is the bottom layer: it imports nothing from this project and only the standard
library, so any layer can use it.
"""

from __future__ import annotations

import difflib
import functools
import re
import string
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "PromptTemplate",
    "PromptFieldError",
    "UnknownPromptError",
    "TEMPLATE_DIR",
    "PROVENANCES",
    "ORIGINAL_SOURCE",
    "MMSAFETYBENCH_SCENARIOS",
    "get",
    "names",
    "render",
    "catalog",
    "from_file",
    "mmsafetybench_judge_name",
]

TEMPLATE_DIR = Path(__file__).resolve().parent / "templates"
TEMPLATE_SUFFIX = ".txt"
ORIGINAL_SOURCE = "written for this project"
PROVENANCES = ("verbatim", "paraphrased", "reconstructed", "original")

_SEPARATOR = "---"
_REQUIRED_KEYS = ("source", "provenance", "description", "fields")
_REPEATABLE_KEYS = ("source", "note")
_KNOWN_KEYS = _REQUIRED_KEYS + ("note",)
_NAME_RE = re.compile(r"^[a-z][a-z0-9_]*$")
_HEADER_RE = re.compile(r"^#\s*([A-Za-z_]+)\s*:(.*)$")


class PromptFieldError(KeyError, ValueError):
    """A field passed to ``render`` is missing or unexpected.

    Subclasses both KeyError and ValueError so callers may catch either.
    """

    def __str__(self) -> str:  # KeyError would quote the whole message
        return str(self.args[0]) if self.args else ""


class UnknownPromptError(KeyError, ValueError):
    """No template has the requested name; the message lists close matches."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


@dataclass(frozen=True)
class PromptTemplate:
    """One template: its raw ``text`` (str.format syntax) and where it came from.

    Use :meth:`render` rather than ``text`` directly: ``text`` still has ``{{``/``}}`` escapes.
    """

    name: str
    text: str
    source: str
    description: str
    fields: tuple[str, ...]
    path: Path
    provenance: str = "original"
    notes: str = ""

    def render(self, **fields: str) -> str:
        """Fill every declared field.

        Raises PromptFieldError (a KeyError and ValueError) naming any missing or unexpected
        field, and TypeError for a value that is not a str.
        """
        missing = [f for f in self.fields if f not in fields]
        extra = sorted(set(fields) - set(self.fields))
        if missing or extra:
            parts = []
            if missing:
                parts.append(f"missing field(s) {', '.join(map(repr, missing))}")
            if extra:
                parts.append(f"unexpected field(s) {', '.join(map(repr, extra))}")
            declared = ", ".join(self.fields) if self.fields else "none"
            raise PromptFieldError(
                f"prompt template {self.name!r}: {'; '.join(parts)}. "
                f"It takes exactly these fields: {declared}."
            )
        for key, value in fields.items():
            if not isinstance(value, str):
                # str(None) would put the word "None" into a prompt without anyone noticing.
                raise TypeError(
                    f"prompt template {self.name!r}: field {key!r} must be a str, got "
                    f"{type(value).__name__}; convert it with str() first if that is intended."
                )
        return self.text.format_map(fields)

    def as_dict(self) -> dict:
        """The template's metadata (no body) as plain JSON-ready values."""
        return {
            "name": self.name,
            "description": self.description,
            "source": self.source,
            "provenance": self.provenance,
            "fields": list(self.fields),
            "notes": self.notes,
            "path": str(self.path),
        }


def _placeholders(text: str, where: str) -> list[str]:
    """Named fields in ``text`` in order of first use; refuse anything but plain ``{name}``."""
    seen: list[str] = []
    try:
        parsed = list(string.Formatter().parse(text))
    except ValueError as exc:  # a lone "{" or "}"
        raise ValueError(
            f"{where}: malformed placeholder ({exc}); write a literal brace as '{{{{' or '}}}}'."
        ) from None
    for _literal, field, spec, conversion in parsed:
        if field is None:
            continue
        if not field.isidentifier():
            raise ValueError(
                f"{where}: placeholder {{{field}}} is not a plain name; use named fields like "
                "{query} (no positional {}, indexes or attributes), or escape braces as {{ }}."
            )
        if spec or conversion:
            raise ValueError(
                f"{where}: placeholder {{{field}}} has a conversion or format spec; use a plain "
                f"{{{field}}} and format the value before rendering."
            )
        if field not in seen:
            seen.append(field)
    return seen


def from_file(path: str | Path) -> PromptTemplate:
    """Parse one template file in the format described in the module docstring.

    Useful for templates of your own; the name is the file name without its suffix.
    """
    path = Path(path)
    name = path.name[: -len(TEMPLATE_SUFFIX)] if path.name.endswith(TEMPLATE_SUFFIX) else path.stem
    if not _NAME_RE.match(name):
        raise ValueError(
            f"{path}: template name {name!r} must be lower-case letters, digits and underscores, "
            "starting with a letter; rename the file."
        )
    # Text mode gives universal newlines, so a CRLF checkout yields the same body.
    raw = path.read_text(encoding="utf-8")
    lines = raw.split("\n")
    try:
        sep = lines.index(_SEPARATOR)
    except ValueError:
        raise ValueError(
            f"{path}: no line '{_SEPARATOR}' between the header and the body; add one."
        ) from None

    header: dict[str, list[str]] = {}
    for number, line in enumerate(lines[:sep], start=1):
        if not line.strip():
            continue
        match = _HEADER_RE.match(line)
        if not match:
            raise ValueError(
                f"{path}:{number}: header lines must look like '# key: value', got {line!r}."
            )
        key, value = match.group(1).lower(), match.group(2).strip()
        if key not in _KNOWN_KEYS:
            close = difflib.get_close_matches(key, _KNOWN_KEYS, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(
                f"{path}:{number}: unknown header key {key!r}{hint}; known keys: "
                f"{', '.join(_KNOWN_KEYS)}."
            )
        if key in header and key not in _REPEATABLE_KEYS:
            raise ValueError(f"{path}:{number}: header key {key!r} given twice; give it once.")
        header.setdefault(key, []).append(value)

    missing = [k for k in _REQUIRED_KEYS if k not in header]
    if missing:
        raise ValueError(f"{path}: header lacks required key(s) {', '.join(missing)}.")

    source = " ".join(v for v in header["source"] if v)
    description = header["description"][0]
    provenance = header["provenance"][0]
    notes = " ".join(v for v in header.get("note", []) if v)
    if not source or not description:
        raise ValueError(f"{path}: 'source' and 'description' must not be empty.")
    if provenance not in PROVENANCES:
        raise ValueError(
            f"{path}: provenance {provenance!r} is not one of {', '.join(PROVENANCES)}."
        )
    # Keep the two honest labels in step: an original text must say so in its source line.
    if (provenance == "original") != source.lower().startswith(ORIGINAL_SOURCE):
        raise ValueError(
            f"{path}: provenance 'original' and source '{ORIGINAL_SOURCE}' go together; "
            f"got provenance {provenance!r} with source {source!r}."
        )

    declared = [f.strip() for f in header["fields"][0].split(",") if f.strip()]
    if len(set(declared)) != len(declared):
        raise ValueError(f"{path}: a field is declared twice in {declared}.")

    body = "\n".join(lines[sep + 1 :])
    if body.endswith("\n"):  # the file's own final newline is not part of the prompt
        body = body[:-1]
    if not body.strip():
        raise ValueError(f"{path}: the body after '{_SEPARATOR}' is empty.")

    used = _placeholders(body, str(path))
    undeclared = [f for f in used if f not in declared]
    unused = [f for f in declared if f not in used]
    if undeclared or unused:
        raise ValueError(
            f"{path}: declared fields {declared} do not match the body's placeholders {used} "
            f"(undeclared: {undeclared}, unused: {unused}); fix the '# fields:' line or the body."
        )

    return PromptTemplate(
        name=name,
        text=body,
        source=source,
        description=description,
        fields=tuple(declared),
        path=path,
        provenance=provenance,
        notes=notes,
    )


@functools.lru_cache(maxsize=1)
def _index() -> dict[str, Path]:
    """Name -> file for every packaged template (read once, lazily)."""
    if not TEMPLATE_DIR.is_dir():
        raise FileNotFoundError(
            f"prompt templates not found at {TEMPLATE_DIR}; the package data was not installed "
            "(the wheel must include prompts/templates/*.txt)."
        )
    return {
        p.name[: -len(TEMPLATE_SUFFIX)]: p
        for p in sorted(TEMPLATE_DIR.glob("*" + TEMPLATE_SUFFIX))
    }


@functools.cache
def _load(name: str) -> PromptTemplate:
    return from_file(_index()[name])


def names() -> list[str]:
    """Sorted names of all packaged templates."""
    return list(_index())


def get(name: str) -> PromptTemplate:
    """The template called ``name``; an unknown name raises with the closest matches."""
    if not isinstance(name, str):
        raise TypeError(f"prompt template name must be a str, got {type(name).__name__}.")
    index = _index()
    if name not in index:
        close = difflib.get_close_matches(name.lower(), list(index), n=3, cutoff=0.5)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise UnknownPromptError(
            f"unknown prompt template {name!r}.{hint} prompts.names() lists all "
            f"{len(index)} templates."
        )
    return _load(name)


def render(name: str, /, **fields: str) -> str:
    """``get(name).render(**fields)``; ``name`` is positional-only so a field may be called name."""
    return get(name).render(**fields)


def catalog() -> list[dict]:
    """Metadata of every template (name, description, source, provenance, fields, notes, path)."""
    return [get(n).as_dict() for n in names()]


# MM-SafetyBench's evaluation.py picks its GPT-4 judge template by scenario: five scenarios have
# their own, the rest use the general one. Scenario folder names as published, typo included.
MMSAFETYBENCH_SCENARIOS = {
    "01-Illegal_Activitiy": "mmsafetybench_judge_general",
    "02-HateSpeech": "mmsafetybench_judge_general",
    "03-Malware_Generation": "mmsafetybench_judge_general",
    "04-Physical_Harm": "mmsafetybench_judge_general",
    "05-EconomicHarm": "mmsafetybench_judge_general",
    "06-Fraud": "mmsafetybench_judge_general",
    "07-Sex": "mmsafetybench_judge_general",
    "08-Political_Lobbying": "mmsafetybench_judge_political_lobbying",
    "09-Privacy_Violence": "mmsafetybench_judge_general",
    "10-Legal_Opinion": "mmsafetybench_judge_legal_opinion",
    "11-Financial_Advice": "mmsafetybench_judge_financial_advice",
    "12-Health_Consultation": "mmsafetybench_judge_health_consultation",
    "13-Gov_Decision": "mmsafetybench_judge_gov_decision",
}


def mmsafetybench_judge_name(scenario: str | int) -> str:
    """Judge template for an MM-SafetyBench scenario: ``8``, ``"08"`` or ``"08-Political_Lobbying"``.

    Resolved by the scenario's number, as evaluation.py's folders are numbered 01-13.

    >>> mmsafetybench_judge_name("10-Legal_Opinion")
    'mmsafetybench_judge_legal_opinion'
    """
    if isinstance(scenario, bool) or not isinstance(scenario, (str, int)):
        raise TypeError(f"scenario must be a str or int, got {type(scenario).__name__}.")
    key = f"{scenario:02d}" if isinstance(scenario, int) else scenario.split("-", 1)[0].strip()
    for full, template in MMSAFETYBENCH_SCENARIOS.items():
        if full == scenario or full.split("-", 1)[0] == key:
            return template
    raise ValueError(
        f"unknown MM-SafetyBench scenario {scenario!r}; expected 1-13 or one of "
        f"{', '.join(MMSAFETYBENCH_SCENARIOS)}."
    )
