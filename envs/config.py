"""Typed, validated configuration of the environment side: data, sampler, LM, optimiser, env, probe.

These pydantic v2 models are frozen and forbid unknown keys, so a typo in a YAML file is an error that
names the dotted field instead of a silently ignored setting. Every dimension of the system derives
from ``DataConfig.domains`` (K = ``len(domains)``); nothing assumes a fixed domain count.

``PretrainConfig`` is the run-level config the environment needs (data, LM, optimiser, sampler,
budget, validation, env, seed). Config flows downward: ``ray_jobs.config.ExperimentConfig`` extends it
with the agent, Ray, tracking, checkpoint, Tune and proxy sections, so an experiment config is a
``PretrainConfig`` and the env never needs to know the layer above it. The agent's model lives in
``agents.config`` so that ``agents`` never imports ``envs``.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-()]*$")


class StrictModel(BaseModel):
    """Base for every config model: frozen, unknown keys forbidden, defaults validated."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


class SourceConfig(StrictModel):
    """Where one domain's raw text comes from.

    ``kind: files`` reads local files (``paths`` are paths or globs; the format is taken from the
    extension unless ``format`` says otherwise). ``kind: hf`` reads a Hugging Face dataset with
    ``datasets.load_dataset(hf_path, hf_name, split=hf_split, data_files=..., streaming=...)``,
    optionally keeping only rows whose ``filter_column`` (dotted for struct columns, e.g.
    ``meta.pile_set_name``) equals ``filter_value``.
    """

    kind: Literal["files", "hf"] = "files"
    paths: list[str] = Field(default_factory=list, description="Files or globs (kind: files).")
    format: Literal["auto", "jsonl", "jsonl.zst", "parquet", "txt"] = "auto"
    text_field: str = Field("text", min_length=1, description="Field holding the document text.")
    hf_path: str | None = Field(None, description="Dataset name or builder (e.g. 'parquet', 'json').")
    hf_name: str | None = None
    hf_split: str = "train"
    hf_data_files: list[str] = Field(default_factory=list)
    streaming: bool = True
    filter_column: str | None = None
    filter_value: str | None = None
    max_documents: int | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _check_kind(self) -> SourceConfig:
        if self.kind == "files" and not self.paths:
            raise ValueError("kind 'files' needs at least one entry in 'paths'")
        if self.kind == "hf" and not self.hf_path:
            raise ValueError("kind 'hf' needs 'hf_path' (a dataset name or a builder such as 'parquet')")
        if (self.filter_column is None) != (self.filter_value is None):
            raise ValueError("'filter_column' and 'filter_value' must be given together")
        return self


class DomainConfig(StrictModel):
    """One data domain: its name (from config, never parsed from a path), source and evaluation role."""

    name: str = Field(..., description="Domain name; letters, digits and _ . - ( ).")
    source: SourceConfig
    target: bool = Field(True, description="Counted in val/mean_ppl (false for e.g. a junk domain).")

    @field_validator("name")
    @classmethod
    def _check_name(cls, value: str) -> str:
        if not _NAME_RE.match(value):
            raise ValueError(f"domain name {value!r} must match {_NAME_RE.pattern}")
        return value


class TokenizerConfig(StrictModel):
    """A given ``tokenizer.json``, or a byte-level BPE trained (seeded) on the target domains."""

    path: str | None = Field(None, description="Existing tokenizer.json; null trains a byte-level BPE.")
    vocab_size: int = Field(8192, ge=256, le=1_000_000)
    train_max_bytes_per_domain: int = Field(4_000_000, gt=0)
    eos_token: str = "<|endoftext|>"


