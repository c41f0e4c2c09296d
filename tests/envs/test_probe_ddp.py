"""GradientProbe under 2-process gloo DDP: all-reduced per-domain sums equal the single-process sums.

Each rank runs its share of one step's micro-batches through a DDP-wrapped tiny GPT-NeoX (``no_sync``
on all but the last, as the Pretrainer does). DDP all-reduces ``.grad`` on the last backward; the
probe's hooks must still see each micro-batch's *local* gradient (reference bug B11), so after the
probe's own all-reduce the per-domain means must equal those of one process running every micro-batch.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import pytest
import torch

from envs.config import ProbeConfig
from envs.probe import GradientProbe, gram_matrix
from tests.envs.lm_fixtures import spawn_gloo
from tests.envs.test_probe import lm_loss, micro_batches, tiny_model

K = 3
DOMAINS = [0, 2, 0, 1, 1, 0, 2, 0]  # 8 micro-batches: rank r takes entries r, r+2, ...
SKETCH = ProbeConfig(mode="sketch", sketch_dim=128)


def make_probes(model: torch.nn.Module) -> tuple[GradientProbe, GradientProbe]:
    return GradientProbe(model, ProbeConfig(), K), GradientProbe(model, SKETCH, K, seed=11)


def run_microbatches(module, probes, batches, ddp=None) -> None:
    for probe in probes:
        probe.begin_step()
    for i, (domain, tokens) in enumerate(batches):
        for probe in probes:
            probe.begin_microbatch(domain)
        last = i == len(batches) - 1
        with ddp.no_sync() if ddp is not None and not last else contextlib.nullcontext():
            lm_loss(module, tokens).backward()
        for probe in probes:
            probe.end_microbatch()


def ddp_worker(rank: int, world_size: int, out_dir: str) -> None:
    model = tiny_model()
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    probes = make_probes(ddp)  # names carry DDP's "module." prefix; the rule must still find them
    run_microbatches(ddp, probes, micro_batches(DOMAINS)[rank::world_size], ddp=ddp)
    counts = np.bincount(DOMAINS, minlength=K)
    exact, sketch = (probe.mean_gradients(counts) for probe in probes)
    first = probes[0].params[0][1]
    torch.save(
        {"exact": exact, "sketch": sketch, "grad": first.grad.clone(), "names": probes[0].param_names},
        Path(out_dir) / f"rank{rank}.pt",
    )


@pytest.mark.slow
def test_ddp_all_reduced_sums_equal_single_process_sums(tmp_path):
    torch.set_num_threads(1)
    spawn_gloo(ddp_worker, 2, str(tmp_path))
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]

    model = tiny_model()
    probes = make_probes(model)
    run_microbatches(model, probes, micro_batches(DOMAINS))
    counts = np.bincount(DOMAINS, minlength=K)
    exact, sketch = (probe.mean_gradients(counts) for probe in probes)

    for record in ranks:
        assert record["names"] == ["module." + n for n in probes[0].param_names]
        torch.testing.assert_close(record["exact"], exact, rtol=1e-5, atol=1e-8)
        torch.testing.assert_close(record["sketch"], sketch, rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(gram_matrix(ranks[0]["exact"]), gram_matrix(exact), rtol=1e-5)
    # DDP itself still averaged .grad over the ranks (the hooks did not disturb it), so reading .grad
    # after the last backward (what the reference does) would give the averaged, not the local, value.
    full_grad = probes[0].params[0][1].grad
    torch.testing.assert_close(ranks[0]["grad"], full_grad / 2, rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(ranks[1]["grad"], ranks[0]["grad"])
