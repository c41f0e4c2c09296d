"""``acodm data prepare --ray``: tokenize with Ray Data into the same shards and manifest as ``envs.prepare``.

Pipeline (one Ray Data execution for every unfinished domain, in config order):

1. **Tokenizer, on the driver**, exactly as the local path (``envs.prepare.prepare_corpus`` trains or
   copies it; training a BPE takes seconds, and it must exist before any document is encoded).
2. **Read**: ``ray.data.read_datasource`` over ``DocumentDatasource``, one read task per source file
   (a domain's glob over 100 files reads in 100 tasks), each calling the project's own reader
   (``envs.text_sources.iter_routed_documents``) on that one file. So every format the local path reads
   (jsonl, jsonl.zst, parquet, txt, dotted fields, ``filter_column`` routing of a shared source) reads
   the same here, with the same ``file:line`` errors. Ray Data's ``read_json``/``read_parquet``/
   ``read_text`` were not used: they parse with Arrow into per-block schemas rather than ``json.loads``
   per line, have no "a txt file is one document", dotted-field, empty-text or filter routing rules, and
   name no line in their errors, so neither the documents nor the errors would be the local path's. A Hugging Face source, or a group with ``max_documents``
   (which stops reading once every domain is full), is read in one task, in order, as locally.
3. **Encode**: ``map_batches`` with ``Encoder``, a callable class, so each actor of the pool builds the
   ``tokenizers`` fast tokenizer once (from the JSON text shipped with the task, so remote nodes need no
   copy of ``tokenizer.json``) and encodes whole blocks with ``envs.shards.encode_chunk``, the local
   path's own encoder (EOS after each document, the manifest's dtype). ``data.num_proc`` actors
   (0 = autoscale up to every CPU of the cluster). Ray Data fuses the read into this operator
   (``ReadDocument->MapBatches(Encoder)``), so each actor reads a file and encodes it, with no copy of
   the text through the object store.
4. **Write, on the driver**: ``preserve_order`` keeps the blocks in reading order, and the ordered token
   ids feed the local path's ``DomainJob`` (train/val split, shard cutting, ``progress.json`` checkpoints
   and resume, atomic writes, then ``manifest.json``). Shards cut a domain's token stream at fixed
   offsets, so writing them is sequential by nature; it is disk-bound and cheap next to encoding.

The result is byte-identical to ``prepare_corpus`` (shards, ``progress.json``, ``tokenizer.json`` and
``manifest.json``; ``tests/ray_jobs/test_data_ray.py`` checks it): the manifest records no "how", since
anything that differs between the two paths would break that identity. A directory begun by one path can
be finished by the other. Errors come in reading order: a read error is raised when the stream reaches
it, after every earlier domain was written and checked, as the local path raises it.

On a multi-node cluster the source files must be readable at the same path from every node (a shared
filesystem), and ``data.prepared_dir`` is written by the driver. Relative source paths are made absolute
against the driver's working directory, so error messages from this path name absolute paths.
"""

from __future__ import annotations

import contextlib
import functools
import glob
import itertools
import logging
import os
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray
from ray.data import Datasource, ReadTask
from ray.data.block import BlockMetadata

from envs.config import DomainConfig
from envs.prepare import TOKENIZER_NAME, prepare_corpus
from envs.shards import DomainJob, ShardHook, encode_chunk
from envs.text_sources import iter_routed_documents, resolve_files
from ray_jobs.cluster import connect
from ray_jobs.config import ExperimentConfig

__all__ = [
    "DocumentDatasource",
    "Encoder",
    "ReadPart",
    "encoder_pool",
    "prepare_with_ray",
    "run_groups_with_ray",
]

log = logging.getLogger(__name__)

_BLOCK_CHARS = 1 << 20  # text per block: enough to amortise a task round trip, small enough to balance
_BLOCK_DOCS = 1024
# Reader errors travel as rows (so they surface in reading order) and are raised again on the driver.
_ERRORS: dict[str, type[Exception]] = {
    c.__name__: c
    for c in (ValueError, OSError, FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)
}
_READ_SCHEMA = pa.schema(
    [("group", pa.int32()), ("domain", pa.int32()), ("text", pa.large_string()), ("error", pa.string())]
)


