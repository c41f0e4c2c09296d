"""Helpers that build tiny prepared corpora in a temporary directory, for LM, env and driver tests.

Two kinds, both opened through the real ``envs.data.PreparedCorpus`` (same manifest and shard format
as ``acodm data prepare`` writes):

* ``make_synthetic_corpus``: per-domain token streams from distinct seeded Markov chains over a small
  word-level vocabulary. No tokenizer training, builds in milliseconds; the loss is learnable and
  differs by domain, which is all most unit tests need.
* ``make_real_text_corpus``: real text that every Python install carries (standard-library source,
  installed packages' licences and package descriptions) plus a junk domain of random tokens, encoded
  with a byte-level BPE trained on it (about a second). For learning tests and export round trips.

Usage from a test module (module-scoped so the corpus is built once)::

    @pytest.fixture(scope="module")
    def corpus(tmp_path_factory):
        return make_synthetic_corpus(tmp_path_factory.mktemp("corpus"))
"""

from __future__ import annotations

import hashlib
import json
import os
import sysconfig
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from envs.config import EvalConfig, LMConfig, OptimConfig, SamplerConfig
from envs.data import FORMAT_VERSION, MANIFEST_NAME, PreparedCorpus

EOS = "<|endoftext|>"


# --------------------------------------------------------------------------------------------- writing
def write_prepared_corpus(
    out_dir: Path,
    streams: dict[str, dict[str, np.ndarray]],
    tokenizer: Tokenizer,
    *,
    targets: Sequence[bool] | None = None,
    shard_tokens: int | None = None,
) -> PreparedCorpus:
    """Write ``streams[domain][split]`` token arrays as a prepared corpus and open it.

    Args:
        out_dir: directory to create (manifest, ``tokenizer.json``, shards).
        streams: per domain (in order) a ``{"train": ids, "val": ids}`` of token ids.
        tokenizer: saved as ``tokenizer.json``; must contain ``EOS``.
        targets: per-domain ``target`` flags (default all True).
        shard_tokens: split each stream into shards of this many tokens (exercises shard straddling).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(out_dir / "tokenizer.json"))
    vocab_size = tokenizer.get_vocab_size()
    eos_id = tokenizer.token_to_id(EOS)
    if eos_id is None:
        raise ValueError(f"tokenizer has no {EOS!r} token")
    dtype = np.dtype("<u2") if vocab_size <= 2**16 else np.dtype("<u4")
    targets = list(targets) if targets is not None else [True] * len(streams)
    domains = []
    for (name, splits), target in zip(streams.items(), targets, strict=True):
        entry = {"name": name, "target": bool(target), "splits": {}}
        for split in ("train", "val"):
            ids = np.asarray(splits[split]).astype(dtype)
            step = shard_tokens or max(1, ids.size)
            shards = []
            for s, start in enumerate(range(0, max(1, ids.size), step)):
                rel = f"{name}/{split}_{s:05d}.bin"
                path = out_dir / rel
                path.parent.mkdir(parents=True, exist_ok=True)
                chunk = ids[start : start + step]
                path.write_bytes(chunk.tobytes())
                shards.append({"file": rel, "num_tokens": int(chunk.size), "sha256": _sha256(path)})
            entry["splits"][split] = {"shards": shards, "num_tokens": int(ids.size)}
        domains.append(entry)
    manifest = {
        "format_version": FORMAT_VERSION,
        "dtype": dtype.str,
        "tokenizer": {"file": "tokenizer.json", "vocab_size": vocab_size, "eos_id": eos_id, "eos_token": EOS},
        "domains": domains,
    }
    (out_dir / MANIFEST_NAME).write_text(json.dumps(manifest, indent=1))
    return PreparedCorpus.open(out_dir, expected_domains=list(streams))


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --------------------------------------------------------------------------------------------- synthetic
def word_level_tokenizer(vocab_size: int) -> Tokenizer:
    """A whitespace word-level tokenizer over ``EOS`` (id 0) and ``w1 .. w{vocab_size-1}``."""
    vocab = {EOS: 0, **{f"w{i}": i for i in range(1, vocab_size)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=EOS))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return tok


def markov_stream(
    rng: np.random.Generator, vocab_size: int, num_tokens: int, branching: int = 3
) -> np.ndarray:
    """Tokens from a random order-1 Markov chain where each token has ``branching`` successors (ids >= 1)."""
    successors = rng.integers(1, vocab_size, size=(vocab_size, branching))
    out = np.empty(num_tokens, dtype=np.int64)
    out[0] = rng.integers(1, vocab_size)
    choice = rng.integers(0, branching, size=num_tokens)
    for i in range(1, num_tokens):
        out[i] = successors[out[i - 1], choice[i]]
    return out


def make_synthetic_corpus(
    out_dir: Path,
    *,
    domain_names: Sequence[str] = ("alpha", "beta", "gamma"),
    vocab_size: int = 96,
    train_tokens: int = 4096,
    val_tokens: int = 1024,
    seed: int = 0,
    targets: Sequence[bool] | None = None,
    shard_tokens: int | None = 1500,
) -> PreparedCorpus:
    """A prepared corpus of seeded Markov-chain domains (each with its own transition table)."""
    rng = np.random.default_rng(seed)
    streams = {}
    for name in domain_names:
        ids = markov_stream(rng, vocab_size, train_tokens + val_tokens)
        streams[name] = {"train": ids[:train_tokens], "val": ids[train_tokens:]}
    return write_prepared_corpus(
        out_dir, streams, word_level_tokenizer(vocab_size), targets=targets, shard_tokens=shard_tokens
    )


# --------------------------------------------------------------------------------------------- real text
def _read_capped(paths: Sequence[Path], max_bytes: int) -> list[str]:
    docs, total = [], 0
    for path in paths:
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if not text.strip():
            continue
        docs.append(text[: max_bytes - total])
        total += len(docs[-1])
        if total >= max_bytes:
            break
    return docs


def real_text_documents(max_bytes_per_domain: int = 150_000) -> dict[str, list[str]]:
    """Documents of three real-text domains found in every Python install, in a fixed order.

    ``code``: standard-library modules; ``licenses``: installed distributions' licence files;
    ``readmes``: installed distributions' METADATA (package descriptions).
    """
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    purelib = Path(sysconfig.get_paths()["purelib"])
    licences = sorted(purelib.glob("*.dist-info/licenses/*")) + sorted(purelib.glob("*.dist-info/LICENSE*"))
    docs = {
        "code": _read_capped(sorted(stdlib.glob("*.py")), max_bytes_per_domain),
        "licenses": _read_capped([p for p in licences if p.is_file()], max_bytes_per_domain),
        "readmes": _read_capped(sorted(purelib.glob("*.dist-info/METADATA")), max_bytes_per_domain),
    }
    empty = [name for name, d in docs.items() if not d]
    if empty:
        raise RuntimeError(f"no text found for domains {empty} under {stdlib} / {purelib}")
    return docs


def train_bpe(texts: Sequence[str], vocab_size: int) -> Tokenizer:
    """A byte-level BPE with ``EOS`` as a special token, trained deterministically on ``texts``."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def make_real_text_corpus(
    out_dir: Path,
    *,
    max_bytes_per_domain: int = 150_000,
    vocab_size: int = 512,
    val_fraction: float = 0.1,
    junk: bool = True,
    seed: int = 0,
) -> PreparedCorpus:
    """A prepared corpus of real text domains (see ``real_text_documents``) plus an optional junk domain.

    Each domain's documents are joined with EOS; the last ``val_fraction`` of the tokens is the
    validation split. ``junk`` (``target: false``) is uniform random tokens of the same length as the
    largest real domain.
    """
    docs = real_text_documents(max_bytes_per_domain)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    tokenizer = train_bpe([t for d in docs.values() for t in d], vocab_size)
    eos_id = tokenizer.token_to_id(EOS)
    streams: dict[str, dict[str, np.ndarray]] = {}
    for name, texts in docs.items():
        ids = np.concatenate(
            [np.array(e.ids + [eos_id], dtype=np.int64) for e in tokenizer.encode_batch(texts)]
        )
        cut = int(ids.size * (1 - val_fraction))
        streams[name] = {"train": ids[:cut], "val": ids[cut:]}
    targets = [True] * len(streams)
    if junk:
        size = max(s["train"].size + s["val"].size for s in streams.values())
        ids = np.random.default_rng(seed).integers(0, tokenizer.get_vocab_size(), size=size)
        cut = int(size * (1 - val_fraction))
        streams["junk"] = {"train": ids[:cut], "val": ids[cut:]}
        targets.append(False)
    return write_prepared_corpus(out_dir, streams, tokenizer, targets=targets)


