"""The LM training engine: one optimiser step over domain-pure micro-batches, validation, exact state.

Dimension legend: K = domains, B = sequences per micro-batch, T = seq_len, V = padded vocabulary.

One ``train_step(weights_K)``:

1. The ``DomainSampler`` turns the weights into this step's global plan; this rank takes its
   ``grad_accum`` micro-batches, each ``B`` sequences of one domain.
2. Per micro-batch: forward (bf16 autocast on GPU), mean token cross-entropy, and backward of
   ``loss * world_size * tokens_mb / global_tokens``. Summed over micro-batches and averaged by DDP over
   ranks, that is exactly the gradient of the mean token loss over the whole global batch. DDP's
   gradient all-reduce runs only on the last micro-batch (``no_sync`` on the others). The attached
   ``StepObserver`` (the gradient probe) is told which domain each backward belongs to.
3. Per-domain loss sums, micro-batch counts and token counts go through one packed all-reduce.
4. Clip, then AdamW, then the warmup+cosine schedule. A non-finite loss or gradient norm skips the
   update (the step still counts, so the schedule and the sampler stay aligned with the step number);
   ``optim.max_nonfinite_steps`` of them in a row raise ``RuntimeError``.

Under ``torch.distributed`` (initialised by the caller, e.g. Ray Train), world size and rank come from
the process group and the Pretrainer wraps the model in DDP itself; pass ``device`` (``cuda:<local
rank>``) explicitly on multi-GPU nodes. ``self.model`` is always the plain Hugging Face model.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import math
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from envs.config import EvalConfig, LMConfig, OptimConfig, SamplerConfig
from envs.model import autocast_dtype, build_model, model_config, resolve_device
from envs.sampler import DomainSampler
from envs.signals import StepObserver, TrainSignals
from envs.validation import validation_metrics

log = logging.getLogger(__name__)

STATE_VERSION = 1
_PHASES = ("data", "forward_backward", "probe", "optimizer")
_SHAPE_KEYS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")


class WarmupCosine:
    """LR multiplier: linear warmup to 1 over ``warmup_steps``, then cosine to ``min_ratio`` at ``total_steps``.

    A callable object (not a lambda) so that ``LambdaLR.state_dict()`` records its parameters.
    ``step`` is the 0-based index of the optimiser step the LR is for; the first step already has a
    non-zero LR (``1 / warmup_steps``), unlike Megatron's schedule that spends step 0 at LR 0.
    """

    def __init__(self, warmup_steps: int, total_steps: int, min_ratio: float) -> None:
        self.warmup_steps = int(warmup_steps)
        self.total_steps = int(total_steps)
        self.min_ratio = float(min_ratio)

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        decay_steps = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / decay_steps)
        return self.min_ratio + (1.0 - self.min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


class WarmupStableDecay:
    """LR multiplier of warmup-stable-decay (MiniCPM, arXiv 2404.06395): linear warmup to 1 over
    ``warmup_steps``, 1 until ``decay_start``, then ``shape`` down to ``min_ratio`` at ``total_steps``.

    The multiplier of every step before ``decay_start`` does not depend on ``total_steps``: that is what
    lets a run be extended from its checkpoint at the decay start (``extend``). ``shape`` is ``linear``,
    ``cosine`` or ``1-sqrt`` (``1 - sqrt(progress)``, Hagele et al., arXiv 2405.18392). Same step indexing
    as ``WarmupCosine``; the last step (``total_steps - 1``) runs at ``min_ratio``.
    """

    def __init__(self, warmup_steps: int, total_steps: int, min_ratio: float, decay_steps: int,
                 shape: str = "1-sqrt") -> None:
        if shape not in ("linear", "cosine", "1-sqrt"):
            raise ValueError(f"decay shape must be linear, cosine or 1-sqrt, got {shape!r}")
        self.warmup_steps = int(warmup_steps)
        self.min_ratio = float(min_ratio)
        self.shape = shape
        self.total_steps = int(total_steps)
        self.decay_steps = max(1, min(int(decay_steps), self.total_steps))
        self.decay_start = self.total_steps - self.decay_steps

    def extend(self, total_steps: int, decay_steps: int) -> None:
        """Move the horizon (and with it the decay) to ``total_steps``; the warmup is kept as it was."""
        self.total_steps = int(total_steps)
        self.decay_steps = max(1, min(int(decay_steps), self.total_steps))
        self.decay_start = self.total_steps - self.decay_steps

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if step < self.decay_start:
            return 1.0
        progress = min(1.0, (step - self.decay_start + 1) / self.decay_steps)
        if self.shape == "linear":
            left = 1.0 - progress
        elif self.shape == "cosine":
            left = 0.5 * (1.0 + math.cos(math.pi * progress))
        else:
            left = 1.0 - math.sqrt(progress)
        return self.min_ratio + (1.0 - self.min_ratio) * left


def warmup_steps_of(optim_cfg: OptimConfig, total_steps: int) -> int:
    """Warmup length of a run of ``total_steps`` (``optim.warmup_fraction``, at least one step if set)."""
    return max(1, round(optim_cfg.warmup_fraction * total_steps)) if optim_cfg.warmup_fraction else 0


def decay_steps_of(optim_cfg: OptimConfig, total_steps: int) -> int:
    """Steps of a ``wsd`` run's decay phase: ``optim.decay_fraction`` of ``total_steps``, at least one."""
    return max(1, min(total_steps, round(optim_cfg.decay_fraction * total_steps)))


