"""Trusting a prepared corpus: the manifest's schema, its agreement with the config, and shard checksums.

What is checked, when, and why (``docs/faults.md`` lists every case with its test):

* **On every open** (``PreparedCorpus.open``, each process, cheap at any scale): ``manifest.json`` parses
  (a truncated file names itself), its schema (every field the reader uses, with its type and range),
  per-split token counts equal the sum of their shards', shard and tokenizer paths stay inside the
  prepared directory, every shard has the size its token count implies, and ``tokenizer.json`` hashes to
  the manifest's sha256 (a few MB at most). Nothing here reads a shard.
* **At the start of a run, on the driver** (``ray_jobs.rundir``): the config agrees with the corpus
  (``check_config``: domains, ``data.tokenizer``) and shard checksums are verified by ``verify_shards``:
  **fully** when the shards total at most ``data.verify_max_bytes`` (1 GiB by default: about a second at
  the 1.7 GB/s sha256 runs at on this project's CPU with a warm page cache, ten seconds from a 100 MB/s
  network filesystem), **sampled** above it: whole shards drawn at random (a fresh draw each start) up to
  that many bytes. Hashing a whole Pile-sized corpus (hundreds of GB) at every start would cost minutes to
  hours of I/O that the run itself may never do (a run reads only the sequences it samples), so at that
  scale each start checks a different random part, and ``acodm data verify DIR`` is the full check to
  run once after copying a corpus. A sampled check catches a bad shard with probability about
  (sampled bytes / total bytes) per start; it is a spot check, not a proof.
* **``acodm data verify DIR``**: everything above plus every shard's sha256 and the tokenizer's
  vocabulary and EOS id against the manifest.

This module reads files and hashes; it never imports ray, mlflow or ``ray_jobs``.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # pragma: no cover - typing only
    from envs.config import DataConfig
    from envs.data import PreparedCorpus

log = logging.getLogger(__name__)

SPLITS = ("train", "val")
DTYPES = ("<u2", "<u4")
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
REPREPARE = "re-run `acodm data prepare` for this directory"


def sha256_file(path: Path, chunk_bytes: int = 1 << 22) -> str:
    """Hex sha256 of a file, read in 4 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------- schema
class _Checker:
    """Raises ``ValueError('<manifest>: <field> = <value>: expected ...')`` on the first violation."""

    def __init__(self, where: str) -> None:
        self.where = where

    def fail(self, field_name: str, value: Any, expected: str) -> None:
        shown = repr(value)
        if len(shown) > 80:
            shown = shown[:77] + "..."
        raise ValueError(f"{self.where}: {field_name} = {shown}: expected {expected}; {REPREPARE}")

    def mapping(self, value: Any, field_name: str) -> dict[str, Any]:
        if not isinstance(value, dict):
            self.fail(field_name, value, "a JSON object")
        return value

    def get(self, obj: dict[str, Any], key: str, prefix: str) -> Any:
        if key not in obj:
            raise ValueError(f"{self.where}: {prefix}{key} is missing; {REPREPARE}")
        return obj[key]

    def count(self, value: Any, field_name: str, *, positive: bool = False) -> int:
        lowest = 1 if positive else 0
        if isinstance(value, bool) or not isinstance(value, int) or value < lowest:
            self.fail(field_name, value, f"an integer >= {lowest}")
        return value

    def relative_file(self, value: Any, field_name: str) -> str:
        """A path relative to the prepared directory that stays inside it (no absolute path, no ``..``)."""
        if not isinstance(value, str) or not value:
            self.fail(field_name, value, "a file name relative to the prepared directory")
        parts = PurePosixPath(value).parts
        if value.startswith(("/", "\\")) or ".." in parts or (parts and ":" in parts[0]):
            self.fail(field_name, value, "a path inside the prepared directory (no absolute path, no '..')")
        return value

    def sha256(self, value: Any, field_name: str) -> str:
        if not isinstance(value, str) or not _SHA256_RE.match(value):
            self.fail(field_name, value, "a sha256 as 64 lowercase hex digits")
        return value