class DataConfig(StrictModel):
    """The corpus: domains, tokenizer, and where prepared shards live."""

    domains: list[DomainConfig] = Field(..., min_length=2)
    prepared_dir: str = Field("data/prepared", description="Output of `acodm data prepare`.")
    tokenizer: TokenizerConfig = Field(default_factory=TokenizerConfig)
    val_fraction: float = Field(0.05, gt=0.0, lt=0.5, description="Documents held out per domain.")
    val_max_tokens: int = Field(200_000, gt=0, description="Cap on held-out tokens per domain.")
    num_proc: int = Field(0, ge=0, description="Tokenizer processes; 0 = all cores.")
    shard_tokens: int = Field(8_000_000, gt=0, description="Tokens per shard file.")
    verify_max_bytes: int = Field(
        1 << 30, ge=0, description="At a run's start, shards up to this many bytes in all are sha256-checked "
        "fully, a random sample of this many bytes above it (envs.integrity); 0 = no shard hashing."
    )

    @model_validator(mode="after")
    def _check_domains(self) -> DataConfig:
        names = [d.name for d in self.domains]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"domain names must be unique; repeated: {dupes}")
        if not any(d.target for d in self.domains):
            raise ValueError("at least one domain must have target: true")
        return self

    @property
    def domain_names(self) -> list[str]:
        """Domain names in config order; index i is domain i everywhere (weights, counts, heads)."""
        return [d.name for d in self.domains]

    @property
    def num_domains(self) -> int:
        """K, the number of domains."""
        return len(self.domains)


class LMConfig(StrictModel):
    """The language model: a GPT-NeoX (Pythia) preset, optionally overridden."""

    preset: Literal["tiny", "small", "pythia-14m", "pythia-70m", "pythia-160m", "pythia-410m", "pythia-1b"] = (
        "tiny"
    )
    seq_len: int = Field(128, gt=0, description="Training sequence length (tokens per sample).")
    num_layers: int | None = Field(None, gt=0, description="Override the preset's depth.")
    hidden_size: int | None = Field(None, gt=0, description="Override the preset's width.")
    num_heads: int | None = Field(None, gt=0)
    compile: bool = Field(False, description="torch.compile the model.")
    precision: Literal["auto", "fp32", "bf16"] = Field("auto", description="auto: bf16 autocast on GPU, fp32 on CPU.")
    num_threads: int = Field(0, ge=0, description="torch CPU threads per process; 0 leaves torch's default.")


class OptimConfig(StrictModel):
    """AdamW with linear warmup, then a cosine decay (Pythia defaults) or warmup-stable-decay.

    ``schedule: wsd`` (MiniCPM, arXiv 2404.06395) holds the peak LR until the last ``decay_fraction`` of
    the steps, then decays to ``min_lr_ratio``. Every step before the decay starts is the same whatever
    ``train.total_steps`` is, so a run can be extended (``acodm train --resume`` with a larger
    ``train.total_steps``) from its checkpoint at the decay start; a cosine run cannot, since its LR at
    every step depends on the horizon.
    """

    lr: float = Field(6e-4, gt=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="Final LR as a fraction of lr.")
    warmup_fraction: float = Field(0.01, ge=0, lt=1)
    schedule: Literal["cosine", "wsd"] = Field(
        "cosine", description="cosine: warmup then cosine decay over the whole run; wsd: warmup, constant "
        "peak LR, then a decay over the last decay_fraction of the steps (the run can be extended).",
    )
    decay_fraction: float = Field(
        0.2, gt=0, le=1, description="wsd: the share of train.total_steps spent decaying (Hagele et al. 2024, "
        "arXiv 2405.18392: a 20% cooldown matches cosine).",
    )
    decay_shape: Literal["linear", "cosine", "1-sqrt"] = Field(
        "1-sqrt", description="wsd: the decay's shape from lr to min_lr_ratio * lr (1-sqrt: Hagele et al.).",
    )
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = Field(1e-8, gt=0)
    weight_decay: float = Field(0.1, ge=0)
    grad_clip: float = Field(1.0, ge=0, description="Max global grad norm; 0 disables clipping.")
    max_nonfinite_steps: int = Field(5, gt=0, description="Consecutive non-finite losses before the run stops.")


