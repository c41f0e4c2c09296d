"""The built-in demo corpus: real text that every Python installation carries, plus a junk domain.

``build_demo_corpus(out_dir)`` writes one ``<domain>.jsonl`` per domain (``{"text": ..., "source": ...}``
per line) and a ``corpus.json`` summary, offline and deterministically. The domains (the names
``configs/demo.yaml`` uses):

* ``code``: standard-library ``.py`` modules of the base install (tests, ``site-packages`` and
  ``pydoc_data`` excluded), whole files as written, docstrings included.
* ``docstrings``: module, class and function docstrings extracted with ``ast`` from the standard-library
  modules that ``code`` did *not* take, one document per module (``qualified.name`` line, then the
  docstring), so no text is shared with ``code``: English prose about code.
* ``doc_topics``: ``pydoc_data.topics.topics``, the language reference topics shipped with Python.
* ``readmes``: long descriptions (README) of the distributions installed in the running interpreter's
  environment (``importlib.metadata``), this project excluded. This domain depends on what is installed;
  ``corpus.json`` fingerprints that set (names and versions).
* ``licenses``: the standard library's ``LICENSE.txt`` plus the licence files in installed
  distributions' metadata, exact duplicates removed.
* ``junk``: random tokens from a fixed-seed generator: words drawn uniformly from the 4096 most frequent
  words of the other domains (95%) and random printable-ASCII strings (5%). Every word is equally likely
  and independent, so the junk domain's loss cannot fall below ~log(4096) per word: it has the highest
  loss of all domains, which makes a loss-seeking mixer chase it (it is ``target: false`` in the config).

Each domain is capped at ``max_bytes_per_domain`` of UTF-8 text. When a source has more, documents are
chosen evenly along its sorted order (a proportional stride), not just the alphabetically first ones.
Files are written atomically and left untouched when their content is unchanged, so a second build
keeps mtimes and ``acodm data prepare`` sees nothing new.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.metadata as metadata
import json
import logging
import re
import sys
import sysconfig
import tokenize
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from envs.paths import require_absent_or_dir

log = logging.getLogger(__name__)

DEMO_DOMAINS = ("code", "docstrings", "doc_topics", "readmes", "licenses", "junk")
DEFAULT_MAX_BYTES = 3_000_000
JUNK_SEED = 20240517
JUNK_VOCAB = 4096
_EXCLUDED_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__", "pydoc_data"}
_LICENSE_RE = re.compile(r"^(licen[cs]e|copying|notice)", re.IGNORECASE)
_WORD_RE = re.compile(r"[A-Za-z]{2,}")

Doc = tuple[str, str]  # (source, text)


def build_demo_corpus(
    out_dir: str | Path, *, max_bytes_per_domain: int = DEFAULT_MAX_BYTES
) -> dict[str, Any]:
    """Assemble the six demo domains into ``out_dir`` (one jsonl each) and return the summary.

    Args:
        out_dir: directory to write ``<domain>.jsonl`` and ``corpus.json`` into (created if needed).
        max_bytes_per_domain: cap on each domain's UTF-8 text.

    Returns:
        ``corpus.json``'s content: per domain its file, documents, bytes and sha256, plus the Python
        version, standard-library path and a fingerprint of the installed distributions.
    """
    if max_bytes_per_domain <= 0:
        raise ValueError(f"max_bytes_per_domain must be positive, got {max_bytes_per_domain}")
    out_dir = require_absent_or_dir(out_dir, "demo corpus directory")  # a file there: say so, not [Errno 17]
    out_dir.mkdir(parents=True, exist_ok=True)
    stdlib = Path(sysconfig.get_path("stdlib"))
    modules = _stdlib_modules(stdlib)
    code_idx = _spread_select([len(text.encode()) for _, text in modules], max_bytes_per_domain)
    code_set = set(code_idx)
    dists = _distributions()
    domains: dict[str, list[Doc]] = {
        "code": [modules[i] for i in code_idx],
        "docstrings": _cap(
            _docstring_docs([m for i, m in enumerate(modules) if i not in code_set]), max_bytes_per_domain
        ),
        "doc_topics": _cap(_topic_docs(), max_bytes_per_domain),
        "readmes": _cap(_readme_docs(dists), max_bytes_per_domain),
        "licenses": _license_docs(stdlib, dists, max_bytes_per_domain),
    }
    domains["junk"] = _junk_docs(_top_words(domains.values(), JUNK_VOCAB), max_bytes_per_domain)
    summary: dict[str, Any] = {
        "python": sys.version.split()[0],
        "stdlib": str(stdlib),
        "distributions": len(dists),
        "distributions_sha256": hashlib.sha256(
            "\n".join(f"{name}=={d.version}" for name, d in dists).encode()
        ).hexdigest(),
        "max_bytes_per_domain": max_bytes_per_domain,
        "domains": {},
    }
    for name in DEMO_DOMAINS:
        summary["domains"][name] = _write_domain(out_dir, name, domains[name])
        info = summary["domains"][name]
        log.info(
            "demo corpus %-10s %6d documents %6.2f MB -> %s",
            name,
            info["documents"],
            info["bytes"] / 1e6,
            info["file"],
        )
    _write_if_changed(out_dir / "corpus.json", (json.dumps(summary, indent=1) + "\n").encode())
    return summary


# ---------------------------------------------------------------------------------------------- helpers
def _write_if_changed(path: Path, data: bytes) -> None:
    from envs.shards import atomic_write_bytes

    if not (path.is_file() and path.read_bytes() == data):
        atomic_write_bytes(path, data)


def _write_domain(out_dir: Path, name: str, docs: list[Doc]) -> dict[str, Any]:
    if not docs:
        raise ValueError(f"demo corpus: domain {name!r} found no text in this Python installation")
    lines = [json.dumps({"text": text, "source": source}, ensure_ascii=False) for source, text in docs]
    data = ("\n".join(lines) + "\n").encode()
    path = out_dir / f"{name}.jsonl"
    _write_if_changed(path, data)
    return {
        "file": path.name,
        "documents": len(docs),
        "bytes": sum(len(text.encode()) for _, text in docs),
        "sha256": hashlib.sha256(data).hexdigest(),
    }


def _spread_select(sizes: list[int], cap: int) -> list[int]:
    """Indices of items to keep so that their total stays <= cap, spread evenly along the list's order.

    Item i is kept when the bytes kept so far plus its size stay within ``cap`` times the fraction of
    all bytes seen up to and including i (a proportional stride, like Bresenham's line).
    """
    total = sum(sizes)
    if total <= cap:
        return list(range(len(sizes)))
    kept: list[int] = []
    taken = seen = 0
    for i, size in enumerate(sizes):
        seen += size
        if taken + size <= cap * seen / total:
            kept.append(i)
            taken += size
    return kept


def _cap(docs: list[Doc], cap: int) -> list[Doc]:
    return [docs[i] for i in _spread_select([len(text.encode()) for _, text in docs], cap)]


# ---------------------------------------------------------------------------------------------- stdlib
def _stdlib_modules(stdlib: Path) -> list[Doc]:
    """(``stdlib:<relative path>``, source) of every non-test standard-library module, sorted by path."""
    if not stdlib.is_dir():
        raise FileNotFoundError(f"demo corpus: standard library directory {stdlib} not found")
    modules: list[Doc] = []
    for path in sorted(stdlib.rglob("*.py"), key=lambda p: p.relative_to(stdlib).as_posix()):
        rel = path.relative_to(stdlib)
        if (
            _EXCLUDED_DIRS.intersection(rel.parts[:-1])
            or rel.name.startswith("test_")
            or rel.parts[0].startswith("config-")
        ):
            continue
        try:
            with tokenize.open(path) as f:  # honours PEP 263 encoding cookies
                text = f.read()
        except (OSError, SyntaxError, UnicodeDecodeError) as exc:
            log.debug("demo corpus: skipping %s (%s)", path, exc)
            continue
        if text.strip():
            modules.append((f"stdlib:{rel.as_posix()}", text))
    return modules


def _docstring_docs(modules: list[Doc]) -> list[Doc]:
    """One document per module: each docstring under its qualified name, in source order."""
    docs: list[Doc] = []
    for source, text in modules:
        rel = source.removeprefix("stdlib:").removesuffix(".py").removesuffix("/__init__")
        try:
            tree = ast.parse(text)
        except (SyntaxError, ValueError):
            continue
        parts = [f"{name}\n{doc}" for name, doc in _docstrings(tree, rel.replace("/", "."))]
        if parts:
            docs.append((f"docstrings:{rel}", "\n\n".join(parts)))
    return docs


_DEFS = (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)


def _docstrings(
    node: ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef, qualname: str
) -> Iterator[tuple[str, str]]:
    """(qualified name, docstring) of a module or class and the definitions in its scope, in source order.

    Definitions inside if/try/with/for blocks belong to the enclosing scope; helpers nested inside
    functions are skipped (their bodies are not walked, which keeps the extraction fast).
    """
    doc = ast.get_docstring(node, clean=True)
    if doc:
        yield qualname, doc
    if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
        yield from _scope_docstrings(node.body, qualname)


def _scope_docstrings(stmts: list[ast.stmt], qualname: str) -> Iterator[tuple[str, str]]:
    for stmt in stmts:
        if isinstance(stmt, _DEFS):
            yield from _docstrings(stmt, f"{qualname}.{stmt.name}")
            continue
        for block in ("body", "orelse", "finalbody", "handlers"):
            inner = getattr(stmt, block, None)
            if isinstance(inner, list):
                yield from _scope_docstrings(inner, qualname)


def _topic_docs() -> list[Doc]:
    try:
        from pydoc_data.topics import topics
    except ImportError as exc:
        raise FileNotFoundError(f"demo corpus: this Python has no pydoc_data.topics ({exc})") from None
    return [(f"pydoc_data:{name}", topics[name]) for name in sorted(topics) if topics[name].strip()]


# ---------------------------------------------------------------------------------------------- metadata
def _distributions() -> list[tuple[str, metadata.Distribution]]:
    """Installed distributions of the running environment, one per normalised name (the first on sys.path)."""
    found: dict[str, metadata.Distribution] = {}
    for dist in metadata.distributions():
        raw = dist.metadata["Name"] if dist.metadata else None
        if not raw:
            continue
        name = re.sub(r"[-_.]+", "-", raw).lower()
        if name != "acodm":  # this project's own README changes with every commit
            found.setdefault(name, dist)
    return sorted(found.items())


def _readme_docs(dists: list[tuple[str, metadata.Distribution]]) -> list[Doc]:
    docs: list[Doc] = []
    for name, dist in dists:
        body = dist.metadata.get_payload()
        text = (
            body
            if isinstance(body, str) and body.strip()
            else _header_description(dist.metadata.get("Description"))
        )
        if text and text.strip() and text.strip() != "UNKNOWN":
            docs.append((f"readme:{name}=={dist.version}", text.strip() + "\n"))
    return docs


def _header_description(value: str | None) -> str:
    """Undo the line folding of an old-style ``Description:`` header (continuations start with 8 spaces or '|')."""
    if not value:
        return ""
    lines = value.splitlines()
    return "\n".join(lines[:1] + [re.sub(r"^( {7}\|| {8})", "", line) for line in lines[1:]])


def _license_docs(stdlib: Path, dists: list[tuple[str, metadata.Distribution]], cap: int) -> list[Doc]:
    """Python's own licence first (always kept), then the distributions' licence files, deduplicated."""
    python: list[Doc] = []
    if (stdlib / "LICENSE.txt").is_file():
        python.append(
            ("license:python", (stdlib / "LICENSE.txt").read_text(encoding="utf-8", errors="replace"))
        )
    seen = {hashlib.sha256(text.strip().encode()).hexdigest() for _, text in python}
    docs: list[Doc] = []
    for name, dist in dists:
        for file in sorted((f for f in dist.files or [] if _is_license_file(f)), key=lambda f: f.as_posix()):
            try:
                text = file.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError):
                continue
            digest = hashlib.sha256(text.strip().encode()).hexdigest()
            if text.strip() and digest not in seen:
                seen.add(digest)
                docs.append((f"license:{name}/{file.name}", text))
    python = _cap(python, cap)
    return python + _cap(docs, cap - sum(len(text.encode()) for _, text in python))


def _is_license_file(file: metadata.PackagePath) -> bool:
    parts = file.parts
    in_meta = any(p.endswith((".dist-info", ".egg-info")) for p in parts[:-1])
    return in_meta and (_LICENSE_RE.match(parts[-1]) is not None or "licenses" in parts[:-1])


# ---------------------------------------------------------------------------------------------- junk
def _top_words(domains: Any, n: int) -> list[str]:
    """The ``n`` most frequent words (letters only) of the given domains, ties broken alphabetically."""
    counts: Counter[str] = Counter()
    for docs in domains:
        for _, text in docs:
            counts.update(_WORD_RE.findall(text))
    return [word for word, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:n]]


def _junk_docs(words: list[str], cap: int) -> list[Doc]:
    """Documents of i.i.d. uniform words (95%) and random printable-ASCII strings (5%), seeded."""
    if not words:
        raise ValueError("demo corpus: no words to build the junk domain from")
    rng = np.random.default_rng(JUNK_SEED)
    docs: list[Doc] = []
    size = 0
    while size < cap:
        num_words = int(rng.integers(50, 400))
        is_word = rng.random(num_words) < 0.95
        word_ids = rng.integers(0, len(words), num_words)
        noise_ends = np.cumsum(rng.integers(1, 9, num_words))
        noise = rng.integers(33, 127, int(noise_ends[-1]), dtype=np.uint8).tobytes().decode("ascii")
        noise_starts = np.concatenate([[0], noise_ends[:-1]])
        seps = np.where(rng.random(num_words) < 0.05, "\n", " ")
        tokens = [
            words[w] if keep else noise[a:b]
            for keep, w, a, b in zip(is_word, word_ids, noise_starts, noise_ends, strict=True)
        ]
        text = "".join(t + s for t, s in zip(tokens, seps, strict=True)).rstrip() + "\n"
        text = text[: cap - size] if size + len(text) > cap else text
        docs.append((f"junk:{len(docs)}", text))
        size += len(text)
    return docs
