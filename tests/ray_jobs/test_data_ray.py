"""Ray Data preparation writes byte-identical shards, tokenizer, progress and manifest to the local path's."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
import zstandard

from envs.config import DataConfig
from envs.prepare import prepare_corpus
from ray_jobs.cli import main
from ray_jobs.config import ExperimentConfig
from ray_jobs.data import prepare_with_ray, read_parts
from tests.envs.test_prepare import files_domain, make_docs, tree, write_jsonl

pytestmark = pytest.mark.ray

SEQ_LEN = 16


def build_corpus(raw: Path) -> list[dict]:
    """Seven domains over every reader path: a glob of jsonl files (blank lines, a whitespace-only
    document, nested fields that vary between lines, a literal EOS), parquet, txt files, a shared
    jsonl.zst split by a filter column, and a capped domain whose corrupt tail is never read."""
    raw.mkdir()
    web = make_docs(1300, 1, "w")
    web[3], web[10] = "   \n", "a literal <|endoftext|> inside, naïve café 🚀"
    # a big first file (> 1024 documents: two read blocks) and small ones after it: with two encoder
    # actors the small files finish first, so only preserve_order keeps the documents in reading order
    for k, chunk in enumerate([web[:1100], *(web[i : i + 50] for i in range(1100, 1300, 50))]):
        lines = [json.dumps({"text": d, "meta": {"id": i} if i % 2 else {"src": "x", "n": [i]}}) for i, d in
                 enumerate(chunk)]  # fmt: skip
        (raw / f"web-{k}.jsonl").write_text("\n".join(lines[:5] + [""] + lines[5:]) + "\n")
    code = make_docs(90, 2, "c")
    pq.write_table(pa.table({"text": code, "n": list(range(90))}), raw / "code.parquet", row_group_size=40)
    (raw / "books").mkdir()
    for i, doc in enumerate(make_docs(12, 3, "b")):
        (raw / "books" / f"{i:02d}.txt").write_text(doc * 3)
    sets = ["alpha", "beta"]
    pile = "".join(json.dumps({"text": d, "meta": {"set": sets[i % 3 % 2]}}) + "\n"
                   for i, d in enumerate(make_docs(300, 4, "p")))  # fmt: skip
    (raw / "pile.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(pile.encode()))
    write_jsonl(raw / "capped.jsonl", make_docs(60, 5, "k"))
    with open(raw / "capped.jsonl", "a") as f:
        f.write("{corrupt line after the cap\n")
    junk = make_docs(50, 6, "j")
    write_jsonl(raw / "junk-0.jsonl", junk[:30])
    write_jsonl(raw / "junk-1.jsonl", junk[30:])
    grouped = {"paths": [str(raw / "pile.jsonl.zst")], "filter_column": "meta.set"}
    return [
        files_domain("web", f"{raw}/web-*.jsonl"),
        files_domain("code", raw / "code.parquet"),
        files_domain("books", f"{raw}/books/*.txt"),
        {"name": "alpha", "source": {**grouped, "filter_value": "alpha"}},
        {"name": "beta", "source": {**grouped, "filter_value": "beta"}},
        files_domain("capped", raw / "capped.jsonl", max_documents=40),
        files_domain("junk", f"{raw}/junk-*.jsonl", target=False),
    ]


def data_cfg(domains: list[dict], prepared: Path, **kw) -> DataConfig:
    kw = {"tokenizer": {"vocab_size": 300}, "shard_tokens": 2000, "val_fraction": 0.1, "val_max_tokens": 150,
          "num_proc": 2, **kw}  # fmt: skip
    return DataConfig(domains=domains, prepared_dir=str(prepared), **kw)


def without_lock(directory: Path) -> dict[str, bytes]:
    files = tree(directory)
    assert not any(".tmp-" in name for name in files)
    return files


@pytest.mark.slow
def test_ray_prepare_is_byte_identical_to_local(ray_session, tmp_path: Path) -> None:
    domains = build_corpus(tmp_path / "raw")
    local = prepare_corpus(data_cfg(domains, tmp_path / "local"), seq_len=SEQ_LEN, seed=7)
    cfg = ExperimentConfig(seed=7, lm={"seq_len": SEQ_LEN}, data=data_cfg(domains, tmp_path / "ray"))
    parts = [len(read_parts(0, [d])) for d in cfg.data.domains]
    assert parts == [5, 1, 12, 1, 1, 1, 2]  # one read task per file; capped reads in one ordered task

    manifest = prepare_with_ray(cfg)

    assert manifest == local
    assert without_lock(tmp_path / "ray") == without_lock(tmp_path / "local")  # every shard, byte for byte
    entries = {e["name"]: e for e in manifest["domains"]}
    assert len(entries["web"]["splits"]["train"]["shards"]) > 3  # shard cuts inside the stream
    assert entries["web"]["splits"]["val"]["num_tokens"] == 150  # the val cap cut the stream
    assert entries["web"]["num_documents"]["train"] + entries["web"]["num_documents"]["val"] == 1299
    assert sum(entries["capped"]["num_documents"].values()) == 40
    assert entries["alpha"]["num_documents"]["train"] > entries["beta"]["num_documents"]["train"] > 0

    # every file but the lock (which records its holder, envs.filelock) stays untouched
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "ray").rglob("*") if p.name != ".prepare.lock"}
    assert prepare_with_ray(cfg) == local  # up to date: nothing is read, encoded or rewritten
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "ray").rglob("*") if p.name != ".prepare.lock"} == before


@pytest.mark.slow
def test_cli_ray_finishes_an_interrupted_local_preparation(ray_session, tmp_path: Path) -> None:
    domains = build_corpus(tmp_path / "raw")
    reference = prepare_corpus(data_cfg(domains, tmp_path / "reference"), seq_len=SEQ_LEN, seed=0)

    def interrupt(domain: str, split: str, index: int) -> None:
        if (domain, split, index) == ("web", "train", 2):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):  # web is half written: shards, a carry and progress.json
        prepare_corpus(data_cfg(domains, tmp_path / "resumed"), seq_len=SEQ_LEN, seed=0, on_shard=interrupt)
    progress = json.loads((tmp_path / "resumed" / "web" / "progress.json").read_text())
    assert not progress["done"] and progress["docs_consumed"] > 0
    cfg = ExperimentConfig(lm={"seq_len": SEQ_LEN}, data=data_cfg(domains, tmp_path / "resumed"))
    config_path = tmp_path / "exp.yaml"
    config_path.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))

    assert main(["-q", "data", "prepare", str(config_path), "--ray"]) == 0

    assert json.loads((tmp_path / "resumed" / "manifest.json").read_text()) == reference
    assert without_lock(tmp_path / "resumed") == without_lock(tmp_path / "reference")


@pytest.mark.slow
def test_reader_errors_are_the_local_ones_in_reading_order(ray_session, tmp_path: Path) -> None:
    domains = build_corpus(tmp_path / "raw")
    with open(tmp_path / "raw" / "junk-0.jsonl", "a") as f:  # junk is not a target: the BPE never reads it
        f.write('{"text": "fine"}\n[1, 2]\n')
    errors = []
    for name in ("local", "ray"):
        cfg = data_cfg(domains, tmp_path / name)
        with pytest.raises(ValueError, match=r"junk-0\.jsonl:32: expected a JSON object per line") as info:
            if name == "local":
                prepare_corpus(cfg, seq_len=SEQ_LEN, seed=0)
            else:
                prepare_with_ray(ExperimentConfig(lm={"seq_len": SEQ_LEN}, data=cfg))
        errors.append(str(info.value))
        assert not (tmp_path / name / "manifest.json").exists()
        done = {d["name"]: json.loads((tmp_path / name / d["name"] / "progress.json").read_text())["done"]
                for d in domains[:-1]}  # fmt: skip
        assert all(done.values())  # every domain before the error was written, as in reading order
    assert errors[0] == errors[1]
    assert without_lock(tmp_path / "ray") == without_lock(tmp_path / "local")  # junk: nothing absorbed


def test_more_encoders_than_cluster_cpus_fails_before_any_work(ray_session, tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    raw.mkdir()
    domains = [files_domain(n, write_jsonl(raw / f"{n}.jsonl", make_docs(20, i))) for i, n in enumerate("ab")]
    cfg = ExperimentConfig(lm={"seq_len": SEQ_LEN}, data=data_cfg(domains, tmp_path / "prep", num_proc=3))
    with pytest.raises(ValueError, match=r"data.num_proc=3 asks for 3 encoder actors .* cluster has 2 CPUs"):
        prepare_with_ray(cfg)
    assert not (tmp_path / "prep").exists()
