"""Read a prepared corpus: ``manifest.json`` plus per-domain token shards written by ``envs.prepare``.

Dimension legend: K = domains, n = sequences read at once, T = seq_len + 1 tokens per sequence.

A domain's split (``train`` or ``val``) is one token stream (documents joined by EOS) cut into shard
files of raw little-endian ``uint16``/``uint32`` tokens. Sequence ``i`` of a split is tokens
``[i * seq_len, i * seq_len + seq_len + 1)`` of that stream, so consecutive sequences overlap by one
token (the last label of one is the first input of the next) and a sequence may straddle two shards.
Shards are opened lazily as read-only ``np.memmap``; a read copies only the pages it touches, so many
processes (Ray Train workers, several runs) can share one prepared directory on a local disk or a
shared filesystem without loading it into memory.

Clusters: prepare once (one process, e.g. on the head node) into a directory on a filesystem every node
mounts (NFS, Lustre, GPFS, a FUSE-mounted bucket) and point ``data.prepared_dir`` there; workers only
open files read-only and the page cache of each node keeps the hot shards. ``open`` checks what is cheap
at any scale (the manifest's schema and counts, shard sizes, the tokenizer's sha256) and reads no shard;
``verify()`` re-hashes shards, all of them or a random sample (``envs.integrity`` says which when, and
why). A copy to node-local
disk (``rsync`` of the directory) is byte-identical and equally valid, since the manifest names files
relative to the directory.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from envs.integrity import VerifyReport, content_id, sha256_file, validate_manifest, verify_shards

__all__ = ["FORMAT_VERSION", "MANIFEST_NAME", "SPLITS", "PreparedCorpus", "sha256_file"]

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
SPLITS = ("train", "val")


@dataclass(frozen=True)
class _SplitShards:
    """The shards of one domain split: their files, where each starts in the stream, and the total."""

    paths: tuple[Path, ...]
    starts: np.ndarray  # int64 [num_shards], token offset of each shard in the split stream
    num_tokens: int


class PreparedCorpus:
    """A prepared corpus on disk: domain names, tokenizer facts, token counts and sequence reads.

    Open it with ``PreparedCorpus.open(prepared_dir, expected_domains=cfg.data.domain_names)``; the check
    of ``expected_domains`` stops a run whose config lists other domains (or another order) than the
    prepared data, since domain index ``i`` must mean the same domain in weights, counts and heads.
    Instances pickle without their memmaps (they reopen lazily), so they can be shipped to Ray workers.
    """

    def __init__(self, prepared_dir: Path, manifest: dict[str, Any], manifest_hash: str) -> None:
        self.prepared_dir = prepared_dir
        self.manifest = manifest
        self.manifest_hash = manifest_hash
        tok = manifest["tokenizer"]
        self.vocab_size: int = int(tok["vocab_size"])
        self.eos_id: int = int(tok["eos_id"])
        self.tokenizer_path: Path = prepared_dir / tok["file"]
        self.dtype = np.dtype(manifest["dtype"])
        self.domain_names: list[str] = [d["name"] for d in manifest["domains"]]
        self.targets: list[bool] = [bool(d["target"]) for d in manifest["domains"]]
        self._index = {name: i for i, name in enumerate(self.domain_names)}
        self._splits: dict[tuple[int, str], _SplitShards] = {}
        for k, entry in enumerate(manifest["domains"]):
            for split in SPLITS:
                shards = entry["splits"][split]["shards"]
                counts = np.array([s["num_tokens"] for s in shards], dtype=np.int64)
                starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
                paths = tuple(prepared_dir / s["file"] for s in shards)
                self._splits[(k, split)] = _SplitShards(paths, starts, int(counts.sum()))
        self._memmaps: dict[Path, np.ndarray] = {}

    # ------------------------------------------------------------------ opening
    @classmethod
    def open(
        cls, prepared_dir: str | Path, *, expected_domains: Sequence[str] | None = None
    ) -> PreparedCorpus:
        """Open ``prepared_dir`` and check that its shards exist with the sizes the manifest states.

        Args:
            prepared_dir: the directory ``acodm data prepare`` wrote (holds ``manifest.json``).
            expected_domains: domain names in config order; when given they must equal the manifest's.

        Raises:
            FileNotFoundError: no manifest, or a shard or the tokenizer is missing.
            ValueError: unknown format version, a shard of the wrong size, or the domains differ.
        """
        prepared_dir = Path(prepared_dir)
        manifest_path = prepared_dir / MANIFEST_NAME
        if not manifest_path.is_file():
            raise FileNotFoundError(
                f"{manifest_path} not found: prepare the corpus first with `acodm data prepare CONFIG`"
            )
        raw = manifest_path.read_bytes()
        try:
            manifest = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(
                f"{manifest_path} is not valid JSON ({exc}): it is truncated or was edited; re-run "
                "`acodm data prepare` for this directory"
            ) from None
        version = manifest.get("format_version") if isinstance(manifest, dict) else None
        if version != FORMAT_VERSION:
            raise ValueError(
                f"{manifest_path}: format_version {version!r} is not supported (expected {FORMAT_VERSION}); "
                "re-run `acodm data prepare`"
            )
        validate_manifest(manifest, str(manifest_path))
        names = [d["name"] for d in manifest["domains"]]
        if expected_domains is not None and list(expected_domains) != names:
            raise ValueError(
                f"{manifest_path}: the prepared domains {names} differ from the configured domains "
                f"{list(expected_domains)} (names and order must match); re-run `acodm data prepare` "
                "or point data.prepared_dir at the matching preparation"
            )
        corpus = cls(prepared_dir, manifest, hashlib.sha256(raw).hexdigest())
        corpus._check_files()
        return corpus

    def _check_files(self) -> None:
        if not self.tokenizer_path.is_file():
            raise FileNotFoundError(f"tokenizer {self.tokenizer_path} named by the manifest is missing")
        expected_sha = self.manifest["tokenizer"].get("sha256")
        if expected_sha is not None and sha256_file(self.tokenizer_path) != expected_sha:
            raise ValueError(
                f"tokenizer {self.tokenizer_path} does not match tokenizer.sha256 in "
                f"{self.prepared_dir / MANIFEST_NAME}: it was replaced or edited after preparation, so the "
                "shards' token ids may mean other tokens; re-run `acodm data prepare` for this directory"
            )
        for entry in self.manifest["domains"]:
            for split in SPLITS:
                for shard in entry["splits"][split]["shards"]:
                    path = self.prepared_dir / shard["file"]
                    if not path.is_file():
                        raise FileNotFoundError(
                            f"shard {path} of domain {entry['name']!r} ({split}) is missing"
                        )
                    expected = int(shard["num_tokens"]) * self.dtype.itemsize
                    if path.stat().st_size != expected:
                        raise ValueError(
                            f"shard {path} has {path.stat().st_size} bytes, the manifest expects {expected}; "
                            "re-run `acodm data prepare` to repair it"
                        )

    def verify(self, max_bytes: int | None = None, *, seed: int | None = None) -> VerifyReport:
        """Recompute shard sha256s and compare with the manifest: every shard, or a random sample.

        Args:
            max_bytes: None = every shard (slow: reads the whole corpus); else all shards when they total at
                most this, otherwise a random sample of whole shards up to it (``envs.integrity``).
            seed: seeds the sample (None = a fresh draw each call).

        Returns:
            What was checked (``mode`` is ``"full"`` or ``"sampled"``).

        Raises:
            ValueError: naming every checked shard whose content differs.
        """
        return verify_shards(self, max_bytes=max_bytes, seed=seed)

    @property
    def content_id(self) -> str:
        """A hash of the data a run reads (tokenizer, shard names, sizes and sha256s); see ``envs.integrity``."""
        return content_id(self.manifest)

    # ------------------------------------------------------------------ facts
    @property
    def num_domains(self) -> int:
        """K."""
        return len(self.domain_names)

    def domain_index(self, domain: int | str) -> int:
        """The index of a domain given by name or index (validated)."""
        if isinstance(domain, str):
            if domain not in self._index:
                raise KeyError(f"unknown domain {domain!r}; the corpus has {self.domain_names}")
            return self._index[domain]
        k = int(domain)
        if not 0 <= k < self.num_domains:
            raise IndexError(f"domain index {k} out of range [0, {self.num_domains})")
        return k

    def _split(self, domain: int | str, split: str) -> tuple[int, _SplitShards]:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        k = self.domain_index(domain)
        return k, self._splits[(k, split)]

    def num_tokens(self, domain: int | str, split: str) -> int:
        """Tokens in a domain's split stream (EOS included)."""
        return self._split(domain, split)[1].num_tokens

    def num_sequences(self, domain: int | str, split: str, seq_len: int) -> int:
        """Sequences of ``seq_len + 1`` tokens (stride ``seq_len``) in a split: ``(num_tokens - 1) // seq_len``."""
        if seq_len <= 0:
            raise ValueError(f"seq_len must be positive, got {seq_len}")
        return max(0, (self.num_tokens(domain, split) - 1) // seq_len)

    def natural_weights(self, split: str = "train") -> np.ndarray:
        """Token-proportional weights_K over domains (the 'natural' mixture of the corpus)."""
        tokens_K = np.array([self.num_tokens(k, split) for k in range(self.num_domains)], dtype=np.float64)
        return tokens_K / tokens_K.sum()

    def tokenizer(self) -> Any:
        """The ``tokenizers.Tokenizer`` the shards were encoded with."""
        from tokenizers import Tokenizer

        return Tokenizer.from_file(str(self.tokenizer_path))

    # ------------------------------------------------------------------ reading
    def _memmap(self, path: Path) -> np.ndarray:
        """A read-only plain-ndarray view of a mapped shard (the view keeps the mapping alive; plain
        ndarrays index about twice as fast as ``np.memmap`` objects, which wrap every result)."""
        tokens = self._memmaps.get(path)
        if tokens is None:
            tokens = np.memmap(path, dtype=self.dtype, mode="r").view(np.ndarray)
            self._memmaps[path] = tokens
        return tokens

    def read_tokens(self, domain: int | str, split: str, start: int, length: int) -> np.ndarray:
        """Tokens ``[start, start + length)`` of a split stream as int64, gathered across shard files."""
        _, shards = self._split(domain, split)
        if start < 0 or length < 0 or start + length > shards.num_tokens:
            raise IndexError(
                f"tokens [{start}, {start + length}) outside the split's {shards.num_tokens} tokens"
            )
        out = np.empty(length, dtype=np.int64)
        s = int(np.searchsorted(shards.starts, start, side="right")) - 1
        pos = 0
        while pos < length:
            mm = self._memmap(shards.paths[s])
            local = start + pos - int(shards.starts[s])
            take = min(length - pos, mm.shape[0] - local)
            out[pos : pos + take] = mm[local : local + take]
            pos += take
            s += 1
        return out

    def read_sequences(
        self, domain: int | str, split: str, seq_idx: Sequence[int] | np.ndarray, seq_len: int
    ) -> np.ndarray:
        """Sequences ``seq_idx`` of a split as an int64 array [n, seq_len + 1]; inputs ``[:, :-1]``, labels ``[:, 1:]``.

        Raises:
            IndexError: an index outside ``[0, num_sequences)``, naming the domain and split.
        """
        k, shards = self._split(domain, split)
        idx_n = np.asarray(seq_idx, dtype=np.int64).reshape(-1)
        num = self.num_sequences(k, split, seq_len)
        if idx_n.size and (idx_n.min() < 0 or idx_n.max() >= num):
            bad = idx_n[(idx_n < 0) | (idx_n >= num)][0]
            raise IndexError(
                f"sequence index {bad} out of range for domain {self.domain_names[k]!r} ({split}): "
                f"{num} sequences of seq_len {seq_len}"
            )
        span = seq_len + 1
        start_n = idx_n * seq_len
        offsets_T = np.arange(span, dtype=np.int64)
        out_nT = np.empty((idx_n.size, span), dtype=np.int64)
        if len(shards.paths) == 1:  # the common case: one shard holds the whole split
            out_nT[:] = self._memmap(shards.paths[0])[start_n[:, None] + offsets_T]
            return out_nT
        first_n = np.searchsorted(shards.starts, start_n, side="right") - 1
        last_n = np.searchsorted(shards.starts, start_n + seq_len, side="right") - 1
        within_n = first_n == last_n
        for s in np.unique(first_n[within_n]):
            rows = np.flatnonzero(within_n & (first_n == s))
            local_n = start_n[rows] - shards.starts[s]
            out_nT[rows] = self._memmap(shards.paths[s])[local_n[:, None] + offsets_T]
        for row in np.flatnonzero(~within_n):  # straddles a shard boundary: gather piecewise
            out_nT[row] = self.read_tokens(k, split, int(start_n[row]), span)
        return out_nT

    # ------------------------------------------------------------------ pickling (Ray)
    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_memmaps"] = {}  # never pickle mapped data; each process maps the files itself
        return state

    def __repr__(self) -> str:
        return f"PreparedCorpus({str(self.prepared_dir)!r}, domains={self.domain_names}, vocab={self.vocab_size})"
