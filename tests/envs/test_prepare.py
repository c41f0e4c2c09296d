"""Corpus preparation: shards match the manifest and the tokenizer, resume is exact, bad input is named."""

from __future__ import annotations

import fcntl
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard
from tokenizers import Tokenizer

import envs.text_sources as envs_text_sources
from envs.config import DataConfig
from envs.data import PreparedCorpus
from envs.prepare import ValSelector, prepare_corpus
from envs.text_sources import iter_documents

REPO = Path(__file__).resolve().parents[2]
WORDS = (
    "the of and data mixing token shard domain corpus model loss gradient weight step batch sequence "
    "agent critic actor reward policy python code text prose license readme junk alpha beta gamma"
).split()
SEQ_LEN = 16


def make_docs(n: int, seed: int, tag: str = "") -> list[str]:
    """``n`` deterministic pseudo-text documents of 10-60 words."""
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(10, 60)))) + f" {tag}{i}.\n" for i in range(n)]


def write_jsonl(path: Path, docs: list[str], field: str = "text") -> Path:
    path.write_text("".join(json.dumps({field: d, "meta": {"id": i}}) + "\n" for i, d in enumerate(docs)))
    return path


def make_cfg(tmp_path: Path, domains: list[dict], **kw) -> DataConfig:
    kw.setdefault("prepared_dir", str(tmp_path / "prep"))
    kw.setdefault("tokenizer", {"vocab_size": 300})
    kw.setdefault("shard_tokens", 400)
    kw.setdefault("val_fraction", 0.1)
    kw.setdefault("num_proc", 1)
    return DataConfig(domains=domains, **kw)


def files_domain(name: str, *paths: Path | str, target: bool = True, **source) -> dict:
    return {"name": name, "target": target, "source": {"paths": [str(p) for p in paths], **source}}


@pytest.fixture
def corpus_docs() -> dict[str, list[str]]:
    return {"a": make_docs(60, 1, "a"), "b": make_docs(80, 2, "b"), "c": make_docs(40, 3, "c")}


@pytest.fixture
def three_domains(tmp_path: Path, corpus_docs) -> list[dict]:
    raw = tmp_path / "raw"
    raw.mkdir()
    return [
        files_domain("a", write_jsonl(raw / "a.jsonl", corpus_docs["a"])),
        files_domain("b", write_jsonl(raw / "b.jsonl", corpus_docs["b"])),
        files_domain("c", write_jsonl(raw / "c.jsonl", corpus_docs["c"]), target=False),
    ]


def tree(directory: Path) -> dict[str, bytes]:
    """Every file under ``directory`` (but the lock) by relative path."""
    return {
        p.relative_to(directory).as_posix(): p.read_bytes()
        for p in sorted(directory.rglob("*"))
        if p.is_file() and p.name != ".prepare.lock"
    }


def assert_no_partial_shards(prep: Path) -> None:
    """No temporary file remains and every shard under a final name is complete (listed with its hash)."""
    assert not list(prep.rglob("*.tmp-*"))
    for shard in prep.rglob("*_0*.bin"):
        if shard.name.startswith("carry_"):
            continue
        progress = json.loads((shard.parent / "progress.json").read_text())
        listed = {s["file"]: s["sha256"] for sp in progress["splits"].values() for s in sp["shards"]}
        rel = shard.relative_to(prep).as_posix()
        # a shard may also be a just-written one not yet in progress.json; then it must still be whole
        if rel in listed:
            assert hashlib.sha256(shard.read_bytes()).hexdigest() == listed[rel]
        else:
            assert shard.stat().st_size == 400 * 2


