"""A damaged or mismatched prepared corpus is refused with a message naming the file, field and value.

Every case here was accepted silently before issue 15 (or failed with a bare ``JSONDecodeError``): a shard
whose bytes changed at the same size, a manifest whose sha256 or token counts were edited, a tokenizer
that no longer matches the manifest, a config whose ``data.tokenizer`` differs from the preparation's.
"""

from __future__ import annotations

import copy
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from envs.config import DataConfig
from envs.data import PreparedCorpus
from envs.integrity import check_config, content_id, verify_prepared_dir
from envs.prepare import prepare_corpus

SEQ_LEN = 12
WORDS = "mixing data tokens shards domains loss reward critic actor policy weights gradient the of and".split()
VOCAB = 280


def _data_cfg(root: Path, **tokenizer: Any) -> DataConfig:
    domains = [{"name": n, "source": {"paths": [str(root / f"{n}.jsonl")]}} for n in ("big", "small")]
    return DataConfig(domains=domains, prepared_dir=str(root / "prep"), tokenizer={"vocab_size": VOCAB, **tokenizer},
                      shard_tokens=250, num_proc=1)  # fmt: skip


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    """Two domains prepared by ``acodm data prepare``'s code, with several 250-token shards each."""
    root = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    for name, n in [("big", 90), ("small", 40)]:
        docs = [" ".join(rng.choice(WORDS, size=int(rng.integers(8, 50)))) for _ in range(n)]
        (root / f"{name}.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    prepare_corpus(_data_cfg(root), seq_len=SEQ_LEN, seed=0)
    return root / "prep"


@pytest.fixture
def copy_of(prepared: Path, tmp_path: Path) -> Path:
    """A private copy of the prepared directory to damage."""
    out = tmp_path / "prep"
    shutil.copytree(prepared, out)
    return out


def _manifest(path: Path) -> dict[str, Any]:
    return json.loads((path / "manifest.json").read_text())


def _write_manifest(path: Path, manifest: Any) -> None:
    (path / "manifest.json").write_text(json.dumps(manifest, indent=1))


def _flip_byte(path: Path, offset: int = 3) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


# ---------------------------------------------------------------------------------------------- schema
def _set(dotted: str, value: Any) -> Callable[[dict[str, Any]], None]:
    """An edit of the manifest: set (or, with value ``DELETE``, remove) a dotted field; ``[i]`` indexes lists."""

    def edit(m: dict[str, Any]) -> None:
        node: Any = m
        parts = dotted.replace("[", ".").replace("]", "").split(".")
        for part in parts[:-1]:
            node = node[int(part)] if part.isdigit() else node[part]
        last = int(parts[-1]) if parts[-1].isdigit() else parts[-1]
        if value is DELETE:
            del node[last]
        else:
            node[last] = value

    return edit


DELETE = object()
SHARD0 = "domains[0].splits.train.shards[0]"

# (case id, edit of the manifest, regex the message must match)
SCHEMA_CASES = [
    ("dtype-unknown", _set("dtype", "<i8"), r"manifest.json: dtype = '<i8': expected one of \['<u2', '<u4'\]"),
    ("tokenizer-missing", _set("tokenizer", DELETE), r"manifest.json: tokenizer is missing"),
    ("tokenizer-file-escapes", _set("tokenizer.file", "../tokenizer.json"),
     r"tokenizer.file = '../tokenizer.json': expected a path inside the prepared directory"),
    ("vocab-size-string", _set("tokenizer.vocab_size", "280"),
     r"tokenizer.vocab_size = '280': expected an integer >= 1"),
    ("vocab-size-too-big-for-uint16", _set("tokenizer.vocab_size", 70_000),
     r"tokenizer.vocab_size = 70000: expected at most 65536 for dtype '<u2'"),
    ("eos-id-outside-vocab", _set("tokenizer.eos_id", 10_000), r"tokenizer.eos_id = 10000: expected an id below"),
    ("tokenizer-sha-malformed", _set("tokenizer.sha256", "abc"),
     r"tokenizer.sha256 = 'abc': expected a sha256 as 64 lowercase hex digits"),
    ("domains-empty", _set("domains", []), r"domains = \[\]: expected a non-empty list"),
    ("domain-name-repeated", _set("domains[1].name", "big"),
     r"domains\[1\].name = 'big': expected a name not used by another domain"),
    ("domain-target-not-bool", _set("domains[0].target", "yes"), r"domains\[0\].target = 'yes': expected true or false"),
    ("split-missing", _set("domains[0].splits.val", DELETE), r"domains\[0\].splits.val is missing"),
    ("shard-file-absolute", _set(f"{SHARD0}.file", "/etc/passwd"),
     r"shards\[0\].file = '/etc/passwd': expected a path inside the prepared directory"),
    ("shard-count-negative", _set(f"{SHARD0}.num_tokens", -1), r"shards\[0\].num_tokens = -1: expected an integer >= 0"),
    ("shard-sha-missing", _set(f"{SHARD0}.sha256", DELETE), r"shards\[0\].sha256 is missing"),
    ("split-total-edited", _set("domains[0].splits.train.num_tokens", 1),
     r"domains\[0\].splits.train.num_tokens = 1: expected \d+, the sum of its shards' num_tokens"),
]


@pytest.mark.parametrize(("edit", "message"), [c[1:] for c in SCHEMA_CASES], ids=[c[0] for c in SCHEMA_CASES])
def test_manifest_schema_violation_names_the_file_and_field(copy_of, edit, message):
    manifest = _manifest(copy_of)
    edit(manifest)
    _write_manifest(copy_of, manifest)
    with pytest.raises(ValueError, match=message) as info:
        PreparedCorpus.open(copy_of)
    assert str(copy_of / "manifest.json") in str(info.value)


def test_truncated_manifest_names_the_file(copy_of):
    raw = (copy_of / "manifest.json").read_bytes()
    (copy_of / "manifest.json").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ValueError, match=r"prep/manifest.json is not valid JSON .*truncated or was edited"):
        PreparedCorpus.open(copy_of)


