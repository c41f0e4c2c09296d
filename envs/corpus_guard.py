"""``acodm data prepare`` never silently replaces a corpus that runs depend on.

A prepared directory's identity, for this purpose, is its domains (names and order) and its tokenizer's
bytes: change either and every token id a run has trained on means something else. Before any work,
``check_settings_kept`` compares the existing manifest with the config (domains; trained or given
tokenizer; the BPE's requested size), and ``check_tokenizer_kept`` compares a newly trained or copied
tokenizer's sha256 before it replaces ``tokenizer.json`` (``envs.prepare`` builds it under a temporary
name first). Other changes (edited or touched sources, split settings) re-prepare as before; a run that
resumes on data that changed is refused by ``ray_jobs.rundir``. ``force=True`` (``--force``) skips this.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from envs.config import DataConfig
from envs.data import MANIFEST_NAME
from envs.integrity import validate_manifest
from envs.shards import read_json

__all__ = ["CorpusReplaceError", "check_settings_kept", "check_tokenizer_kept", "existing_manifest"]

log = logging.getLogger(__name__)


class CorpusReplaceError(FileExistsError):
    """Preparing would replace a different corpus (other domains or tokenizer) that runs may depend on.

    ``differences`` lists what differs; the CLI adds which runs used the directory.
    """

    def __init__(self, out_dir: Path, differences: list[str]) -> None:
        self.out_dir = out_dir
        self.differences = differences
        super().__init__(
            f"{out_dir} already holds a prepared corpus that differs from this config: {'; '.join(differences)}. "
            "Preparing here would replace the data that runs trained on it depend on (a resumed run would "
            "refuse it). Prepare into another data.prepared_dir, or pass --force (force=True) to replace it"
        )


def existing_manifest(out_dir: Path) -> dict[str, Any] | None:
    """The directory's current manifest, or None if there is none or it cannot be read (nothing to protect)."""
    manifest = read_json(out_dir / MANIFEST_NAME)
    try:
        validate_manifest(manifest, str(out_dir / MANIFEST_NAME))
    except ValueError as exc:
        if (out_dir / MANIFEST_NAME).exists():
            log.warning("ignoring the unreadable existing manifest: %s", exc)
        return None
    return manifest


def check_settings_kept(existing: dict[str, Any] | None, data_cfg: DataConfig, out_dir: Path) -> None:
    """Before any work: the domains, and the tokenizer settings that surely change the tokenizer."""
    if existing is None:
        return
    differences = []
    old = [d["name"] for d in existing["domains"]]
    if old != data_cfg.domain_names:
        differences.append(f"its domains are {old}, the config's are {data_cfg.domain_names}")
    tok, tcfg = existing["tokenizer"], data_cfg.tokenizer
    if tok.get("trained") is True and tcfg.path is not None:
        differences.append(f"its tokenizer is a trained BPE, the config gives data.tokenizer.path = {tcfg.path!r}")
    elif tok.get("trained") is False and tcfg.path is None:
        differences.append(f"its tokenizer is the given {tok.get('source', '?')!r}, the config trains a BPE")
    elif tok.get("trained") is True and tok.get("requested_vocab_size", tcfg.vocab_size) != tcfg.vocab_size:
        differences.append(
            f"its BPE was trained for {tok['requested_vocab_size']} tokens, the config asks for "
            f"data.tokenizer.vocab_size = {tcfg.vocab_size}"
        )
    if differences:
        raise CorpusReplaceError(out_dir, differences)


def check_tokenizer_kept(existing: dict[str, Any] | None, new_sha: str, out_dir: Path) -> None:
    """Called with the new tokenizer's sha256 before it replaces ``tokenizer.json``."""
    if existing is None:
        return
    old_sha = existing["tokenizer"].get("sha256")
    if old_sha is not None and old_sha != new_sha:
        old = existing["tokenizer"]
        made = f"a BPE trained for {old.get('requested_vocab_size', old['vocab_size'])} tokens" if old.get(
            "trained") else f"the given tokenizer {old.get('source', '?')!r}"  # fmt: skip
        raise CorpusReplaceError(
            out_dir, [f"its tokenizer ({made}, sha256 {old_sha[:12]}) differs from this config's (sha256 {new_sha[:12]})"]
        )