# ------------------------------------------------------------------------------------------- contents
def test_manifest_counts_equal_shard_tokens(tmp_path, three_domains):
    manifest = prepare_corpus(make_cfg(tmp_path, three_domains), seq_len=SEQ_LEN, seed=0)
    prep = tmp_path / "prep"
    assert manifest == json.loads((prep / "manifest.json").read_text())
    assert [d["name"] for d in manifest["domains"]] == ["a", "b", "c"]
    assert manifest["dtype"] == "<u2" and manifest["seq_len"] == SEQ_LEN and manifest["seed"] == 0
    assert (
        manifest["tokenizer"]["sha256"] == hashlib.sha256((prep / "tokenizer.json").read_bytes()).hexdigest()
    )
    for entry in manifest["domains"]:
        for split in ("train", "val"):
            record = entry["splits"][split]
            sizes = [np.fromfile(prep / s["file"], dtype=np.uint16).size for s in record["shards"]]
            assert sizes == [s["num_tokens"] for s in record["shards"]]
            assert sum(sizes) == record["num_tokens"] > SEQ_LEN
            assert all(n == 400 for n in sizes[:-1]) and 0 < sizes[-1] <= 400
            for s in record["shards"]:
                assert hashlib.sha256((prep / s["file"]).read_bytes()).hexdigest() == s["sha256"]
        assert entry["sources"][0]["size"] == Path(entry["sources"][0]["path"]).stat().st_size


def test_streams_are_the_encoded_documents_joined_by_eos(tmp_path, three_domains, corpus_docs):
    manifest = prepare_corpus(make_cfg(tmp_path, three_domains), seq_len=SEQ_LEN, seed=0)
    corpus = PreparedCorpus.open(tmp_path / "prep")
    tok = Tokenizer.from_file(str(corpus.tokenizer_path))
    tok.encode_special_tokens = True
    for k, name in enumerate(corpus.domain_names):
        selector = ValSelector(0.1, 0, name)
        expected = {"train": [], "val": []}
        for i, doc in enumerate(corpus_docs[name]):
            expected["val" if selector.is_val(i) else "train"].extend([*tok.encode(doc).ids, corpus.eos_id])
        for split in ("train", "val"):
            got = corpus.read_tokens(k, split, 0, corpus.num_tokens(k, split))
            assert got.tolist() == expected[split]
        docs = manifest["domains"][k]["num_documents"]
        assert docs["val"] == sum(selector.is_val(i) for i in range(len(corpus_docs[name]))) >= 1
        assert docs["train"] + docs["val"] == len(corpus_docs[name])


def test_decode_encode_round_trips_every_document(tmp_path):
    docs = [
        "Hello, world!  Tabs\tand\r\nnewlines\n\n",
        "unicode: naïve café, ∑ αβγ, 日本語, emoji 🚀🎉, zero-width\u200bjoiner",
        "a literal <|endoftext|> inside a document stays text",
        "    leading spaces and trailing    ",
        "def f(x):\n    return x ** 2  # code\n",
    ] * 6
    raw = write_jsonl(tmp_path / "d.jsonl", docs)
    other = write_jsonl(tmp_path / "o.jsonl", make_docs(40, 5))
    cfg = make_cfg(tmp_path, [files_domain("d", raw), files_domain("o", other)], val_fraction=0.2)
    prepare_corpus(cfg, seq_len=8, seed=3)
    corpus = PreparedCorpus.open(tmp_path / "prep")
    tok = corpus.tokenizer()
    selector = ValSelector(0.2, 3, "d")
    expected = {"train": [d for i, d in enumerate(docs) if not selector.is_val(i)]}
    expected["val"] = [d for i, d in enumerate(docs) if selector.is_val(i)]
    for split in ("train", "val"):
        stream = corpus.read_tokens("d", split, 0, corpus.num_tokens("d", split)).tolist()
        cuts = [i for i, t in enumerate(stream) if t == corpus.eos_id]
        assert len(cuts) == len(expected[split]) and cuts[-1] == len(stream) - 1
        starts = [0] + [c + 1 for c in cuts[:-1]]
        decoded = [
            tok.decode(stream[a:b], skip_special_tokens=False) for a, b in zip(starts, cuts, strict=True)
        ]
        assert decoded == expected[split]