def prepare_with_ray(cfg: ExperimentConfig, *, on_shard: ShardHook | None = None, force: bool = False) -> dict:
    """Prepare ``cfg.data`` like ``envs.prepare.prepare_corpus``, encoding through Ray Data.

    Uses the Ray that ``ray_jobs.cluster.connect`` gives (an initialised one, ``ray.address`` /
    ``RAY_ADDRESS``, or a local Ray on 127.0.0.1).

    Args:
        cfg: the experiment config (``data``, ``lm.seq_len``, ``seed`` and ``ray.address`` are used).
        on_shard: called as ``on_shard(domain, split, shard_index)`` after each shard is durable (tests).
        force: replace a corpus with other domains or another tokenizer (as ``prepare_corpus``).

    Returns:
        The manifest, also written to ``<data.prepared_dir>/manifest.json``; byte-identical to the local path's.

    Raises:
        ConnectionError: ``ray.address`` is unreachable.
        ValueError: ``data.num_proc`` is more than the cluster's CPUs.
        FileNotFoundError, ValueError: as ``prepare_corpus`` (missing files, corrupt records, short domains),
            with the same messages.
    """
    with connect(cfg) as address:
        pool = encoder_pool(cfg.data.num_proc)  # fails before any work if the cluster is too small
        log.info("preparing %s with Ray Data on %s", cfg.data.prepared_dir, address or "a local Ray")
        runner = functools.partial(run_groups_with_ray, pool=pool)
        return prepare_corpus(
            cfg.data, seq_len=cfg.lm.seq_len, seed=cfg.seed, on_shard=on_shard, run_groups=runner, force=force
        )


# ---------------------------------------------------------------------------------------------- driver
def run_groups_with_ray(
    groups: list[list[DomainJob]], *, pool: ray.data.ActorPoolStrategy
) -> Iterator[list[DomainJob]]:
    """The ``run_groups`` of ``prepare_corpus`` on Ray Data: one ordered pass over every unfinished group.

    ``pool`` runs the encoder actors (``encoder_pool``). Each group is yielded (for its length check) once the stream has moved past it;
    a job resumed from ``progress.json`` drops its first ``docs_consumed`` documents again, as
    ``envs.shards.run_jobs`` does.
    """
    active = [[job for job in group if not job.done] for group in groups]
    skip = [[job.docs_consumed for job in jobs] for jobs in active]
    for job in itertools.chain.from_iterable(active):
        job.start()
    finished = 0

    def finish_before(end: int) -> Iterator[list[DomainJob]]:
        nonlocal finished
        while finished < end:
            for job in active[finished]:
                job.finish()
            yield groups[finished]
            finished += 1

    for g, rows in _encoded_runs(active, pool):
        yield from finish_before(g)
        _absorb_rows(active[g], skip[g], rows)
    yield from finish_before(len(groups))


def _absorb_rows(jobs: list[DomainJob], skip: list[int], rows: pa.Table) -> None:
    """Hand a run of encoded rows of one group to its jobs, in order; raise a reader error where it occurs."""
    domains = rows.column("domain").to_numpy()
    errors = rows.column("error").to_pylist()
    blobs = rows.column("ids").to_pylist()
    num_bytes = rows.column("num_bytes").to_numpy()
    ids_lists: list[list[np.ndarray]] = [[] for _ in jobs]
    sizes = [0] * len(jobs)
    for r, i in enumerate(domains):
        if errors[r] is not None:
            raise _ERRORS[errors[r]](rows.column("message")[r].as_py())
        if skip[i]:  # consumed before an interruption: already in shards or carried tokens
            skip[i] -= 1
            continue
        ids_lists[i].append(np.frombuffer(blobs[r], dtype=jobs[i].ctx.dtype))
        sizes[i] += int(num_bytes[r])
    for job, ids_list, size in zip(jobs, ids_lists, sizes, strict=True):
        if ids_list:
            job.absorb(ids_list, size)


