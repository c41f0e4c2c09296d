"""Prepare a corpus: tokenizer, per-domain train/val token shards and ``manifest.json``.

Dimension legend: K = domains.

Layout of ``data.prepared_dir`` (read by ``envs.data.PreparedCorpus``)::

    manifest.json            domains in config order, token counts, shards with sha256, dtype, tokenizer hash,
                             source fingerprints, seq_len, seed, format_version
    tokenizer.json           the given tokenizer (copied) or the byte-level BPE trained here
    <domain>/train_00000.bin raw little-endian uint16 (vocab <= 65536) or uint32 tokens, at most
    <domain>/val_00000.bin   data.shard_tokens each; documents are joined by EOS (one after every document)
    <domain>/progress.json   resume state of the domain (shards done, documents consumed, carried tokens)

Why raw ``.bin`` shards rather than Arrow IPC: ``benchmarks/bench_prepare.py`` measures both; a raw file
is a zero-copy ``np.memmap`` with no framing, reads of scattered sequences are as fast or faster, and any
tool (numpy, torch, nanoGPT-style loaders) can read it.

Determinism: documents are read in a fixed order; the validation split holds out one document in about
``1/val_fraction`` by systematic sampling with a seeded start (``envs.shards.ValSelector``), until
``val_max_tokens`` (the validation stream is cut there; later held-out documents go to training). The
BPE is trained on the training documents of the target domains only (``train_max_bytes_per_domain``
each, in order), since e.g. junk would otherwise take a large part of the vocabulary. Shards cut the
token stream every ``shard_tokens`` tokens, independent of batching and threads, so an interrupted and
resumed run writes byte-identical shards.

Parallelism: documents are encoded in chunks by ``data.num_proc`` threads (0 = every core); the
``tokenizers`` encoder releases the GIL, so threads scale like processes without pickling text and
token arrays between them (``benchmarks/bench_prepare.py`` compares threads, the Rust pool and a
process pool). Domains that share a source up to ``filter_value`` (The Pile split by
``meta.pile_set_name``) are read in one pass over it, for the tokenizer and for the shards.

Safety: every file is written to a temporary name, fsynced and renamed, so no half-written shard ever
carries a final name; ``manifest.json`` is removed before any shard changes and written last, so a
manifest always describes complete shards. A lock file stops two preparations of one directory at once.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from envs.config import DataConfig, DomainConfig
from envs.corpus_guard import CorpusReplaceError, check_settings_kept, check_tokenizer_kept, existing_manifest
from envs.data import FORMAT_VERSION, MANIFEST_NAME, SPLITS, sha256_file
from envs.filelock import exclusive_lock
from envs.shards import (
    DomainJob,
    JobContext,
    ShardHook,
    ValSelector,
    atomic_write_bytes,
    read_json,
    remove_tmp_files,
    run_jobs,
    sha_json,
    write_json,
)
from envs.text_sources import empty_domain_error, group_key, iter_routed_documents, source_fingerprint

__all__ = ["CorpusReplaceError", "GroupRunner", "ValSelector", "num_threads", "prepare_corpus", "run_groups_locally"]

log = logging.getLogger(__name__)

TOKENIZER_NAME = "tokenizer.json"
LOCK_NAME = ".prepare.lock"
T = TypeVar("T")
# Prepares groups of domain jobs (domains sharing a source), yielding each group when it is finished.
GroupRunner = Callable[[list[list[DomainJob]]], Iterator[list[DomainJob]]]


@contextlib.contextmanager
def _exclusive(out_dir: Path) -> Iterator[None]:
    """One preparation per directory at a time (``envs.filelock``: released on any exit, even SIGKILL)."""
    with exclusive_lock(out_dir / LOCK_NAME, what=f"prepared directory {out_dir} (acodm data prepare)"):
        yield


@contextlib.contextmanager
def _tokenizers_parallelism(enabled: bool) -> Iterator[None]:
    """Set TOKENIZERS_PARALLELISM (the Rust thread pool) for a block and restore it."""
    old = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "true" if enabled else "false"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = old


def num_threads(num_proc: int) -> int:
    """Encoding threads for ``data.num_proc`` (0 = every core this process may use)."""
    return num_proc if num_proc > 0 else len(os.sched_getaffinity(0))


# ---------------------------------------------------------------------------------------------- tokenizer
def _load_tokenizer(
    data_cfg: DataConfig,
    out_dir: Path,
    seed: int,
    fingerprints: dict[str, list[dict[str, Any]]],
    threads: int,
    before_replace: Callable[[str], None] = lambda sha: None,
) -> tuple[Any, dict[str, Any]]:
    """The tokenizer (copied into ``out_dir`` or trained there, reused when its inputs are unchanged).

    ``before_replace(sha256)`` sees a new tokenizer before it replaces ``tokenizer.json`` (and may refuse).
    """
    from tokenizers import Tokenizer

    tcfg = data_cfg.tokenizer
    dest = out_dir / TOKENIZER_NAME
    if tcfg.path is not None:
        src = Path(tcfg.path)
        if src.is_dir():
            raise IsADirectoryError(f"data.tokenizer.path = {str(src)!r} is a directory; expected a tokenizer.json file")
        if not src.is_file():
            raise FileNotFoundError(f"data.tokenizer.path: tokenizer file {src} not found")
        data = src.read_bytes()
        before_replace(hashlib.sha256(data).hexdigest())
        if not (dest.is_file() and dest.read_bytes() == data):
            atomic_write_bytes(dest, data)
        info: dict[str, Any] = {"trained": False, "source": str(src)}
    else:
        targets = [d for d in data_cfg.domains if d.target]
        key = sha_json(
            {
                "format_version": FORMAT_VERSION,
                "tokenizer": tcfg.model_dump(mode="json"),
                "val_fraction": data_cfg.val_fraction,
                "seed": seed,
                "targets": [
                    [d.name, d.source.model_dump(mode="json"), fingerprints[d.name]] for d in targets
                ],
            }
        )
        meta_path = out_dir / "tokenizer_meta.json"
        meta = read_json(meta_path) or {}
        if not (meta.get("key") == key and dest.is_file() and sha256_file(dest) == meta.get("sha256")):
            started = time.perf_counter()
            fresh = dest.with_name(f".{dest.name}.new")
            try:
                _train_bpe(data_cfg, targets, fresh, seed, threads)
                before_replace(sha256_file(fresh))
                os.replace(fresh, dest)
            finally:
                fresh.unlink(missing_ok=True)
            log.info(
                "trained a %d-token byte-level BPE in %.1fs", tcfg.vocab_size, time.perf_counter() - started
            )
            write_json(meta_path, {"key": key, "sha256": sha256_file(dest)})
        info = {"trained": True, "trained_on": [d.name for d in targets], "requested_vocab_size": tcfg.vocab_size}
    tokenizer = Tokenizer.from_file(str(dest))
    tokenizer.encode_special_tokens = True  # a literal "<|endoftext|>" inside a document stays text
    eos_id = tokenizer.token_to_id(tcfg.eos_token)
    if eos_id is None:
        raise ValueError(
            f"tokenizer {tcfg.path or dest} has no token {tcfg.eos_token!r} (data.tokenizer.eos_token); "
            "set eos_token to its end-of-text token"
        )
    size = tokenizer.get_vocab_size(with_added_tokens=True)
    _check_vocab_size(tcfg.vocab_size, size, given=tcfg.path)
    info |= {
        "file": TOKENIZER_NAME,
        "sha256": sha256_file(dest),
        "vocab_size": size,
        "eos_token": tcfg.eos_token,
        "eos_id": int(eos_id),
    }
    return tokenizer, info


def _check_vocab_size(requested: int, actual: int, *, given: str | None) -> None:
    """A given tokenizer must have the configured size (the run's config records what the model uses); a
    trained BPE may stop short of it on a small corpus, which is worth a warning."""
    if given is not None and actual != requested:
        raise ValueError(
            f"data.tokenizer.vocab_size = {requested} but the given tokenizer {given} (data.tokenizer.path) has "
            f"{actual} tokens; set data.tokenizer.vocab_size: {actual} so that the config records the "
            "vocabulary the model is built for"
        )
    if given is None and actual < requested:
        log.warning(
            "the BPE stopped at %d of the %d tokens asked for (data.tokenizer.vocab_size): the target domains "
            "have too little text for that vocabulary; the model is built for %d (recorded in the manifest)",
            actual, requested, actual,
        )


def _train_bpe(
    data_cfg: DataConfig, targets: list[DomainConfig], dest: Path, seed: int, threads: int
) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tcfg = data_cfg.tokenizer
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=tcfg.vocab_size,
        min_frequency=2,
        special_tokens=[tcfg.eos_token],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=sys.stderr.isatty(),
    )
    texts = _training_texts(targets, data_cfg.val_fraction, seed, tcfg.train_max_bytes_per_domain)
    with _tokenizers_parallelism(threads > 1):
        tokenizer.train_from_iterator(texts, trainer=trainer)
    atomic_write_bytes(dest, tokenizer.to_str(pretty=True).encode())


def _training_texts(
    targets: list[DomainConfig], val_fraction: float, seed: int, max_chars: int
) -> Iterator[str]:
    """Per target domain, in config order, the first ``max_chars`` characters (about bytes) of its training
    documents; domains that share a source (``group_key``) are collected in one pass over it."""
    collected: dict[str, list[str]] = {}
    for group in _grouped(targets, lambda d: d):
        selectors = [ValSelector(val_fraction, seed, d.name) for d in group]
        texts: list[list[str]] = [[] for _ in group]
        used, seen = [0] * len(group), [0] * len(group)
        unfilled = len(group)
        for i, text in iter_routed_documents(group):
            seen[i] += 1
            if used[i] >= max_chars or selectors[i].is_val(seen[i] - 1):
                continue
            texts[i].append(text[: max_chars - used[i]])
            used[i] += len(texts[i][-1])
            if used[i] >= max_chars:
                unfilled -= 1
                if unfilled == 0:
                    break
        for i, domain in enumerate(group):
            if seen[i] == 0:
                raise empty_domain_error(domain)
            collected[domain.name] = texts[i]
    for domain in targets:
        yield from collected[domain.name]


def _check_length(entry: dict[str, Any], seq_len: int, val_fraction: float) -> None:
    need = seq_len + 1
    train, val = (entry["splits"][s]["num_tokens"] for s in SPLITS)
    if train < need or val < need:
        docs = entry["num_documents"]
        raise ValueError(
            f"domain {entry['name']!r} is shorter than one sequence: train has {train} tokens "
            f"({docs['train']} documents) and val {val} tokens ({docs['val']} documents); each split needs "
            f"at least seq_len + 1 = {need} tokens. Validation holds out about one document in "
            f"{1 / val_fraction:.0f} (data.val_fraction = {val_fraction}): add text, raise data.val_fraction "
            "or lower lm.seq_len"
        )


def prepare_corpus(
    data_cfg: DataConfig,
    *,
    seq_len: int,
    seed: int,
    on_shard: ShardHook | None = None,
    run_groups: GroupRunner | None = None,
    force: bool = False,
) -> dict:
    """Tokenize every configured domain into train/val shards and write ``manifest.json``.

    Re-running skips domains whose inputs (sources, tokenizer, split settings) are unchanged and whose
    shards verify against their sha256, and resumes an interrupted domain after its last finished shard.

    Args:
        data_cfg: the ``data`` section of the experiment config.
        seq_len: training sequence length; every domain needs ``seq_len + 1`` tokens in each split.
        seed: seeds the validation split (and thereby the documents the BPE is trained on).
        on_shard: called as ``on_shard(domain, split, shard_index)`` after each shard is durable (tests).
        run_groups: reads and encodes the documents of each group of jobs (domains sharing one source)
            and yields each group once its jobs are finished, in order; default ``run_groups_locally``
            (threads in this process). ``ray_jobs.data`` passes one that encodes with Ray Data.
        force: replace a prepared corpus with other domains or another tokenizer (refused otherwise, before
            anything is changed, since runs that trained on it depend on it).

    Returns:
        The manifest (also written to ``<prepared_dir>/manifest.json``).

    Raises:
        CorpusReplaceError: ``out_dir`` holds a corpus with other domains or another tokenizer (and not ``force``).
        DirectoryLockedError: another process is preparing ``out_dir`` (the message names its PID).
        FileNotFoundError: a source file, glob or the given tokenizer is missing.
        ValueError: a corrupt or unreadable record, an unknown text field, an empty domain or a domain
            shorter than one sequence; the message names the domain, file and line.
    """
    if seq_len <= 0:
        raise ValueError(f"seq_len must be positive, got {seq_len}")
    out_dir = Path(data_cfg.prepared_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise NotADirectoryError(f"data.prepared_dir = {str(out_dir)!r} is a file, not a directory")
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with _exclusive(out_dir):
        existing = None if force else existing_manifest(out_dir)
        check_settings_kept(existing, data_cfg, out_dir)
        for directory in [out_dir, *(out_dir / d.name for d in data_cfg.domains)]:
            if directory.is_dir():
                remove_tmp_files(directory)
        fingerprints = {d.name: source_fingerprint(d) for d in data_cfg.domains}  # missing files fail here
        threads = num_threads(data_cfg.num_proc)
        tokenizer, tok_info = _load_tokenizer(
            data_cfg, out_dir, seed, fingerprints, threads, lambda sha: check_tokenizer_kept(existing, sha, out_dir)
        )
        with (
            ThreadPoolExecutor(threads, thread_name_prefix="tokenize") as pool,
            _tokenizers_parallelism(False),
        ):
            ctx = JobContext(
                data_cfg, out_dir, seed, tokenizer, tok_info, pool, threads, fingerprints, on_shard
            )
            jobs = [DomainJob(ctx, d) for d in data_cfg.domains]
            restored = [job.restore() for job in jobs]
            if not all(ok and job.done for ok, job in zip(restored, jobs, strict=True)):
                (out_dir / MANIFEST_NAME).unlink(missing_ok=True)  # a manifest only names complete shards
            status = {}
            for ok, job in zip(restored, jobs, strict=True):
                if not ok:
                    job.reset()  # deletes the domain's stale shards, now that no manifest names them
                resumed = f"resumed after {job.docs_consumed} documents" if ok else "prepared"
                status[job.domain.name] = "up to date" if job.done else resumed
            started_group = time.perf_counter()
            runner = (run_groups or run_groups_locally)(_grouped(jobs, lambda job: job.domain))
            with contextlib.closing(runner):  # a failed check stops the runner's reading at once
                for group in runner:
                    for job in group:
                        seconds = time.perf_counter() - started_group
                        _check_and_log(job, seq_len, status[job.domain.name], seconds)
                    started_group = time.perf_counter()
            entries = [job.entry() for job in jobs]
        manifest = {
            "format_version": FORMAT_VERSION,
            "seq_len": seq_len,
            "seed": seed,
            "dtype": ctx.dtype.str,
            "val_fraction": data_cfg.val_fraction,
            "val_max_tokens": data_cfg.val_max_tokens,
            "shard_tokens": data_cfg.shard_tokens,
            "tokenizer": tok_info,
            "domains": entries,
        }
        write_json(out_dir / MANIFEST_NAME, manifest)
    total = sum(e["splits"][s]["num_tokens"] for e in entries for s in SPLITS)
    elapsed = time.perf_counter() - started
    log.info("prepared %d domains, %d tokens in %s (%.1fs)", len(entries), total, out_dir, elapsed)
    return manifest


def run_groups_locally(groups: list[list[DomainJob]]) -> Iterator[list[DomainJob]]:
    """Prepare each group in this process (one pass over its source, threads encode); yield it when done."""
    for group in groups:
        run_jobs(group)
        yield group


def _grouped(items: list[T], domain_of: Callable[[T], DomainConfig]) -> list[list[T]]:
    """Items whose domains read one shared source (equal ``group_key``), in config order of the first."""
    groups: dict[Any, list[T]] = {}
    for i, item in enumerate(items):
        key = group_key(domain_of(item))
        groups.setdefault(key if key is not None else i, []).append(item)
    return list(groups.values())


def _check_and_log(job: DomainJob, seq_len: int, status: str, seconds: float) -> None:
    entry = job.entry()
    _check_length(entry, seq_len, job.ctx.data_cfg.val_fraction)
    train, val = (entry["splits"][s]["num_tokens"] for s in SPLITS)
    docs = entry["num_documents"]
    log.info(
        "%s: %s in %.1fs: %d docs (train %d / val %d), %.2f MB text -> %d train + %d val tokens "
        "(%.2f bytes/token), %d shards",
        job.domain.name, status, seconds, docs["train"] + docs["val"], docs["train"], docs["val"],
        entry["text_bytes"] / 1e6, train, val, entry["text_bytes"] / max(1, train + val),
        sum(len(entry["splits"][s]["shards"]) for s in SPLITS),
    )  # fmt: skip
