"""Domain sampler: one optimiser step's mixture weights become a list of domain-pure micro-batches.

Dimension legend: K = domains, M = micro-batches per optimiser step over all ranks
(``world_size * grad_accum``), N = sequences in one domain's training split.

Why domain-pure micro-batches: a micro-batch drawn from one domain gives that domain's gradient for
free (the probe adds it to the domain's running sum), which is what the per-domain reward needs.

How a step is planned (every rank computes the same global plan from the shared seed):

1. The weights are validated (finite, non-negative, positive sum, length K), normalised, and mixed
   with the uniform distribution so that every weight is at least ``weight_floor``.
2. Quotas: the M micro-batches are apportioned exactly (``sum(quotas_K) == M``), each domain getting
   the floor or the ceiling of its target ``weight * M``. ``rounding="largest_remainder"`` gives the
   remaining seats to the largest fractional parts (ties broken by a domain order that rotates with
   the step, so exactly uniform weights serve every domain in turn). ``rounding="systematic"`` gives
   them by seeded systematic sampling over the fractional parts, so every domain receives its target
   *in expectation* even when M is smaller than K (largest remainder never serves a domain whose
   fractional part is always the smallest). With ``min_per_domain = m`` domains whose target is
   below m are raised to exactly m and the others share the rest in proportion to their weights.
3. The global list (each domain repeated by its quota) is shuffled by a generator derived from
   (seed, step), so domains interleave and the order depends on nothing but the seed and step.
4. Global entry j is a micro-batch of ``micro_batch_size`` sequences; rank r takes entries
   r, r + W, r + 2W, ... (``grad_accum`` of them), so ranks never read the same sequence.
5. Each domain has a sequential cursor into an endless stream: the concatenation of per-epoch
   permutations of its N sequences. The permutation of epoch e is derived from (seed, domain, e)
   alone, so a domain that wraps reshuffles deterministically whatever the weight history was.

The state (``state_dict``) is just the step counter and one stream position per domain (plain ints,
JSON-able): generators are derived, never carried, so a restored sampler continues exactly even when
the weights differ from step to step.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from numbers import Integral
from typing import Any, Literal

import numpy as np

log = logging.getLogger(__name__)

Rounding = Literal["largest_remainder", "systematic"]
ROUNDINGS: tuple[str, ...] = ("largest_remainder", "systematic")
STATE_VERSION = 1

# Stream tags keep the generators of different purposes independent for the same seed.
_TAG_STEP = 0
_TAG_EPOCH = 1
# Fractional parts closer than this count as a tie (float noise must not decide who gets a seat).
_TIE_DECIMALS = 12


@dataclass(frozen=True, eq=False)
class MicroBatch:
    """One domain-pure micro-batch for this rank.

    Attributes:
        domain: index of the domain (position in the config's domain list).
        sequence_indices: int64 array [micro_batch_size] of sequence indices into that domain's
            training split (``PreparedCorpus.read_sequences(domain, "train", sequence_indices, seq_len)``).
    """

    domain: int
    sequence_indices: np.ndarray

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, MicroBatch):
            return NotImplemented
        return self.domain == other.domain and np.array_equal(self.sequence_indices, other.sequence_indices)

    __hash__ = None  # type: ignore[assignment]  # holds an array: equal-by-value, not hashable


@dataclass(frozen=True, eq=False)
class StepPlan:
    """The plan of one optimiser step: identical on every rank except ``local``.

    Attributes:
        step: 0-based index of the optimiser step this plan is for.
        weights_K: the mixture actually apportioned (normalised, floor applied).
        quotas_K: int64 [K], global micro-batches per domain; sums to ``world_size * grad_accum``.
        domains: int64 [M], the domain of each global micro-batch in processing order.
        local: this rank's ``grad_accum`` micro-batches, global entries ``rank, rank + W, ...``.
    """

    step: int
    weights_K: np.ndarray
    quotas_K: np.ndarray
    domains: np.ndarray
    local: tuple[MicroBatch, ...]

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, StepPlan):
            return NotImplemented
        return (
            self.step == other.step
            and np.array_equal(self.weights_K, other.weights_K)
            and np.array_equal(self.quotas_K, other.quotas_K)
            and np.array_equal(self.domains, other.domains)
            and self.local == other.local
        )

    __hash__ = None  # type: ignore[assignment]


# ---------------------------------------------------------------------------------------------- weights
def validate_weights(
    weights_K: Sequence[float] | np.ndarray, num_domains: int, domain_names: Sequence[str] | None = None
) -> np.ndarray:
    """Check a weight vector and return it normalised to sum 1 (float64 [K]).

    Raises:
        ValueError: wrong shape or length, a NaN/inf or negative entry (naming the domain and value),
            or a sum that is not positive.
    """
    try:
        w_K = np.asarray(weights_K, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(
            f"weights must be a sequence of {num_domains} numbers; got {weights_K!r} ({exc})"
        ) from None
    if w_K.shape != (num_domains,):
        raise ValueError(
            f"weights must have length K={num_domains} (one per domain); got shape {w_K.shape}: {w_K.tolist()!r}"
        )

    def name(k: int) -> str:
        return repr(domain_names[k]) if domain_names is not None else str(k)

    bad = np.flatnonzero(~np.isfinite(w_K))
    if bad.size:
        k = int(bad[0])
        raise ValueError(f"weights must be finite; domain {name(k)} has {w_K[k]} (weights {w_K.tolist()})")
    bad = np.flatnonzero(w_K < 0)
    if bad.size:
        k = int(bad[0])
        raise ValueError(f"weights must be >= 0; domain {name(k)} has {w_K[k]} (weights {w_K.tolist()})")
    total = float(w_K.sum())
    if not total > 0 or not math.isfinite(total):
        raise ValueError(f"weights must have a positive finite sum; got sum {total} (weights {w_K.tolist()})")
    return w_K / total


def apply_floor(weights_K: np.ndarray, floor: float) -> np.ndarray:
    """Mix normalised weights with the uniform distribution so that every weight is >= ``floor``.

    ``w' = floor + (1 - K * floor) * w``: the smallest change of this form that meets the floor; it keeps
    the ordering of the weights and is the identity for ``floor = 0``. Needs ``K * floor < 1``.
    """
    k = weights_K.shape[0]
    if not 0.0 <= floor < 1.0 / k:
        raise ValueError(f"weight_floor={floor} must be in [0, 1/K) = [0, {1 / k:.4g}) for K={k} domains")
    if floor == 0.0:
        return weights_K
    return floor + (1.0 - k * floor) * weights_K


# ---------------------------------------------------------------------------------------------- quotas
def _check_quota_args(num_domains: int, total: int, min_per_domain: int) -> None:
    if not isinstance(total, Integral) or isinstance(total, bool) or total < 0:
        raise ValueError(f"total must be an integer >= 0 (micro-batches per step); got {total!r}")
    if not isinstance(min_per_domain, Integral) or isinstance(min_per_domain, bool) or min_per_domain < 0:
        raise ValueError(f"min_per_domain must be an integer >= 0; got {min_per_domain!r}")
    if min_per_domain * num_domains > total:
        raise ValueError(
            f"min_per_domain={min_per_domain} x K={num_domains} domains = {min_per_domain * num_domains} "
            f"exceeds the {total} micro-batches per step (world_size x grad_accum); lower min_per_domain "
            "or raise grad_accum / world_size"
        )


def quota_targets(weights_K: np.ndarray, total: int, min_per_domain: int = 0) -> np.ndarray:
    """Real-valued targets (float64 [K], sum ``total``) that respect ``min_per_domain``.

    Domains whose share ``w * budget`` falls below the minimum are pinned to it and the rest share what
    is left in proportion to their weights, repeated until stable (water-filling). With no minimum the
    targets are ``w * total``. ``weights_K`` must already be validated and normalised.
    """
    k = weights_K.shape[0]
    _check_quota_args(k, total, min_per_domain)
    target_K = weights_K * total
    if min_per_domain == 0:
        return target_K
    pinned_K = np.zeros(k, dtype=bool)
    while True:
        free_K = ~pinned_K
        budget = total - min_per_domain * int(pinned_K.sum())
        # sum over free weights is > 0: if every free domain fell below the minimum, the total would be
        # below min_per_domain * K, which _check_quota_args rules out.
        free_sum = float(weights_K[free_K].sum())
        target_K = np.where(free_K, weights_K * (budget / free_sum), float(min_per_domain))
        newly = free_K & (target_K < min_per_domain)
        if not newly.any():
            return target_K
        pinned_K |= newly


def _rounded(target_K: np.ndarray, total: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Floors (int64), fractional parts and the number of seats left to hand out."""
    # Snap targets within float noise of an integer (e.g. 1.9999999999999998) so that a pinned minimum or
    # an exact share never depends on the last bit.
    nearest_K = np.round(target_K)
    target_K = np.where(np.abs(target_K - nearest_K) < 1e-9, nearest_K, target_K)
    floor_K = np.floor(target_K).astype(np.int64)
    seats = total - int(floor_K.sum())
    assert 0 <= seats <= target_K.shape[0], (seats, target_K)  # internal invariant: parts are < 1 each
    return floor_K, target_K - floor_K, seats


def largest_remainder_quotas(
    weights_K: Sequence[float] | np.ndarray, total: int, min_per_domain: int = 0, *, tie_offset: int = 0
) -> np.ndarray:
    """Apportion ``total`` micro-batches to K domains by the largest-remainder (Hamilton) method.

    Every domain gets the floor of its target (see ``quota_targets``) and the seats left over go to
    the largest fractional parts, so each quota is within 1 of its target and the quotas sum to
    ``total`` exactly.

    Args:
        weights_K: non-negative weights, any positive scale (validated here).
        total: micro-batches to apportion.
        min_per_domain: every domain gets at least this many; ``min_per_domain * K <= total``.
        tie_offset: equal fractional parts are ranked by domain index starting from
            ``tie_offset mod K`` (the sampler passes the step so ties rotate fairly).

    Returns:
        int64 [K] quotas.

    Raises:
        ValueError: invalid weights, a negative total, or ``min_per_domain * K > total``.
    """
    w_K = validate_weights(weights_K, np.size(weights_K))
    k = w_K.shape[0]
    floor_K, rem_K, seats = _rounded(quota_targets(w_K, total, min_per_domain), total)
    if seats:
        rotation_K = (np.arange(k) - tie_offset) % k
        order = np.lexsort((rotation_K, -np.round(rem_K, _TIE_DECIMALS)))  # last key is primary
        floor_K[order[:seats]] += 1
    return floor_K


def systematic_quotas(
    weights_K: Sequence[float] | np.ndarray, total: int, min_per_domain: int = 0, *, u: float
) -> np.ndarray:
    """Apportion like ``largest_remainder_quotas`` but hand out the leftover seats by systematic sampling.

    The fractional parts are laid end to end on [0, seats); seats sit at ``u, u + 1, ...``; a domain
    whose segment holds a seat gets its ceiling. Each part is < 1, so every quota is the floor or the
    ceiling of its target (within 1), the sum is exact, and for ``u ~ U[0, 1)`` the expected quota
    equals the target: no domain is starved by always having the smallest fractional part.

    Raises:
        ValueError: as ``largest_remainder_quotas``, or ``u`` outside [0, 1).
    """
    if not 0.0 <= u < 1.0:
        raise ValueError(f"u must be in [0, 1); got {u!r}")
    w_K = validate_weights(weights_K, np.size(weights_K))
    floor_K, rem_K, seats = _rounded(quota_targets(w_K, total, min_per_domain), total)
    if seats:
        cum_K = np.cumsum(rem_K)
        cum_K *= seats / cum_K[-1]  # exact end point despite float noise
        # seats in [0, x) at u, u+1, ...: ceil(x - u) of them for x > u.
        hits_K = np.maximum(0, np.ceil(cum_K - u)).astype(np.int64)
        floor_K += np.diff(hits_K, prepend=0)
    return floor_K


def epoch_permutation(seed: int, domain: int, epoch: int, num_sequences: int) -> np.ndarray:
    """The order in which ``domain`` reads its sequences in ``epoch``: a function of its arguments only.

    Stored as uint32 where it fits, so a 100M-sequence domain costs 400 MB per rank while in use.
    """
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, _TAG_EPOCH, domain, epoch])))
    order = np.arange(num_sequences, dtype=np.uint32 if num_sequences < 2**32 else np.int64)
    rng.shuffle(order)
    return order


