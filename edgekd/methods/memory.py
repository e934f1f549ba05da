"""Will a training step fit in memory? A prediction from the shapes, the settings that make it fit,
and the layout those settings give the models while they train.

The prediction is the process's resident memory now (interpreter, libraries, the models as they
are held) plus what one optimizer step of distillation or QAT-KD adds, part by part, minus what
the training layout saves. The coefficients per part are counted from the tensors autograd keeps
(Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer Models", count
them the same way) and checked against the measured peak of each stage
(``benchmarks/memory_fit.py``; the run report puts both side by side).

When the plain recipe does not fit, :func:`fit_memory` turns on, in order of cost, activation
checkpointing (Chen et al. 2016, "Training Deep Nets with Sublinear Memory Cost": ~30% more
compute), AdamW moments in bf16 (edgekd.methods.optim: no compute, 4 bytes per parameter less),
for QAT the fake-quantized weights made again in each block's recomputation instead of kept from
the forward pass (edgekd.methods.qat.round_trips_cached),
the linear weights' gradients in bf16 (exact under bf16 autocast, 2 bytes per weight less),
then smaller micro-batches with more accumulation (the same tokens per step and the same batches,
so the same gradients, slower matmuls). It refuses only when all of them together do not fit,
naming the smallest memory that would.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

import torch

from ..errors import EdgekdError
from ..families import family_of

HEADROOM = 0.9  # of the memory limit a step may plan to use: the rest absorbs allocator slack
CHECKPOINT_COST = 0.3  # the extra compute of recomputing every block once in backward


def _params(model: Any) -> int:
    return sum(p.numel() for p in model.parameters())


def _dims(config: Any) -> tuple[int, int, int, int, int, int]:
    h = config.hidden_size
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or h // heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    return h, config.intermediate_size, heads, kv, head_dim, config.num_hidden_layers



def kv_cache_bytes(config: Any, rows: int, positions: int, element_bytes: int) -> float:
    """A KV cache's bytes: keys and values of every layer for ``rows`` x ``positions``."""
    _, _, _, kv, head_dim, layers = _dims(config)
    return float(2 * layers * rows * positions * kv * head_dim * element_bytes)

def layer_activation_bytes_per_token(config: Any, act_bytes: int) -> int:
    """What autograd keeps for backward, per token, in one decoder block (sdpa attention).

    fp32: the residual stream at the block's input and after attention, and the two RMSNorm
    inputs (4 x h x 4 B). In the forward passes' precision (``act_bytes``): the inputs of the
    Q/K/V, O, gate/up and down products, their outputs, the rotated Q and K, the attention
    output, and the MLP's activation and product (h x 2 + q x 4 + kv x 4 + i x 5).
    """
    h, inter, heads, kv, hd, _ = _dims(config)
    q, k = heads * hd, kv * hd
    return 4 * h * 4 + act_bytes * (2 * h + 4 * q + 4 * k + 5 * inter)


@dataclass
class MemoryPlan:
    """A training step's memory: predicted peak parts (bytes) and the settings they assume."""

    parts: dict[str, float]
    gradient_checkpointing: bool
    optimizer_state: str
    batch_size: int
    grad_accum: int
    teacher_bf16: bool
    teacher_parked: bool = False
    gradient_dtype: str = "fp32"
    recompute_round_trips: bool = False
    teacher_head_kept: bool = False  # parked but for its head (a hidden-state cache)

    @property
    def total(self) -> float:
        return float(sum(self.parts.values()))

    def settings(self) -> dict[str, Any]:
        return {"gradient_checkpointing": self.gradient_checkpointing, "optimizer_state": self.optimizer_state,
                "gradient_dtype": self.gradient_dtype,
                "batch_size": self.batch_size, "grad_accum": self.grad_accum, "teacher_linears_bf16": self.teacher_bf16,
                "teacher_parked": self.teacher_parked, "recompute_round_trips": self.recompute_round_trips}

    def describe(self) -> str:
        return ", ".join(f"{k.replace('_', ' ')} {v / 1e9:.2f} GB" for k, v in self.parts.items())