def validate_manifest(manifest: Any, where: str) -> None:
    """Check every field ``PreparedCorpus`` reads, its type and range, and that counts add up.

    Args:
        manifest: the parsed ``manifest.json``.
        where: the manifest's path, for messages.

    Raises:
        ValueError: naming the file, the dotted field, its value and what was expected.
    """
    c = _Checker(where)
    m = c.mapping(manifest, "<top level>")
    dtype = c.get(m, "dtype", "")
    if dtype not in DTYPES:
        c.fail("dtype", dtype, f"one of {list(DTYPES)} (little-endian uint16 or uint32 token ids)")
    tok = c.mapping(c.get(m, "tokenizer", ""), "tokenizer")
    c.relative_file(c.get(tok, "file", "tokenizer."), "tokenizer.file")
    vocab = c.count(c.get(tok, "vocab_size", "tokenizer."), "tokenizer.vocab_size", positive=True)
    if dtype == "<u2" and vocab > 1 << 16:
        c.fail("tokenizer.vocab_size", vocab, f"at most 65536 for dtype {dtype!r} (uint16 ids)")
    eos = c.count(c.get(tok, "eos_id", "tokenizer."), "tokenizer.eos_id")
    if eos >= vocab:
        c.fail("tokenizer.eos_id", eos, f"an id below tokenizer.vocab_size = {vocab}")
    if "sha256" in tok:
        c.sha256(tok["sha256"], "tokenizer.sha256")
    if "requested_vocab_size" in tok:
        c.count(tok["requested_vocab_size"], "tokenizer.requested_vocab_size", positive=True)
    if "trained" in tok and not isinstance(tok["trained"], bool):
        c.fail("tokenizer.trained", tok["trained"], "true or false")
    domains = c.get(m, "domains", "")
    if not isinstance(domains, list) or not domains:
        c.fail("domains", domains, "a non-empty list of domain records")
    names: list[str] = []
    for k, entry in enumerate(domains):
        prefix = f"domains[{k}]"
        entry = c.mapping(entry, prefix)
        name = c.get(entry, "name", f"{prefix}.")
        if not isinstance(name, str) or not name:
            c.fail(f"{prefix}.name", name, "a non-empty domain name")
        if name in names:
            c.fail(f"{prefix}.name", name, f"a name not used by another domain (domains are {names})")
        names.append(name)
        if not isinstance(c.get(entry, "target", f"{prefix}."), bool):
            c.fail(f"{prefix}.target", entry["target"], "true or false")
        splits = c.mapping(c.get(entry, "splits", f"{prefix}."), f"{prefix}.splits")
        for split in SPLITS:
            _validate_split(c, splits, split, f"{prefix}.splits.{split}")


def _validate_split(c: _Checker, splits: dict[str, Any], split: str, prefix: str) -> None:
    record = c.mapping(c.get(splits, split, prefix.rsplit(split, 1)[0]), prefix)
    total = c.count(c.get(record, "num_tokens", f"{prefix}."), f"{prefix}.num_tokens")
    shards = c.get(record, "shards", f"{prefix}.")
    if not isinstance(shards, list):
        c.fail(f"{prefix}.shards", shards, "a list of shard records")
    counted = 0
    for s, shard in enumerate(shards):
        where = f"{prefix}.shards[{s}]"
        shard = c.mapping(shard, where)
        c.relative_file(c.get(shard, "file", f"{where}."), f"{where}.file")
        counted += c.count(c.get(shard, "num_tokens", f"{where}."), f"{where}.num_tokens")
        c.sha256(c.get(shard, "sha256", f"{where}."), f"{where}.sha256")
    if counted != total:
        c.fail(f"{prefix}.num_tokens", total, f"{counted}, the sum of its shards' num_tokens")