def _step_rng(seed: int, step: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, _TAG_STEP, step])))


def _check_int(name: str, value: Any, minimum: int) -> int:
    if not isinstance(value, Integral) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}; got {value!r}")
    return int(value)


# ---------------------------------------------------------------------------------------------- sampler
class DomainSampler:
    """Turns mixture weights into each optimiser step's domain-pure micro-batches (see the module doc).

    Args:
        num_sequences_K: training sequences per domain (``PreparedCorpus.num_sequences(k, "train", seq_len)``);
            each must be >= 1.
        micro_batch_size: sequences per micro-batch.
        grad_accum: micro-batches per rank per optimiser step.
        world_size: data-parallel ranks; the global step has ``world_size * grad_accum`` micro-batches.
        rank: this process's rank in ``[0, world_size)``.
        seed: the shared seed; every rank must pass the same one.
        min_per_domain: micro-batches every domain gets each step (the reference forces 1);
            ``min_per_domain * K <= world_size * grad_accum``.
        weight_floor: every weight is raised to at least this (``apply_floor``); ``< 1/K``.
        rounding: ``"largest_remainder"`` (deterministic) or ``"systematic"`` (seeded, unbiased).
        domain_names: names used in error messages (optional).

    Raises:
        ValueError: any argument out of range, naming it and its value.
    """

    def __init__(
        self,
        num_sequences_K: Sequence[int] | np.ndarray,
        *,
        micro_batch_size: int,
        grad_accum: int,
        world_size: int = 1,
        rank: int = 0,
        seed: int = 0,
        min_per_domain: int = 0,
        weight_floor: float = 0.0,
        rounding: Rounding = "largest_remainder",
        domain_names: Sequence[str] | None = None,
    ) -> None:
        self.num_sequences_K = self._check_num_sequences(num_sequences_K)
        k = self.num_domains
        self.micro_batch_size = _check_int("micro_batch_size", micro_batch_size, 1)
        self.grad_accum = _check_int("grad_accum", grad_accum, 1)
        self.world_size = _check_int("world_size", world_size, 1)
        self.rank = _check_int("rank", rank, 0)
        if self.rank >= self.world_size:
            raise ValueError(f"rank must be in [0, world_size={self.world_size}); got {rank}")
        self.seed = _check_int("seed", seed, 0)
        self.min_per_domain = _check_int("min_per_domain", min_per_domain, 0)
        _check_quota_args(k, self.microbatches_per_step, self.min_per_domain)
        if isinstance(weight_floor, bool) or not isinstance(weight_floor, int | float | np.floating):
            raise ValueError(f"weight_floor must be a number in [0, 1/K); got {weight_floor!r}")
        apply_floor(np.full(k, 1.0 / k), float(weight_floor))  # validates 0 <= floor < 1/K
        self.weight_floor = float(weight_floor)
        if rounding not in ROUNDINGS:
            raise ValueError(f"rounding must be one of {ROUNDINGS}; got {rounding!r}")
        self.rounding: Rounding = rounding
        if domain_names is not None and len(domain_names) != k:
            raise ValueError(
                f"domain_names has {len(domain_names)} names for K={k} domains: {list(domain_names)}"
            )
        self.domain_names = list(domain_names) if domain_names is not None else None
        self._step = 0
        self._pos_K = np.zeros(k, dtype=np.int64)  # absolute position in each domain's endless stream
        self._perm_cache: dict[int, tuple[int, np.ndarray]] = {}  # domain -> (epoch, permutation)
        small = [self._name(d) for d in range(k) if self.num_sequences_K[d] < self.micro_batch_size]
        if small:
            log.warning(
                "domains %s have fewer sequences than micro_batch_size=%d: their micro-batches span epochs",
                small,
                self.micro_batch_size,
            )

    @staticmethod
    def _check_num_sequences(num_sequences_K: Sequence[int] | np.ndarray) -> np.ndarray:
        arr = np.asarray(num_sequences_K)
        if arr.ndim != 1 or arr.size == 0 or not np.issubdtype(arr.dtype, np.integer):
            raise ValueError(
                f"num_sequences_K must be a non-empty 1-D list of integers; got {num_sequences_K!r}"
            )
        if (arr < 1).any():
            bad = int(np.flatnonzero(arr < 1)[0])
            raise ValueError(
                f"every domain needs at least one training sequence; domain {bad} has {int(arr[bad])} "
                f"(num_sequences_K={arr.tolist()})"
            )
        return arr.astype(np.int64)

    def _name(self, domain: int) -> str:
        return repr(self.domain_names[domain]) if self.domain_names is not None else str(domain)

    # ------------------------------------------------------------------ properties
    @property
    def num_domains(self) -> int:
        """K."""
        return int(self.num_sequences_K.shape[0])

    @property
    def microbatches_per_step(self) -> int:
        """M = world_size * grad_accum, the global micro-batches of one optimiser step."""
        return self.world_size * self.grad_accum

    @property
    def step(self) -> int:
        """Optimiser steps planned so far (the index of the next plan)."""
        return self._step

    @property
    def epochs_K(self) -> np.ndarray:
        """Completed epochs per domain (int64 [K]); the cursor wraps and reshuffles at each one."""
        return self._pos_K // self.num_sequences_K

    @property
    def epoch_progress_K(self) -> np.ndarray:
        """Epochs read per domain as a fraction (float64 [K]), e.g. 2.25 = a quarter into the third epoch."""
        return self._pos_K / self.num_sequences_K

    # ------------------------------------------------------------------ planning
    def quotas(
        self, weights_K: Sequence[float] | np.ndarray, step: int | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Effective weights and quotas for ``step`` (default: the next one) without advancing anything.

        Returns:
            (weights_K after validation and floor, int64 quotas_K summing to ``microbatches_per_step``).
        """
        step = self._step if step is None else step
        return self._apportion(weights_K, step, float(_step_rng(self.seed, step).random()))

    def _apportion(
        self, weights_K: Sequence[float] | np.ndarray, step: int, u: float
    ) -> tuple[np.ndarray, np.ndarray]:
        w_K = apply_floor(validate_weights(weights_K, self.num_domains, self.domain_names), self.weight_floor)
        m = self.microbatches_per_step
        if self.rounding == "largest_remainder":
            return w_K, largest_remainder_quotas(w_K, m, self.min_per_domain, tie_offset=step)
        return w_K, systematic_quotas(w_K, m, self.min_per_domain, u=u)

    def plan_step(self, weights_K: Sequence[float] | np.ndarray) -> StepPlan:
        """Plan the next optimiser step and advance the cursors (the same global plan on every rank).

        Raises:
            ValueError: invalid weights (wrong length, NaN/inf, negative, zero sum), naming the value.
        """
        step = self._step
        rng = _step_rng(self.seed, step)  # one stream per step: first draw = systematic offset, then order
        w_K, q_K = self._apportion(weights_K, step, float(rng.random()))
        domains = np.repeat(np.arange(self.num_domains, dtype=np.int64), q_K)
        rng.shuffle(domains)  # interleave domains within the step

        # Entry j of domain d reads stream positions [pos_d + c*B, pos_d + (c+1)*B) where c counts the
        # earlier entries of d in this step; rank r materialises only entries j = r, r+W, ...
        mbs, w = self.micro_batch_size, self.world_size
        start = self._pos_K.copy()
        local: list[MicroBatch] = []
        for j, d in enumerate(domains.tolist()):
            if j % w == self.rank:
                local.append(MicroBatch(d, self._read(d, int(start[d]), mbs)))
            start[d] += mbs
        self._pos_K = start
        self._step = step + 1
        return StepPlan(step=step, weights_K=w_K, quotas_K=q_K, domains=domains, local=tuple(local))

    def _read(self, domain: int, position: int, count: int) -> np.ndarray:
        """Sequence indices at stream positions [position, position + count) of ``domain`` (int64)."""
        n = int(self.num_sequences_K[domain])
        out = np.empty(count, dtype=np.int64)
        filled = 0
        while filled < count:
            epoch, offset = divmod(position + filled, n)
            take = min(count - filled, n - offset)
            out[filled : filled + take] = self._permutation(domain, epoch)[offset : offset + take]
            filled += take
        return out

    def _permutation(self, domain: int, epoch: int) -> np.ndarray:
        cached = self._perm_cache.get(domain)
        if cached is None or cached[0] != epoch:
            if cached is not None:
                log.debug("domain %s starts epoch %d", self._name(domain), epoch)
            cached = (epoch, epoch_permutation(self.seed, domain, epoch, int(self.num_sequences_K[domain])))
            self._perm_cache[domain] = cached
        return cached[1]

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly: plain ints and lists, JSON-able, identical on every rank."""
        return {
            "version": STATE_VERSION,
            "seed": self.seed,
            "step": self._step,
            "positions_K": self._pos_K.tolist(),
            "num_sequences_K": self.num_sequences_K.tolist(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore ``state_dict()`` (from any rank: the state is global).

        World size, grad_accum, micro-batch size, min_per_domain, floor and rounding may differ from the
        saved run (the cursors are global stream positions, so no sequence is repeated within an epoch);
        the seed and the corpus (sequences per domain) must match, since they define the streams.

        Raises:
            ValueError: a missing or malformed entry, another version, seed or corpus.
        """
        if not isinstance(state, dict):
            raise ValueError(f"sampler state must be a dict; got {type(state).__name__}")
        missing = [
            key for key in ("version", "seed", "step", "positions_K", "num_sequences_K") if key not in state
        ]
        if missing:
            raise ValueError(f"sampler state lacks {missing}; keys present: {sorted(state)}")
        if state["version"] != STATE_VERSION:
            raise ValueError(f"sampler state version {state['version']!r} is not {STATE_VERSION}")
        if state["seed"] != self.seed:
            raise ValueError(
                f"sampler state was saved with seed {state['seed']!r}, this sampler has seed {self.seed}"
            )
        saved_n = list(state["num_sequences_K"])
        if saved_n != self.num_sequences_K.tolist():
            raise ValueError(
                f"sampler state was saved for num_sequences_K={saved_n}, this corpus has "
                f"{self.num_sequences_K.tolist()}: the prepared data changed"
            )
        step = _check_int("sampler state 'step'", state["step"], 0)
        pos = state["positions_K"]
        if (
            not isinstance(pos, list | tuple)
            or len(pos) != self.num_domains
            or not all(isinstance(p, Integral) and not isinstance(p, bool) and p >= 0 for p in pos)
        ):
            raise ValueError(
                f"sampler state 'positions_K' must be {self.num_domains} integers >= 0; got {pos!r}"
            )
        self._step = step
        self._pos_K = np.asarray(pos, dtype=np.int64)
        self._perm_cache.clear()

    def __repr__(self) -> str:
        return (
            f"DomainSampler(K={self.num_domains}, micro_batch_size={self.micro_batch_size}, "
            f"grad_accum={self.grad_accum}, world_size={self.world_size}, rank={self.rank}, "
            f"min_per_domain={self.min_per_domain}, weight_floor={self.weight_floor}, "
            f"rounding={self.rounding!r}, step={self._step})"
        )
