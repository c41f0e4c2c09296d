"""The offline demo corpus: six domains of real text plus junk, deterministic, preparable, junk hardest."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from envs.config import DataConfig
from envs.corpus import DEMO_DOMAINS, _junk_docs, _spread_select, build_demo_corpus
from envs.data import PreparedCorpus
from envs.prepare import prepare_corpus

REPO = Path(__file__).resolve().parents[2]
CAP = 400_000


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("demo") / "raw"
    return out, build_demo_corpus(out, max_bytes_per_domain=CAP)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_demo_config_names_the_demo_domains():
    cfg = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
    domains = cfg["data"]["domains"]
    assert tuple(d["name"] for d in domains) == DEMO_DOMAINS
    assert [d["name"] for d in domains if d.get("target", True) is False] == ["junk"]
    assert [d["source"]["paths"] for d in domains] == [[f"data/demo/raw/{n}.jsonl"] for n in DEMO_DOMAINS]


def test_spread_select_stays_under_the_cap_and_spans_the_list():
    sizes = [((i * 37) % 100) + 1 for i in range(1000)]
    kept = _spread_select(sizes, 5_000)
    assert sum(sizes[i] for i in kept) <= 5_000
    assert sum(sizes[i] for i in kept) > 4_000
    assert kept[0] < 50 and kept[-1] > 950  # spread over the whole order, not a prefix
    assert _spread_select([3, 4], 100) == [0, 1]


def test_junk_is_seeded_uniform_words_and_noise():
    words = [f"w{i}" for i in range(50)]
    docs = _junk_docs(words, 20_000)
    assert docs == _junk_docs(words, 20_000)
    assert sum(len(t) for _, t in docs) == 20_000
    tokens = " ".join(t for _, t in docs).split()
    share = np.mean([t in words for t in tokens])
    assert 0.93 < share < 0.97  # 95% words, 5% random printable strings
    counts = np.array([tokens.count(w) for w in words])
    assert counts.min() > 0.6 * counts.mean()  # uniform over the word list


@pytest.mark.slow
def test_build_writes_six_domains_deterministically(demo):
    out, summary = demo
    assert tuple(summary["domains"]) == DEMO_DOMAINS
    for name, info in summary["domains"].items():
        rows = read_jsonl(out / f"{name}.jsonl")
        assert rows and all(set(r) == {"text", "source"} and r["text"].strip() for r in rows)
        assert info["documents"] == len(rows) and 0 < info["bytes"] <= CAP
        assert info["bytes"] == sum(len(r["text"].encode()) for r in rows)
    sources = {n: [r["source"] for r in read_jsonl(out / f"{n}.jsonl")] for n in DEMO_DOMAINS}
    assert not any("/test" in s or "test_" in s.rsplit("/", 1)[-1] for s in sources["code"])
    code_modules = {
        s.removeprefix("stdlib:").removesuffix(".py").removesuffix("/__init__") for s in sources["code"]
    }
    assert not code_modules & {s.removeprefix("docstrings:") for s in sources["docstrings"]}
    assert "license:python" in sources["licenses"]
    assert not any("acodm" in s for s in sources["readmes"])
    assert json.loads((out / "corpus.json").read_text()) == summary

    mtimes = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    again = build_demo_corpus(out, max_bytes_per_domain=CAP)
    assert again == summary
    # same sha256 per file, and identical files are not even rewritten (prepare then sees nothing new)
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == mtimes


@pytest.mark.slow
def test_demo_prepares_and_junk_has_the_highest_entropy(demo, tmp_path):
    out, _ = demo
    cfg = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())["data"]
    for d in cfg["domains"]:
        d["source"]["paths"] = [str(out / f"{d['name']}.jsonl")]
    cfg |= {"prepared_dir": str(tmp_path / "prep"), "tokenizer": {"vocab_size": 2048}}
    prepare_corpus(DataConfig(**cfg), seq_len=128, seed=0)
    corpus = PreparedCorpus.open(tmp_path / "prep", expected_domains=list(DEMO_DOMAINS))
    entropy = {}
    for name in DEMO_DOMAINS:
        tokens = corpus.read_tokens(name, "train", 0, corpus.num_tokens(name, "train"))
        p = np.bincount(tokens, minlength=corpus.vocab_size) / tokens.size
        entropy[name] = float(-(p[p > 0] * np.log(p[p > 0])).sum())
        assert corpus.num_sequences(name, "val", 128) >= 1
    # unigram entropy: what a model that learnt only token frequencies would pay; junk has no more to learn
    assert max(entropy, key=entropy.get) == "junk", entropy