# ---------------------------------------------------------------------------------------------- config
def check_config(corpus: PreparedCorpus, data_cfg: DataConfig) -> None:
    """Refuse a config that describes another preparation than the corpus's (domains, tokenizer).

    ``data.tokenizer.vocab_size`` must be what the corpus was prepared with: the size asked of the BPE
    trainer when ``acodm data prepare`` trained it (``tokenizer.requested_vocab_size``; on a small corpus
    the trained vocabulary can stop short of it, and the model uses the tokenizer's real size, recorded
    in the manifest and in the run's ``corpus.json``), or the given tokenizer's size when the corpus was
    prepared from ``data.tokenizer.path``. Refusing rather than silently taking the corpus's value keeps
    the run's ``config.yaml`` a true record. A manifest that does not say how its tokenizer was made (no
    ``tokenizer.trained``: written by another tool, e.g. the tests' synthetic corpora) only has its
    domains checked.

    Raises:
        ValueError: naming the config field, its value, the corpus's value and the fix.
    """
    where = f"prepared corpus {corpus.prepared_dir}"
    names = list(data_cfg.domain_names)
    if names != corpus.domain_names:
        raise ValueError(
            f"{where}: its domains {corpus.domain_names} differ from data.domains {names} (names and order "
            "must match); re-run `acodm data prepare` or point data.prepared_dir at the matching preparation"
        )
    tok = corpus.manifest["tokenizer"]
    tcfg = data_cfg.tokenizer
    fix = "or prepare this config into another data.prepared_dir (`acodm data prepare CONFIG`)"
    if "eos_token" in tok and tcfg.eos_token != tok["eos_token"]:
        raise ValueError(
            f"data.tokenizer.eos_token = {tcfg.eos_token!r} but {where} was prepared with end-of-text token "
            f"{tok['eos_token']!r}; set data.tokenizer.eos_token: {tok['eos_token']!r}, {fix}"
        )
    trained = tok.get("trained")
    if trained is None:
        log.info("%s: the manifest does not record how its tokenizer was made; data.tokenizer not compared", where)
        return
    if trained and tcfg.path is not None:
        raise ValueError(
            f"data.tokenizer.path = {tcfg.path!r} but {where} was prepared with a BPE trained on its target "
            f"domains; remove data.tokenizer.path, {fix}"
        )
    if not trained and tcfg.path is None:
        raise ValueError(
            f"data.tokenizer.path is not set (train a BPE) but {where} was prepared with the given tokenizer "
            f"{tok.get('source', '?')!r}; set data.tokenizer.path to it, {fix}"
        )
    if not trained and Path(tcfg.path).is_file() and sha256_file(Path(tcfg.path)) != tok.get("sha256"):
        raise ValueError(
            f"data.tokenizer.path = {tcfg.path!r} is not the tokenizer {where} was prepared with (their "
            f"sha256 differ); point data.tokenizer.path at {tok.get('source', '?')!r}, {fix}"
        )
    expected = int(tok.get("requested_vocab_size", tok["vocab_size"])) if trained else int(tok["vocab_size"])
    if tcfg.vocab_size != expected:
        made = "its BPE was trained for" if trained else "its given tokenizer has"
        raise ValueError(
            f"data.tokenizer.vocab_size = {tcfg.vocab_size} but {where} was prepared with a different "
            f"vocabulary ({made} {expected} tokens; the model would use the corpus's {tok['vocab_size']}); "
            f"set data.tokenizer.vocab_size: {expected}, {fix}"
            + ("" if not trained or "requested_vocab_size" in tok else
               " (this manifest predates the record of the size asked of the BPE; re-running `acodm data "
               "prepare` with the config it was prepared with adds it without retraining)")
        )


# ---------------------------------------------------------------------------------------------- checksums
@dataclass
class VerifyReport:
    """What ``verify_shards`` checked."""

    mode: str  # "full" or "sampled"
    shards_checked: int
    shards_total: int
    bytes_checked: int
    bytes_total: int
    checked: list[str] = field(default_factory=list)  # shard files, relative to the prepared directory

    def summary(self) -> str:
        """One line for the log."""
        scale, unit = (1e6, "MB") if self.bytes_total >= 1e5 else (1e3, "kB")
        return (
            f"{self.mode} shard check: {self.shards_checked}/{self.shards_total} shards, "
            f"{self.bytes_checked / scale:.1f}/{self.bytes_total / scale:.1f} {unit} match their sha256"
        )


def _shard_records(corpus: PreparedCorpus) -> list[tuple[str, str, dict[str, Any]]]:
    return [
        (entry["name"], split, shard)
        for entry in corpus.manifest["domains"]
        for split in SPLITS
        for shard in entry["splits"][split]["shards"]
    ]