def test_val_split_is_systematic_seeded_and_capped(tmp_path):
    sel = ValSelector(0.1, 0, "x")
    picks = [i for i in range(1000) if sel.is_val(i)]
    assert (
        len(picks) == 100
        and picks[0] < 10
        and all(9 <= b - a <= 11 for a, b in zip(picks, picks[1:], strict=False))
    )
    assert picks == [i for i in range(1000) if ValSelector(0.1, 0, "x").is_val(i)]
    starts = {ValSelector(0.1, s, "x").start for s in range(5)} | {ValSelector(0.1, 0, "y").start}
    assert len(starts) == 6  # the seed and the domain both move the start

    docs = make_docs(100, 4)
    cfg = make_cfg(tmp_path, [files_domain("a", write_jsonl(tmp_path / "a.jsonl", docs)),
                              files_domain("b", write_jsonl(tmp_path / "b.jsonl", make_docs(50, 5)))],
                   val_fraction=0.3, val_max_tokens=60)  # fmt: skip
    manifest = prepare_corpus(cfg, seq_len=SEQ_LEN, seed=0)
    entry = manifest["domains"][0]
    assert entry["splits"]["val"]["num_tokens"] == 60  # the held-out stream is cut at the cap
    held = sum(ValSelector(0.3, 0, "a").is_val(i) for i in range(100))
    assert entry["num_documents"]["val"] < held  # later held-out documents went to training
    assert entry["num_documents"]["train"] + entry["num_documents"]["val"] == 100


def test_tokenizer_is_trained_on_target_domains_only(tmp_path):
    noise = ["zqxvjk " * 40 + f"{i}" for i in range(40)]

    def vocab(target: bool, sub: str) -> dict[str, int]:
        cfg = make_cfg(tmp_path, [files_domain("a", write_jsonl(tmp_path / "a.jsonl", make_docs(40, 1))),
                                  files_domain("n", write_jsonl(tmp_path / "n.jsonl", noise), target=target)],
                       prepared_dir=str(tmp_path / sub))  # fmt: skip
        prepare_corpus(cfg, seq_len=8, seed=0)
        return Tokenizer.from_file(str(tmp_path / sub / "tokenizer.json")).get_vocab()

    assert any("zqx" in t for t in vocab(True, "with"))
    assert not any("zqx" in t for t in vocab(False, "without"))


def test_given_tokenizer_gives_the_same_shards(tmp_path, three_domains):
    size = prepare_corpus(make_cfg(tmp_path, three_domains), seq_len=SEQ_LEN, seed=0)["tokenizer"]["vocab_size"]
    given = tmp_path / "given.json"
    given.write_bytes((tmp_path / "prep" / "tokenizer.json").read_bytes())
    cfg = make_cfg(tmp_path, three_domains, prepared_dir=str(tmp_path / "p2"),
                   tokenizer={"path": str(given), "vocab_size": size})  # fmt: skip
    manifest = prepare_corpus(cfg, seq_len=SEQ_LEN, seed=0)
    assert manifest["tokenizer"]["trained"] is False
    assert {k: v for k, v in tree(tmp_path / "prep").items() if k.endswith(".bin")} == {
        k: v for k, v in tree(tmp_path / "p2").items() if k.endswith(".bin")
    }
    bad = make_cfg(tmp_path, three_domains, prepared_dir=str(tmp_path / "p3"),
                   tokenizer={"path": str(given), "vocab_size": size, "eos_token": "<eos>"})  # fmt: skip
    with pytest.raises(ValueError, match=r"has no token '<eos>' \(data.tokenizer.eos_token\)"):
        prepare_corpus(bad, seq_len=SEQ_LEN, seed=0)


def test_file_formats_yield_the_same_documents(tmp_path):
    docs = make_docs(12, 9)
    write_jsonl(tmp_path / "x.jsonl", docs)
    with open(tmp_path / "x.jsonl.zst", "wb") as f:
        f.write(zstandard.ZstdCompressor().compress((tmp_path / "x.jsonl").read_bytes()))
    pq.write_table(pa.table({"text": docs, "n": list(range(12))}), tmp_path / "x.parquet", row_group_size=5)
    txt_dir = tmp_path / "txt"
    txt_dir.mkdir()
    for i, d in enumerate(docs):
        (txt_dir / f"{i:02d}.txt").write_text(d)
    cfg = make_cfg(tmp_path, [
        files_domain("jsonl", tmp_path / "x.jsonl"), files_domain("zst", tmp_path / "x.jsonl.zst"),
        files_domain("parquet", tmp_path / "x.parquet"), files_domain("txt", f"{txt_dir}/*.txt"),
        files_domain("cap", tmp_path / "x.jsonl", max_documents=5),
    ])  # fmt: skip
    got = {d.name: list(iter_documents(d)) for d in cfg.domains}
    assert got == {"jsonl": docs, "zst": docs, "parquet": docs, "txt": docs, "cap": docs[:5]}