class SamplerConfig(StrictModel):
    """How one optimiser step's global batch is split into domain-pure micro-batches."""

    micro_batch_size: int = Field(8, gt=0, description="Sequences per micro-batch (per rank).")
    grad_accum: int = Field(4, gt=0, description="Micro-batches per rank per optimiser step.")
    min_per_domain: int = Field(0, ge=0, description="Micro-batches forced per domain each step (reference: 1).")
    weight_floor: float = Field(0.0, ge=0, lt=1, description="Probability floor applied before quotas.")
    rounding: Literal["largest_remainder", "systematic"] = Field(
        "largest_remainder",
        description="Leftover seats: largest remainder (deterministic) or systematic (seeded, unbiased; "
        "use it when micro-batches per step are few compared with K).",
    )


class TrainConfig(StrictModel):
    """Budget and cadence of one pretraining run."""

    total_steps: int = Field(200, gt=0, description="Optimiser steps in the run (the training budget).")
    log_interval: int = Field(10, gt=0)


class EvalConfig(StrictModel):
    """Per-domain validation on the held-out split."""

    interval: int = Field(50, gt=0, description="Evaluate every N optimiser steps (and at the end).")
    max_batches: int = Field(8, gt=0, description="Validation batches per domain.")
    batch_size: int = Field(16, gt=0)


class ProbeConfig(StrictModel):
    """Which parameters feed the gradient-alignment reward and the weight-norm features."""

    mode: Literal["exact", "sketch"] = "exact"
    sketch_dim: int = Field(4096, gt=0, description="k of the K x k sketch.")
    param_patterns: list[str] = Field(
        default_factory=list,
        description="Regexes of parameter names; empty = dense_4h_to_h.weight of the last 3 even-offset blocks.",
    )
    num_reward_blocks: int = Field(3, gt=0)
    num_monitored_layers: int = Field(9, gt=0, description="Evenly spaced blocks whose weight norms are observed.")


class EnvConfig(StrictModel):
    """The Gymnasium environment's semantics."""

    steps_per_action: int = Field(1, gt=0, description="Optimiser steps per env.step.")
    reward_mode: Literal["direction", "quadratic", "mixture", "reference"] = Field(
        "direction",
        description="direction: cosine of the step's update with the target gradient (default); "
        "quadratic: second-order target-loss decrease; mixture: <w, s> (linear, collapses onto a vertex); "
        "reference: the paper's per-domain z-scores. See envs.rewards.",
    )
    reward_curvature: float = Field(1.0, gt=0, description="lam of reward_mode quadratic.")
    reward_smoothing: float = Field(
        0.9,
        ge=0,
        lt=1,
        description="EMA factor of the Gram matrix that direction/quadratic score the step under; 0 = the "
        "step's own (envs.rewards).",
    )
    debias_gram: bool = Field(
        True, description="Unbiased Gram diagonal from per-micro-batch gradient norms (envs.rewards)."
    )
    observation_mode: Literal["default", "reference"] = "default"
    clamp: float = Field(3.0, gt=0, description="z-score clamp for features and scores.")
    action_floor: float = Field(0.0, ge=0, lt=1, description="Minimum weight per domain after projection.")
    probe: ProbeConfig = Field(default_factory=ProbeConfig)


class PretrainConfig(StrictModel):
    """One pretraining run as the environment sees it: what ``DataMixingEnv`` and ``LMBackend`` read.

    The YAML sections of the same names in an experiment file; ``ray_jobs.config.ExperimentConfig``
    adds the orchestration sections on top (this class is its base, so its fields keep their place in
    the file).
    """

    seed: int = Field(0, ge=0)
    data: DataConfig
    lm: LMConfig = Field(default_factory=LMConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    sampler: SamplerConfig = Field(default_factory=SamplerConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    env: EnvConfig = Field(default_factory=EnvConfig)

    @model_validator(mode="after")
    def _floors_below_uniform(self) -> PretrainConfig:
        k = len(self.data.domain_names)
        for field, floor in (("env.action_floor", self.env.action_floor), ("sampler.weight_floor", self.sampler.weight_floor)):
            if floor * k >= 1:
                raise ValueError(f"{field}={floor} must be < 1/K = {1 / k:.4g} for K={k} domains")
        return self
