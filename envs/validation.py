"""The validation metrics every backend reports, from per-domain validation losses.

Dimension legend: K = domains.

``Pretrainer.evaluate`` (a real LM) and ``SimulatedBackend.evaluate`` (the analytic model) both report
the same keys, so the driver, the ledger, the analysis code and the benchmarks read one vocabulary.
Keeping the formulas in one place keeps the summaries' definitions identical across backends.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def validation_metrics(
    domain_names: Sequence[str],
    loss_sum_K: np.ndarray,
    tokens_K: np.ndarray,
    target_mask_K: np.ndarray,
) -> dict[str, float]:
    """Per-domain validation loss and perplexity, and their summaries over the target domains.

    The losses come as sums over tokens with their token counts, so that the token-weighted summary
    is exact; a backend whose losses are already means passes them with ``tokens_K`` all ones (every
    domain then weighs the same, and ``val/weighted_ppl`` equals ``val/geo_mean_ppl``).

    Args:
        domain_names: the K domain names, in index order.
        loss_sum_K: per domain, the summed token loss (nats) over its validation tokens.
        tokens_K: per domain, the number of validation tokens (all > 0).
        target_mask_K: which domains the summaries average over (at least one True).

    Returns:
        ``val/loss/<domain>`` (mean token loss) and ``val/ppl/<domain>`` (its exp) for every domain;
        over the targets: ``val/mean_ppl`` (unweighted mean of the perplexities), ``val/weighted_ppl``
        (exp of the token-weighted mean loss) and ``val/geo_mean_ppl`` (exp of the mean loss).

    Raises:
        ValueError: the arrays do not have one entry per domain, or no domain is a target.
    """
    loss_sum_K = np.asarray(loss_sum_K, dtype=np.float64)
    tokens_K = np.asarray(tokens_K, dtype=np.float64)
    t = np.asarray(target_mask_K, dtype=bool)
    k = len(domain_names)
    if not loss_sum_K.shape == tokens_K.shape == t.shape == (k,):
        raise ValueError(
            f"expected one value per domain ({k}), got loss_sum_K {loss_sum_K.shape}, tokens_K "
            f"{tokens_K.shape}, target_mask_K {t.shape}"
        )
    if not t.any():
        raise ValueError("target_mask_K marks no domain: the summaries would average over nothing")
    loss_K = loss_sum_K / tokens_K
    ppl_K = np.exp(loss_K)
    out: dict[str, float] = {}
    for name, loss, ppl in zip(domain_names, loss_K, ppl_K, strict=True):
        out[f"val/loss/{name}"] = float(loss)
        out[f"val/ppl/{name}"] = float(ppl)
    out["val/mean_ppl"] = float(ppl_K[t].mean())
    out["val/weighted_ppl"] = float(np.exp(loss_sum_K[t].sum() / tokens_K[t].sum()))
    out["val/geo_mean_ppl"] = float(np.exp(loss_K[t].mean()))
    return out