def estimate_training_memory(teacher: Any, student: Any, cfg: Any, block_len: int, *, quantized_params: int = 0,
                             cached: bool | str | None = False, resident_bytes: float | None = None) -> MemoryPlan:
    """The predicted peak resident bytes of one training step of ``cfg`` (edgekd.methods.distill.DistillConfig).

    ``quantized_params``: weights under QAT's fake quantization (their round trips are kept for
    backward); ``cached``: the teacher's targets come from a cache (its kind: "hidden" keeps the
    teacher's head, a logit cache nothing of it; True: a logit cache); ``resident_bytes``: the
    process's resident memory now (measured when None), which already holds both models in fp32.
    """
    from .chunked_head import chunk_positions

    sc, tc = student.config, teacher.config
    bf16 = cfg.precision == "bf16"
    act = 2 if bf16 else 4
    want_logits, want_hidden, want_attn = cfg.w_logit > 0 and cfg.alpha > 0, cfg.w_hidden > 0, cfg.w_attention > 0
    tokens = cfg.batch_size * block_len
    h, _, heads, _, _, layers = _dims(sc)
    th, _, t_heads, _, _, t_layers = _dims(tc)
    n_student = _params(student)
    vocab = sc.vocab_size
    table = vocab * h * 4  # the token embedding (and a tied head) in fp32
    ckpt = cfg.gradient_checkpointing
    per_layer = layer_activation_bytes_per_token(sc, act) * tokens
    # each block's input is kept when blocks are recomputed; one block's activations live at a time in backward
    activations = layers * tokens * h * 4 + per_layer if ckpt else layers * per_layer
    maps = cfg.batch_size * heads * block_len ** 2
    if want_attn:  # eager attention: the maps the loss reads (and, kept for backward, the fp32 softmax)
        # with checkpointing, each layer's KL is recomputed in backward; the heap keeps its fp32 temporaries
        activations += layers * maps * (act + ATTENTION_KL_HEAP * 4 if ckpt else 4 + act) + maps * 16
    teacher_live = teacher_runs(cfg, cached)
    targets = 0
    if teacher_live and want_hidden:
        targets += (t_layers + 1) * tokens * th * 4
    if teacher_live and want_attn:
        targets += t_layers * cfg.batch_size * t_heads * block_len ** 2 * act
    if teacher_live:  # the teacher's forward pass: one block's working set at a time
        targets += layer_activation_bytes_per_token(tc, act) * tokens
    chunk = min(chunk_positions(vocab), tokens)
    # dL/dW and dL/dh of the chunked head, one chunk's softmaxes and gradients, and the lookup's
    # gradient: sparse into a tied head's (training_layout), else a second table
    # forward KL + CE (live or from the sampled cache) without a softcap has a closed-form logit gradient
    closed_form = want_logits and cfg.kl == "forward" and not getattr(sc, "final_logit_softcapping", None)
    copies = HEAD_CHUNK_COPIES_CLOSED_FORM if closed_form else HEAD_CHUNK_COPIES
    # the closed form sums dL/dW in the forward pass into the buffer that becomes the table's gradient
    # (counted in ``gradients``: measured, the head's buffers and the gradients are not alive at once)
    grad_w = 0 if closed_form else table
    head = grad_w + tokens * h * 4 + copies * chunk * vocab * 4 + (0 if family_of(student).tied(student) else table)
    head += vocab * h * act if bf16 else 0  # the head's cast for the chunks' products, during the forward pass
    if want_logits and not cached:
        head += tokens * th * 4 + (vocab * th * act if bf16 else 0)  # the teacher's final hidden states, its head's cast
    elif want_logits and cached == "hidden":
        head += tokens * th * act  # the cached final hidden states (the head is held in their dtype: training_layout)
    linear_params = bf16_linear_params(student)
    if quantized_params:  # the round-tripped weights the products keep (one block's when recomputed), the table's
        blocks = quantized_params - vocab * h
        if ckpt:  # each block's from the forward pass to the end of backward (qat.round_trips_cached), or one block's
            kept = blocks / max(layers, 1) if cfg.recompute_round_trips else blocks
        else:
            kept = quantized_params
        weights = kept * act + table  # the table's round trip, made in place (blockquant), kept for the head's backward
    else:  # the bf16 copy of every trainable weight, kept for backward (none kept when blocks are recomputed)
        weights = linear_params * 2 if bf16 and not ckpt else 0
    if cfg.grad_accum > 1:  # a later micro-batch's gradients are made whole, then added to the kept ones
        head += table * ACCUMULATION_COPIES
    state = 4 if cfg.optimizer_state == "bf16" else 8
    gradients = n_student * 4.0
    # held in bf16 as each is finished; one fp32 gradient at a time before that. Not credited to a QAT step:
    # its peak sits in the forward pass (the head's chunks, the round trips), measured no lower with them
    # (default teacher, full depth, live teacher: 2,912 MiB with bf16 gradients, 2,892 without; memory_fit.py)
    if bf16_gradients_apply(cfg) and not quantized_params:
        held = [p.numel() for p in bf16_product_weights(student)]
        gradients -= sum(held) * 2.0 - max(held, default=0) * 4.0
    # edgekd.methods.layout.training_layout: an idle teacher leaves memory, a running one holds bf16 linears
    teacher_bf16 = bf16 and teacher_live
    if not teacher_live:
        saved = float(sum(p.numel() * p.element_size() for p in teacher.parameters()))
        if teacher_use(cfg, cached) == "head":  # the head stays, in the products' dtype
            saved -= family_of(teacher).head_module(teacher).weight.numel() * act
    else:
        saved = bf16_linear_params(teacher) * 2.0 if teacher_bf16 else 0.0
    resident = resident_bytes if resident_bytes is not None else _resident_now()
    parts = {"resident_now": resident, TEACHER_SAVED: -saved, "gradients": gradients,
             "optimizer_state": n_student * float(state), "activations": float(activations), "teacher_targets": float(targets),
             "head_and_table_gradients": float(head), "weight_copies": float(weights)}
    parts["allocator_slack"] = ALLOCATOR_SLACK * sum(v for k, v in parts.items() if k not in ("resident_now", TEACHER_SAVED))
    return MemoryPlan(parts, cfg.gradient_checkpointing, cfg.optimizer_state, cfg.batch_size, cfg.grad_accum, teacher_bf16,
                      not teacher_live,
                      cfg.gradient_dtype if bf16_gradients_apply(cfg) else "fp32",
                      bool(quantized_params and ckpt and cfg.recompute_round_trips),
                      teacher_use(cfg, cached) == "head")


