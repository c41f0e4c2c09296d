"""GPT-NeoX (Pythia architecture) language models: presets, seeded construction, precision policy.

We use Hugging Face ``transformers.GPTNeoXForCausalLM`` unchanged (no hand-written transformer), so runs
compare with the Pythia suite and a checkpoint exports straight to ``from_pretrained`` and lm-eval.

Presets follow the published Pythia shapes: rotary embeddings on 25% of each head (``rotary_pct``
0.25, base 10000), parallel attention + MLP residual, untied input/output embeddings, MLP width 4h,
context 2048, LayerNorm eps 1e-5, no dropout. ``tiny`` and ``small`` are CPU-sized members of the same
family (``tiny`` for tests and the demo, ``small`` as its slightly larger target in proxy-vs-target
experiments). Weight init is Hugging Face's (normal, std 0.02; zero biases), not GPT-NeoX's
``small_init``/``wang_init``; it is drawn from a seed in a forked RNG so building a model never
disturbs (or depends on) anyone else's random state.

Vocabulary padding: like Pythia (50,277 tokens padded to 50,304), the embedding and LM head get
``ceil(vocab_size / 128) * 128`` rows, which keeps the matmuls tensor-core friendly. The extra rows
are never produced by the tokenizer; training drives their logits down, and Hugging Face loading
accepts a model vocabulary larger than the tokenizer's.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

from envs.config import LMConfig

log = logging.getLogger(__name__)

VOCAB_MULTIPLE = 128
"""Embedding rows are padded to a multiple of this (Pythia pads 50,277 to 50,304)."""

PYTHIA_CONTEXT = 2048


@dataclass(frozen=True)
class _Shape:
    num_layers: int
    hidden_size: int
    num_heads: int


# Published Pythia shapes (Biderman et al. 2023, table 1; HF configs EleutherAI/pythia-*).
PRESETS: dict[str, _Shape] = {
    "tiny": _Shape(num_layers=4, hidden_size=128, num_heads=4),
    "small": _Shape(num_layers=6, hidden_size=192, num_heads=6),
    "pythia-14m": _Shape(num_layers=6, hidden_size=128, num_heads=4),
    "pythia-70m": _Shape(num_layers=6, hidden_size=512, num_heads=8),
    "pythia-160m": _Shape(num_layers=12, hidden_size=768, num_heads=12),
    "pythia-410m": _Shape(num_layers=24, hidden_size=1024, num_heads=16),
    "pythia-1b": _Shape(num_layers=16, hidden_size=2048, num_heads=8),
}


def padded_vocab_size(vocab_size: int, multiple: int = VOCAB_MULTIPLE) -> int:
    """Round ``vocab_size`` up to a multiple of ``multiple`` (Pythia's embedding padding)."""
    if vocab_size <= 0:
        raise ValueError(f"vocab_size must be positive, got {vocab_size}")
    return int(math.ceil(vocab_size / multiple) * multiple)


def _neox_config(shape: _Shape, vocab_size: int) -> GPTNeoXConfig:
    if shape.hidden_size % shape.num_heads != 0:
        raise ValueError(
            f"hidden_size={shape.hidden_size} must be divisible by num_heads={shape.num_heads} "
            "(lm.hidden_size / lm.num_heads)"
        )
    return GPTNeoXConfig(
        vocab_size=padded_vocab_size(vocab_size),
        hidden_size=shape.hidden_size,
        num_hidden_layers=shape.num_layers,
        num_attention_heads=shape.num_heads,
        intermediate_size=4 * shape.hidden_size,
        hidden_act="gelu",
        rotary_pct=0.25,
        rotary_emb_base=10000,
        max_position_embeddings=PYTHIA_CONTEXT,
        layer_norm_eps=1e-5,
        use_parallel_residual=True,
        tie_word_embeddings=False,
        attention_dropout=0.0,
        hidden_dropout=0.0,
        initializer_range=0.02,
        use_cache=False,
        attn_implementation="sdpa",
    )


def preset_config(name: str, vocab_size: int) -> GPTNeoXConfig:
    """The ``GPTNeoXConfig`` of a preset for a tokenizer of ``vocab_size`` tokens (padded, see module doc).

    Raises:
        ValueError: ``name`` is not a preset (the message lists them) or ``vocab_size`` <= 0.
    """
    if name not in PRESETS:
        raise ValueError(f"unknown LM preset {name!r}; presets are {sorted(PRESETS)}")
    return _neox_config(PRESETS[name], vocab_size)


def model_config(lm_cfg: LMConfig, vocab_size: int) -> GPTNeoXConfig:
    """The preset's config with ``lm.num_layers`` / ``lm.hidden_size`` / ``lm.num_heads`` overrides applied.

    Raises:
        ValueError: unknown preset, heads not dividing the width, or ``lm.seq_len`` longer than the
            model's context (``max_position_embeddings``).
    """
    if lm_cfg.preset not in PRESETS:
        raise ValueError(f"unknown LM preset {lm_cfg.preset!r}; presets are {sorted(PRESETS)}")
    base = PRESETS[lm_cfg.preset]
    shape = _Shape(
        num_layers=lm_cfg.num_layers or base.num_layers,
        hidden_size=lm_cfg.hidden_size or base.hidden_size,
        num_heads=lm_cfg.num_heads or base.num_heads,
    )
    config = _neox_config(shape, vocab_size)
    if lm_cfg.seq_len > config.max_position_embeddings:
        raise ValueError(
            f"lm.seq_len={lm_cfg.seq_len} is longer than the context of preset {lm_cfg.preset!r} "
            f"(max_position_embeddings={config.max_position_embeddings})"
        )
    return config


def build_model(
    lm_cfg: LMConfig, vocab_size: int, *, seed: int = 0, device: torch.device | str | None = None
) -> GPTNeoXForCausalLM:
    """Build a freshly initialised GPT-NeoX model for ``lm_cfg`` and a tokenizer of ``vocab_size`` tokens.

    Initialisation draws from ``torch.manual_seed(seed)`` inside ``torch.random.fork_rng`` on the CPU
    (then the model moves to ``device``), so the same seed gives the same weights on every device and
    the caller's global RNG state is untouched. ``device="meta"`` builds shapes only (no memory; for
    parameter counting).

    Args:
        lm_cfg: preset, overrides and ``seq_len`` (checked against the context).
        vocab_size: the prepared tokenizer's vocabulary size (padded to a multiple of 128).
        seed: init seed.
        device: target device; None = CUDA when available, else CPU.

    Returns:
        The model in train mode, fp32 parameters (mixed precision is applied by autocast, see
        ``autocast_dtype``), SDPA attention, ``use_cache`` off.
    """
    config = model_config(lm_cfg, vocab_size)
    target = resolve_device(device)
    if target.type == "meta":
        with torch.device("meta"):
            return GPTNeoXForCausalLM(config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = GPTNeoXForCausalLM(config)
    log.info(
        "built %s: %d layers, width %d, %d heads, vocab %d (padded from %d), %.2fM parameters",
        lm_cfg.preset,
        config.num_hidden_layers,
        config.hidden_size,
        config.num_attention_heads,
        config.vocab_size,
        vocab_size,
        count_parameters(model) / 1e6,
    )
    return model.to(target).train()


def count_parameters(model: torch.nn.Module) -> int:
    """Total number of parameters (works on the meta device)."""
    return sum(p.numel() for p in model.parameters())


def resolve_device(device: torch.device | str | None) -> torch.device:
    """``None`` means CUDA when available, else CPU."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``lm.precision`` on ``device``; None means plain fp32.

    ``auto`` is bf16 on CUDA and fp32 elsewhere; ``bf16`` forces bf16 autocast (also on CPU);
    ``fp32`` never autocasts.
    """
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    raise ValueError(f"lm.precision must be one of 'auto', 'fp32', 'bf16'; got {precision!r}")
