"""Export a run's model and tokenizer in Hugging Face format (``acodm export RUN_DIR --hf OUT_DIR``).

The output loads with ``transformers.AutoModelForCausalLM.from_pretrained(OUT_DIR)`` and
``AutoTokenizer.from_pretrained(OUT_DIR)``, so ``lm-eval --model hf --model_args pretrained=OUT_DIR``
evaluates it directly. It holds the ``save_pretrained`` model (safetensors, ``GPTNeoXForCausalLM``), the
prepared ``tokenizer.json`` as a ``PreTrainedTokenizerFast`` with EOS (also used as BOS, as Pythia does),
and ``acodm_export.json`` (which run, step and prepared corpus it came from).

Inputs (layout in ``docs/internals.md``, "Checkpoints"): ``<run_dir>/config.yaml`` (its
``data.prepared_dir`` locates the tokenizer) and the newest ``<run_dir>/checkpoints/step_<N>/pretrainer.pt``
(``Pretrainer.state_dict()``). The output is written to a temporary sibling directory and renamed into
place, so ``OUT_DIR`` is either absent, or complete; an existing non-empty ``OUT_DIR`` is never touched.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
import yaml

from envs.data import PreparedCorpus

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
STATE_FILE = "pretrainer.pt"
_STEP_DIR = re.compile(r"^step_(\d+)$")


def latest_checkpoint(run_dir: Path) -> Path:
    """The ``checkpoints/step_<N>`` directory with the largest N (``.tmp`` directories are incomplete).

    Raises:
        FileNotFoundError: the run directory holds no checkpoint.
    """
    root = Path(run_dir) / CHECKPOINTS
    steps = sorted(
        (int(m.group(1)), p)
        for p in (root.iterdir() if root.is_dir() else [])
        if (m := _STEP_DIR.match(p.name))
    )
    if not steps:
        raise FileNotFoundError(
            f"{root} holds no checkpoint (step_<N>/ directories); train the run first or check RUN_DIR"
        )
    return steps[-1][1]


def load_pretrainer_state(path: Path) -> dict[str, Any]:
    """Read a ``pretrainer.pt`` (tensors and plain values only: ``weights_only=True``).

    Raises:
        FileNotFoundError: the file is missing.
        ValueError: the file is unreadable or not a Pretrainer state.
    """
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file {path} is missing")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated zip, bad pickle, ...: torch raises several types
        raise ValueError(f"checkpoint file {path} is corrupt or unreadable: {exc}") from None
    missing = [
        k for k in ("model", "model_config", "header") if not isinstance(state, dict) or k not in state
    ]
    if missing:
        raise ValueError(f"checkpoint file {path} is not a Pretrainer state (missing {missing})")
    return state


def _prepared_dir(run_dir: Path, prepared_dir: str | os.PathLike[str] | None) -> Path:
    if prepared_dir is not None:
        return Path(prepared_dir)
    config_path = run_dir / "config.yaml"
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} is missing: {run_dir} is not a run directory")
    try:
        config = yaml.safe_load(config_path.read_text())
        return Path(config["data"]["prepared_dir"])
    except (yaml.YAMLError, KeyError, TypeError) as exc:
        raise ValueError(f"{config_path} has no readable data.prepared_dir ({exc!r})") from None


def _check_out_dir(out_dir: Path) -> None:
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise FileExistsError(f"output directory {out_dir} exists and is not empty; refusing to overwrite it")


def export_hf(
    run_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    checkpoint: str | os.PathLike[str] | None = None,
    prepared_dir: str | os.PathLike[str] | None = None,
) -> Path:
    """Write the latest checkpoint of ``run_dir`` as a Hugging Face model + tokenizer into ``out_dir``.

    Args:
        run_dir: a run directory (``config.yaml`` and ``checkpoints/step_<N>/pretrainer.pt``).
        out_dir: created; must not exist or be empty.
        checkpoint: a ``step_<N>`` directory to export instead of the run's newest one (e.g. one kept
            in Ray Train storage).
        prepared_dir: the prepared corpus holding ``tokenizer.json``; default the run config's
            ``data.prepared_dir`` (relative paths are relative to the working directory, as in training).

    Returns:
        ``out_dir``.

    Raises:
        FileExistsError: ``out_dir`` is not empty (nothing is written).
        FileNotFoundError: no run config, checkpoint, state file or prepared corpus.
        ValueError: a corrupt checkpoint, or a prepared corpus whose domains or vocabulary differ from
            the checkpoint's.
    """
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, PreTrainedTokenizerFast

    run_dir, out_dir = Path(run_dir), Path(out_dir)
    _check_out_dir(out_dir)
    ckpt = Path(checkpoint) if checkpoint is not None else latest_checkpoint(run_dir)
    state = load_pretrainer_state(ckpt / STATE_FILE)
    header = state["header"]
    corpus = PreparedCorpus.open(_prepared_dir(run_dir, prepared_dir))
    if corpus.domain_names != header["domain_names"] or corpus.vocab_size != header["vocab_size"]:
        raise ValueError(
            f"prepared corpus {corpus.prepared_dir} (domains {corpus.domain_names}, vocab {corpus.vocab_size}) "
            f"is not the one checkpoint {ckpt} was trained on (domains {header['domain_names']}, "
            f"vocab {header['vocab_size']}); pass the right prepared_dir"
        )
    eos_token = corpus.tokenizer().id_to_token(corpus.eos_id)
    config = GPTNeoXConfig.from_dict(
        {
            **state["model_config"],
            "use_cache": True,
            "bos_token_id": corpus.eos_id,
            "eos_token_id": corpus.eos_id,
        }
    )
    config.architectures = ["GPTNeoXForCausalLM"]
    with torch.random.fork_rng(devices=[]):  # the random init is overwritten; keep the caller's RNG intact
        model = GPTNeoXForCausalLM(config)
    model.load_state_dict(state["model"])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_file=str(corpus.tokenizer_path),
        eos_token=eos_token,
        bos_token=eos_token,
        unk_token=eos_token,
    )

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        provenance = {
            "run_dir": str(run_dir.resolve()),
            "checkpoint": str(ckpt.resolve()),
            "step": state.get("step"),
            "manifest_hash": corpus.manifest_hash,
            "domain_names": corpus.domain_names,
        }
        (tmp / "acodm_export.json").write_text(json.dumps(provenance, indent=2))
        _check_out_dir(out_dir)  # again: it may have appeared while we were writing
        os.replace(tmp, out_dir)  # rename(2) also replaces an empty directory
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    log.info("exported %s (step %s) to %s", ckpt, state.get("step"), out_dir)
    return out_dir