TEACHER_SAVED = "teacher_held_less"  # the part training_layout takes off the resident teacher


def teacher_use(cfg: Any, cached: bool | str | None) -> str:
    """What a training step of ``cfg`` (edgekd.methods.distill.DistillConfig) needs of the teacher:
    "model", its forward pass (for its logits unless a cache supplies them, its hidden states or
    attention maps, or to score on-policy samples); "head", only its output head (``cached`` is
    "hidden": the cache holds its final hidden states); or "none" (a logit cache supplies every target)."""
    want_logits = cfg.w_logit > 0 and cfg.alpha > 0
    if (want_logits and not cached) or cfg.w_hidden > 0 or cfg.w_attention > 0 or cfg.on_policy_share:
        return "model"
    return "head" if want_logits and cached == "hidden" else "none"


def teacher_runs(cfg: Any, cached: bool | str | None) -> bool:
    """Whether a training step of ``cfg`` runs the teacher's blocks (:func:`teacher_use`)."""
    return teacher_use(cfg, cached) == "model"


def bf16_gradients_apply(cfg: Any, world: int = 1) -> bool:
    """Whether ``cfg``'s (edgekd.methods.distill.DistillConfig) gradients of bf16 products can be
    kept in bf16 exactly (edgekd.methods.optim.Bf16Gradients)."""
    return (cfg.gradient_dtype == "bf16" and cfg.precision == "bf16" and cfg.optimizer_state == "bf16"
            and cfg.grad_accum == 1 and world == 1 and not cfg.on_policy_share)  # one backward pass a step