def stable_checkpoint_step(optim_cfg: OptimConfig, total_steps: int) -> int | None:
    """The step a ``wsd`` run keeps a checkpoint at so it can be extended: the last one before its decay
    (the state after ``decay_start`` optimiser steps, all at the warmup or peak LR); None for cosine."""
    if optim_cfg.schedule != "wsd":
        return None
    return total_steps - decay_steps_of(optim_cfg, total_steps)


def lr_schedule(optim_cfg: OptimConfig, total_steps: int) -> WarmupCosine | WarmupStableDecay:
    """The LR multiplier ``optim.schedule`` names, for a run of ``total_steps``."""
    warmup = warmup_steps_of(optim_cfg, total_steps)
    if optim_cfg.schedule == "wsd":
        return WarmupStableDecay(warmup, total_steps, optim_cfg.min_lr_ratio,
                                 decay_steps_of(optim_cfg, total_steps), optim_cfg.decay_shape)
    return WarmupCosine(warmup, total_steps, optim_cfg.min_lr_ratio)


def build_optimizer(
    model: torch.nn.Module, optim_cfg: OptimConfig, device: torch.device
) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices (linear weights, embeddings) only, as GPT-NeoX/Pythia do.

    Biases and LayerNorm parameters (every tensor with fewer than 2 dims) get no decay.
    """
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    groups = [
        {"params": decay, "weight_decay": optim_cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(
        groups,
        lr=optim_cfg.lr,
        betas=tuple(optim_cfg.betas),
        eps=optim_cfg.eps,
        fused=device.type == "cuda",
    )


def _no_buffer_sync() -> dict[str, bool]:
    """DDP kwargs that skip the per-forward buffer broadcast (renamed in torch 2.13)."""
    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel.__init__).parameters:
        return {"forward_sync_buffers": False}
    return {"broadcast_buffers": False}


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


class Pretrainer:
    """Trains a GPT-NeoX model on a prepared corpus, one mixture-weighted optimiser step at a time.

    Args:
        lm_cfg: model preset, sequence length, precision, compile, CPU threads.
        optim_cfg: AdamW, schedule, clipping and non-finite tolerance.
        sampler_cfg: micro-batch size, gradient accumulation, per-domain minimum, weight floor.
        eval_cfg: validation batches per domain and their size.
        corpus: a ``PreparedCorpus`` (or anything with its read interface).
        total_steps: optimiser steps in the run (the LR schedule's horizon).
        seed: model init and sampler seed (same seed, same run).
        device: None = CUDA if available, else CPU.
        target_mask_K: which domains count in ``val/mean_ppl``; default the corpus's ``targets``
            (all domains when the corpus has none).

    Raises:
        ValueError: ``seq_len`` longer than the model's context, a domain whose validation split is
            shorter than one sequence, a target mask of the wrong length or without a target.
    """

    def __init__(
        self,
        lm_cfg: LMConfig,
        optim_cfg: OptimConfig,
        sampler_cfg: SamplerConfig,
        eval_cfg: EvalConfig,
        corpus: Any,
        *,
        total_steps: int,
        seed: int,
        device: torch.device | str | None = None,
        target_mask_K: Sequence[bool] | np.ndarray | None = None,
    ) -> None:
        if total_steps <= 0:
            raise ValueError(f"total_steps must be positive, got {total_steps}")
        if lm_cfg.num_threads > 0:
            torch.set_num_threads(lm_cfg.num_threads)
        self.lm_cfg = lm_cfg
        self.optim_cfg = optim_cfg
        self.sampler_cfg = sampler_cfg
        self.eval_cfg = eval_cfg
        self.corpus = corpus
        self.total_steps = int(total_steps)
        self.seed = int(seed)
        self.device = resolve_device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())  # DDP needs the index
        self.domain_names: list[str] = list(corpus.domain_names)
        self.seq_len = lm_cfg.seq_len
        self.world_size, self.rank = _world()
        model_config(lm_cfg, corpus.vocab_size)  # validates seq_len vs context before any allocation
        self.target_mask_K = self._target_mask(target_mask_K)
        self._check_val_splits()

        model_seed, sampler_seed = np.random.SeedSequence(self.seed).generate_state(2).tolist()
        self.model = build_model(lm_cfg, corpus.vocab_size, seed=model_seed, device=self.device)
        self._ddp: DistributedDataParallel | None = None
        forward_module: torch.nn.Module = self.model
        if self.world_size > 1:
            self._ddp = DistributedDataParallel(
                self.model,
                device_ids=[self.device.index] if self.device.type == "cuda" else None,
                **_no_buffer_sync(),  # the only buffers are the fixed rotary frequencies
            )
            forward_module = self._ddp
        self._forward = torch.compile(forward_module) if lm_cfg.compile else forward_module
        self._autocast = autocast_dtype(lm_cfg.precision, self.device)

        self.optimizer = build_optimizer(self.model, optim_cfg, self.device)
        self.optim_cfg = optim_cfg
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_schedule(optim_cfg, self.total_steps))
        num_sequences_K = [corpus.num_sequences(k, "train", self.seq_len) for k in range(self.num_domains)]
        self.sampler = DomainSampler(
            num_sequences_K,
            micro_batch_size=sampler_cfg.micro_batch_size,
            grad_accum=sampler_cfg.grad_accum,
            world_size=self.world_size,
            rank=self.rank,
            seed=sampler_seed,
            min_per_domain=sampler_cfg.min_per_domain,
            weight_floor=sampler_cfg.weight_floor,
            rounding=sampler_cfg.rounding,
            domain_names=self.domain_names,
        )
        self.observer: StepObserver | None = None
        self.step = 0
        self.nonfinite_in_a_row = 0
        self.nonfinite_total = 0

    # ------------------------------------------------------------------------------ setup helpers
    @property
    def num_domains(self) -> int:
        """K."""
        return len(self.domain_names)

    def _target_mask(self, target_mask_K: Sequence[bool] | np.ndarray | None) -> np.ndarray:
        if target_mask_K is None:
            target_mask_K = getattr(self.corpus, "targets", None)
        if target_mask_K is None:
            target_mask_K = [True] * self.num_domains
        mask_K = np.asarray(target_mask_K, dtype=bool)
        if mask_K.shape != (self.num_domains,):
            raise ValueError(
                f"target_mask_K must have one entry per domain {self.domain_names}; got shape {mask_K.shape}"
            )
        if not mask_K.any():
            raise ValueError(f"target_mask_K marks no domain as a target (domains {self.domain_names})")
        return mask_K

    def _check_val_splits(self) -> None:
        short = {
            name: self.corpus.num_tokens(k, "val")
            for k, name in enumerate(self.domain_names)
            if self.corpus.num_sequences(k, "val", self.seq_len) < 1
        }
        if short:
            raise ValueError(
                f"validation splits shorter than one sequence of lm.seq_len={self.seq_len} "
                f"(+1) tokens: {short} tokens; raise data.val_fraction / data.val_max_tokens or lower lm.seq_len"
            )

    def set_observer(self, observer: StepObserver | None) -> None:
        """Attach (or detach with None) the per-micro-batch hooks, e.g. a ``GradientProbe``."""
        self.observer = observer

    @property
    def ddp_module(self) -> DistributedDataParallel | None:
        """The DDP wrapper when running data-parallel, else None."""
        return self._ddp

    def _autocast_ctx(self) -> contextlib.AbstractContextManager[Any]:
        if self._autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self._autocast)

    def _batch(self, domain: int, split: str, seq_idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and labels [B, T] for sequences of one domain's split."""
        tokens_BT1 = torch.from_numpy(self.corpus.read_sequences(domain, split, seq_idx, self.seq_len))
        if self.device.type == "cuda":
            tokens_BT1 = tokens_BT1.pin_memory().to(self.device, non_blocking=True)
        elif self.device.type != "cpu":
            tokens_BT1 = tokens_BT1.to(self.device)
        return tokens_BT1[:, :-1], tokens_BT1[:, 1:]

    def _loss(
        self, module: torch.nn.Module, inputs_BT: torch.Tensor, labels_BT: torch.Tensor
    ) -> torch.Tensor:
        """Mean token cross-entropy of one micro-batch (fp32 softmax)."""
        with self._autocast_ctx():
            logits_BTV = module(input_ids=inputs_BT, use_cache=False).logits
        return F.cross_entropy(logits_BTV.flatten(0, 1).float(), labels_BT.flatten())

    # ------------------------------------------------------------------------------ training
    def train_step(self, weights_K: Sequence[float] | np.ndarray) -> TrainSignals:
        """Run one optimiser step on the mixture ``weights_K`` and return what it measured (global).

        Raises:
            ValueError: invalid weights (wrong length, negative, NaN, zero sum), naming the domain.
            RuntimeError: ``optim.max_nonfinite_steps`` consecutive non-finite steps.
        """
        t_step = time.perf_counter()
        timings = dict.fromkeys(_PHASES, 0.0)
        plan = self.sampler.plan_step(weights_K)  # validates the weights
        timings["data"] += time.perf_counter() - t_step
        lr = float(self.optimizer.param_groups[0]["lr"])
        observer = self.observer
        if observer is not None:
            observer.begin_step()
        losses = self._accumulate(plan.local, self.world_size / len(plan.domains), timings)
        loss_K, microbatches_K, tokens_K, step_loss = self._reduce_train_stats(plan, losses)

        extra: dict[str, np.ndarray] = {}
        if observer is not None:
            t0 = time.perf_counter()
            extra.update(observer.end_step(microbatches_K))
            timings["probe"] += time.perf_counter() - t0
        t0 = time.perf_counter()
        grad_norm, skipped = self._update(step_loss)
        timings["optimizer"] += time.perf_counter() - t0
        if observer is not None:
            t0 = time.perf_counter()
            extra.update(observer.after_update())
            timings["probe"] += time.perf_counter() - t0
        timings["step"] = time.perf_counter() - t_step
        signals = TrainSignals(
            step=self.step,
            weights_K=np.asarray(plan.weights_K, dtype=np.float64),
            loss_K=loss_K,
            microbatches_K=microbatches_K,
            tokens_K=tokens_K,
            loss=step_loss,
            lr=lr,
            grad_norm=grad_norm,
            skipped=skipped,
            gram_KK=extra.get("gram_KK"),
            microbatch_sqnorm_K=extra.get("microbatch_sqnorm_K"),
            weight_norms_L=extra.get("weight_norms_L"),
            weight_delta_norms_L=extra.get("weight_delta_norms_L"),
            timings=timings,
        )
        self._check_nonfinite_budget()
        return signals

    def _accumulate(
        self, local: Sequence[Any], loss_scale: float, timings: dict[str, float]
    ) -> list[torch.Tensor]:
        """Forward and backward of this rank's micro-batches; returns their (unscaled) mean losses.

        ``loss_scale = world_size / global micro-batches`` (= W * tokens_mb / global tokens, micro-batches
        being equal): summed here and averaged by DDP, the gradient is that of the global mean token loss.
        """
        observer = self.observer
        losses: list[torch.Tensor] = []
        for i, mb in enumerate(local):
            t0 = time.perf_counter()
            inputs_BT, labels_BT = self._batch(mb.domain, "train", mb.sequence_indices)
            t1 = time.perf_counter()
            if observer is not None:
                observer.begin_microbatch(mb.domain)
            last = i == len(local) - 1
            sync = self._ddp.no_sync() if self._ddp is not None and not last else contextlib.nullcontext()
            with sync:  # DDP all-reduces the accumulated gradients on the last backward only
                loss = self._loss(self._forward, inputs_BT, labels_BT)
                (loss * loss_scale).backward()
            t2 = time.perf_counter()
            if observer is not None:
                observer.end_microbatch()
            losses.append(loss.detach())
            timings["data"] += t1 - t0
            timings["forward_backward"] += t2 - t1
            timings["probe"] += time.perf_counter() - t2
        return losses

    def _reduce_train_stats(
        self, plan: Any, losses: list[torch.Tensor]
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
        """Global (loss_K, microbatches_K, tokens_K, step loss) through one packed all-reduce."""
        k, local = self.num_domains, plan.local
        tokens_mb = float(self.sampler_cfg.micro_batch_size * self.seq_len)
        stats_3K = torch.zeros(3, k, dtype=torch.float64, device=self.device)
        if losses:
            domains = torch.tensor([mb.domain for mb in local], dtype=torch.long, device=self.device)
            stats_3K[0].index_add_(0, domains, torch.stack(losses).double() * tokens_mb)
            stats_3K[1].index_add_(
                0, domains, torch.ones(len(local), dtype=torch.float64, device=self.device)
            )
            stats_3K[2] = stats_3K[1] * tokens_mb
        if self.world_size > 1:
            dist.all_reduce(stats_3K)
        loss_sum_K, count_K, token_K = stats_3K.cpu().numpy()
        microbatches_K, tokens_K = count_K.astype(np.int64), token_K.astype(np.int64)
        if not np.array_equal(
            microbatches_K, np.asarray(plan.quotas_K, dtype=np.int64)
        ):  # internal invariant
            raise RuntimeError(f"micro-batch counts {microbatches_K} differ from the plan's {plan.quotas_K}")
        with np.errstate(invalid="ignore", divide="ignore"):
            loss_K = np.where(microbatches_K > 0, loss_sum_K / np.maximum(token_K, 1.0), np.nan)
        return loss_K, microbatches_K, tokens_K, float(loss_sum_K.sum() / token_K.sum())

    def _update(self, step_loss: float) -> tuple[float, bool]:
        """Clip and step (or skip a non-finite step); advance the schedule. Returns (grad norm, skipped)."""
        params = [p for p in self.model.parameters() if p.grad is not None]
        clip = self.optim_cfg.grad_clip
        if clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(params, clip, foreach=True)
        else:
            norm = torch.nn.utils.get_total_norm([p.grad for p in params], foreach=True)
        grad_norm = float(norm)
        skipped = not (math.isfinite(step_loss) and math.isfinite(grad_norm))
        if skipped:
            self.nonfinite_in_a_row += 1
            self.nonfinite_total += 1
            log.warning(
                "step %d: non-finite loss %s or grad norm %s; update skipped (%d in a row, %d in total)",
                self.step + 1,
                step_loss,
                grad_norm,
                self.nonfinite_in_a_row,
                self.nonfinite_total,
            )
            grad_norm = float("nan")
        else:
            self.optimizer.step()
            self.nonfinite_in_a_row = 0
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.step += 1
        return grad_norm, skipped

    def _check_nonfinite_budget(self) -> None:
        limit = self.optim_cfg.max_nonfinite_steps
        if self.nonfinite_in_a_row >= limit:
            raise RuntimeError(
                f"{self.nonfinite_in_a_row} consecutive optimiser steps (up to step {self.step}) had a non-finite "
                f"loss or gradient (optim.max_nonfinite_steps={limit}); the run stops. Lower optim.lr, raise "
                "optim.warmup_fraction or enable optim.grad_clip, and resume from an earlier checkpoint."
            )

    # ------------------------------------------------------------------------------ validation
    def validation_indices(self, domain: int) -> np.ndarray:
        """The validation sequences of ``domain``: at most ``max_batches * batch_size``, evenly spread."""
        n = self.corpus.num_sequences(domain, "val", self.seq_len)
        num = min(n, self.eval_cfg.max_batches * self.eval_cfg.batch_size)
        return (np.arange(num, dtype=np.int64) * n) // num

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Per-domain validation loss/perplexity and their summaries over the target domains.

        The same sequences every time (``validation_indices``); under DDP the batches are split over
        ranks and the sums all-reduced, so every rank returns the same dict.

        Returns:
            ``val/loss/<domain>``, ``val/ppl/<domain>`` for every domain; over the targets:
            ``val/mean_ppl`` (unweighted mean of ppl), ``val/weighted_ppl`` (exp of the token-weighted
            mean loss) and ``val/geo_mean_ppl`` (exp of the mean loss).
        """
        was_training = self.model.training
        self.model.eval()
        bs = self.eval_cfg.batch_size
        stats_2K = torch.zeros(2, self.num_domains, dtype=torch.float64, device=self.device)
        for k in range(self.num_domains):
            idx = self.validation_indices(k)
            for b, start in enumerate(range(0, idx.size, bs)):
                if b % self.world_size != self.rank:
                    continue
                inputs_BT, labels_BT = self._batch(k, "val", idx[start : start + bs])
                loss = self._loss(self.model, inputs_BT, labels_BT)
                stats_2K[0, k] += loss.double() * labels_BT.numel()
                stats_2K[1, k] += labels_BT.numel()
        if self.world_size > 1:
            dist.all_reduce(stats_2K)
        self.model.train(was_training)
        loss_sum_K, tokens_K = stats_2K.cpu().numpy()
        return validation_metrics(self.domain_names, loss_sum_K, tokens_K, self.target_mask_K)

    # ------------------------------------------------------------------------------ state
    def flops_per_token(self) -> float:
        """Model FLOPs per trained token, forward and backward: ``6 N + 12 L d T`` (N parameters, L layers,
        width d, sequence length T; the PaLM paper's appendix B, as nanoGPT's MFU estimate). The basis of
        the MFU metric; it counts the model's work, not the probe's or recomputation."""
        config = self.model.config
        n_params = sum(p.numel() for p in self.model.parameters())
        return float(6 * n_params + 12 * config.num_hidden_layers * config.hidden_size * self.seq_len)

    def _extendable(self, state: dict[str, Any]) -> bool:
        """Whether a state saved with another ``total_steps`` may continue under this one: both are
        warmup-stable-decay and the state is from before either decay began, so no step it took would
        have had another LR (the rule ``acodm train --resume`` applies when a run is extended)."""
        saved = (state.get("scheduler") or {}).get("lr_lambdas") or [None]
        fields = saved[0] if isinstance(saved[0], dict) else {}
        if self.optim_cfg.schedule != "wsd" or "decay_start" not in fields:
            return False
        mine = stable_checkpoint_step(self.optim_cfg, self.total_steps)
        return mine is not None and int(state["step"]) <= min(int(fields["decay_start"]), mine)

    def _header(self) -> dict[str, Any]:
        """What a saved state must agree with to be loadable here (and what export rebuilds from)."""
        config = self.model.config
        return {
            "domain_names": list(self.domain_names),
            "vocab_size": int(self.corpus.vocab_size),
            "seq_len": int(self.seq_len),
            "total_steps": self.total_steps,
            "model_shape": {key: getattr(config, key) for key in _SHAPE_KEYS},
        }

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue bit-identically (on CPU): model, optimizer, schedule, sampler, RNG.

        Holds only tensors and plain Python values, so it loads with ``torch.load(weights_only=True)``.
        The Pretrainer draws no numpy or Python ``random`` numbers (the sampler's generators are
        derived from its seed and step), so only torch's RNG states are saved.
        """
        rng: dict[str, Any] = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        return {
            "version": STATE_VERSION,
            "header": self._header(),
            "model_config": self.model.config.to_dict(),
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "sampler": self.sampler.state_dict(),
            "rng": rng,
            "step": self.step,
            "nonfinite_in_a_row": self.nonfinite_in_a_row,
            "nonfinite_total": self.nonfinite_total,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore ``state_dict()`` output.

        Raises:
            ValueError: the state is from another version, domain list, vocabulary, sequence length or
                model shape (naming what differs).
        """
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
            found = state.get("version") if isinstance(state, dict) else type(state).__name__
            raise ValueError(f"not a Pretrainer state of version {STATE_VERSION} (found {found!r})")
        mine, theirs = self._header(), state["header"]
        differ = [key for key in mine if mine[key] != theirs.get(key)]
        extending = differ == ["total_steps"] and self._extendable(state)
        if differ and not extending:
            details = "; ".join(f"{key}: saved {theirs.get(key)!r}, now {mine[key]!r}" for key in differ)
            raise ValueError(f"the saved Pretrainer state does not fit this run: {details}")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])  # restores the saved schedule's fields too
        if extending:
            schedule = self.scheduler.lr_lambdas[0]
            schedule.extend(self.total_steps, decay_steps_of(self.optim_cfg, self.total_steps))
            # the optimiser holds the next step's LR from the old horizon: recompute it from the new one
            for group, base_lr in zip(self.optimizer.param_groups, self.scheduler.base_lrs, strict=True):
                group["lr"] = base_lr * schedule(self.scheduler.last_epoch)
            self.scheduler._last_lr = [group["lr"] for group in self.optimizer.param_groups]
            log.info("LR schedule extended from %d to %d steps (decay from step %d; warmup kept at %d)",
                     theirs["total_steps"], self.total_steps, schedule.decay_start, schedule.warmup_steps)
        self.sampler.load_state_dict(state["sampler"])
        torch.set_rng_state(state["rng"]["torch"])
        if "cuda" in state["rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        self.step = int(state["step"])
        self.nonfinite_in_a_row = int(state["nonfinite_in_a_row"])
        self.nonfinite_total = int(state["nonfinite_total"])