# ------------------------------------------------------------------------------------------- HF path
def test_hf_parquet_split_by_pile_set_name(tmp_path):
    sets = ["Github", "ArXiv", "Wikipedia (en)"]
    rows = [(d, sets[i % 3]) for i, d in enumerate(make_docs(150, 11))]
    table = pa.table({
        "text": [t for t, _ in rows],
        "meta": pa.array([{"pile_set_name": s} for _, s in rows], type=pa.struct([("pile_set_name", pa.string())])),
    })  # fmt: skip
    pq.write_table(table, tmp_path / "pile.parquet", row_group_size=40)

    def hf(name: str, value: str) -> dict:
        return {"name": name, "source": {"kind": "hf", "hf_path": "parquet", "hf_data_files": [str(tmp_path / "pile.parquet")],
                                         "filter_column": "meta.pile_set_name", "filter_value": value}}  # fmt: skip

    cfg = make_cfg(tmp_path, [hf("github", "Github"), hf("arxiv", "ArXiv"), hf("wiki", "Wikipedia (en)")])
    manifest = prepare_corpus(cfg, seq_len=SEQ_LEN, seed=0)
    corpus = PreparedCorpus.open(tmp_path / "prep", expected_domains=["github", "arxiv", "wiki"])
    tok = corpus.tokenizer()
    for k, value in enumerate(sets):
        wanted = [t for t, s in rows if s == value]
        entry = manifest["domains"][k]
        assert entry["num_documents"]["train"] + entry["num_documents"]["val"] == len(wanted) == 50
        train = corpus.read_tokens(k, "train", 0, corpus.num_tokens(k, "train")).tolist()
        first_doc = tok.decode(train[: train.index(corpus.eos_id)], skip_special_tokens=False)
        assert first_doc in wanted
        assert entry["sources"][0]["data_files"][0]["path"] == str(tmp_path / "pile.parquet")

    bad = make_cfg(tmp_path, [hf("github", "Github"), {**hf("x", "ArXiv"), "source": {
        **hf("x", "ArXiv")["source"], "filter_column": "meta.set"}}], prepared_dir=str(tmp_path / "p2"))  # fmt: skip
    with pytest.raises(
        ValueError, match=r"domain 'x'.*row 1: no filter column 'meta.set'; fields seen: .*meta.pile_set_name"
    ):
        prepare_corpus(bad, seq_len=SEQ_LEN, seed=0)


# ------------------------------------------------------------------------------------------- resume
def test_rerun_skips_finished_work(tmp_path, three_domains, caplog):
    cfg = make_cfg(tmp_path, three_domains)
    prepare_corpus(cfg, seq_len=SEQ_LEN, seed=0)
    prep = tmp_path / "prep"
    # every file but the lock (which records its holder, envs.filelock) stays untouched
    mtimes = {p: p.stat().st_mtime_ns for p in prep.rglob("*") if p.is_file() and p.name != ".prepare.lock"}
    caplog.set_level("INFO", logger="envs.prepare")
    prepare_corpus(cfg, seq_len=SEQ_LEN, seed=0)
    assert {p: p.stat().st_mtime_ns for p in prep.rglob("*") if p.is_file() and p.name != ".prepare.lock"} == mtimes
    assert caplog.text.count("up to date") == 3

    # changing a non-target domain's file redoes that domain only (the tokenizer did not see it)
    write_jsonl(Path(three_domains[2]["source"]["paths"][0]), make_docs(30, 99, "c"))
    prepare_corpus(cfg, seq_len=SEQ_LEN, seed=0)
    changed = {p for p, t in mtimes.items() if p.exists() and p.stat().st_mtime_ns != t}
    assert changed and all(p.parent.name == "c" or p.name == "manifest.json" for p in changed)