ACCUMULATION_COPIES = 1.5  # measured: 1 x 4 micro-batches peaked 0.93 GB above the whole batch (Qwen3-0.6B shape, 0.62 GB table)
HEAD_CHUNK_COPIES = 8  # (chunk, vocab) fp32 tensors alive at once in a chunk's loss and its gradient (autograd)
HEAD_CHUNK_COPIES_CLOSED_FORM = 4  # the same with the gradient in closed form (edgekd.methods.chunked_head): its buffers
# measured on the 135M default's 24-block student (checkpointing, bf16 moments): the resident set rose
# 349-392 MiB across the attention loss's 24 layers with no live tensor added, 1.6-1.8 fp32 maps a layer
# (heap the allocator kept); 1.5, as the Qwen3-0.6B shape's distillation was already predicted 4-5% over
ATTENTION_KL_HEAP = 1.5
ALLOCATOR_SLACK = 0.1  # freed blocks the heap keeps resident, as a share of what the step allocates


CUDA_CONTEXT_BYTES = 0.5e9  # the CUDA context and kernels (outside torch's allocator)


def memory_limit_bytes(limit_gb: float | None = None) -> float:
    """The memory a training step may use: ``limit_gb`` when given; else, where training runs on a
    GPU (edgekd.methods.distill: Accelerate's device), that GPU's memory; else what this process
    holds plus what the machine has free."""
    if limit_gb is not None:
        return float(limit_gb) * 1e9
    if torch.cuda.is_available():
        return float(torch.cuda.mem_get_info()[1])
    import psutil

    from ..pipeline.peak_memory import current_rss_mb

    return float(psutil.virtual_memory().available + current_rss_mb() * 2**20)


def refuse_over_limit(predicted: float, limit_gb: float | None, what: str, fix: str) -> None:
    """Stop a stage before it allocates when its predicted peak (a PROJECTION) exceeds what the run may use."""
    limit = memory_limit_bytes(limit_gb)
    if predicted > HEADROOM * limit:
        raise EdgekdError(f"{what} needs about {predicted / 1e9:.1f} GB (PROJECTION), but this run may use {limit / 1e9:.1f} GB",
                          fix=f"{fix}, or run on a machine with at least {predicted / HEADROOM / 1e9:.1f} GB free (compression.memory_gb sets the limit)")


def device_resident_bytes(teacher: Any, student: Any) -> float | None:
    """On a GPU, what the step starts from there: both models (moved there by the training loop),
    what torch holds on it already and the CUDA context; None on the CPU (the process's RSS is measured)."""
    if not torch.cuda.is_available():
        return None
    on_host = sum(t.numel() * t.element_size() for m in (teacher, student) for t in m.parameters() if t.device.type != "cuda")
    return float(on_host + torch.cuda.memory_allocated() + CUDA_CONTEXT_BYTES)


def _savings_ladder(cfg: Any, quantized: bool = False) -> Iterator[Any]:
    """``cfg`` with more and more memory saved, cheapest first; ``quantized``: a QAT step (fake-quantized weights)."""
    cfg = replace(cfg)
    yield cfg
    if not cfg.gradient_checkpointing:
        cfg = replace(cfg, gradient_checkpointing=True)
        yield cfg
    if cfg.optimizer_state != "bf16":
        cfg = replace(cfg, optimizer_state="bf16")
        yield cfg
    if quantized and not cfg.recompute_round_trips:  # each block's round trips made again in backward (~10% of a QAT step)
        cfg = replace(cfg, recompute_round_trips=True)
        yield cfg
    # bf16 gradients: not for QAT, whose peak they do not lower (estimate_training_memory)
    if not quantized and cfg.gradient_dtype != "bf16" and cfg.precision == "bf16" and cfg.grad_accum == 1 and not cfg.on_policy_share:
        cfg = replace(cfg, gradient_dtype="bf16")
        yield cfg
    while cfg.batch_size > 1:
        half = cfg.batch_size // 2
        if cfg.batch_size % half or half * 2 != cfg.batch_size:
            break
        cfg = replace(cfg, batch_size=half, grad_accum=cfg.grad_accum * 2, gradient_dtype="fp32")  # accumulated in fp32
        yield cfg


