"""GPT-NeoX presets: published Pythia shapes and sizes, vocabulary adaptation, seeding, clear errors."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from envs.config import LMConfig
from envs.model import (
    PRESETS,
    autocast_dtype,
    build_model,
    count_parameters,
    padded_vocab_size,
    preset_config,
)

# Total parameter counts published for the Pythia suite (Biderman et al. 2023, table 1; the model cards
# of EleutherAI/pythia-*), all with the padded GPT-NeoX vocabulary of 50,304.
PUBLISHED_PARAMS = {
    "pythia-14m": 14_067_712,
    "pythia-70m": 70_426_624,
    "pythia-160m": 162_322_944,
    "pythia-410m": 405_334_016,
    "pythia-1b": 1_011_781_632,
}
PUBLISHED_SHAPES = {  # (layers, width, heads)
    "pythia-14m": (6, 128, 4),
    "pythia-70m": (6, 512, 8),
    "pythia-160m": (12, 768, 12),
    "pythia-410m": (24, 1024, 16),
    "pythia-1b": (16, 2048, 8),
}
PYTHIA_VOCAB = 50_304


@pytest.mark.parametrize("preset", sorted(PUBLISHED_PARAMS))
def test_pythia_preset_matches_published_parameter_count(preset: str) -> None:
    model = build_model(LMConfig(preset=preset), PYTHIA_VOCAB, device="meta")
    assert next(model.parameters()).device.type == "meta"
    published = PUBLISHED_PARAMS[preset]
    assert abs(count_parameters(model) - published) / published < 0.01


@pytest.mark.parametrize("preset", sorted(PUBLISHED_SHAPES))
def test_pythia_preset_has_published_architecture(preset: str) -> None:
    cfg = preset_config(preset, PYTHIA_VOCAB)
    layers, width, heads = PUBLISHED_SHAPES[preset]
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads) == (layers, width, heads)
    assert cfg.intermediate_size == 4 * width
    assert cfg.rope_parameters["partial_rotary_factor"] == 0.25
    assert cfg.rope_parameters["rope_theta"] == 10000
    assert cfg.use_parallel_residual is True
    assert cfg.tie_word_embeddings is False
    assert cfg.max_position_embeddings == 2048
    assert cfg.vocab_size == PYTHIA_VOCAB


def test_every_preset_builds_untied_with_sdpa_attention() -> None:
    for preset in PRESETS:
        model = build_model(LMConfig(preset=preset), 1000, device="meta")
        assert model.config._attn_implementation == "sdpa"
        assert model.lm_head.weight is not model.gpt_neox.embed_in.weight
    tiny = count_parameters(build_model(LMConfig(preset="tiny"), 1000, device="meta"))
    small = count_parameters(build_model(LMConfig(preset="small"), 1000, device="meta"))
    assert tiny < small  # small is the larger target of the tiny proxy


@pytest.mark.parametrize(("vocab", "rows"), [(8192, 8192), (8193, 8320), (300, 384), (50_277, 50_304)])
def test_embedding_adapts_to_tokenizer_vocabulary(vocab: int, rows: int) -> None:
    assert padded_vocab_size(vocab) == rows
    model = build_model(LMConfig(preset="tiny"), vocab, device="meta")
    assert model.gpt_neox.embed_in.weight.shape == (rows, 128)
    assert model.lm_head.weight.shape == (rows, 128)


def test_overrides_change_the_shape() -> None:
    model = build_model(
        LMConfig(preset="tiny", num_layers=2, hidden_size=64, num_heads=2), 256, device="meta"
    )
    cfg = model.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.intermediate_size) == (
        2,
        64,
        2,
        256,
    )
    assert len(model.gpt_neox.layers) == 2


def test_same_seed_same_weights_and_caller_rng_untouched() -> None:
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a = build_model(LMConfig(preset="tiny"), 256, seed=7, device="cpu")
    assert torch.equal(torch.get_rng_state(), before)
    b = build_model(LMConfig(preset="tiny"), 256, seed=7, device="cpu")
    c = build_model(LMConfig(preset="tiny"), 256, seed=8, device="cpu")
    for (name, pa), pb in zip(a.named_parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb), name
    w = "gpt_neox.layers.0.mlp.dense_h_to_4h.weight"
    assert not torch.equal(dict(a.named_parameters())[w], dict(c.named_parameters())[w])
    assert a.training and a.config.use_cache is False


def test_unknown_preset_is_a_clear_error() -> None:
    with pytest.raises(
        ValueError, match=r"unknown LM preset 'pythia-7b'; presets are \[.*'pythia-160m'.*'tiny'"
    ):
        preset_config("pythia-7b", 50_304)
    with pytest.raises(ValidationError, match="preset"):
        LMConfig(preset="pythia-7b")


def test_seq_len_longer_than_context_is_a_clear_error() -> None:
    with pytest.raises(
        ValueError, match=r"lm.seq_len=4096 is longer than the context .*max_position_embeddings=2048"
    ):
        build_model(LMConfig(preset="tiny", seq_len=4096), 256, device="cpu")


def test_heads_must_divide_width() -> None:
    with pytest.raises(ValueError, match=r"hidden_size=130 must be divisible by num_heads=4"):
        build_model(LMConfig(preset="tiny", hidden_size=130), 256, device="meta")


def test_bad_vocab_size_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="vocab_size must be positive"):
        preset_config("tiny", 0)


def test_precision_policy() -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert autocast_dtype("auto", cpu) is None
    assert autocast_dtype("auto", cuda) is torch.bfloat16
    assert autocast_dtype("bf16", cpu) is torch.bfloat16
    assert autocast_dtype("fp32", cuda) is None
    with pytest.raises(ValueError, match="lm.precision"):
        autocast_dtype("fp16", cpu)