def test_interrupted_run_resumes_to_identical_shards(tmp_path, three_domains, caplog):
    prepare_corpus(
        make_cfg(tmp_path, three_domains, prepared_dir=str(tmp_path / "ref")), seq_len=SEQ_LEN, seed=0
    )

    def boom(domain: str, split: str, index: int) -> None:
        if (domain, split, index) == ("b", "train", 1):
            raise KeyboardInterrupt

    cfg = make_cfg(tmp_path, three_domains, num_proc=2)
    with pytest.raises(KeyboardInterrupt):
        prepare_corpus(cfg, seq_len=SEQ_LEN, seed=0, on_shard=boom)
    prep = tmp_path / "prep"
    assert not (prep / "manifest.json").exists()
    assert list((prep / "b").glob("carry_*.bin"))  # resume state for the tokens not yet in a shard
    kept = (prep / "b" / "train_00000.bin").stat().st_mtime_ns
    caplog.set_level("INFO", logger="envs.prepare")
    prepare_corpus(cfg, seq_len=SEQ_LEN, seed=0)
    assert "b: resumed after" in caplog.text
    assert (prep / "b" / "train_00000.bin").stat().st_mtime_ns == kept  # not rewritten
    assert not list((prep / "b").glob("carry_*.bin"))
    assert tree(prep) == tree(tmp_path / "ref")