def test_manifest_that_is_not_an_object_is_refused(copy_of):
    (copy_of / "manifest.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"format_version None is not supported"):
        PreparedCorpus.open(copy_of)


def test_edited_shard_token_count_fails_the_size_check(copy_of):
    manifest = _manifest(copy_of)
    split = manifest["domains"][0]["splits"]["train"]
    split["shards"][0]["num_tokens"] -= 1  # consistent totals: only the file size can tell
    split["num_tokens"] -= 1
    _write_manifest(copy_of, manifest)
    with pytest.raises(ValueError, match=r"train_00000.bin has 500 bytes, the manifest expects 498"):
        PreparedCorpus.open(copy_of)


# ---------------------------------------------------------------------------------------------- tokenizer
def test_replaced_tokenizer_is_refused_on_open(copy_of):
    tok = json.loads((copy_of / "tokenizer.json").read_text())
    tok["model"]["vocab"]["zzz"] = 10_000
    (copy_of / "tokenizer.json").write_text(json.dumps(tok))
    with pytest.raises(ValueError, match=r"tokenizer .*tokenizer.json does not match tokenizer.sha256 in .*manifest"):
        PreparedCorpus.open(copy_of)


def test_edited_vocab_size_is_caught_by_verify(copy_of):
    manifest = _manifest(copy_of)
    manifest["tokenizer"]["vocab_size"] += 1
    _write_manifest(copy_of, manifest)
    PreparedCorpus.open(copy_of)  # consistent on its face: only the tokenizer itself can tell
    with pytest.raises(ValueError, match=r"tokenizer .* has \d+ tokens but the manifest says tokenizer.vocab_size"):
        verify_prepared_dir(copy_of)


def test_edited_eos_id_is_caught_by_verify(copy_of):
    manifest = _manifest(copy_of)
    manifest["tokenizer"]["eos_id"] += 1
    _write_manifest(copy_of, manifest)
    with pytest.raises(ValueError, match=r"'<\|endoftext\|>' has id 0 but the manifest says tokenizer.eos_id = 1"):
        verify_prepared_dir(copy_of)


# ---------------------------------------------------------------------------------------------- checksums
def test_changed_shard_bytes_at_the_same_size_fail_verification(copy_of):
    _flip_byte(copy_of / "small" / "train_00001.bin")
    corpus = PreparedCorpus.open(copy_of)  # sizes are right: open cannot tell
    with pytest.raises(ValueError, match=r"small/train_00001.bin does not match the sha256 in the manifest "
                                         r"\(domain 'small', train\)"):  # fmt: skip
        corpus.verify()
    with pytest.raises(ValueError, match=r"small/train_00001.bin does not match"):
        verify_prepared_dir(copy_of)


def test_edited_manifest_sha256_fails_verification(copy_of):
    manifest = _manifest(copy_of)
    manifest["domains"][1]["splits"]["val"]["shards"][0]["sha256"] = "0" * 64
    _write_manifest(copy_of, manifest)
    with pytest.raises(ValueError, match=r"small/val_00000.bin does not match the sha256"):
        PreparedCorpus.open(copy_of).verify()


def test_every_bad_shard_is_named(copy_of):
    _flip_byte(copy_of / "big" / "train_00000.bin")
    _flip_byte(copy_of / "small" / "val_00000.bin")
    with pytest.raises(ValueError, match=r"big/train_00000.bin does not match.*; shard .*small/val_00000.bin"):
        PreparedCorpus.open(copy_of).verify()


def test_verify_is_full_up_to_the_budget_and_sampled_above(prepared):
    corpus = PreparedCorpus.open(prepared)
    full = corpus.verify()
    assert (full.mode, full.shards_checked) == ("full", full.shards_total) and full.bytes_checked == full.bytes_total
    assert corpus.verify(max_bytes=full.bytes_total).mode == "full"
    sampled = corpus.verify(max_bytes=1200, seed=1)
    assert sampled.mode == "sampled"
    assert 1 <= sampled.shards_checked < sampled.shards_total and sampled.bytes_checked <= 1200
    assert corpus.verify(max_bytes=1200, seed=1).checked == sampled.checked  # seeded draw
    assert corpus.verify(max_bytes=1, seed=1).shards_checked == 1  # always at least one shard


def test_sampled_verification_catches_a_sampled_shard_and_documents_what_it_misses(copy_of):
    sampled = PreparedCorpus.open(copy_of).verify(max_bytes=1200, seed=1)
    unsampled = sorted({s["file"] for d in _manifest(copy_of)["domains"] for sp in ("train", "val")
                        for s in d["splits"][sp]["shards"]} - set(sampled.checked))  # fmt: skip
    _flip_byte(copy_of / unsampled[0])
    PreparedCorpus.open(copy_of).verify(max_bytes=1200, seed=1)  # a spot check: this shard was not drawn
    _flip_byte(copy_of / sampled.checked[0])
    with pytest.raises(ValueError, match=f"{sampled.checked[0]} does not match"):
        PreparedCorpus.open(copy_of).verify(max_bytes=1200, seed=1)


def test_content_id_follows_the_data_not_the_layout(prepared, copy_of):
    before = content_id(_manifest(prepared))
    manifest = _manifest(copy_of)
    manifest["domains"][0]["sources"] = []  # provenance only: the data is the same
    assert content_id(manifest) == before
    manifest["domains"][0]["splits"]["train"]["shards"][0]["sha256"] = "1" * 64
    assert content_id(manifest) != before


# ---------------------------------------------------------------------------------------------- config
def _cfg_for(prepared: Path, **tokenizer: Any) -> DataConfig:
    return _data_cfg(prepared.parent, **tokenizer).model_copy(update={"prepared_dir": str(prepared)})


def test_config_matching_the_preparation_is_accepted(prepared):
    check_config(PreparedCorpus.open(prepared), _cfg_for(prepared))


@pytest.mark.parametrize(
    ("tokenizer", "message"),
    [
        ({"vocab_size": 4096}, r"data.tokenizer.vocab_size = 4096 but prepared corpus .* was prepared with a different "
                               r"vocabulary \(its BPE was trained for 280 tokens; the model would use the corpus's \d+\); "
                               r"set data.tokenizer.vocab_size: 280"),
        ({"eos_token": "<eos>"}, r"data.tokenizer.eos_token = '<eos>' but .* was prepared with end-of-text token "
                                 r"'<\|endoftext\|>'"),
        ({"path": "/some/tokenizer.json"}, r"data.tokenizer.path = '/some/tokenizer.json' but .* was prepared with a "
                                           r"BPE trained on its target domains"),
    ],
    ids=["vocab-size", "eos-token", "path-vs-trained"],
)
def test_config_disagreeing_with_the_preparation_is_refused(prepared, tokenizer, message):
    with pytest.raises(ValueError, match=message):
        check_config(PreparedCorpus.open(prepared), _cfg_for(prepared, **tokenizer))


def test_domains_disagreeing_with_the_preparation_are_refused(prepared):
    cfg = _cfg_for(prepared)
    cfg = cfg.model_copy(update={"domains": list(reversed(cfg.domains))})
    with pytest.raises(ValueError, match=r"its domains \['big', 'small'\] differ from data.domains \['small', 'big'\]"):
        check_config(PreparedCorpus.open(prepared), cfg)


def test_given_tokenizer_corpus_checks_path_and_size(prepared, tmp_path):
    size = _manifest(prepared)["tokenizer"]["vocab_size"]
    given = tmp_path / "given.json"
    shutil.copy(prepared / "tokenizer.json", given)
    cfg = _cfg_for(prepared, path=str(given), vocab_size=size).model_copy(update={"prepared_dir": str(tmp_path / "p")})
    prepare_corpus(cfg, seq_len=SEQ_LEN, seed=0)
    corpus = PreparedCorpus.open(tmp_path / "p")
    check_config(corpus, cfg)
    with pytest.raises(ValueError, match=rf"data.tokenizer.vocab_size = {size + 1} .*its given tokenizer has {size}"):
        check_config(corpus, cfg.model_copy(update={"tokenizer": cfg.tokenizer.model_copy(update={"vocab_size": size + 1})}))
    with pytest.raises(ValueError, match=r"data.tokenizer.path is not set \(train a BPE\) but .* given tokenizer"):
        check_config(corpus, cfg.model_copy(update={"tokenizer": cfg.tokenizer.model_copy(update={"path": None})}))
    other = tmp_path / "other.json"
    tok = json.loads(given.read_text())
    tok["model"]["vocab"]["zzz"] = size
    other.write_text(json.dumps(tok))
    with pytest.raises(ValueError, match=r"data.tokenizer.path = '.*other.json' is not the tokenizer .* sha256 differ"):
        check_config(corpus, cfg.model_copy(update={"tokenizer": cfg.tokenizer.model_copy(update={"path": str(other)})}))


def test_manifest_before_the_requested_size_record_says_how_to_add_it(copy_of):
    manifest = _manifest(copy_of)
    actual = manifest["tokenizer"]["vocab_size"]
    del manifest["tokenizer"]["requested_vocab_size"]
    _write_manifest(copy_of, manifest)
    cfg = _cfg_for(copy_of, vocab_size=actual + 7)
    with pytest.raises(ValueError, match=rf"set data.tokenizer.vocab_size: {actual}.*predates the record"):
        check_config(PreparedCorpus.open(copy_of), cfg)


def test_manifest_of_another_tool_has_only_its_domains_checked(copy_of):
    manifest = copy.deepcopy(_manifest(copy_of))
    del manifest["tokenizer"]["trained"]
    _write_manifest(copy_of, manifest)
    check_config(PreparedCorpus.open(copy_of), _cfg_for(copy_of, vocab_size=8192))  # documented: not compared