# --------------------------------------------------------------------------------------------- configs
def tiny_configs(
    *,
    seq_len: int = 32,
    micro_batch_size: int = 2,
    grad_accum: int = 3,
    lr: float = 3e-3,
    eval_batches: int = 2,
    eval_batch_size: int = 4,
    **lm_overrides: object,
) -> tuple[LMConfig, OptimConfig, SamplerConfig, EvalConfig]:
    """Small, fast configs for CPU tests of the ``tiny`` preset (fp32, no compile)."""
    lm = LMConfig(preset="tiny", seq_len=seq_len, precision="fp32", **lm_overrides)
    optim = OptimConfig(lr=lr, warmup_fraction=0.1)
    sampler = SamplerConfig(micro_batch_size=micro_batch_size, grad_accum=grad_accum)
    evaluation = EvalConfig(max_batches=eval_batches, batch_size=eval_batch_size)
    return lm, optim, sampler, evaluation


# --------------------------------------------------------------------------------------------- DDP
def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _gloo_entry(rank: int, fn: Callable[..., None], world_size: int, port: int, args: tuple) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        fn(rank, world_size, *args)
        # Tear down together: a rank destroying the group while its peer still holds gloo work (DDP's
        # reducer) aborted the peer now and then ("terminate called without an active exception").
        dist.barrier()
    finally:
        import gc

        gc.collect()  # release the DDP module (and its reducer's references to the group) first
        dist.destroy_process_group()


