"""``acodm data prepare`` never silently replaces a corpus that runs depend on, and one runs at a time.

Before issue 15, preparing a config with other domains or another tokenizer into an existing prepared
directory rewrote it in place; a given tokenizer of another size than ``data.tokenizer.vocab_size`` was
accepted, and a second preparation of a directory was refused without saying by whom.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from envs.config import DataConfig
from envs.filelock import DirectoryLockedError
from envs.prepare import CorpusReplaceError, prepare_corpus

SEQ_LEN = 8
WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho".split()


def _docs(path: Path, n: int, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    docs = [" ".join(rng.choice(WORDS, size=int(rng.integers(10, 40)))) + f" doc{i}." for i in range(n)]
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return path


@pytest.fixture
def sources(tmp_path: Path) -> dict[str, Path]:
    return {name: _docs(tmp_path / f"{name}.jsonl", 60, seed) for seed, name in enumerate(("a", "b", "c"))}


def _cfg(tmp_path: Path, sources: dict[str, Path], names: tuple[str, ...] = ("a", "b"), **tokenizer: Any) -> DataConfig:
    domains = [{"name": n, "source": {"paths": [str(sources[n])]}} for n in names]
    return DataConfig(domains=domains, prepared_dir=str(tmp_path / "prep"), tokenizer={"vocab_size": 300, **tokenizer},
                      shard_tokens=400, num_proc=1)  # fmt: skip


def _snapshot(prep: Path) -> dict[str, bytes]:
    return {str(p.relative_to(prep)): p.read_bytes() for p in sorted(prep.rglob("*")) if p.is_file()
            and p.name != ".prepare.lock"}  # fmt: skip


def test_other_domains_are_refused_before_anything_changes(tmp_path, sources):
    prepare_corpus(_cfg(tmp_path, sources), seq_len=SEQ_LEN, seed=0)
    before = _snapshot(tmp_path / "prep")
    with pytest.raises(CorpusReplaceError, match=r"prep already holds a prepared corpus that differs from this config: "
                                                 r"its domains are \['a', 'b'\], the config's are \['a', 'b', 'c'\].*"
                                                 r"pass --force"):  # fmt: skip
        prepare_corpus(_cfg(tmp_path, sources, ("a", "b", "c")), seq_len=SEQ_LEN, seed=0)
    assert _snapshot(tmp_path / "prep") == before


def test_another_vocabulary_is_refused_before_training(tmp_path, sources):
    prepare_corpus(_cfg(tmp_path, sources), seq_len=SEQ_LEN, seed=0)
    before = _snapshot(tmp_path / "prep")
    with pytest.raises(CorpusReplaceError, match=r"its BPE was trained for 300 tokens, the config asks for "
                                                 r"data.tokenizer.vocab_size = 320"):  # fmt: skip
        prepare_corpus(_cfg(tmp_path, sources, vocab_size=320), seq_len=SEQ_LEN, seed=0)
    assert _snapshot(tmp_path / "prep") == before


def test_a_retrained_tokenizer_that_differs_is_refused_and_left_unwritten(tmp_path, sources):
    prepare_corpus(_cfg(tmp_path, sources), seq_len=SEQ_LEN, seed=0)
    before = _snapshot(tmp_path / "prep")
    # fewer bytes of training text: same settings that are compared up front, another BPE
    with pytest.raises(CorpusReplaceError, match=r"its tokenizer \(a BPE trained for 300 tokens, sha256 [0-9a-f]{12}\) "
                                                 r"differs from this config's"):  # fmt: skip
        prepare_corpus(_cfg(tmp_path, sources, train_max_bytes_per_domain=300), seq_len=SEQ_LEN, seed=0)
    assert _snapshot(tmp_path / "prep") == before  # no tokenizer.json nor any .new file left behind


def test_a_given_tokenizer_replacing_a_trained_one_is_refused(tmp_path, sources):
    manifest = prepare_corpus(_cfg(tmp_path, sources), seq_len=SEQ_LEN, seed=0)
    given = tmp_path / "given.json"
    given.write_bytes((tmp_path / "prep" / "tokenizer.json").read_bytes())
    cfg = _cfg(tmp_path, sources, path=str(given), vocab_size=manifest["tokenizer"]["vocab_size"])
    with pytest.raises(CorpusReplaceError, match=r"its tokenizer is a trained BPE, the config gives data.tokenizer.path"):
        prepare_corpus(cfg, seq_len=SEQ_LEN, seed=0)


def test_force_replaces_and_the_same_config_is_never_refused(tmp_path, sources):
    cfg = _cfg(tmp_path, sources)
    prepare_corpus(cfg, seq_len=SEQ_LEN, seed=0)
    prepare_corpus(cfg, seq_len=SEQ_LEN, seed=0)  # a re-run of the same preparation
    os.utime(sources["a"])  # a touched source re-prepares the domain (same data, documented): not refused
    prepare_corpus(cfg, seq_len=SEQ_LEN, seed=0)
    manifest = prepare_corpus(_cfg(tmp_path, sources, ("a", "b", "c")), seq_len=SEQ_LEN, seed=0, force=True)
    assert [d["name"] for d in manifest["domains"]] == ["a", "b", "c"]


def test_unreadable_existing_manifest_does_not_block_repair(tmp_path, sources):
    prepare_corpus(_cfg(tmp_path, sources), seq_len=SEQ_LEN, seed=0)
    (tmp_path / "prep" / "manifest.json").write_text("{trunc")
    manifest = prepare_corpus(_cfg(tmp_path, sources, ("a", "b", "c")), seq_len=SEQ_LEN, seed=0)
    assert len(manifest["domains"]) == 3


def test_given_tokenizer_of_another_size_than_configured_is_refused(tmp_path, sources):
    manifest = prepare_corpus(_cfg(tmp_path, sources), seq_len=SEQ_LEN, seed=0)
    size = manifest["tokenizer"]["vocab_size"]
    given = tmp_path / "given.json"
    given.write_bytes((tmp_path / "prep" / "tokenizer.json").read_bytes())
    cfg = _cfg(tmp_path, sources, path=str(given), vocab_size=8192).model_copy(update={"prepared_dir": str(tmp_path / "p2")})
    with pytest.raises(ValueError, match=rf"data.tokenizer.vocab_size = 8192 but the given tokenizer .*given.json "
                                         rf"\(data.tokenizer.path\) has {size} tokens; set data.tokenizer.vocab_size: {size}"):  # fmt: skip
        prepare_corpus(cfg, seq_len=SEQ_LEN, seed=0)


def test_bpe_that_stops_short_records_both_sizes_and_warns(tmp_path, sources, caplog):
    caplog.set_level("WARNING", logger="envs.prepare")
    manifest = prepare_corpus(_cfg(tmp_path, sources, vocab_size=5000), seq_len=SEQ_LEN, seed=0)
    tok = manifest["tokenizer"]
    assert tok["requested_vocab_size"] == 5000 and tok["vocab_size"] < 5000
    assert f"the BPE stopped at {tok['vocab_size']} of the 5000 tokens asked for" in caplog.text


def test_directory_as_source_path_says_so(tmp_path, sources):
    cfg = _cfg(tmp_path, {**sources, "b": tmp_path})
    with pytest.raises(IsADirectoryError, match=r"domain 'b': source path '.*' is a directory; expected a jsonl, "
                                                r"jsonl.zst, parquet or txt file, or a glob such as '.*/\*.jsonl'"):  # fmt: skip
        prepare_corpus(cfg, seq_len=SEQ_LEN, seed=0)


def test_directory_as_given_tokenizer_says_so(tmp_path, sources):
    with pytest.raises(IsADirectoryError, match=r"data.tokenizer.path = '.*' is a directory; expected a tokenizer.json"):
        prepare_corpus(_cfg(tmp_path, sources, path=str(tmp_path)), seq_len=SEQ_LEN, seed=0)


def test_prepared_dir_that_is_a_file_says_so(tmp_path, sources):
    cfg = _cfg(tmp_path, sources)
    (tmp_path / "prep").write_text("not a directory")
    with pytest.raises(NotADirectoryError, match=r"data.prepared_dir = '.*prep' is a file, not a directory"):
        prepare_corpus(cfg, seq_len=SEQ_LEN, seed=0)


HOLD_LOCK = """
import sys, time
from pathlib import Path
from envs.prepare import _exclusive
with _exclusive(Path(sys.argv[1])):
    print("locked", flush=True)
    time.sleep(600)
"""


def test_second_preparation_names_the_holder_pid_and_runs_once_it_is_gone(tmp_path, sources):
    prep = tmp_path / "prep"
    prep.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(prep)], stdout=subprocess.PIPE, text=True,
                              cwd=Path(__file__).resolve().parents[2])  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(DirectoryLockedError, match=rf"prep \(acodm data prepare\) is in use by PID {holder.pid} on "
                                                       rf"host .* \(command: -c .*\)"):  # fmt: skip
            prepare_corpus(_cfg(tmp_path, sources), seq_len=SEQ_LEN, seed=0)
    finally:
        holder.kill()  # SIGKILL: the kernel releases the lock, nothing to clean up
        holder.wait(timeout=60)
    prepare_corpus(_cfg(tmp_path, sources), seq_len=SEQ_LEN, seed=0)  # its exit released the lock: no stale lock
    assert (prep / "manifest.json").is_file()
