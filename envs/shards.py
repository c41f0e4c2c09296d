"""Resumable, atomic writing of one domain's token shards (used by ``envs.prepare``).

A ``DomainJob`` reads a domain's documents in order, encodes them in a thread pool (the ``tokenizers``
encoder releases the GIL, so threads scale across cores without copying text between processes),
routes each document to the train or validation stream (``ValSelector``), and cuts each stream into
shards of exactly ``shard_tokens`` tokens. After every shard it checkpoints ``progress.json`` (shards
with sha256, documents consumed, the tokens carried into the next shard), so an interrupted run resumes
after the last finished shard and writes byte-identical files.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import sys
import zlib
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from envs.config import DataConfig, DomainConfig
from envs.data import FORMAT_VERSION, SPLITS, sha256_file
from envs.text_sources import empty_domain_error, iter_routed_documents

log = logging.getLogger(__name__)

PROGRESS_NAME = "progress.json"
_CHUNK_BYTES = 1 << 18  # text per encode call: amortises the call, small enough to balance threads
_CHUNK_DOCS = 1024
ShardHook = Callable[[str, str, int], None]


# ---------------------------------------------------------------------------------------------- files
def atomic_write_bytes(path: Path, data: bytes | memoryview) -> None:
    """Write ``data`` to ``path`` via a fsynced temporary file and ``os.replace`` (never half-written)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json(path: Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON atomically; an identical file is left untouched (keeps its mtime)."""
    data = (json.dumps(obj, indent=1) + "\n").encode()
    if not (path.is_file() and path.read_bytes() == data):
        atomic_write_bytes(path, data)


def read_json(path: Path) -> dict[str, Any] | None:
    """The JSON object in ``path``, or None if the file is missing or not JSON (e.g. never finished)."""
    try:
        return json.loads(path.read_bytes())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def sha_json(obj: Any) -> str:
    """A stable hash of a JSON-serialisable object (sorted keys)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def remove_tmp_files(directory: Path) -> None:
    """Delete temporary files of ``atomic_write_bytes`` left in ``directory`` by a killed run."""
    for path in directory.glob(".*.tmp-*"):  # left by a killed run; we hold the lock, so none is live
        path.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------- split
class ValSelector:
    """Which documents of a domain are held out: systematic sampling with a seeded start.

    Document ``i`` goes to validation when ``[i f + u, (i + 1) f + u)`` contains an integer, with
    ``f = val_fraction`` and ``u`` in [0, 1) drawn from ``default_rng([seed, crc32(domain name)])``. So
    ``floor(n f + u)`` of the first ``n`` documents are held out, one every ``1/f`` documents, evenly
    spread (no clumps, no domain without validation once it has ``1/f`` documents), and the choice
    needs no document count up front, which streaming sources cannot give.
    """

    def __init__(self, val_fraction: float, seed: int, domain_name: str) -> None:
        self.val_fraction = val_fraction
        self.start = float(np.random.default_rng([seed, zlib.crc32(domain_name.encode())]).random())

    def is_val(self, doc_index: int) -> bool:
        """True if document ``doc_index`` (0-based, in reading order) belongs to the validation split."""
        f, u = self.val_fraction, self.start
        return math.floor((doc_index + 1) * f + u) > math.floor(doc_index * f + u)


def encode_chunk(
    tokenizer: Any, texts: list[str], eos_id: int, dtype: np.dtype
) -> tuple[list[np.ndarray], int]:
    """Token ids of each text with EOS appended, and the chunk's UTF-8 bytes (runs in a worker thread)."""
    encodings = tokenizer.encode_batch_fast(texts, add_special_tokens=False)
    ids = [np.array([*enc.ids, eos_id], dtype=dtype) for enc in encodings]
    return ids, sum(len(t.encode("utf-8")) for t in texts)


# ---------------------------------------------------------------------------------------------- shards
class _SplitWriter:
    """Cuts one split's token stream into shards of exactly ``shard_tokens`` (the last may be shorter)."""

    def __init__(self, ddir: Path, domain: str, split: str, dtype: np.dtype, shard_tokens: int) -> None:
        self.ddir, self.domain, self.split = ddir, domain, split
        self.dtype, self.shard_tokens = dtype, shard_tokens
        self.shards: list[dict[str, Any]] = []
        self.pending: list[np.ndarray] = []
        self.pending_tokens = 0

    @property
    def total_tokens(self) -> int:
        return sum(s["num_tokens"] for s in self.shards) + self.pending_tokens

    def append(self, ids: np.ndarray) -> None:
        self.pending.append(ids)
        self.pending_tokens += len(ids)

    def carry(self) -> np.ndarray:
        """The tokens not yet in a shard, as one array."""
        if len(self.pending) != 1:
            self.pending = [np.concatenate(self.pending) if self.pending else np.empty(0, self.dtype)]
        return self.pending[0]

    def commit(self, final: bool = False) -> int:
        """Write every full shard (and, if ``final``, the remainder); returns how many were written."""
        written = 0
        while self.pending_tokens >= self.shard_tokens or (final and self.pending_tokens > 0):
            stream = self.carry()
            shard, rest = stream[: self.shard_tokens], stream[self.shard_tokens :]
            name = f"{self.split}_{len(self.shards):05d}.bin"
            atomic_write_bytes(self.ddir / name, shard.tobytes())
            self.shards.append(
                {
                    "file": f"{self.domain}/{name}",
                    "num_tokens": int(len(shard)),
                    "sha256": hashlib.sha256(shard.tobytes()).hexdigest(),
                }
            )
            self.pending, self.pending_tokens = [rest], len(rest)
            written += 1
        return written


@dataclass
class JobContext:
    """What every domain job shares: paths, config, tokenizer and the encoding thread pool."""

    data_cfg: DataConfig
    out_dir: Path
    seed: int
    tokenizer: Any  # tokenizers.Tokenizer
    tok_info: dict[str, Any]  # the manifest's "tokenizer" record (sha256, vocab_size, eos_id, ...)
    pool: ThreadPoolExecutor
    threads: int
    fingerprints: dict[str, list[dict[str, Any]]]
    on_shard: ShardHook | None = None

    @property
    def eos_id(self) -> int:
        return int(self.tok_info["eos_id"])

    @property
    def dtype(self) -> np.dtype:
        """Little-endian uint16 when every id fits (vocab <= 65536), else uint32 (the same on any machine)."""
        return np.dtype("<u2" if self.tok_info["vocab_size"] <= 1 << 16 else "<u4")


class DomainJob:
    """Tokenizes one domain into shards, checkpointing after every shard so a re-run resumes there."""

    def __init__(self, ctx: JobContext, domain: DomainConfig) -> None:
        self.ctx, self.domain = ctx, domain
        self.ddir = ctx.out_dir / domain.name
        cfg = ctx.data_cfg
        self.key = sha_json(
            {
                "format_version": FORMAT_VERSION,
                "name": domain.name,
                "source": domain.source.model_dump(mode="json"),
                "fingerprints": ctx.fingerprints[domain.name],
                "tokenizer_sha256": ctx.tok_info["sha256"],
                "eos_id": ctx.eos_id,
                "dtype": ctx.dtype.str,
                "seed": ctx.seed,
                "split": [cfg.val_fraction, cfg.val_max_tokens, cfg.shard_tokens],
            }
        )
        self.selector = ValSelector(cfg.val_fraction, ctx.seed, domain.name)
        self.reset(remove_files=False)

    def reset(self, remove_files: bool = True) -> None:
        """Forget all progress (and delete this domain's shards and state when ``remove_files``)."""
        if remove_files:
            self.ddir.mkdir(parents=True, exist_ok=True)
            for pattern in ("train_*.bin", "val_*.bin", "carry_*.bin", PROGRESS_NAME):
                for path in self.ddir.glob(pattern):
                    path.unlink()
        cfg = self.ctx.data_cfg
        self.writers = {
            s: _SplitWriter(self.ddir, self.domain.name, s, self.ctx.dtype, cfg.shard_tokens) for s in SPLITS
        }
        self.docs_consumed, self.text_bytes, self.done = 0, 0, False
        self.num_documents = dict.fromkeys(SPLITS, 0)

    def restore(self) -> bool:
        """Load ``progress.json`` if it belongs to this exact input and its files verify; else False."""
        progress = read_json(self.ddir / PROGRESS_NAME)
        if not progress or progress.get("key") != self.key:
            return False
        carries: dict[str, np.ndarray] = {}
        for split in SPLITS:
            record = progress["splits"][split]
            for shard in record["shards"]:
                path = self.ctx.out_dir / shard["file"]
                if not (path.is_file() and sha256_file(path) == shard["sha256"]):
                    log.warning(
                        "%s: %s is missing or changed; preparing the domain again", self.domain.name, path
                    )
                    return False
            carry = record.get("carry")
            if carry:
                data = (
                    (self.ddir / carry["file"]).read_bytes() if (self.ddir / carry["file"]).is_file() else b""
                )
                if hashlib.sha256(data).hexdigest() != carry["sha256"]:
                    log.warning(
                        "%s: resume state %s is missing or changed; starting over", self.domain.name, carry
                    )
                    return False
                carries[split] = np.frombuffer(data, dtype=self.ctx.dtype)
        for split, writer in self.writers.items():
            writer.shards = list(progress["splits"][split]["shards"])
            if split in carries:
                writer.append(carries[split])
        self.docs_consumed, self.text_bytes = progress["docs_consumed"], progress["text_bytes"]
        self.num_documents, self.done = dict(progress["num_documents"]), bool(progress["done"])
        return True

    def start(self) -> None:
        """Begin feeding documents (after ``restore``/``reset``); the first ``docs_consumed`` are skipped."""
        self._chunk: list[str] = []
        self._chunk_chars = 0
        self._pending: deque[Future[tuple[list[np.ndarray], int]]] = deque()

    def feed(self, text: str) -> None:
        """Queue the next document for encoding; full chunks go to the thread pool, results are absorbed in order."""
        self._chunk.append(text)
        self._chunk_chars += len(text)
        if self._chunk_chars >= _CHUNK_BYTES or len(self._chunk) >= _CHUNK_DOCS:
            self._submit()

    def _submit(self) -> None:
        ctx = self.ctx
        self._pending.append(ctx.pool.submit(encode_chunk, ctx.tokenizer, self._chunk, ctx.eos_id, ctx.dtype))
        self._chunk, self._chunk_chars = [], 0
        if len(self._pending) >= 2 * ctx.threads:  # keep every thread busy while the reader runs ahead
            self.absorb(*self._pending.popleft().result())

    def finish(self) -> None:
        """Encode what is left, write the last (short) shards and mark the domain done."""
        if self._chunk:
            self._submit()
        while self._pending:
            self.absorb(*self._pending.popleft().result())
        if self.docs_consumed == 0:
            raise empty_domain_error(self.domain)
        before = {s: len(w.shards) for s, w in self.writers.items()}
        for writer in self.writers.values():
            writer.commit(final=True)
        self.done = True
        self._checkpoint()
        self._notify(before)

    def absorb(self, ids_list: list[np.ndarray], num_bytes: int) -> None:
        """Route the next encoded documents (EOS appended, reading order) to train/val; write full shards.

        ``num_bytes`` is their UTF-8 text size. Also the entry point for documents encoded elsewhere
        (``ray_jobs.data`` encodes with Ray Data): call ``start`` first and ``finish`` after the last.
        """
        before = {s: len(w.shards) for s, w in self.writers.items()}
        val, cap = self.writers["val"], self.ctx.data_cfg.val_max_tokens
        for ids in ids_list:
            if self.selector.is_val(self.docs_consumed) and val.total_tokens < cap:
                val.append(ids[: cap - val.total_tokens])  # the val stream is cut at val_max_tokens
                self.num_documents["val"] += 1
            else:
                self.writers["train"].append(ids)
                self.num_documents["train"] += 1
            self.docs_consumed += 1
        self.text_bytes += num_bytes
        if sum(w.commit() for w in self.writers.values()):
            self._checkpoint()
            self._notify(before)

    def _notify(self, before: dict[str, int]) -> None:
        if self.ctx.on_shard is None:
            return
        for split, writer in self.writers.items():
            for index in range(before[split], len(writer.shards)):
                self.ctx.on_shard(self.domain.name, split, index)

    def _checkpoint(self) -> None:
        """Persist resume state: carried tokens first, then ``progress.json`` (atomic), then old carries go."""
        keep = set()
        splits: dict[str, Any] = {}
        for split, writer in self.writers.items():
            splits[split] = {"shards": writer.shards}
            if not self.done and writer.pending_tokens:
                carry = writer.carry()
                name = f"carry_{split}_{self.docs_consumed}.bin"
                atomic_write_bytes(self.ddir / name, carry.tobytes())
                splits[split]["carry"] = {"file": name, "sha256": hashlib.sha256(carry.tobytes()).hexdigest()}
                keep.add(name)
        progress = {"key": self.key, "done": self.done, "docs_consumed": self.docs_consumed,
                    "text_bytes": self.text_bytes, "num_documents": self.num_documents, "splits": splits}  # fmt: skip
        write_json(self.ddir / PROGRESS_NAME, progress)
        for path in self.ddir.glob("carry_*.bin"):
            if path.name not in keep:
                path.unlink()

    def entry(self) -> dict[str, Any]:
        """This domain's record in ``manifest.json``."""
        return {
            "name": self.domain.name,
            "target": self.domain.target,
            "sources": self.ctx.fingerprints[self.domain.name],
            "num_documents": dict(self.num_documents),
            "text_bytes": self.text_bytes,
            "splits": {
                s: {"num_tokens": w.total_tokens, "shards": list(w.shards)} for s, w in self.writers.items()
            },
        }


def run_jobs(jobs: list[DomainJob]) -> None:
    """Prepare the unfinished ``jobs`` in one pass over the source they share (``group_key``).

    A single job reads its own source; several (e.g. The Pile split by ``meta.pile_set_name``) read the
    shared source once, each resuming after the documents it had already consumed.
    """
    from tqdm import tqdm

    active = [job for job in jobs if not job.done]
    if not active:
        return
    skip = [job.docs_consumed for job in active]
    for job in active:
        job.start()
    names = ", ".join(job.domain.name for job in active)
    with tqdm(desc=f"prepare {names}", unit="doc", disable=not sys.stderr.isatty(), leave=False) as bar:
        for i, text in iter_routed_documents([job.domain for job in active]):
            if skip[i]:  # consumed before an interruption: already in shards or carried tokens
                skip[i] -= 1
                continue
            active[i].feed(text)
            bar.update()
    for job in active:
        job.finish()
