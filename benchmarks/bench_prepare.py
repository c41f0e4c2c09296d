"""Preparation throughput on the demo corpus: tokens/s per core, encoding strategies, shard formats.

Usage (from the repository root)::

    .venv/bin/python benchmarks/bench_prepare.py                   # builds the demo corpus in a temp dir
    .venv/bin/python benchmarks/bench_prepare.py --corpus data/demo/raw --threads 1,2,4,8,16

Three tables, each against a baseline measured in the same run:

1. ``prepare_corpus`` end to end (read jsonl, encode, split, write shards + manifest) with the tokenizer
   given, for each ``data.num_proc``; speed-up over one thread and tokens/s per thread.
2. Encoding only, all demo documents, four ways to use the cores: one thread; our thread pool (the
   ``tokenizers`` encoder releases the GIL); the Rust thread pool of ``encode_batch``
   (``TOKENIZERS_PARALLELISM=true``); a process pool (spawned workers, warmed up before timing).
3. Shard format for training reads: raw ``.bin`` + ``np.memmap`` versus an Arrow IPC file opened with
   ``pyarrow.memory_map``: write time, open time and micro-batches of 16 random sequences read per second.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from envs.config import DataConfig  # noqa: E402
from envs.corpus import DEMO_DOMAINS, build_demo_corpus  # noqa: E402
from envs.data import PreparedCorpus  # noqa: E402
from envs.prepare import prepare_corpus  # noqa: E402
from envs.shards import _CHUNK_DOCS  # noqa: E402

SEQ_LEN = 128
_WORKER_TOKENIZER = None


def data_cfg(raw: Path, prepared: Path, num_proc: int, tokenizer: str | None) -> DataConfig:
    domains = [
        {"name": n, "target": n != "junk", "source": {"paths": [str(raw / f"{n}.jsonl")]}}
        for n in DEMO_DOMAINS
    ]
    tok = {"vocab_size": 8192} | ({"path": tokenizer} if tokenizer else {})
    return DataConfig(domains=domains, prepared_dir=str(prepared), num_proc=num_proc, tokenizer=tok)


def table(title: str, header: list[str], rows: list[list[str]]) -> None:
    print(f"\n### {title}\n")
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" for _ in header) + "|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


def bench_prepare(raw: Path, work: Path, threads: list[int], repeats: int) -> Path:
    started = time.perf_counter()
    manifest = prepare_corpus(data_cfg(raw, work / "trained", 0, None), seq_len=SEQ_LEN, seed=0)
    total = time.perf_counter() - started
    tokens = sum(d["splits"][s]["num_tokens"] for d in manifest["domains"] for s in ("train", "val"))
    text = sum(d["text_bytes"] for d in manifest["domains"])
    print(
        f"\nfirst preparation (trains the 8192-token BPE): {total:.2f}s, {tokens} tokens, {text / 1e6:.1f} MB"
    )
    tokenizer = str(work / "trained" / "tokenizer.json")
    rows, base = [], None
    for n in threads:
        best, best_cpu = float("inf"), float("inf")
        for _ in range(repeats):
            out = work / f"p{n}"
            shutil.rmtree(out, ignore_errors=True)
            started, started_cpu = time.perf_counter(), time.process_time()
            prepare_corpus(data_cfg(raw, out, n, tokenizer), seq_len=SEQ_LEN, seed=0)
            best = min(best, time.perf_counter() - started)
            best_cpu = min(best_cpu, time.process_time() - started_cpu)
        rate = tokens / best
        base = base or rate
        rows.append([str(n), f"{best:.2f}", f"{rate / 1e3:.0f}k", f"{rate / n / 1e3:.0f}k",
                     f"{tokens / best_cpu / 1e3:.0f}k", f"{rate / base:.2f}x"])  # fmt: skip
    # tokens per CPU-second is the per-core throughput even on a shared machine (wall time is not)
    table(f"prepare_corpus, tokenizer given (best of {repeats})",
          ["num_proc", "wall s", "tokens/s", "tokens/s per thread", "tokens per CPU-second", "vs 1 thread"],
          rows)  # fmt: skip
    return work / "trained"


def _init_worker(path: str) -> None:
    global _WORKER_TOKENIZER
    from tokenizers import Tokenizer

    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _WORKER_TOKENIZER = Tokenizer.from_file(path)


def _encode_in_worker(texts: list[str]) -> list[np.ndarray]:
    return [np.array(e.ids, dtype=np.uint16) for e in _WORKER_TOKENIZER.encode_batch_fast(texts)]


def bench_encoding(raw: Path, tokenizer_path: Path, threads: list[int]) -> None:
    from tokenizers import Tokenizer

    texts = [json.loads(line)["text"] for n in DEMO_DOMAINS for line in (raw / f"{n}.jsonl").open()]
    chunks = [texts[i : i + _CHUNK_DOCS // 16] for i in range(0, len(texts), _CHUNK_DOCS // 16)]
    tok = Tokenizer.from_file(str(tokenizer_path))

    def encode(chunk: list[str]) -> list[np.ndarray]:
        return [np.array(e.ids, dtype=np.uint16) for e in tok.encode_batch_fast(chunk)]

    def timed(fn) -> tuple[float, float, int]:
        started, started_cpu = time.perf_counter(), time.process_time()
        out = fn()
        seconds, cpu = time.perf_counter() - started, time.process_time() - started_cpu
        return seconds, cpu, sum(len(a) for part in out for a in part)

    results: list[tuple[str, float, float, int]] = []
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    results.append(("one thread", *timed(lambda: [encode(c) for c in chunks])))
    for n in [t for t in threads if t > 1]:
        with ThreadPoolExecutor(n) as pool:
            results.append((f"thread pool x{n}", *timed(lambda pool=pool: list(pool.map(encode, chunks)))))
    os.environ["TOKENIZERS_PARALLELISM"] = "true"
    results.append(("Rust pool (encode_batch, all cores)", *timed(lambda: [encode(c) for c in chunks])))
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    for n in [t for t in threads if t > 1]:
        ctx = get_context("spawn")
        with ProcessPoolExecutor(
            n, mp_context=ctx, initializer=_init_worker, initargs=(str(tokenizer_path),)
        ) as pool:
            list(pool.map(_encode_in_worker, [["warm up"]] * n))
            results.append(
                (f"process pool x{n}", *timed(lambda pool=pool: list(pool.map(_encode_in_worker, chunks))))
            )
    base = results[0][1]
    rows = [
        [name, f"{s:.2f}", f"{t / s / 1e3:.0f}k", "n/a (children)" if "process" in name else f"{t / cpu / 1e3:.0f}k",
         f"{base / s:.2f}x"]
        for name, s, cpu, t in results
    ]  # fmt: skip
    table(f"encoding only, {len(texts)} documents, {results[0][3]} tokens",
          ["strategy", "wall s", "tokens/s", "tokens per CPU-second", "vs one thread"], rows)  # fmt: skip


def bench_formats(prepared: Path, work: Path, reads: int) -> None:
    import pyarrow as pa

    corpus = PreparedCorpus.open(prepared)
    tokens = corpus.read_tokens("code", "train", 0, corpus.num_tokens("code", "train")).astype(np.uint16)
    n_seq = (tokens.size - 1) // SEQ_LEN
    rng = np.random.default_rng(0)
    batches = [rng.integers(0, n_seq, 16) for _ in range(reads)]
    span = np.arange(SEQ_LEN + 1)

    def write_bin() -> None:
        (work / "tokens.bin").write_bytes(tokens.tobytes())

    def write_arrow() -> None:
        table_ = pa.table({"tokens": pa.array(tokens)})
        with (
            pa.OSFile(str(work / "tokens.arrow"), "wb") as sink,
            pa.ipc.new_file(sink, table_.schema) as writer,
        ):
            writer.write_table(table_)

    def best_of_3(fn) -> float:  # the first call of each also pays one-off imports and allocator warm-up
        times = []
        for _ in range(3):
            started = time.perf_counter()
            fn()
            times.append(time.perf_counter() - started)
        return min(times)

    written_bin, written_arrow = best_of_3(write_bin), best_of_3(write_arrow)

    def read_bin() -> tuple[float, float]:
        started = time.perf_counter()
        mm = np.memmap(work / "tokens.bin", dtype=np.uint16, mode="r").view(np.ndarray)
        opened = time.perf_counter() - started
        started = time.perf_counter()
        for idx in batches:
            mm[(idx * SEQ_LEN)[:, None] + span].astype(np.int64)
        return opened, time.perf_counter() - started

    def read_arrow() -> tuple[float, float]:
        started = time.perf_counter()
        column = pa.ipc.open_file(pa.memory_map(str(work / "tokens.arrow"))).read_all().column("tokens")
        arr = column.chunk(0).to_numpy(zero_copy_only=True)
        opened = time.perf_counter() - started
        started = time.perf_counter()
        for idx in batches:
            arr[(idx * SEQ_LEN)[:, None] + span].astype(np.int64)
        return opened, time.perf_counter() - started

    def read_corpus() -> tuple[float, float]:
        started = time.perf_counter()
        c = PreparedCorpus.open(prepared)
        opened = time.perf_counter() - started
        started = time.perf_counter()
        for idx in batches:
            c.read_sequences("code", "train", idx, SEQ_LEN)
        return opened, time.perf_counter() - started

    rows = []
    for name, fn, written in [("raw .bin + np.memmap (ndarray view)", read_bin, written_bin), ("Arrow IPC + memory_map", read_arrow, written_arrow),
                              ("PreparedCorpus.read_sequences (.bin shards)", read_corpus, float("nan"))]:  # fmt: skip
        opened, seconds = min((fn() for _ in range(3)), key=lambda r: r[1])
        rows.append([name, f"{written * 1e3:.1f}", f"{opened * 1e3:.2f}", f"{reads / seconds:,.0f}"])
    table(f"shard format, code train stream ({tokens.size} tokens), micro-batches of 16 x {SEQ_LEN + 1} tokens",
          ["format", "write ms", "open ms", "micro-batches/s"], rows)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--corpus", type=Path, default=None, help="demo corpus dir (default: build one in a temp dir)"
    )
    parser.add_argument(
        "--threads", default=None, help="comma-separated num_proc values (default: 1,2,..,cores)"
    )
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--reads", type=int, default=2000, help="micro-batches per shard-format read test")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    cores = len(os.sched_getaffinity(0))
    threads = (
        [int(t) for t in args.threads.split(",")]
        if args.threads
        else sorted({1, *[2**i for i in range(1, 8) if 2**i <= cores], cores})
    )
    with tempfile.TemporaryDirectory(prefix="bench_prepare_") as tmp:
        work = Path(tmp)
        raw = args.corpus
        if raw is None:
            started = time.perf_counter()
            build_demo_corpus(work / "raw")
            print(f"built the demo corpus in {time.perf_counter() - started:.2f}s")
            raw = work / "raw"
        print(f"cores available: {cores}; python {sys.version.split()[0]}")
        prepared = bench_prepare(raw, work, threads, args.repeats)
        bench_encoding(raw, prepared / "tokenizer.json", threads)
        bench_formats(prepared, work, args.reads)


if __name__ == "__main__":
    main()
