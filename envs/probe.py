"""GradientProbe: per-domain gradients of the reward parameters, and the monitored weight norms.

Dimension legend: K = domains, P = probed parameter values, k = sketch width, L = monitored layers.

The probe is the ``StepObserver`` a ``Pretrainer`` calls around each micro-batch (``envs.signals``).

**Which parameters.** By default the MLP output projections ``layers.<i>.mlp.dense_4h_to_h.weight``
of the reference's blocks: with N blocks (0-based), blocks ``N-1, N-3, N-5, ...`` (the last
``num_reward_blocks`` even offsets from the last block; fewer when the model is too shallow). For the
reference's 1B (N=16) that is blocks 15, 13, 11 and for 410M (N=24) blocks 23, 21, 19: exactly its
sequential indices 17/15/13 and 25/23/21 (docs/reference.md, R1). ``ProbeConfig.param_patterns`` (regexes,
``re.search`` on the parameter name) replace the rule. Monitored weights: ``dense_4h_to_h.weight`` of
``num_monitored_layers`` evenly spaced blocks, ``round(linspace(0, N-1, L))`` (all N blocks if L > N).

**How gradients are captured.** A tensor hook on each probed parameter (``param.register_hook``) runs
when autograd has computed that parameter's gradient for the current backward, *before* it is
accumulated into ``.grad`` and before DDP's reducer (which runs after accumulation) all-reduces it. So
the hook sees exactly this micro-batch's local gradient, on every micro-batch including the last one
of a DDP step (the reference reads reduced ``.grad`` values there: bug B11). Each gradient is added to
its domain's running sum on the parameter's device; ``end_step`` all-reduces the sums once (SUM over
ranks) and divides by the *global* per-domain micro-batch counts, giving per-domain mean gradients.
Scale factors applied to the loss (1/grad_accum, a loss scale) multiply every row alike and cancel in
the z-scored reward.

**Modes.** ``exact`` keeps a K x P fp32 matrix. ``sketch`` keeps a K x k CountSketch: value i goes to
bucket ``h(i) = ((a1*i + b1) mod p) mod k`` with sign ``s(i) = 1 - 2 * (((a2*i + b2) mod p) mod 2)``,
``p = 2^31 - 1``, (a1, b1, a2, b2) drawn from the probe's seed. Over the seed, inner products of
sketches are unbiased estimates of the true inner products (up to O(1/p)), with variance at most
``(|x|^2 |y|^2 + <x, y>^2) / k``. Memory and the all-reduce are K x k, independent of P; the hash
tables are cached on the device only while ``P <= SKETCH_CACHE_MAX`` values and recomputed per
micro-batch (in chunks) above that. All ranks must use the same seed (it is part of the config).

**Absent domains** (global count 0) have zero rows, hence zero Gram rows and columns.

**Weight norms.** ``after_update`` returns the Frobenius norms of the monitored weights and the norm
of their change since the baseline: the previous step's weights (``delta_baseline="previous"``) or
the weights when the probe was attached (``"initial"``, the reference's cumulative feature, bug B8).
In exact mode the baseline is an fp32 copy of the L monitored matrices on their device; in sketch
mode it is their k-wide CountSketches (a second seed), and the change norm is estimated from them.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from envs.config import ProbeConfig

log = logging.getLogger(__name__)

BLOCK_PARAM_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.mlp\.dense_4h_to_h\.weight$")
MERSENNE_PRIME = 2**31 - 1
SKETCH_CACHE_MAX = 2**22
_CHUNK = 2**22
_GRAM_CHUNK_BYTES = 2**27


def select_reward_blocks(num_blocks: int, num_reward_blocks: int) -> list[int]:
    """Blocks ``N-1, N-3, ...`` (``num_reward_blocks`` of them, those that exist), ascending."""
    if num_blocks <= 0:
        raise ValueError(f"the model has no transformer blocks (num_blocks={num_blocks})")
    return sorted(num_blocks - 1 - 2 * j for j in range(num_reward_blocks) if num_blocks - 1 - 2 * j >= 0)


def select_monitored_blocks(num_blocks: int, num_layers: int) -> list[int]:
    """``min(L, N)`` evenly spaced blocks ``round(linspace(0, N-1, L))``, ascending, distinct."""
    if num_blocks <= 0:
        raise ValueError(f"the model has no transformer blocks (num_blocks={num_blocks})")
    count = min(num_layers, num_blocks)
    if count == 1:
        return [num_blocks - 1]
    return [int(np.floor(x + 0.5)) for x in np.linspace(0, num_blocks - 1, count)]


def block_params(model: nn.Module) -> dict[int, tuple[str, nn.Parameter]]:
    """``{block index: (name, dense_4h_to_h.weight)}`` of a GPT-NeoX model (DDP/compile prefixes allowed)."""
    found: dict[int, tuple[str, nn.Parameter]] = {}
    for name, param in model.named_parameters():
        match = BLOCK_PARAM_RE.search(name)
        if match:
            found[int(match.group(1))] = (name, param)
    if not found:
        raise ValueError("no parameter matches 'layers.<i>.mlp.dense_4h_to_h.weight': not a GPT-NeoX model?")
    expected = list(range(len(found)))
    if sorted(found) != expected:
        raise ValueError(f"block indices {sorted(found)} are not 0..{len(found) - 1}")
    return found


def resolve_reward_params(model: nn.Module, cfg: ProbeConfig) -> list[tuple[str, nn.Parameter]]:
    """The probed parameters, in model order: by ``cfg.param_patterns`` or by the block rule."""
    if cfg.param_patterns:
        try:
            regexes = [re.compile(p) for p in cfg.param_patterns]
        except re.error as exc:
            raise ValueError(f"env.probe.param_patterns: invalid regex ({exc})") from None
        chosen = [(n, p) for n, p in model.named_parameters() if any(r.search(n) for r in regexes)]
        if not chosen:
            raise ValueError(f"env.probe.param_patterns {cfg.param_patterns} match no parameter of the model")
        frozen = [n for n, p in chosen if not p.requires_grad]
        if frozen:
            raise ValueError(f"env.probe.param_patterns match parameters without gradients: {frozen}")
        return chosen
    blocks = block_params(model)
    return [blocks[i] for i in select_reward_blocks(len(blocks), cfg.num_reward_blocks)]


@dataclass(frozen=True)
class CountSketch:
    """A seeded CountSketch R^P -> R^k (see the module docstring for the hash family)."""

    sketch_dim: int
    seed: int

    def coefficients(self) -> tuple[int, int, int, int]:
        """``(a1, b1, a2, b2)`` of the bucket and sign hashes, drawn from ``seed``."""
        rng = np.random.default_rng([self.seed, 0x5EED])
        a1, a2 = (int(x) for x in rng.integers(1, MERSENNE_PRIME, size=2))
        b1, b2 = (int(x) for x in rng.integers(0, MERSENNE_PRIME, size=2))
        return a1, b1, a2, b2

    def hashes(self, start: int, stop: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Buckets (int64) and signs (float32) of global indices ``[start, stop)``."""
        a1, b1, a2, b2 = self.coefficients()
        idx = torch.arange(start, stop, dtype=torch.int64, device=device)
        bucket = torch.remainder(torch.remainder(idx * a1 + b1, MERSENNE_PRIME), self.sketch_dim)
        parity = torch.remainder(torch.remainder(idx * a2 + b2, MERSENNE_PRIME), 2)
        return bucket, (1 - 2 * parity).to(torch.float32)

    def add_into(self, out_k: torch.Tensor, values: torch.Tensor, start: int = 0) -> None:
        """``out_k += S(values)`` where ``values`` hold global indices ``start, start+1, ...``.

        Hashes are computed per chunk of ``2^22`` values, so the extra memory stays bounded.
        """
        flat = values.detach().reshape(-1).to(torch.float32)
        for lo in range(0, flat.numel(), _CHUNK):
            hi = min(lo + _CHUNK, flat.numel())
            bucket, sign = self.hashes(start + lo, start + hi, flat.device)
            out_k.index_add_(0, bucket, flat[lo:hi] * sign)

    def project(self, values_P: torch.Tensor) -> torch.Tensor:
        """The sketch of a flat vector (global indices 0..P-1)."""
        out = torch.zeros(self.sketch_dim, dtype=torch.float32, device=values_P.device)
        self.add_into(out, values_P)
        return out


