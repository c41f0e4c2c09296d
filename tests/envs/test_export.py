"""export_hf: a run's latest checkpoint reloads with from_pretrained and gives the same logits; bad runs fail."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from envs.data import PreparedCorpus
from envs.export import export_hf
from envs.pretrainer import Pretrainer
from ray_jobs.checkpoints import write_checkpoint
from ray_jobs.config import ExperimentConfig, save_config
from tests.envs.lm_fixtures import make_real_text_corpus, make_synthetic_corpus, tiny_configs


def _write_run(run_dir: Path, corpus: PreparedCorpus, pt: Pretrainer) -> None:
    cfg = ExperimentConfig.from_dict(
        {
            "name": run_dir.name,
            "output_dir": str(run_dir.parent),
            "data": {
                "prepared_dir": str(corpus.prepared_dir),
                "domains": [{"name": n, "source": {"paths": [f"{n}.jsonl"]}} for n in corpus.domain_names],
            },
            "lm": pt.lm_cfg.model_dump(),
        }
    )
    save_config(cfg, run_dir / "config.yaml")


def _checkpoint(run_dir: Path, pt: Pretrainer) -> None:
    loop = {"step": pt.step, "tokens": 0, "wall_time": 0.0, "ledger_rows": pt.step, "obs": []}
    write_checkpoint(
        run_dir / "checkpoints",
        pt.step,
        pretrainer_state=pt.state_dict(),
        env_state={},
        agent_state=None,
        loop_state=loop,
        keep_last=3,
    )


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, PreparedCorpus, Pretrainer]:
    torch.set_num_threads(1)
    base = tmp_path_factory.mktemp("export")
    corpus = make_real_text_corpus(base / "prepared", max_bytes_per_domain=40_000, vocab_size=320, junk=False)
    pt = Pretrainer(*tiny_configs(), corpus, total_steps=5, seed=0, device="cpu")
    run_dir = base / "run"
    _write_run(run_dir, corpus, pt)
    pt.train_step([1, 1, 1])
    _checkpoint(run_dir, pt)
    pt.train_step([1, 2, 3])
    _checkpoint(run_dir, pt)  # the newest checkpoint is the one exported
    return run_dir, corpus, pt


def test_export_reloads_with_from_pretrained_and_gives_the_same_logits(trained, tmp_path: Path) -> None:
    run_dir, corpus, pt = trained
    out = export_hf(run_dir, tmp_path / "hf")
    assert json.loads((out / "acodm_export.json").read_text())["step"] == 2
    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert type(model).__name__ == "GPTNeoXForCausalLM"
    text = "def export(run_dir):\n    return open(run_dir)  # Licensed under the Apache License"
    ids = tokenizer(text)["input_ids"]
    assert ids == corpus.tokenizer().encode(text).ids
    assert tokenizer.eos_token_id == corpus.eos_id and model.config.eos_token_id == corpus.eos_id
    assert tokenizer.decode(ids) == text
    x = torch.tensor([ids])
    pt.model.eval()
    with torch.no_grad():
        expected = pt.model(input_ids=x).logits
        got = model(input_ids=x).logits
    pt.model.train()
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)


def test_export_into_an_existing_empty_directory(trained, tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    out = export_hf(trained[0], tmp_path / "empty")
    assert (out / "config.json").is_file() and (out / "tokenizer.json").is_file()


def test_export_never_overwrites_a_non_empty_directory(trained, tmp_path: Path) -> None:
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    with pytest.raises(FileExistsError, match=r"exists and is not empty; refusing to overwrite"):
        export_hf(trained[0], out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "user data"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]  # no temporary leftovers


def test_missing_checkpoint_is_a_clear_error(trained, tmp_path: Path) -> None:
    run_dir = tmp_path / "fresh"
    run_dir.mkdir()
    shutil.copy(trained[0] / "config.yaml", run_dir / "config.yaml")
    (run_dir / "checkpoints" / "step_00000009.tmp").mkdir(parents=True)  # an interrupted write is ignored
    with pytest.raises(FileNotFoundError, match=r"holds no checkpoint"):
        export_hf(run_dir, tmp_path / "out")
    no_config = tmp_path / "no-config"
    shutil.copytree(trained[0] / "checkpoints", no_config / "checkpoints")
    with pytest.raises(FileNotFoundError, match=r"config.yaml is missing"):
        export_hf(no_config, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_corrupt_checkpoint_is_a_clear_error(trained, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    shutil.copytree(trained[0], run_dir)
    state = sorted((run_dir / "checkpoints").iterdir())[-1] / "pretrainer.pt"
    state.write_bytes(state.read_bytes()[:1000])  # truncated, as by a full disk
    with pytest.raises(ValueError, match=r"pretrainer.pt is corrupt or unreadable"):
        export_hf(run_dir, tmp_path / "out")
    state.unlink()
    with pytest.raises(FileNotFoundError, match=r"pretrainer.pt is missing"):
        export_hf(run_dir, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_another_prepared_corpus_is_a_clear_error(trained, tmp_path: Path) -> None:
    other = make_synthetic_corpus(tmp_path / "other", domain_names=("code", "licenses", "poems"))
    with pytest.raises(ValueError, match=r"is not the one checkpoint .* was trained on"):
        export_hf(trained[0], tmp_path / "out", prepared_dir=other.prepared_dir)
    assert not (tmp_path / "out").exists()