def _encoded_runs(
    active: list[list[DomainJob]], pool: ray.data.ActorPoolStrategy
) -> Iterator[tuple[int, pa.Table]]:
    """Encoded rows in reading order, as ``(group index, rows of that group)`` runs."""
    parts = [
        part for g, jobs in enumerate(active) if jobs for part in read_parts(g, [job.domain for job in jobs])
    ]
    if not parts:
        return
    ctx = next(job for jobs in active for job in jobs).ctx
    with _ordered_data_context():
        ds = ray.data.read_datasource(DocumentDatasource(parts), override_num_blocks=len(parts))
        ds = ds.map_batches(
            Encoder,
            fn_constructor_kwargs={
                "tokenizer_json": (ctx.out_dir / TOKENIZER_NAME).read_text(encoding="utf-8"),
                "eos_id": ctx.eos_id,
                "dtype": ctx.dtype.str,
            },
            batch_size=None,  # one read block per call
            batch_format="pyarrow",
            compute=pool,
            num_cpus=1,
        )
        log.info("reading %d parts, encoding with %d-%d actors", len(parts), pool.min_size, pool.max_size)
        for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            if batch.num_rows == 0:
                continue
            group = batch.column("group").to_numpy()
            cuts = [0, *(np.flatnonzero(np.diff(group)) + 1).tolist(), len(group)]
            for start, stop in itertools.pairwise(cuts):
                yield int(group[start]), batch.slice(start, stop - start)


def encoder_pool(num_encoders: int) -> ray.data.ActorPoolStrategy:
    """``num_encoders`` actors of one CPU; 0 = autoscale from 1 up to every CPU of the cluster.

    Raises:
        ValueError: more actors than the cluster has CPUs (Ray would wait for them forever).
    """
    num_cpus = int(ray.cluster_resources().get("CPU", 0))
    if num_encoders > num_cpus:
        raise ValueError(
            f"data.num_proc={num_encoders} asks for {num_encoders} encoder actors of 1 CPU each, but the Ray "
            f"cluster has {num_cpus} CPUs; lower data.num_proc or set it to 0 (every CPU of the cluster)"
        )
    if num_encoders > 0:
        return ray.data.ActorPoolStrategy(size=num_encoders)
    return ray.data.ActorPoolStrategy(min_size=1, max_size=max(1, num_cpus))


@contextlib.contextmanager
def _ordered_data_context() -> Iterator[None]:
    """Ray Data keeps blocks in reading order (and shows progress bars on a terminal only) for the block."""
    ctx = ray.data.DataContext.get_current()
    saved = ctx.execution_options.preserve_order, ctx.enable_progress_bars
    ctx.execution_options.preserve_order = True
    ctx.enable_progress_bars = sys.stderr.isatty()
    try:
        yield
    finally:
        ctx.execution_options.preserve_order, ctx.enable_progress_bars = saved


# ---------------------------------------------------------------------------------------------- read
@dataclass(frozen=True)
class ReadPart:
    """What one read task reads: the active domains of group ``group``, narrowed to one file if possible."""

    group: int
    domains: tuple[DomainConfig, ...]
    size_bytes: int | None = None


def read_parts(group: int, domains: list[DomainConfig]) -> list[ReadPart]:
    """The read tasks of one group (domains sharing a source), in reading order.

    Local files are read one task per file: each file's documents are the same whichever task reads
    them, because routing and empty-text skipping are per record. A Hugging Face source has no files
    to split, and ``max_documents`` counts across files (and stops the pass), so those read in one task.
    """
    absolute = [_absolute_source(d) for d in domains]
    if absolute[0].source.kind == "hf" or any(d.source.max_documents is not None for d in domains):
        return [ReadPart(group, tuple(absolute))]
    parts = []
    for path, fmt in resolve_files(absolute[0]):
        update = {"paths": [glob.escape(str(path))], "format": fmt}  # exactly this file, even if named a[1]
        narrowed = tuple(
            d.model_copy(update={"source": d.source.model_copy(update=update)}) for d in absolute
        )
        parts.append(ReadPart(group, narrowed, path.stat().st_size))
    return parts


def _absolute_source(domain: DomainConfig) -> DomainConfig:
    """The domain with local paths made absolute (read tasks may run in another directory or node)."""
    src = domain.source

    def fix(path: str) -> str:
        return path if "://" in path or os.path.isabs(path) else os.path.abspath(path)

    if src.kind == "files":
        update: dict[str, Any] = {"paths": [fix(p) for p in src.paths]}
    else:
        update = {"hf_data_files": [fix(p) if glob.glob(p, recursive=True) else p for p in src.hf_data_files]}
        if src.hf_path and os.path.exists(src.hf_path):  # a local dataset directory or script
            update["hf_path"] = fix(src.hf_path)
    return domain.model_copy(update={"source": src.model_copy(update=update)})