def spawn_gloo(fn: Callable[..., None], world_size: int, *args: object) -> None:
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` spawned processes joined by a gloo group.

    ``fn`` must be a module-level function (it is pickled by reference); an exception in any rank
    is re-raised here. Results come back through files the workers write.
    """
    import torch.multiprocessing as mp

    mp.spawn(_gloo_entry, args=(fn, world_size, free_port(), args), nprocs=world_size, join=True)


# --------------------------------------------------------------------------------------------- observers
class RecordingObserver:
    """A ``StepObserver`` that records its calls and snapshots the gradients the optimizer will see."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.calls: list[tuple[Any, ...]] = []
        self.grads: dict[str, Any] = {}

    def begin_step(self) -> None:
        self.calls.append(("begin_step",))

    def begin_microbatch(self, domain: int) -> None:
        self.calls.append(("begin_microbatch", domain))

    def end_microbatch(self) -> None:
        self.calls.append(("end_microbatch",))

    def end_step(self, microbatches_K: np.ndarray) -> dict[str, np.ndarray]:
        self.calls.append(("end_step", np.asarray(microbatches_K).tolist()))
        self.grads = {
            n: p.grad.detach().clone() for n, p in self.model.named_parameters() if p.grad is not None
        }
        return {"gram_KK": np.eye(len(microbatches_K))}

    def after_update(self) -> dict[str, np.ndarray]:
        self.calls.append(("after_update",))
        return {"weight_norms_L": np.array([1.0, 2.0])}

    @property
    def domains(self) -> list[int]:
        """The domains announced by ``begin_microbatch``, in order."""
        return [c[1] for c in self.calls if c[0] == "begin_microbatch"]


def one_step_record(
    corpus: PreparedCorpus, weights_K: Sequence[float], *, grad_accum: int, seed: int, adam_eps: float = 1e-8
) -> dict:
    """Build a tiny Pretrainer, evaluate, run one step of ``weights_K``, evaluate; return what they measured."""
    from envs.pretrainer import Pretrainer

    lm, optim, sampler, evaluation = tiny_configs(grad_accum=grad_accum, eval_batches=3, eval_batch_size=2)
    optim = OptimConfig(**{**optim.model_dump(), "eps": adam_eps})
    pt = Pretrainer(lm, optim, sampler, evaluation, corpus, total_steps=10, seed=seed, device="cpu")
    observer = RecordingObserver(pt.model)
    pt.set_observer(observer)
    params_before = {n: p.detach().clone() for n, p in pt.model.named_parameters()}
    eval_before = pt.evaluate()
    sig = pt.train_step(weights_K)
    return {
        "world_size": pt.world_size,
        "ddp": pt.ddp_module is not None,
        "signals": sig,
        "observed_domains": observer.domains,
        "end_counts": [c[1] for c in observer.calls if c[0] == "end_step"][0],
        "grads": observer.grads,
        "params_before": params_before,
        "params": {n: p.detach().clone() for n, p in pt.model.named_parameters()},
        "eval_before": eval_before,
        "eval_after": pt.evaluate(),
    }


def one_step_worker(
    rank: int, world_size: int, corpus_dir: str, weights_K: list[float], kwargs: dict[str, Any], out_dir: str
) -> None:
    """``spawn_gloo`` target: ``one_step_record(corpus, weights_K, **kwargs)`` saved to ``<out_dir>/rank<r>.pt``."""
    import torch

    record = one_step_record(PreparedCorpus.open(corpus_dir), weights_K, **kwargs)
    torch.save(record, Path(out_dir) / f"rank{rank}.pt")