def verify_shards(
    corpus: PreparedCorpus, *, max_bytes: int | None = None, seed: int | Sequence[int] | None = None
) -> VerifyReport:
    """Hash shards and compare with the manifest: all of them, or a random sample of ``max_bytes``.

    Args:
        corpus: an open corpus (its sizes are already checked).
        max_bytes: None = every shard; else every shard when they total at most this, otherwise whole shards
            drawn at random until the next would exceed it (at least one).
        seed: seeds the draw (None = fresh entropy, so successive starts check different shards).

    Returns:
        What was checked.

    Raises:
        ValueError: naming every checked shard whose content differs from its sha256 (with domain and split).
    """
    records = _shard_records(corpus)
    itemsize = corpus.dtype.itemsize
    sizes = [int(shard["num_tokens"]) * itemsize for _, _, shard in records]
    total = sum(sizes)
    order = list(range(len(records)))
    mode = "full"
    if max_bytes is not None and total > max_bytes:
        mode = "sampled"
        order = [int(i) for i in np.random.default_rng(seed).permutation(len(records))]
        chosen, used = [], 0
        for i in order:
            if chosen and used + sizes[i] > max_bytes:
                continue
            chosen.append(i)
            used += sizes[i]
        order = sorted(chosen)
    bad = []
    for i in order:
        domain, split, shard = records[i]
        if sha256_file(corpus.prepared_dir / shard["file"]) != shard["sha256"]:
            bad.append(
                f"shard {corpus.prepared_dir / shard['file']} does not match the sha256 in the manifest "
                f"(domain {domain!r}, {split})"
            )
    if bad:
        raise ValueError(
            f"{'; '.join(bad)}: changed after preparation ({corpus.prepared_dir / 'manifest.json'}); "
            f"{REPREPARE} to repair it"
        )
    return VerifyReport(
        mode, len(order), len(records), sum(sizes[i] for i in order), total,
        [records[i][2]["file"] for i in order],
    )  # fmt: skip


def check_tokenizer(corpus: PreparedCorpus) -> None:
    """Load ``tokenizer.json`` and compare its vocabulary size and EOS id with the manifest.

    Raises:
        ValueError: naming the tokenizer file, the manifest's value and the tokenizer's.
    """
    tokenizer = corpus.tokenizer()
    tok = corpus.manifest["tokenizer"]
    size = tokenizer.get_vocab_size(with_added_tokens=True)
    if size != corpus.vocab_size:
        raise ValueError(
            f"tokenizer {corpus.tokenizer_path} has {size} tokens but the manifest says tokenizer.vocab_size = "
            f"{corpus.vocab_size}; {REPREPARE}"
        )
    if "eos_token" in tok and tokenizer.token_to_id(tok["eos_token"]) != corpus.eos_id:
        raise ValueError(
            f"tokenizer {corpus.tokenizer_path}: {tok['eos_token']!r} has id "
            f"{tokenizer.token_to_id(tok['eos_token'])} but the manifest says tokenizer.eos_id = {corpus.eos_id}; "
            f"{REPREPARE}"
        )


def verify_prepared_dir(prepared_dir: str | Path) -> VerifyReport:
    """``acodm data verify DIR``: open (schema, counts, sizes, tokenizer hash), every shard, the tokenizer.

    Raises:
        FileNotFoundError / ValueError: the first problem found (every bad shard at once), naming the file.
    """
    from envs.data import PreparedCorpus  # envs.data imports this module

    prepared_dir = Path(prepared_dir)
    if prepared_dir.exists() and not prepared_dir.is_dir():
        raise NotADirectoryError(f"{prepared_dir} is a file; expected a prepared directory (with manifest.json)")
    corpus = PreparedCorpus.open(prepared_dir)
    report = verify_shards(corpus)
    check_tokenizer(corpus)
    return report


def content_id(manifest: dict[str, Any]) -> str:
    """A hash of what a run reads: dtype, tokenizer, and per domain its shards' names, sizes and sha256.

    Unchanged by things that do not change the data (source mtimes, the manifest's layout), so a
    re-preparation that writes the same shards keeps it.
    """
    digest = hashlib.sha256()
    tok = manifest["tokenizer"]
    digest.update(repr((manifest["dtype"], tok.get("sha256"), tok["vocab_size"], tok["eos_id"])).encode())
    for entry in manifest["domains"]:
        for split in SPLITS:
            for shard in entry["splits"][split]["shards"]:
                digest.update(repr((entry["name"], split, shard["file"], shard["num_tokens"], shard["sha256"])).encode())
    return digest.hexdigest()