class DocumentDatasource(Datasource):
    """A Ray Data source over ``ReadPart``s: one read task each, in the given order."""

    def __init__(self, parts: list[ReadPart]) -> None:
        super().__init__()
        self._parts = parts

    def estimate_inmemory_data_size(self) -> int | None:
        sizes = [part.size_bytes for part in self._parts]
        return None if None in sizes else sum(s or 0 for s in sizes)

    def get_read_tasks(
        self, parallelism: int, per_task_row_limit: int | None = None, data_context: Any = None
    ) -> list[ReadTask]:
        return [
            ReadTask(
                functools.partial(read_part_blocks, part),
                BlockMetadata(num_rows=None, size_bytes=part.size_bytes, input_files=None, exec_stats=None),
                schema=_READ_SCHEMA,
                per_task_row_limit=per_task_row_limit,
            )
            for part in self._parts
        ]


def read_part_blocks(part: ReadPart) -> Iterable[pa.Table]:
    """Blocks of ``(group, domain, text, error)`` rows; a reader error becomes a last row (runs in a task)."""
    domains: list[int] = []
    texts: list[str] = []
    chars = 0
    try:
        for i, text in iter_routed_documents(list(part.domains)):
            domains.append(i)
            texts.append(text)
            chars += len(text)
            if chars >= _BLOCK_CHARS or len(texts) >= _BLOCK_DOCS:
                yield _read_block(part.group, domains, texts)
                domains, texts, chars = [], [], 0
    except (ValueError, OSError) as exc:  # e.g. a corrupt line; raised again by the driver when it gets there
        kind = type(exc).__name__
        if kind not in _ERRORS:
            kind = "OSError" if isinstance(exc, OSError) else "ValueError"
        yield _read_block(part.group, [*domains, -1], [*texts, str(exc)], error=kind)
        return
    if texts:
        yield _read_block(part.group, domains, texts)


def _read_block(group: int, domains: list[int], texts: list[str], error: str | None = None) -> pa.Table:
    errors = [None] * len(texts)
    if error is not None:
        errors[-1] = error
    columns = [[group] * len(texts), domains, texts, errors]
    return pa.Table.from_arrays([pa.array(c, f.type) for c, f in zip(columns, _READ_SCHEMA, strict=True)],
                                schema=_READ_SCHEMA)  # fmt: skip


# ---------------------------------------------------------------------------------------------- encode
class Encoder:
    """``map_batches`` callable: token ids (EOS appended) of each document, as raw bytes in the shard dtype.

    Built once per actor of the pool. Error rows pass through with empty ids and their message.
    """

    def __init__(self, tokenizer_json: str, eos_id: int, dtype: str) -> None:
        from tokenizers import Tokenizer

        # One CPU per actor: Ray runs the actors in parallel, so no Rust thread pool inside each.
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
        self.tokenizer = Tokenizer.from_str(tokenizer_json)
        self.tokenizer.encode_special_tokens = True  # as envs.prepare: a literal EOS in a document is text
        self.eos_id, self.dtype = eos_id, np.dtype(dtype)

    def __call__(self, batch: pa.Table) -> pa.Table:
        texts = batch.column("text").to_pylist()
        errors = batch.column("error").to_pylist()
        documents = [t for t, e in zip(texts, errors, strict=True) if e is None]
        ids_list, _ = encode_chunk(self.tokenizer, documents, self.eos_id, self.dtype)
        encoded = iter(ids_list)
        blobs = [next(encoded).tobytes() if e is None else b"" for e in errors]
        messages = [t if e is not None else None for t, e in zip(texts, errors, strict=True)]
        return pa.table(
            {
                "group": batch.column("group"),
                "domain": batch.column("domain"),
                "ids": pa.array(blobs, pa.large_binary()),
                "num_bytes": pc.binary_length(batch.column("text")),  # UTF-8 bytes, as the local path counts
                "error": batch.column("error"),
                "message": pa.array(messages, pa.large_string()),
            }
        )