class GradientProbe:
    """Per-domain gradient sums of the reward parameters (exact or sketched) and weight-norm monitor.

    Args:
        model: the model being trained (plain, DDP-wrapped or compiled: parameters are shared).
        config: ``EnvConfig.probe``.
        num_domains: K.
        seed: the sketch seed; must be equal on every rank.
        delta_baseline: ``previous`` (step-to-step weight change) or ``initial`` (since attach).
        process_group: the group to all-reduce over (default: the default group when initialised).

    Attributes:
        hook_seconds: host seconds spent inside the gradient hooks since ``begin_step`` (they run
            within backward, so the Pretrainer's ``probe`` timing does not include them).
    """

    def __init__(
        self,
        model: nn.Module,
        config: ProbeConfig,
        num_domains: int,
        *,
        seed: int = 0,
        delta_baseline: Literal["previous", "initial"] = "previous",
        process_group: Any = None,
    ) -> None:
        if num_domains < 1:
            raise ValueError(f"num_domains must be >= 1, got {num_domains}")
        if delta_baseline not in ("previous", "initial"):
            raise ValueError(f"delta_baseline must be 'previous' or 'initial', got {delta_baseline!r}")
        self.config = config
        self.num_domains = num_domains
        self.seed = int(seed)
        self.delta_baseline = delta_baseline
        self.process_group = process_group
        self.params = resolve_reward_params(model, config)
        self.param_names = [n for n, _ in self.params]
        sizes = [p.numel() for _, p in self.params]
        self.offsets = [int(x) for x in np.cumsum([0, *sizes])]
        self.num_values = self.offsets[-1]
        if self.num_values >= 2**32:
            raise ValueError(f"probing {self.num_values} values is above the sketch hash range 2^32")
        self.device = self.params[0][1].device
        self.sketch = CountSketch(config.sketch_dim, self.seed) if config.mode == "sketch" else None
        width = config.sketch_dim if self.sketch is not None else self.num_values
        self._sums = torch.zeros(num_domains, width, dtype=torch.float32, device=self.device)
        # Per-domain sums of each micro-batch's *exact* squared gradient norm, and the running one of
        # the current micro-batch: what ``envs.rewards.debiased_gram`` needs to remove each domain's
        # sampling noise from its own Gram diagonal.
        self._sqnorm_sums = torch.zeros(num_domains, dtype=torch.float64, device=self.device)
        self._mb_sqnorm = torch.zeros((), dtype=torch.float64, device=self.device)
        self._hash_cache: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        if self.sketch is not None and self.num_values <= SKETCH_CACHE_MAX:
            self._hash_cache = []
            for lo, hi in zip(self.offsets, self.offsets[1:], strict=False):
                bucket, sign = self.sketch.hashes(lo, hi, self.device)
                self._hash_cache.append((bucket.to(torch.int32), sign))
        blocks = block_params(model)
        self.monitored_blocks = select_monitored_blocks(len(blocks), config.num_monitored_layers)
        self.monitored = [blocks[i] for i in self.monitored_blocks]
        # The weight-change baseline: exact fp32 copies, or (sketch mode) their CountSketches, so that
        # sketch mode holds no O(P) state at all.
        self._weight_sketch = (
            CountSketch(config.sketch_dim, self.seed + 1) if self.sketch is not None else None
        )
        self._weight_hash: tuple[torch.Tensor, torch.Tensor] | None = None
        sizes_L = {p.numel() for _, p in self.monitored}
        if self._weight_sketch is not None and len(sizes_L) == 1 and max(sizes_L) <= SKETCH_CACHE_MAX:
            # Every monitored matrix has the same shape, so one cached hash table serves all of them.
            bucket, sign = self._weight_sketch.hashes(0, sizes_L.pop(), self.device)
            self._weight_hash = (bucket.to(torch.int32), sign)
        self.hook_seconds = 0.0
        self._baseline = [self._weight_state(p) for _, p in self.monitored]
        self._domain: int | None = None
        self._fired = 0
        self._missing_warned = False
        self._handles = [p.register_hook(self._make_hook(i)) for i, (_, p) in enumerate(self.params)]

    # ------------------------------------------------------------------ sizes
    @property
    def num_monitored_layers(self) -> int:
        """L, the monitored weight matrices."""
        return len(self.monitored)

    def state_bytes(self) -> dict[str, int]:
        """Bytes held on the device: per-domain sums, cached sketch hashes, weight baseline."""
        tables = list(self._hash_cache or []) + ([self._weight_hash] if self._weight_hash is not None else [])
        cache = sum(b.numel() * 4 + s.numel() * 4 for b, s in tables)
        return {
            "sums": self._sums.numel() * 4,
            "sketch_hash_cache": cache,
            "weight_baseline": sum(t.numel() * 4 for t in self._baseline),
        }

    # ------------------------------------------------------------------ hooks
    def _make_hook(self, index: int):
        lo, hi = self.offsets[index], self.offsets[index + 1]

        def hook(grad: torch.Tensor) -> None:
            if self._domain is None:
                return  # a backward outside begin/end_microbatch (not a training micro-batch)
            t0 = time.perf_counter()
            self._fired += 1
            row = self._sums[self._domain]
            flat = grad.detach().reshape(-1).to(torch.float32)
            self._mb_sqnorm += flat.square().sum(dtype=torch.float64)
            if self.sketch is None:
                row[lo:hi].add_(flat)
            elif self._hash_cache is not None:
                bucket, sign = self._hash_cache[index]
                row.index_add_(0, bucket, flat * sign)
            else:
                self.sketch.add_into(row, flat, start=lo)
            self.hook_seconds += time.perf_counter() - t0

        return hook

    # ------------------------------------------------------------------ StepObserver
    def begin_step(self) -> None:
        """Zero the per-domain sums."""
        if not self._handles:
            raise RuntimeError("GradientProbe.begin_step on a closed probe; attach a new probe instead")
        self._sums.zero_()
        self._sqnorm_sums.zero_()
        self._domain = None
        self.hook_seconds = 0.0

    def begin_microbatch(self, domain: int) -> None:
        """The next backward belongs to ``domain``."""
        if not 0 <= domain < self.num_domains:
            raise ValueError(f"domain index {domain} out of range [0, {self.num_domains})")
        self._domain = int(domain)
        self._fired = 0
        self._mb_sqnorm.zero_()

    def end_microbatch(self) -> None:
        """Close the micro-batch; warn once if no probed gradient arrived (probe on the wrong model?)."""
        if self._domain is not None and self._fired == 0 and not self._missing_warned:
            log.warning(
                "GradientProbe saw no gradient of %s for a micro-batch of domain %d; is it attached to the "
                "model being trained, and did backward run?",
                self.param_names,
                self._domain,
            )
            self._missing_warned = True
        if self._domain is not None:
            self._sqnorm_sums[self._domain] += self._mb_sqnorm
        self._domain = None

    def _all_reduce(self, tensor: torch.Tensor) -> None:
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized() and dist.get_world_size(self.process_group) > 1:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=self.process_group)

    def mean_gradients(self, microbatches_K: np.ndarray) -> torch.Tensor:
        """All-reduce the sums and divide each row by its global count (zero rows for count 0).

        Returns the K x P (exact) or K x k (sketch) matrix of per-domain mean gradients, fp32, on the
        probe's device. Call at most once per step: it reduces and scales the sums in place.
        """
        counts = np.asarray(microbatches_K, dtype=np.float64).reshape(-1)
        if counts.shape != (self.num_domains,):
            raise ValueError(f"microbatches_K must have shape ({self.num_domains},), got {counts.shape}")
        self._all_reduce(self._sums)
        inv = np.divide(1.0, counts, out=np.zeros_like(counts), where=counts > 0)
        return self._sums.mul_(torch.as_tensor(inv, dtype=torch.float32, device=self.device)[:, None])

    def end_step(self, microbatches_K: np.ndarray) -> dict[str, np.ndarray]:
        """``{"gram_KK": G G^T}`` of the per-domain mean gradients and ``{"microbatch_sqnorm_K": ...}``,
        the per-domain sums of each micro-batch's squared gradient norm (float64, identical on all
        ranks)."""
        gram = gram_matrix(self.mean_gradients(microbatches_K))
        self._all_reduce(self._sqnorm_sums)
        return {"gram_KK": gram, "microbatch_sqnorm_K": self._sqnorm_sums.cpu().numpy().copy()}

    @torch.no_grad()
    def weight_norms(self) -> np.ndarray:
        """Frobenius norms of the monitored weights now (float64, L)."""
        if not self.monitored:
            return np.zeros(0)
        norms = torch.stack(
            [torch.linalg.vector_norm(p.detach().to(torch.float32)) for _, p in self.monitored]
        )
        return norms.cpu().numpy().astype(np.float64)

    @torch.no_grad()
    def _weight_state(self, param: torch.Tensor) -> torch.Tensor:
        """What the baseline keeps of a monitored weight: an fp32 copy, or its sketch."""
        if self._weight_sketch is None:
            return param.detach().to(torch.float32).clone()
        if self._weight_hash is None:
            return self._weight_sketch.project(param)
        bucket, sign = self._weight_hash
        out = torch.zeros(self._weight_sketch.sketch_dim, dtype=torch.float32, device=param.device)
        return out.index_add_(0, bucket, param.detach().reshape(-1).to(torch.float32) * sign)

    @torch.no_grad()
    def after_update(self) -> dict[str, np.ndarray]:
        """``weight_norms_L`` and ``weight_delta_norms_L`` (change since the baseline) after the update.

        In sketch mode the change norm is the norm of the difference of sketches: an estimate whose
        square is unbiased, with relative standard deviation about ``sqrt(2 / k)``.
        """
        norms, deltas = [], []
        for (_, param), base in zip(self.monitored, self._baseline, strict=True):
            current = self._weight_state(param)
            norms.append(torch.linalg.vector_norm(param.detach().to(torch.float32)))
            deltas.append(torch.linalg.vector_norm(current - base))
            if self.delta_baseline == "previous":
                base.copy_(current)
        if not norms:
            return {"weight_norms_L": np.zeros(0), "weight_delta_norms_L": np.zeros(0)}
        stacked = torch.stack([torch.stack(norms), torch.stack(deltas)]).cpu().numpy().astype(np.float64)
        return {"weight_norms_L": stacked[0], "weight_delta_norms_L": stacked[1]}

    # ------------------------------------------------------------------ state
    @torch.no_grad()
    def rebaseline(self) -> None:
        """Take the current monitored weights as the baseline (after loading model weights)."""
        for (_, param), base in zip(self.monitored, self._baseline, strict=True):
            base.copy_(self._weight_state(param))

    def state_dict(self) -> dict[str, Any]:
        """Settings that must match on resume, plus the initial weights in ``initial`` baseline mode.

        In ``previous`` mode the baseline is the model's current weights, so ``load_state_dict``
        re-reads it from the (already loaded) model instead of storing L matrices.
        """
        state: dict[str, Any] = {
            "mode": self.config.mode,
            "sketch_dim": self.config.sketch_dim,
            "seed": self.seed,
            "param_names": list(self.param_names),
            "monitored_blocks": list(self.monitored_blocks),
            "delta_baseline": self.delta_baseline,
        }
        if self.delta_baseline == "initial":
            state["baseline"] = [t.detach().cpu().clone() for t in self._baseline]
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Check the settings match and restore the weight baseline; load the model weights first."""
        mine = self.state_dict()
        for key in ("mode", "sketch_dim", "seed", "param_names", "monitored_blocks", "delta_baseline"):
            if state.get(key) != mine[key]:
                raise ValueError(
                    f"probe state mismatch for {key!r}: checkpoint {state.get(key)!r}, now {mine[key]!r}"
                )
        if self.delta_baseline == "initial":
            for base, saved in zip(self._baseline, state["baseline"], strict=True):
                base.copy_(saved.to(base.device))
        else:
            self.rebaseline()

    def close(self) -> None:
        """Remove the hooks and free the buffers."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._sums = torch.zeros(0)
        self._sqnorm_sums = torch.zeros(0, dtype=torch.float64)
        self._hash_cache = None
        self._weight_hash = None
        self._baseline = []


def gram_matrix(rows_KP: torch.Tensor) -> np.ndarray:
    """``rows @ rows.T`` accumulated in float64 over column chunks (bounded extra memory)."""
    k, width = rows_KP.shape
    gram = torch.zeros(k, k, dtype=torch.float64, device=rows_KP.device)
    step = max(1, _GRAM_CHUNK_BYTES // (8 * max(k, 1)))
    for start in range(0, width, step):
        chunk = rows_KP[:, start : start + step].to(torch.float64)
        gram += chunk @ chunk.T
    return gram.cpu().numpy()