def test_killed_mid_write_then_rerun_gives_identical_shards(tmp_path, three_domains):
    prepare_corpus(
        make_cfg(tmp_path, three_domains, prepared_dir=str(tmp_path / "ref")), seq_len=SEQ_LEN, seed=0
    )
    cfg = make_cfg(tmp_path, three_domains)
    script = f"""
import os, signal, sys
sys.path.insert(0, {str(REPO)!r})
import envs.shards as S
from envs.config import DataConfig
original = S.atomic_write_bytes
def dying_write(path, data):
    if path.parent.name == "b" and path.name == "train_00002.bin":  # die halfway through writing a shard
        path.with_name(f".{{path.name}}.tmp-{{os.getpid()}}").write_bytes(bytes(data)[: len(data) // 2])
        os.kill(os.getpid(), signal.SIGKILL)
    original(path, data)
S.atomic_write_bytes = dying_write
from envs.prepare import prepare_corpus
prepare_corpus(DataConfig.model_validate_json({cfg.model_dump_json()!r}), seq_len={SEQ_LEN}, seed=0)
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr
    prep = tmp_path / "prep"
    assert list((prep / "b").glob(".train_00002.bin.tmp-*")) and not (prep / "b" / "train_00002.bin").exists()
    assert not (prep / "manifest.json").exists()
    prepare_corpus(cfg, seq_len=SEQ_LEN, seed=0)
    assert tree(prep) == tree(tmp_path / "ref")


def test_second_preparation_of_one_directory_is_refused(tmp_path, three_domains):
    cfg = make_cfg(tmp_path, three_domains)
    (tmp_path / "prep").mkdir()
    with open(tmp_path / "prep" / ".prepare.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        with pytest.raises(FileExistsError, match=r"prep \(acodm data prepare\) is in use by another process"):
            prepare_corpus(cfg, seq_len=SEQ_LEN, seed=0)


# ------------------------------------------------------------------------------------------- bad input
def _bad_jsonl(tmp_path: Path, lines: list[str]) -> Path:
    good = [json.dumps({"text": d}) for d in make_docs(300, 8)]  # enough for shards before the bad line
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(good + lines) + "\n")
    return path


@pytest.mark.parametrize(
    ("lines", "match"),
    [
        (['{"text": "unterminated'], r"domain 'b': .*bad.jsonl:301: corrupt JSON line \(Unterminated string"),
        (["[1, 2]"], r"domain 'b': .*bad.jsonl:301: expected a JSON object per line, got list"),
        (
            ['{"content": "x", "meta": {"id": 1}}'],
            r"domain 'b': .*bad.jsonl:301: no text field 'text' \(set source.text_field\); "
            r"fields seen: \['content', 'meta', 'meta.id'\]",
        ),
        (['{"text": 5}'], r"domain 'b': .*bad.jsonl:301: text field 'text' holds int, expected a string"),
    ],
    ids=["corrupt-json", "not-an-object", "unknown-field", "not-a-string"],
)
@pytest.mark.parametrize("target", [True, False], ids=["target", "non-target"])
def test_bad_jsonl_line_is_named_and_leaves_no_partial_shard(tmp_path, monkeypatch, lines, match, target):
    monkeypatch.setattr("envs.shards._CHUNK_DOCS", 16)  # encode small chunks, so shards exist before line 301
    a = write_jsonl(tmp_path / "a.jsonl", make_docs(40, 1))
    cfg = make_cfg(tmp_path, [files_domain("a", a), files_domain("b", _bad_jsonl(tmp_path, lines), target=target)],
                   tokenizer={"vocab_size": 300, "train_max_bytes_per_domain": 500_000})  # fmt: skip
    with pytest.raises(ValueError, match=match):
        prepare_corpus(cfg, seq_len=SEQ_LEN, seed=0)
    prep = tmp_path / "prep"
    assert not (prep / "manifest.json").exists()
    if not target:  # the tokenizer was trained, and b failed after writing some of its shards
        assert list((prep / "b").glob("train_*.bin"))
    assert_no_partial_shards(prep)


def test_missing_inputs_are_named(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", make_docs(40, 1))
    with pytest.raises(FileNotFoundError, match=r"domain 'b': file '.*nope.jsonl' not found"):
        prepare_corpus(make_cfg(tmp_path, [files_domain("a", a), files_domain("b", tmp_path / "nope.jsonl")]),
                       seq_len=SEQ_LEN, seed=0)  # fmt: skip
    with pytest.raises(FileNotFoundError, match=r"domain 'b': the glob '.*/\*.parquet' matches no file"):
        prepare_corpus(make_cfg(tmp_path, [files_domain("a", a), files_domain("b", f"{tmp_path}/*.parquet")]),
                       seq_len=SEQ_LEN, seed=0)  # fmt: skip
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match=r"domain 'b': cannot tell the format of .*x.csv"):
        prepare_corpus(make_cfg(tmp_path, [files_domain("a", a), files_domain("b", tmp_path / "x.csv")]),
                       seq_len=SEQ_LEN, seed=0)  # fmt: skip
    assert not list((tmp_path / "prep").rglob("*.bin"))  # inputs are checked before any work


@pytest.mark.parametrize("target", [True, False], ids=["target", "non-target"])
def test_empty_domain_is_named(tmp_path, target):
    a = write_jsonl(tmp_path / "a.jsonl", make_docs(40, 1))
    empty = write_jsonl(tmp_path / "e.jsonl", ["", "   \n", ""])
    cfg = make_cfg(tmp_path, [files_domain("a", a), files_domain("e", empty, target=target)])
    with pytest.raises(
        ValueError, match=r"domain 'e' is empty: files \['.*e.jsonl'\] gave no non-empty document"
    ):
        prepare_corpus(cfg, seq_len=SEQ_LEN, seed=0)
    assert not (tmp_path / "prep" / "manifest.json").exists()
    assert_no_partial_shards(tmp_path / "prep")


def test_domain_shorter_than_one_sequence_is_named(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", make_docs(40, 1))
    short = write_jsonl(tmp_path / "s.jsonl", ["tiny doc"] * 12)
    cfg = make_cfg(tmp_path, [files_domain("a", a), files_domain("s", short)])
    with pytest.raises(ValueError, match=r"domain 's' is shorter than one sequence: train has \d+ tokens "
                       r"\(10 documents\) and val \d+ tokens \(2 documents\); each split needs at least "
                       r"seq_len \+ 1 = 17 tokens"):  # fmt: skip
        prepare_corpus(cfg, seq_len=SEQ_LEN, seed=0)
    assert not (tmp_path / "prep" / "manifest.json").exists()
    assert_no_partial_shards(tmp_path / "prep")
    manifest = prepare_corpus(cfg, seq_len=2, seed=0)  # fine for shorter sequences, and reuses the shards
    assert manifest["seq_len"] == 2


# ------------------------------------------------------------------------------------------- shared source
def _pile_jsonl(path: Path, rows: list[tuple[str, str]]) -> Path:
    path.write_text("".join(json.dumps({"text": t, "meta": {"pile_set_name": s}}) + "\n" for t, s in rows))
    return path


def test_domains_sharing_a_source_are_read_in_one_pass(tmp_path, monkeypatch):
    sets = ["Github", "ArXiv", "Enron Emails"]
    rows = [(d, sets[i % 3]) for i, d in enumerate(make_docs(240, 12))]
    shared = _pile_jsonl(tmp_path / "pile.jsonl", rows)

    def domains(paths: list[Path], **extra) -> list[dict]:
        return [
            {"name": s.split()[0].lower(), "source": {"paths": [str(p)], "filter_column": "meta.pile_set_name",
                                                      "filter_value": s, **extra}}
            for s, p in zip(sets, paths, strict=True)
        ]  # fmt: skip

    passes = []
    original = envs_text_sources._records
    monkeypatch.setattr(
        envs_text_sources, "_records", lambda d, label: passes.append(label) or original(d, label)
    )

    def boom(domain: str, split: str, index: int) -> None:
        if (domain, split, index) == ("arxiv", "train", 2):
            raise KeyboardInterrupt

    cfg = make_cfg(tmp_path, domains([shared] * 3))
    with pytest.raises(KeyboardInterrupt):  # interrupted in the middle of the shared pass
        prepare_corpus(cfg, seq_len=SEQ_LEN, seed=0, on_shard=boom)
    assert (
        passes == ["domains ['github', 'arxiv', 'enron']"] * 2
    )  # tokenizer texts, then shards: one pass each
    prepare_corpus(cfg, seq_len=SEQ_LEN, seed=0)  # resumes every domain of the group in one more pass
    assert len(passes) == 3

    # one copy of the file per domain: not grouped, three passes each, and byte-identical results
    copies = [tmp_path / f"copy{i}.jsonl" for i in range(3)]
    for c in copies:
        c.write_bytes(shared.read_bytes())
    separate = make_cfg(tmp_path, domains(copies), prepared_dir=str(tmp_path / "separate"))
    prepare_corpus(separate, seq_len=SEQ_LEN, seed=0)
    assert len(passes) == 3 + 6
    bins = {k: v for k, v in tree(tmp_path / "prep").items() if k.endswith(".bin") or k == "tokenizer.json"}
    assert bins == {k: v for k, v in tree(tmp_path / "separate").items() if k in bins}
    corpus = PreparedCorpus.open(tmp_path / "prep")
    tok = corpus.tokenizer()
    for k, value in enumerate(sets):
        train = corpus.read_tokens(k, "train", 0, corpus.num_tokens(k, "train")).tolist()
        assert tok.decode(train[: train.index(corpus.eos_id)], skip_special_tokens=False) == next(
            t for t, s in rows if s == value
        )

    # max_documents per domain: the pass stops once every domain has its documents
    capped = make_cfg(
        tmp_path, domains([shared] * 3, max_documents=20), prepared_dir=str(tmp_path / "capped")
    )
    seen_rows = []
    monkeypatch.setattr(envs_text_sources, "_records",
                        lambda d, label: (seen_rows.append(r) or r for r in original(d, label)))  # fmt: skip
    manifest = prepare_corpus(capped, seq_len=SEQ_LEN, seed=0)
    assert [sum(d["num_documents"].values()) for d in manifest["domains"]] == [20, 20, 20]
    assert len(seen_rows) == 2 * 60  # two passes (tokenizer, shards), each stopping after row 60
