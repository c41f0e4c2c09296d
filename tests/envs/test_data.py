"""PreparedCorpus: sequences equal slices of the split stream (across shards), checks and errors."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest

from envs.config import DataConfig
from envs.data import PreparedCorpus
from envs.prepare import prepare_corpus

SEQ_LEN = 12
WORDS = (
    "mixing data tokens shards domains loss reward critic actor policy weights gradient the of and".split()
)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    """Two domains with small shards (250 tokens, not a multiple of SEQ_LEN) so sequences straddle files."""
    root = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    domains = []
    for name, n in [("big", 90), ("small", 40)]:
        path = root / f"{name}.jsonl"
        docs = [" ".join(rng.choice(WORDS, size=int(rng.integers(8, 50)))) for _ in range(n)]
        path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
        domains.append({"name": name, "source": {"paths": [str(path)]}})
    cfg = DataConfig(domains=domains, prepared_dir=str(root / "prep"), tokenizer={"vocab_size": 280},
                     shard_tokens=250, num_proc=1)  # fmt: skip
    prepare_corpus(cfg, seq_len=SEQ_LEN, seed=0)
    return root / "prep"


def stream(prep: Path, domain: str, split: str) -> np.ndarray:
    manifest = json.loads((prep / "manifest.json").read_text())
    entry = next(d for d in manifest["domains"] if d["name"] == domain)
    return np.concatenate(
        [np.fromfile(prep / s["file"], dtype=np.uint16) for s in entry["splits"][split]["shards"]]
    )


def test_open_reports_facts_of_the_manifest(prepared):
    corpus = PreparedCorpus.open(prepared, expected_domains=["big", "small"])
    manifest = json.loads((prepared / "manifest.json").read_text())
    assert corpus.domain_names == ["big", "small"] and corpus.num_domains == 2
    assert corpus.vocab_size == manifest["tokenizer"]["vocab_size"] <= 280
    assert corpus.tokenizer().token_to_id("<|endoftext|>") == corpus.eos_id
    assert corpus.targets == [True, True]
    for k, name in enumerate(corpus.domain_names):
        for split in ("train", "val"):
            n = stream(prepared, name, split).size
            assert corpus.num_tokens(name, split) == corpus.num_tokens(k, split) == n
            assert corpus.num_sequences(k, split, SEQ_LEN) == (n - 1) // SEQ_LEN
    weights_K = corpus.natural_weights()
    tokens_K = np.array([corpus.num_tokens(k, "train") for k in range(2)])
    np.testing.assert_allclose(weights_K, tokens_K / tokens_K.sum())
    assert len(corpus.manifest_hash) == 64


def test_read_sequences_equals_stream_slices_across_shards(prepared):
    corpus = PreparedCorpus.open(prepared)
    for name in corpus.domain_names:
        for split in ("train", "val"):
            tokens = stream(prepared, name, split)
            n = corpus.num_sequences(name, split, SEQ_LEN)
            idx = np.arange(n)[::-1]  # every sequence, out of order, many straddling a shard boundary
            got_nT = corpus.read_sequences(name, split, idx, SEQ_LEN)
            assert got_nT.dtype == np.int64 and got_nT.shape == (n, SEQ_LEN + 1)
            want_nT = np.stack([tokens[i * SEQ_LEN : i * SEQ_LEN + SEQ_LEN + 1] for i in idx])
            np.testing.assert_array_equal(got_nT, want_nT)
    straddling = [
        i
        for i in range(corpus.num_sequences("big", "train", SEQ_LEN))
        if i * SEQ_LEN // 250 != (i * SEQ_LEN + SEQ_LEN) // 250
    ]
    assert straddling  # the fixture really exercises the cross-shard path
    assert corpus.read_sequences("big", "train", [], SEQ_LEN).shape == (0, SEQ_LEN + 1)


def test_bad_reads_are_rejected_with_the_domain(prepared):
    corpus = PreparedCorpus.open(prepared)
    n = corpus.num_sequences("small", "val", SEQ_LEN)
    with pytest.raises(
        IndexError, match=rf"sequence index {n} out of range for domain 'small' \(val\): {n} sequences"
    ):
        corpus.read_sequences(1, "val", [0, n], SEQ_LEN)
    with pytest.raises(IndexError, match="sequence index -1 out of range"):
        corpus.read_sequences(1, "val", [-1], SEQ_LEN)
    with pytest.raises(KeyError, match=r"unknown domain 'code'; the corpus has \['big', 'small'\]"):
        corpus.num_tokens("code", "train")
    with pytest.raises(ValueError, match=r"split must be one of \('train', 'val'\), got 'test'"):
        corpus.num_tokens(0, "test")
    with pytest.raises(IndexError, match=r"domain index 2 out of range \[0, 2\)"):
        corpus.num_tokens(2, "train")


def test_domain_mismatch_names_both_lists(prepared):
    with pytest.raises(ValueError, match=r"the prepared domains \['big', 'small'\] differ from the configured "
                       r"domains \['small', 'big'\]"):  # fmt: skip
        PreparedCorpus.open(prepared, expected_domains=["small", "big"])
    with pytest.raises(ValueError, match=r"differ from the configured domains \['big'\]"):
        PreparedCorpus.open(prepared, expected_domains=["big"])


def test_open_checks_files(prepared, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"manifest.json not found: prepare the corpus first"):
        PreparedCorpus.open(tmp_path)
    copy = tmp_path / "copy"
    for path in prepared.rglob("*"):
        if path.is_file():
            (copy / path.relative_to(prepared)).parent.mkdir(parents=True, exist_ok=True)
            (copy / path.relative_to(prepared)).write_bytes(path.read_bytes())
    shard = copy / "big" / "train_00001.bin"
    data = bytearray(shard.read_bytes())
    data[0] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"train_00001.bin does not match the sha256 in the manifest"):
        PreparedCorpus.open(copy).verify()
    shard.write_bytes(bytes(data[:-2]))
    with pytest.raises(ValueError, match=r"train_00001.bin has \d+ bytes, the manifest expects \d+"):
        PreparedCorpus.open(copy)
    shard.unlink()
    with pytest.raises(
        FileNotFoundError, match=r"shard .*train_00001.bin of domain 'big' \(train\) is missing"
    ):
        PreparedCorpus.open(copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    (copy / "manifest.json").write_text(json.dumps({**manifest, "format_version": 99}))
    with pytest.raises(ValueError, match=r"format_version 99 is not supported \(expected 1\)"):
        PreparedCorpus.open(copy)


def test_pickles_without_mapped_data(prepared):
    corpus = PreparedCorpus.open(prepared)
    first = corpus.read_sequences(0, "train", [0, 5], SEQ_LEN)
    blob = pickle.dumps(corpus)
    assert len(blob) < 50_000  # the shards are not in the pickle
    clone = pickle.loads(blob)
    np.testing.assert_array_equal(clone.read_sequences(0, "train", [0, 5], SEQ_LEN), first)
