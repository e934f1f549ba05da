"""The distillation loop: a student learns from a frozen teacher on packed token blocks.

Built on Accelerate, so the same code runs on one CPU, one GPU, or several processes
(``accelerate launch`` / ``torchrun``): each rank takes its own slice of every global batch
and gradients are averaged across ranks.

Determinism and resume: the data order is a pure function of (seed, step) - the sample
stream is the concatenation of seeded permutations of the training blocks, one per epoch -
and the learning rate a pure function of the step, and the loop has no other randomness
(Llama has no dropout). A checkpoint (student weights, optimizer state, step, loss history)
is written atomically every ``checkpoint_every`` steps; resuming from it replays exactly
the batches an uninterrupted run would have seen, so the final weights are identical.

The loss of a micro-batch (weights from the profile, ``compression.distill.losses``) is
edgekd.methods.step_losses.distill_step_losses.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import faults
from ..errors import EdgekdError
from ..pipeline.peak_memory import trim_heap
from .checkpoints import latest_checkpoint, load_checkpoint, save_checkpoint
from .layout import training_layout
from .memory import (
    MemoryPlan,
    bf16_gradients_apply,
    bf16_product_weights,
    device_resident_bytes,
    fit_memory,
    memory_limit_bytes,
)
from .mixture import Mixture
from .on_policy import Rollouts, on_policy_losses
from .optim import Bf16Gradients, clip_grad_norm, make_optimizer
from .precision import resolve_precision
from .qat import round_trips_cached
from .step_losses import distill_step_losses, needed_terms


@dataclass
class DistillConfig:
    steps: int
    batch_size: int = 4  # per process
    grad_accum: int = 1
    learning_rate: float = 1e-4
    warmup_steps: int | None = None
    min_lr_fraction: float = 0.1
    temperature: float = 2.0
    alpha: float = 0.7
    kl: str = "forward"
    w_logit: float = 1.0
    w_hidden: float = 0.0
    w_attention: float = 0.0
    hidden_kind: str = "mse"
    checkpoint_every: int = 50
    seed: int = 0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    precision: str = "fp32"  # "fp32" or "bf16" (autocast forward passes); see resolve_precision
    # memory savings (edgekd.methods.memory.fit_memory turns them on when a step would not fit)
    gradient_checkpointing: bool = False
    optimizer_state: str = "fp32"  # AdamW's moments: "fp32" or "bf16" (edgekd.methods.optim)
    gradient_dtype: str = "fp32"  # "bf16": linear weights' gradients kept in bf16 (optim.Bf16Gradients; exact under bf16)
    recompute_round_trips: bool = False  # QAT under checkpointing: make each round trip again in backward (qat.round_trips_cached)
    # share of each batch that is the student's own samples (edgekd.methods.mixture; its own backward pass)
    on_policy_share: float = 0.0

    @classmethod
    def from_settings(cls, s: Any, steps: int | None = None, learning_rate: float | None = None) -> DistillConfig:
        """From the profile's ``compression.distill`` (``DistillSettings``)."""
        return cls(
            steps=s.steps if steps is None else steps, batch_size=s.batch_size, grad_accum=s.grad_accum,
            learning_rate=s.learning_rate if learning_rate is None else learning_rate,
            temperature=s.temperature, alpha=s.alpha, kl=s.kl, **loss_weights(s.losses),
            checkpoint_every=s.checkpoint_every, seed=s.seed, precision=resolve_precision(s.precision),
        )

    def lr_at(self, step: int) -> float:
        """Linear warm-up, then cosine decay to ``min_lr_fraction`` of the peak."""
        warm = self.warmup_steps if self.warmup_steps is not None else max(1, self.steps // 20)
        if step < warm:
            return self.learning_rate * (step + 1) / warm
        progress = (step - warm) / max(1, self.steps - warm)
        cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        return self.learning_rate * (self.min_lr_fraction + (1 - self.min_lr_fraction) * cosine)


def loss_weights(losses: dict[str, float]) -> dict[str, Any]:
    """A profile's ``losses`` mapping (``distill.losses``, ``qat.losses``) as DistillConfig's weights."""
    return {"w_logit": losses.get("logit_kl", 0.0), "w_hidden": losses.get("hidden_mse", 0.0) + losses.get("hidden_cos", 0.0),
            "w_attention": losses.get("attention_kl", 0.0),
            "hidden_kind": "cosine" if "hidden_cos" in losses and "hidden_mse" not in losses else "mse"}


@dataclass
class DistillOutcome:
    steps: int
    tokens: int  # training tokens seen, all ranks
    wall_time_s: float
    resumed_from_step: int
    history: list[dict[str, float]] = field(default_factory=list)
    seen_blocks: list[int] = field(default_factory=list)  # this rank's block indices, in order
    stopped_at_deadline: bool = False  # the time budget ran out before cfg.steps (see distill's deadline)

    def summary(self) -> dict[str, Any]:
        last = self.history[-10:]

        def mean(k: str) -> float | None:
            values = [h[k] for h in last if h.get(k) is not None]
            return float(np.mean(values)) if values else None
        sampling = sum(h.get("sampling_s", 0.0) for h in self.history)
        training = sum(h["step_s"] for h in self.history) - sampling
        return {
            "steps": self.steps, "training_tokens": self.tokens, "train_wall_time_s": round(self.wall_time_s, 2),
            "resumed_from_step": self.resumed_from_step, "stopped_at_deadline": self.stopped_at_deadline,
            "final_loss": mean("loss"), "final_ce": mean("ce"), "final_kd": mean("kd"),
            "final_hidden": mean("hidden"), "final_attention": mean("attention"),
            "tokens_per_s": mean("tokens_per_s"), "final_on_policy_kd": mean("on_policy_kd"),
            "sampling_tokens_per_s": self.history[-1].get("sampling_tokens_per_s") if self.history else None,
            # on-policy sampling's share of the steps' wall time, and the training tokens/s without it
            "sampling_share": round(sampling / (sampling + training), 4) if sampling else None,
            "training_tokens_per_s_without_sampling": round(self.tokens / training, 1) if sampling and training > 0 else None,
        }


# ---------------------------------------------------------------- one micro-step


def micro_step(model: Any, teacher: Any, blocks: np.ndarray, cfg: DistillConfig, layer_map: list[int], mixture: Mixture,
               step: int, micro: int, rank: int, world: int, device: Any, logit_cache: Any = None,
               sync: Callable[[bool], Any] = lambda last: contextlib.nullcontext(),
               backward: Callable[[torch.Tensor], None] = lambda loss: loss.backward(),
               rollouts: Rollouts | None = None) -> tuple[dict[str, float], list[int]]:
    """Forward and backward passes of one micro-batch: its offline rows, then its on-policy rows
    (each part weighted by its share of the batch, each with its own backward pass, so one part's
    graph is freed before the other's forward). ``sync(last)``: the context a part runs in
    (Accelerate's no_sync unless it is the step's last); ``rollouts``: where the on-policy rows come
    from (sampled a generation at a time). Returns the loss terms (``sampling_s``: seconds spent
    sampling in this call) and the offline rows."""
    idx, prompt_rows = mixture.indices(step, micro, cfg, rank, world)
    total, out = len(idx) + len(prompt_rows), {}
    if len(prompt_rows):  # sampled first (fp32 weights, outside the cached round trips); no weight changes before the loss
        rollouts = rollouts or Rollouts(mixture, cfg, rank, world)
        seq, prompt_len, out["sampling_s"] = rollouts.rows(model, blocks, step, micro)
    # each part's round trips cached for its own passes only: a second backward through them would
    # meet the graph the first one freed (learned clips save tensors for backward)
    if len(idx):
        ids = torch.from_numpy(blocks[idx].astype(np.int64)).to(device)
        cached = None if logit_cache is None else (*(t.to(device) for t in logit_cache.batch(idx)), logit_cache.kind)
        with sync(not len(prompt_rows)), round_trips_cached(not cfg.recompute_round_trips):
            terms = distill_step_losses(model, teacher, ids, cfg, layer_map, cached)
            backward(terms["loss"] * (len(idx) / total))
        out.update({k: float(v.detach()) for k, v in terms.items()})
        out["loss"] *= len(idx) / total
    if len(prompt_rows):
        with sync(True), round_trips_cached(not cfg.recompute_round_trips):
            terms = on_policy_losses(model, teacher, torch.from_numpy(seq).to(device), prompt_len, rollouts.policy, cfg)
            backward(terms["loss"] * (len(prompt_rows) / total))
        out["loss"] = out.get("loss", 0.0) + float(terms["loss"].detach()) * len(prompt_rows) / total
        out["on_policy_kd"] = float(terms["on_policy_kd"].detach())
    return out, idx.tolist()


def check_cache(cache: Any, cfg: DistillConfig) -> None:
    """A logit cache must have been built at the step's temperature, a hidden-state cache in its precision."""
    if cache is None:
        return
    if cache.kind == "hidden":
        if cache.precision != cfg.precision:
            raise ValueError(f"the hidden-state cache was built for {cache.precision} steps, these run in {cfg.precision}")
    elif abs(cache.temperature - cfg.temperature) > 1e-9:
        raise ValueError("the logit cache was built at another temperature")


def check_mixture(mixture: Mixture, cfg: DistillConfig, n_blocks: int) -> None:
    if sum(mixture.sizes) != n_blocks:
        raise ValueError(f"the mixture's pools hold {sum(mixture.sizes)} blocks, the training blocks {n_blocks}")
    if abs(mixture.on_policy_share - cfg.on_policy_share) > 1e-9:
        raise ValueError("cfg.on_policy_share does not match the mixture's on-policy share")
    if any(w > 0 and size == 0 for w, size in zip(mixture.weights, mixture.sizes)):
        raise EdgekdError("a data source with a share of the batch has no blocks", fix="give it data, or set its share to 0")


# ---------------------------------------------------------------- the loop


def distill(
    student: Any,
    teacher: Any,
    train_blocks: np.ndarray,
    cfg: DistillConfig,
    layer_map: list[int],
    run_dir: Path | None = None,
    resume: bool = True,
    progress: Callable[..., None] | None = None,
    on_step: Callable[[int], None] | None = None,
    logit_cache: Any = None,
    param_groups: list[dict[str, Any]] | None = None,
    after_step: Callable[[], None] | None = None,
    deadline: float | None = None,
    mixture: Mixture | None = None,
) -> DistillOutcome:
    """Train ``student`` in place for ``cfg.steps`` optimizer steps; checkpoints under ``run_dir``.

    ``deadline`` (a ``time.perf_counter()`` value): stop early, with a checkpoint, once the next
    step would end after it at the pace of the last few (a time budget's guard for when steps run
    slower than the probe that fitted their number said; Lightning's ``max_time`` does the same).

    ``logit_cache`` (edgekd.methods.logit_cache.LogitCache over ``train_blocks``) replaces the
    teacher's live logits; it must have been built at ``cfg.temperature``. ``param_groups``:
    optimizer groups of the caller's own (an ``lr_scale`` multiplies the schedule's rate),
    taken out of the main group; ``after_step`` runs after every optimizer step. QAT passes
    both for learned clip factors (edgekd.methods.qat.prepare); the loop knows nothing of them.
    ``mixture``: how batches are drawn from ``train_blocks`` (its pools, stacked) and how many rows
    are on-policy (edgekd.methods.mixture); default: every row a block of the one pool.
    """
    check_cache(logit_cache, cfg)
    from accelerate import Accelerator

    if len(layer_map) != student.config.num_hidden_layers:
        raise ValueError(f"layer map has {len(layer_map)} entries for {student.config.num_hidden_layers} student layers")
    if len(train_blocks) < 1:
        raise EdgekdError("no training blocks", fix="pass a larger corpus")
    mixture = mixture or Mixture.single(len(train_blocks))
    check_mixture(mixture, cfg, len(train_blocks))
    _, want_hidden, want_attn = needed_terms(cfg)
    if want_attn:  # attention probabilities are only materialised by the eager implementation
        student.set_attn_implementation("eager")
        teacher.set_attn_implementation("eager")
    # Accelerate forms a gloo process group on CPU only when told it runs on CPU, so that
    # `accelerate launch --multi_gpu --num_processes N` (or torchrun) also works without a GPU.
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    rank, world = accelerator.process_index, accelerator.num_processes
    teacher.eval().requires_grad_(False)
    student.train().requires_grad_(True)  # a student copied from a frozen teacher inherits its flags
    extra = list(param_groups or [])
    taken = {id(p) for g in extra for p in g["params"]}
    groups = [{"params": [p for p in student.parameters() if id(p) not in taken], "lr_scale": 1.0}, *extra]
    optimizer = make_optimizer(groups, cfg.learning_rate, cfg.weight_decay, cfg.optimizer_state)

    start_step, tokens, history = 0, 0, []
    rollouts = Rollouts(mixture, cfg, rank, world) if mixture.on_policy_share else None
    ckpt = latest_checkpoint(run_dir) if (run_dir is not None and resume) else None
    if ckpt is not None:
        start_step, tokens, history, extra = load_checkpoint(ckpt, student, optimizer)
        if rollouts is not None:
            rollouts.load_state(extra.get("on_policy_rollouts"))
    scratch = run_dir if run_dir is not None and run_dir.exists() else None
    with training_layout(student, teacher, cfg, scratch, distributed=world > 1, cached=cache_kind(logit_cache)):
        model, optimizer = accelerator.prepare(student, optimizer)
        teacher = teacher.to(accelerator.device)
        unwrapped = accelerator.unwrap_model(model)
        seen: list[int] = []
        block_len = train_blocks.shape[1]
        inner = getattr(optimizer, "optimizer", optimizer)  # under Accelerate's wrapper
        if hasattr(inner, "init_state"):  # moments allocated before the first step's activations, not among them
            inner.init_state()
        held = None
        if bf16_gradients_apply(cfg, world) and hasattr(inner, "held"):
            held = inner.held = Bf16Gradients(bf16_product_weights(unwrapped))
        t_start = time.perf_counter()
        done, stopped = start_step, False
        for step in range(start_step, cfg.steps):
            t0 = time.perf_counter()
            for group in optimizer.param_groups:
                group["lr"] = cfg.lr_at(step) * group.get("lr_scale", 1.0)
            sums: dict[str, float] = {}
            for micro in range(cfg.grad_accum):
                def sync(last: bool, micro: int = micro) -> Any:
                    return accelerator.no_sync(model) if micro < cfg.grad_accum - 1 or not last else contextlib.nullcontext()

                terms, rows = micro_step(model, teacher, train_blocks, cfg, layer_map, mixture, step, micro, rank, world,
                                         accelerator.device, logit_cache, sync, lambda loss: accelerator.backward(loss / cfg.grad_accum),
                                         rollouts)
                seen.extend(rows)
                for k, v in terms.items():
                    sums[k] = sums.get(k, 0.0) + (v if k == "sampling_s" else v / cfg.grad_accum)
            if cfg.max_grad_norm and held is not None:
                clip_grad_norm(list(model.parameters()), cfg.max_grad_norm, held)
            elif cfg.max_grad_norm:
                accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            faults.point("training step")
            if not torch.cuda.is_available():
                # the freed gradients' and temporaries' pages back to the OS: the next step's larger
                # requests would otherwise land beside them (measured: a 0.1 GB lower QAT-KD peak, no slower)
                trim_heap()
            if after_step:
                after_step()
            step_tokens = mixture.row_tokens(cfg.batch_size, block_len, mixture.on_policy_at(step, cfg.steps)) * cfg.grad_accum * world
            tokens += step_tokens
            dt = time.perf_counter() - t0
            record = {"step": step + 1, "lr": cfg.lr_at(step), **sums, "tokens_per_s": step_tokens / dt, "step_s": dt}
            if rollouts is not None and rollouts.tokens_per_s is not None:
                record["sampling_tokens_per_s"] = rollouts.tokens_per_s  # so far, every generation of this process
            history.append(record)
            done = step + 1
            if run_dir is not None and accelerator.is_main_process and (done % cfg.checkpoint_every == 0 or done == cfg.steps):
                save_checkpoint(run_dir, unwrapped, optimizer.optimizer if hasattr(optimizer, "optimizer") else optimizer,
                                 done, tokens, history, cfg, loop_state(rollouts))
            accelerator.wait_for_everyone()
            if progress:
                extra = " ".join(f"{k} {sums[k]:.3f}" for k in ("loss", "ce", "kd", "hidden", "attention", "on_policy_kd") if k in sums)
                progress(1, status=f"{extra} | {record['tokens_per_s']:.0f} tok/s")
            if on_step:
                on_step(done)
            if deadline is not None and done < cfg.steps:
                pace = float(np.median([h["step_s"] for h in history[-5:]]))
                if rank0s(time.perf_counter() + pace > deadline, world):
                    if run_dir is not None and accelerator.is_main_process and done % cfg.checkpoint_every:
                        save_checkpoint(run_dir, unwrapped, optimizer.optimizer if hasattr(optimizer, "optimizer") else optimizer,
                                        done, tokens, history, cfg, loop_state(rollouts))
                    stopped = True
                    break
    if held is not None:
        held.remove()
        inner.held = None
    if want_attn:
        unwrapped.set_attn_implementation("sdpa")
        teacher.set_attn_implementation("sdpa")
    unwrapped.eval()
    return DistillOutcome(done if stopped else cfg.steps, tokens, time.perf_counter() - t_start, start_step, history, seen, stopped)


def cache_kind(cache: Any) -> str | None:
    """The kind of the teacher cache a step reads ("sample", "topk", "hidden"), None for the live teacher."""
    return None if cache is None else cache.kind


def rank0s(value: Any, world: int) -> Any:
    """The main process's ``value`` on every rank: a decision read off a clock (the deadline) must
    be the same in every process, or their collectives wait on each other."""
    if world == 1:
        return value
    from accelerate.utils import broadcast_object_list

    return broadcast_object_list([value])[0]


def loop_state(rollouts: Rollouts | None) -> dict[str, Any]:
    """What a checkpoint keeps of the loop besides weights and optimizer: the current on-policy generation."""
    return {"on_policy_rollouts": rollouts.state()} if rollouts is not None else {}


def quantized_param_count(model: Any) -> int:
    """Weights under a parametrization (QAT's fake quantization), each shared tensor once."""
    from torch.nn.utils import parametrize

    seen: dict[int, int] = {}
    for m in model.modules():
        if parametrize.is_parametrized(m, "weight"):
            original = m.parametrizations.weight.original
            seen[original.data_ptr()] = original.numel()
    return sum(seen.values())


def apply_memory_settings(cfg: DistillConfig, memory: MemoryPlan) -> None:
    """Give ``cfg`` the memory settings of ``memory`` (the plan fit_memory chose for it)."""
    cfg.gradient_checkpointing, cfg.optimizer_state = memory.gradient_checkpointing, memory.optimizer_state
    cfg.gradient_dtype, cfg.recompute_round_trips = memory.gradient_dtype, memory.recompute_round_trips
    cfg.batch_size, cfg.grad_accum = memory.batch_size, memory.grad_accum


def plan_memory(student: Any, teacher: Any, cfg: DistillConfig, block_len: int, logit_cache: Any = None,
                limit_gb: float | None = None, stage: str = "distillation",
                quantized_params: int | None = None, target_gb: float | None = None) -> tuple[DistillConfig, MemoryPlan]:
    """The config a step of ``cfg`` fits in memory with (memory savings turned on as needed) and its
    predicted peak; a clear error when nothing fits (edgekd.methods.memory.fit_memory).
    ``quantized_params``: weights QAT will fake-quantize (default: those parametrized now);
    ``target_gb``: the soft memory target (compression.memory_target_gb)."""
    quantized = quantized_param_count(student) if quantized_params is None else quantized_params
    return fit_memory(teacher, student, cfg, block_len, memory_limit_bytes(limit_gb), stage=stage,
                      quantized_params=quantized, cached=cache_kind(logit_cache),
                      resident_bytes=device_resident_bytes(teacher, student),
                      target_bytes=target_gb * 1e9 if target_gb is not None else None)


def run_distillation(student: Any, teacher: Any, train_blocks: np.ndarray, cfg: DistillConfig, layer_map: list[int],
                     label: str, reporter: Any = None, run_dir: Path | None = None, logit_cache: Any = None,
                     param_groups: list[dict[str, Any]] | None = None,
                     after_step: Callable[[], None] | None = None,
                     deadline: float | None = None, memory: MemoryPlan | None = None,
                     limit_gb: float | None = None, target_gb: float | None = None,
                     mixture: Mixture | None = None) -> tuple[DistillOutcome, MemoryPlan]:
    """Fit a step in memory (unless ``memory``, a plan for ``cfg``, is given), then train with a
    progress bar named ``label``; resumes from ``run_dir``'s checkpoints. Returns the outcome and
    the memory plan; ``cfg`` carries the memory settings it trained with."""
    from ..progress import Reporter

    if memory is None:
        fitted, memory = plan_memory(student, teacher, cfg, train_blocks.shape[1], logit_cache, limit_gb, target_gb=target_gb)
        apply_memory_settings(cfg, memory)
    with (reporter or Reporter(quiet=True)).task(label, total=cfg.steps, unit="steps") as advance:
        outcome = distill(student, teacher, train_blocks, cfg, layer_map, run_dir=run_dir, resume=True, progress=advance,
                          logit_cache=logit_cache, param_groups=param_groups, after_step=after_step, deadline=deadline,
                          mixture=mixture)
    return outcome, memory