def fit_memory(teacher: Any, student: Any, cfg: Any, block_len: int, limit_bytes: float, *, stage: str = "distillation",
               quantized_params: int = 0, cached: bool | str | None = False, resident_bytes: float | None = None,
               target_bytes: float | None = None) -> tuple[Any, MemoryPlan]:
    """The config a step runs with, and its plan: the first on the savings ladder whose predicted
    peak fits ``HEADROOM`` of the hard ``limit_bytes``; with a soft ``target_bytes``, the first
    under the target without splitting the batch (micro-batches cost QAT twice its step time,
    measured), else the most saving of those that fits the limit. A clear refusal naming the
    memory that would fit when nothing does. ``resident_bytes``: the process's resident memory
    (measured, after trimming the heap, when None)."""
    from ..pipeline.peak_memory import release_freed_memory

    if resident_bytes is None:
        release_freed_memory()  # what the process holds, not what an earlier step freed and the heap kept
    resident = resident_bytes
    ladder = []
    for candidate in _savings_ladder(cfg, quantized=bool(quantized_params)):
        plan = estimate_training_memory(teacher, student, candidate, block_len, quantized_params=quantized_params,
                                        cached=cached, resident_bytes=resident)
        resident = plan.parts["resident_now"]
        ladder.append((candidate, plan, plan.total <= HEADROOM * limit_bytes))
    whole_batch = [(c, p, fits) for c, p, fits in ladder if c.batch_size == cfg.batch_size]
    if target_bytes is not None:
        for candidate, plan, fits in whole_batch:
            if fits and plan.total <= target_bytes:
                return candidate, plan
        # short of the target, the most saving whole-batch settings, but not bf16 gradients: their
        # conversions cost ~5% of a QAT step (measured), for a peak that on a 49k-token vocabulary
        # sits in the forward pass's head, before any gradient exists
        fitting = [(c, p) for c, p, fits in whole_batch if fits and c.gradient_dtype == cfg.gradient_dtype]
        if fitting:
            return fitting[-1]
    for candidate, plan, fits in ladder:
        if fits:
            return candidate, plan
    candidate, plan, _ = min(ladder, key=lambda rung: rung[1].total)  # the closest (not the last: accumulation costs)
    need = plan.total / HEADROOM
    raise EdgekdError(
        f"{stage} needs about {plan.total / 1e9:.1f} GB even with every memory saving "
        f"({', '.join(f'{k}={v}' for k, v in plan.settings().items())}), but this run may use {limit_bytes / 1e9:.1f} GB "
        f"({plan.describe()})",
        fix=f"run it on a machine with at least {need / 1e9:.1f} GB of memory free (or raise compression.memory_gb), "
        "shorten compression.data.block_len, drop the attention loss (its maps grow with block_len^2), "
        "or prune the student further (compression.prune.keep_layers)",
    )


def bf16_product_weights(model: Any) -> list[torch.Tensor]:
    """The weight Parameters of ``model``'s linear layers that are not its (tied) token embedding:
    each used by one product a step, which bf16 autocast computes in bf16."""
    embedding = stored_weight(family_of(model).embedding_module(model))
    weights: dict[int, torch.Tensor] = {}
    for m in model.modules():
        if isinstance(m, torch.nn.Linear) and stored_weight(m) is not embedding:
            weights.setdefault(id(stored_weight(m)), stored_weight(m))
    return list(weights.values())


def bf16_linear_params(model: Any) -> int:
    """Weights of ``model``'s linear layers that are not its (tied) token embedding."""
    return sum(w.numel() for w in bf16_product_weights(model))


def stored_weight(module: Any) -> torch.Tensor:
    """A module's weight Parameter; under a parametrization (QAT), the original it is computed from."""
    from torch.nn.utils import parametrize

    return module.parametrizations.weight.original if parametrize.is_parametrized(module, "weight") else module.weight


def predict_export_peak(model: Any, plan: Any, runtime: str = "llama.cpp", context: int = 256,
                        resident_bytes: float | None = None, reference_file_bytes: float = 0.0) -> float:
    """The predicted peak resident bytes of writing ``model``'s file and checking it in ``runtime``
    on blocks of ``context`` tokens.

    The writer holds every quantized tensor until the file is written (the file's size), the
    largest tensor passes through fp32 working copies while it is quantized, the runtime maps the
    whole file, and the check holds both sides' logits for a block; the fp32 model is resident.
    ``reference_file_bytes``: a second file checked the same way afterwards (the teacher's own GGUF,
    llama.cpp's noise floor), still mapped by the runtime when its check runs.
    """
    from ..device.costmodel import ArchShape, model_bytes

    resident = resident_bytes if resident_bytes is not None else _resident_now()
    file_bytes = model_bytes(ArchShape.from_config(model.config), plan, runtime)
    largest = max(p.numel() for p in model.parameters())
    logits = context * model.config.vocab_size * 4
    return (resident + EXPORT_FILE_COPIES * file_bytes + EXPORT_LARGEST_COPIES * largest * 4 + EXPORT_LOGIT_COPIES * logits
            + EXPORT_FILE_COPIES * reference_file_bytes)


EXPORT_FILE_COPIES = 2.0  # the writer's buffers and the runtime's mapping of the file
# fp32 working copies of the largest tensor while it is quantized, and what the heap keeps of them:
# fitted to six measured export peaks (the 135M default, 0.11 GB table: 0.91-0.97; a Qwen3-0.6B
# shape, 0.62 GB table, whose peak moves 7.3-8.2 GB run to run with the heap: 1.01-1.13; RESULTS.md "Memory")
EXPORT_LARGEST_COPIES = 3.5
EXPORT_LOGIT_COPIES = 4.0  # a block's logits from the runtime and torch, and their log-softmaxes


def _resident_now() -> float:
    """What the process holds now, plus the parts of memory-mapped weight files not read yet: a
    model transformers maps from safetensors becomes resident as its first forward pass reads it."""
    from ..pipeline.peak_memory import current_rss_mb, mapped_unread_bytes

    return current_rss_mb() * 2**20 + mapped_unread_bytes()



def predict_forward_peak(config: Any, batch: int, block_len: int, *, logit_copies: float = 1.0, hidden_copies: float = 0.0,
                         extra_bytes: float = 0.0, resident_bytes: float | None = None) -> float:
    """The predicted peak resident bytes of a no-grad stage that runs ``config``'s model on batches of
    ``batch`` blocks: what is resident now, one block's fp32 working set (inference frees each
    block's tensors before the next), ``logit_copies`` (batch, T, vocab) fp32 logits,
    ``hidden_copies`` (batch, T, hidden) states per layer boundary, and ``extra_bytes``."""
    resident = resident_bytes if resident_bytes is not None else _resident_now()
    tokens = batch * block_len
    working = layer_activation_bytes_per_token(config, 4) * tokens
    logits = tokens * config.vocab_size * 4 * logit_copies
    hidden = (config.num_hidden_layers + 1) * tokens * config.hidden_size * 4 * hidden_copies
    return resident + working + logits + hidden + extra_bytes


EVAL_BATCH = 4  # edgekd.methods.evaluate.evaluate's batch of blocks


def predict_evaluation_peak(config: Any, block_len: int, with_teacher: bool, extra_bytes: float = 0.0) -> float:
    """Held-out evaluation (edgekd.methods.evaluate): a batch's logits of the model (and the
    teacher's), and one block's log-softmaxes and KL terms in numpy (three block-sized arrays, five with a teacher)."""
    per_block = (5 if with_teacher else 3) / EVAL_BATCH
    return predict_forward_peak(config, EVAL_BATCH, block_len, logit_copies=(2 if with_teacher else 1) + per_block,
                                extra_bytes=extra_bytes)


def kept_bytes(model: Any, keep: list[int]) -> float:
    """fp32 bytes of a depth-pruned copy of ``model`` keeping blocks ``keep``."""
    layers = [sum(p.numel() for p in layer.parameters()) for layer in family_of(model).decoder_layers(model)]
    return float((_params(model) - sum(layers) + sum(layers[i] for i in keep)) * 4)
