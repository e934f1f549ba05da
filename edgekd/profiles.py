"""Device profiles: schema, loading, and ``--set`` overrides.

A profile describes one target device and deployment (hardware facts, runtime and
weight format, budgets) plus compression defaults; the pipeline derives its plan
from it. Profiles are YAML files validated by a strict pydantic schema: unknown
keys and wrong types are rejected, and every problem is reported at once with its
key path and a suggestion.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    model_validator,
)

from .errors import EdgekdError
from .formats import LINEAR_FORMATS, PLANNER_FORMATS
from .overrides import apply_overrides, parse_overrides
from .profile_errors import describe_validation_errors
from .profile_yaml import read_yaml as _read_yaml


# Cross-field rules, shared by the model validators and by the raw-data pass in
# validate_profile (pydantic skips model validators once a field fails, but the
# user should see every problem at once).
def _power_problem(active: Any, idle: Any) -> str | None:
    if isinstance(active, (int, float)) and isinstance(idle, (int, float)) and idle >= active:
        return f"power_idle_w ({idle}) must be lower than power_active_w ({active})"
    return None


def _format_problem(runtime: Any, formats: Any) -> str | None:
    need = RUNTIME_FORMAT.get(runtime) if isinstance(runtime, str) else None
    if need and isinstance(formats, list) and need not in formats:
        return f"runtime {runtime!r} loads {need!r} files: add {need!r} to formats"
    return None


def _cross_field_problems(data: dict[str, Any]) -> list[str]:
    hw = data.get("hardware") if isinstance(data.get("hardware"), dict) else {}
    dep = data.get("deployment") if isinstance(data.get("deployment"), dict) else {}
    found = [("hardware", _power_problem(hw.get("power_active_w"), hw.get("power_idle_w"))),
             ("deployment", _format_problem(dep.get("runtime"), dep.get("formats")))]
    return [f"{where}: {p}" for where, p in found if p]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class Hardware(_Strict):
    cores: int = Field(gt=0, description="CPU cores available to the runtime")
    isa: list[str] = Field(description="instruction-set features, e.g. neon, dotprod, avx2")
    memory_gb: float = Field(gt=0)
    memory_bandwidth_gbs: float = Field(gt=0, description="peak DRAM bandwidth, GB/s")
    peak_gflops_fp32: float = Field(gt=0)
    power_active_w: float = Field(gt=0, description="whole-device power under CPU load")
    power_idle_w: float = Field(ge=0)
    battery_wh: float | None = Field(default=None, gt=0)

    @model_validator(mode="after")
    def _idle_below_active(self) -> Hardware:
        problem = _power_problem(self.power_active_w, self.power_idle_w)
        if problem:
            raise ValueError(problem)
        return self


Runtime = Literal["llama.cpp", "onnxruntime", "onnxruntime-genai"]
ExportFormat = Literal["gguf", "onnx"]
# One weight format drives QAT and every export; the choices are the registry's (edgekd.formats).
WeightFormatName = Literal[LINEAR_FORMATS]  # type: ignore[valid-type]

# onnxruntime-genai (what Android / iOS apps call) loads a folder: the decoder .onnx with its
# genai_config.json and tokenizer; plain onnxruntime loads the .onnx alone
RUNTIME_FORMAT: dict[str, str] = {"llama.cpp": "gguf", "onnxruntime": "onnx", "onnxruntime-genai": "onnx"}


TensorKey = Annotated[str, StringConstraints(pattern=r"^(embedding|head|(blk\.\d+\.)?[a-z][a-z0-9_]*)$")]


class Deployment(_Strict):
    runtime: Runtime
    formats: list[ExportFormat] = Field(min_length=1)
    weight_format: WeightFormatName
    # per-tensor formats over weight_format (a mixed-precision file, as llama.cpp's Q4_K_M is):
    # keys "embedding" (with a tied head), "head", a role in every block ("ffn_down") or one
    # block's tensor ("blk.3.attn_v"); values from the same registry. "auto": the planner gives
    # the embedding and each role the format that meets the budgets at the least measured KL.
    tensor_formats: Union[Literal["auto"], dict[TensorKey, WeightFormatName]] = Field(default_factory=dict)  # noqa: UP007
    threads: int = Field(gt=0)
    context_length: int = Field(gt=0)

    @model_validator(mode="after")
    def _runtime_needs_its_format(self) -> Deployment:
        problem = _format_problem(self.runtime, self.formats)
        if problem:
            raise ValueError(problem)
        return self


class Budgets(_Strict):
    """Limits checked on measured (or clearly labelled projected) numbers; null disables one."""

    max_model_mb: float | None = Field(default=None, gt=0)
    min_decode_tokens_per_s: float | None = Field(default=None, gt=0)
    max_ttft_ms: float | None = Field(default=None, gt=0, description="for a 128-token prompt")
    max_peak_memory_mb: float | None = Field(default=None, gt=0)
    max_energy_mj_per_token: float | None = Field(default=None, gt=0)
    # quality against the teacher on held-out text, checked by `edgekd eval` and on a run's exported files
    max_kl_to_teacher: float | None = Field(default=None, gt=0, description="mean KL(teacher || model), nats/token")
    min_top1_agreement: float | None = Field(default=None, gt=0, le=1, description="share of positions with the teacher's top-1")
    # lm-eval accuracy of compression.evaluation.tasks: floors per task, and the largest drop below the teacher
    min_task_accuracy: dict[str, Annotated[float, Field(ge=0, le=1)]] = Field(default_factory=dict)
    max_task_accuracy_drop: float | None = Field(default=None, ge=0, le=1)


class PruneSettings(_Strict):
    method: Literal["block_influence", "angular", "loss_increase", "none"] = "block_influence"
    # int: layers to keep; float in (0, 1]: fraction to keep; "auto": the planner picks
    keep_layers: Union[Literal["auto"], int, float] = "auto"  # noqa: UP007
    # fraction of MLP intermediate channels kept (width pruning); 1.0 disables it; "auto": the
    # planner searches compression.planner.mlp_fractions
    mlp_keep_fraction: Union[Literal["auto"], Annotated[float, Field(gt=0, le=1)]] = 1.0  # noqa: UP007
    calibration_blocks: int = Field(default=16, gt=0)


class GenerationSettings(_Strict):
    """The teacher's samples (edgekd.methods.generate): sequence-level KD's data, and with
    ``--data teacher`` the whole corpus (data-free QAT)."""

    tokens: int = Field(default=65536, gt=0)  # training tokens to generate (prompts included, EOS-separated)
    # with --data teacher and a time budget: sampling goes on past `tokens` until this share of the
    # training time left when sampling starts (0: `tokens` exactly): distinct samples in place of steps.
    # Measured at 30 minutes of QAT: KL unchanged, 9% fewer repeated 4-grams (benchmarks/RESULTS.md)
    time_share: float = Field(default=0.0, ge=0, le=0.5)
    # corpus: the first prompt_tokens of training blocks; none: a first token drawn from the
    # vocabulary (LLM-QAT); chat: the chat template's empty user turn; query: the teacher writes a user's
    # message and answers it (Magpie); auto: corpus, or none without one. --prompts FILE replaces them
    prompts: Literal["auto", "corpus", "none", "chat", "query"] = "auto"
    # extra arguments of the teacher's chat template for chat, query and --prompts messages, as
    # transformers' apply_chat_template takes them: {enable_thinking: false} for Qwen3's or SmolLM3's replies without reasoning
    chat_template_args: dict[str, Union[bool, int, float, str]] = Field(default_factory=dict)  # noqa: UP007
    prompt_tokens: int = Field(default=16, gt=0)
    new_tokens: int = Field(default=240, gt=0)
    temperature: float = Field(default=1.0, ge=0)
    top_p: float = Field(default=0.95, gt=0, le=1)
    # the first new tokens of each sample taken greedily, the rest sampled: LLM-QAT's hybrid sampling
    # (Liu et al. 2023, their generations start greedy for 3-5 tokens) against samples that drift at once
    greedy_tokens: int = Field(default=0, ge=0)
    # auto: torch with batched KV-cache decoding, in compression.distill.precision (measured faster than
    # llama.cpp's one sequence at a time on the default teacher; benchmarks/RESULTS.md, "Distillation data"
    # and "Speed of the toolkit"); llama.cpp: the teacher's GGUF
    engine: Literal["auto", "torch", "llama.cpp"] = "auto"
    batch_size: int = Field(default=32, gt=0)  # prompts sampled together (torch): more rows per decode step, more tokens/s
    seed: int = 0

    @model_validator(mode="after")
    def _template_args_reach_the_template(self) -> GenerationSettings:
        from .methods.chat_template import CALL_PARAMETERS

        clash = sorted(set(self.chat_template_args) & CALL_PARAMETERS)
        if clash:
            raise ValueError(f"chat_template_args names {', '.join(clash)}: a parameter of the chat template call itself, "
                             "not a variable of the template (give the template's own, e.g. enable_thinking: false)")
        return self


class OnPolicySettings(_Strict):
    """On-policy distillation (GKD, Agarwal et al. 2024): the student continues prompts, the teacher scores them."""

    prompt_tokens: int = Field(default=32, gt=0)  # the first tokens of a training block
    new_tokens: int = Field(default=64, gt=0)
    temperature: float = Field(default=1.0, ge=0)
    top_p: float = Field(default=1.0, gt=0, le=1)
    # the divergence on the sampled positions; reverse KL (MiniLLM) asks the student to generate what the teacher would
    kl: Literal["forward", "reverse", "skew", "jsd"] = "reverse"
    # the rows of this many training steps are sampled in one batch with the weights of the first
    # (TRL's steps_per_generation): 64 tokens took 2.8 s for 1 row and 4.8 s for 8 (the fake-quantized
    # 135M student on 2 cores, benchmarks/data_sources.py), so 8 steps a generation cost 0.6 s a step
    # instead of 2.8; the later steps' rows come from weights a few updates old
    steps_per_generation: int = Field(default=8, ge=1)
    # the share of a stage's steps trained on the offline pools alone before on-policy rows join: GKD
    # and MiniLLM start from a fine-tuned student. Measured against the same rows from the first step
    # (benchmarks/RESULTS.md, "The warm-up as a profile setting"): held-out KL -9.4% in distillation,
    # -9.9% in QAT, with lower perplexity and less repetition (those rows joined late, at three quarters
    # of the steps trained; joined at half, distillation cost 3.7% against the corpus alone)
    start: float = Field(default=0.5, ge=0, lt=1)


class DataMixture(_Strict):
    """Shares of each training batch (distillation and QAT): corpus blocks, blocks of the teacher's
    samples, and the student's own continuations scored by the teacher (on-policy)."""

    corpus: float = Field(default=1.0, ge=0)
    teacher_samples: float = Field(default=0.0, ge=0)
    on_policy: float = Field(default=0.0, ge=0)

    @model_validator(mode="after")
    def _some_data(self) -> DataMixture:
        if self.corpus + self.teacher_samples <= 0:
            raise ValueError("corpus + teacher_samples must be above 0: on-policy prompts come from their blocks")
        return self


class DataSettings(_Strict):
    # every stage packs the corpus into blocks of this many tokens: calibration, distillation,
    # QAT, the logit cache and held-out evaluation
    block_len: int = Field(default=256, ge=16)
    mixture: DataMixture = Field(default_factory=DataMixture)
    generation: GenerationSettings = Field(default_factory=GenerationSettings)
    on_policy: OnPolicySettings = Field(default_factory=OnPolicySettings)


class LogitCacheSettings(_Strict):
    """The teacher's targets computed once per training position instead of live every step."""

    # entries per position: k draws from the teacher ("sample", unbiased KL) or its k most likely tokens ("topk");
    # "hidden": the teacher's final hidden states, exact targets (its head runs in the step), no k; read only by
    # logit-only steps (edgekd.methods.step_losses.reads_teacher_cache), and not built when no step is one
    k: int | None = Field(default=None, gt=0)
    kind: Literal["sample", "topk", "hidden"] = "sample"

    @model_validator(mode="after")
    def _k_for_logits(self) -> LogitCacheSettings:
        if self.kind != "hidden" and self.k is None:
            raise ValueError(f"a {self.kind} logit cache needs k, the entries per position (e.g. k: 128)")
        if self.kind == "hidden" and self.k is not None:
            raise ValueError("k is the entries per position of a logit cache; the hidden-state cache has none "
                             "(set kind: sample or topk with k, or drop k)")
        return self


class DistillSettings(_Strict):
    steps: int = Field(default=120, ge=0)
    batch_size: int = Field(default=4, gt=0)
    grad_accum: int = Field(default=1, gt=0)
    learning_rate: float = Field(default=1e-4, gt=0)
    temperature: float = Field(default=2.0, gt=0)
    alpha: float = Field(default=0.7, ge=0, le=1, description="weight of KD against cross-entropy")
    kl: Literal["forward", "reverse", "skew", "jsd"] = "forward"
    losses: dict[Literal["logit_kl", "hidden_mse", "hidden_cos", "attention_kl"], float] = Field(
        default_factory=lambda: {"logit_kl": 1.0, "hidden_mse": 1.0, "attention_kl": 1.0}
    )
    logit_cache: LogitCacheSettings | None = None  # None: the live teacher
    checkpoint_every: int = Field(default=50, gt=0)
    seed: int = 0
    # arithmetic of the forward passes in distillation and QAT (and of the teacher's sampling); master
    # weights, gradients and optimizer state stay fp32. auto: bf16 where the hardware has native bf16, else fp32.
    precision: Literal["auto", "fp32", "bf16"] = "auto"


class QatSettings(_Strict):
    steps: int = Field(default=300, ge=0)
    learning_rate: float = Field(default=1e-4, gt=0)
    # weight of the teacher's logits against cross-entropy on the corpus. QAT's goal is the
    # teacher's distribution: CE pulls the student toward the corpus instead (measured on the
    # default teacher, 100 steps: KL 0.117 at 0.7, 0.056 at 1.0; benchmarks/qat_recipe.py)
    alpha: float = Field(default=1.0, ge=0, le=1, description="weight of KD against cross-entropy in QAT")
    # the loss terms of a QAT-KD step, as distill.losses (no attention term). Logit KD and every block's hidden-state
    # target at weight 30 (FitNets' term; block-wise reconstruction, BRECQ / EfficientQAT): held-out KL 3-5% lower than
    # logit KD alone in four side-by-side runs (the whole default run's GGUF and an fp32 run on a CPU without bf16
    # included), for a teacher pass in every step (+11-29% step time, +184 MiB peak on the default teacher).
    # {logit_kl: 1.0} is the faster step
    # (benchmarks/RESULTS.md, "Hidden-state targets in QAT")
    losses: dict[Literal["logit_kl", "hidden_mse", "hidden_cos"], float] = Field(
        default_factory=lambda: {"logit_kl": 1.0, "hidden_mse": 30.0})
    # Q4_0: train the per-block clip factors too (LSQ-style gradient), starting from the search
    learn_clip: bool = False
    # Q4_0: search a per-block scale clip factor (importance-weighted error) before QAT;
    # the exported file stays exactly what the QAT model computes (see formats.torch_round_trip)
    clip_search: bool = True


CHAT_PROMPTS = ("Write a Python function that reverses a string.", "What does the `with` statement do in Python?",
                "Give me three tips for writing clear code.")


class EvaluationSettings(_Strict):
    heldout_fraction: float = Field(default=0.1, gt=0, lt=1)
    max_heldout_blocks: int = Field(default=24, gt=0)
    # chat side by side in report.md (edgekd.quality.chat): user turns, greedy, teacher vs each shipped file
    chat_prompts: list[str] = Field(default_factory=lambda: list(CHAT_PROMPTS))
    chat_prompts_file: str | None = None  # JSONL of {"messages": [...]} or {"prompt": "..."}, added to chat_prompts
    chat_new_tokens: int = Field(default=48, ge=0)  # 0: no chat section
    # lm-evaluation-harness tasks run on every shipped file and the teacher (edgekd.quality.tasks)
    tasks: list[str] = Field(default_factory=list)
    task_limit: int | None = Field(default=None, gt=0)  # items per task (None: all)
    task_include_path: str | None = None  # a folder of task YAMLs of one's own


class PlannerSettings(_Strict):
    """What the planner may choose when a knob is ``auto`` (edgekd.methods.planner)."""

    # formats a block's linear role may get, and the embedding (with a tied head)
    candidates: list[WeightFormatName] = Field(default_factory=lambda: list(PLANNER_FORMATS), min_length=1)
    embedding_candidates: list[WeightFormatName] = Field(default_factory=lambda: list(PLANNER_FORMATS), min_length=1)
    mlp_fractions: list[Annotated[float, Field(gt=0, lt=1)]] = Field(default_factory=lambda: [0.75, 0.5])
    sensitivity_blocks: int = Field(default=8, gt=0)  # calibration blocks the knobs' KL is measured on
    # the largest predicted KL after training a plan may have: beyond it the step budget cannot heal it
    max_kl: float = Field(default=0.5, gt=0)


class Compression(_Strict):
    # wall-clock budget of a whole run ("45m", "1h30m"): training steps are fitted to it from the
    # step time measured on this machine (edgekd.pipeline.timebudget); null: the steps as set
    time_budget: str | None = None
    # memory the run may use, in GB (null: what this process holds plus what the machine has free).
    # Training steps that would not fit turn on activation checkpointing, bf16 optimizer moments and
    # smaller micro-batches, in that order, before refusing (edgekd.methods.memory)
    memory_gb: float | None = Field(default=None, gt=0)
    # memory a run prefers to stay within (GB): the savings that keep the whole batch (checkpointing,
    # bf16 optimizer moments) are turned on to get there; never a reason to refuse. null: only memory_gb
    memory_target_gb: float | None = Field(default=3.0, gt=0)
    data: DataSettings = Field(default_factory=DataSettings)

    @model_validator(mode="after")
    def _time_budget_reads(self) -> Compression:
        if self.time_budget is not None:
            from .pipeline.timebudget import parse_duration

            try:
                parse_duration(self.time_budget)
            except EdgekdError as exc:
                raise ValueError(f"{exc.problem}; {exc.fix}") from None
        return self
    planner: PlannerSettings = Field(default_factory=PlannerSettings)
    prune: PruneSettings = Field(default_factory=PruneSettings)
    distill: DistillSettings = Field(default_factory=DistillSettings)
    qat: QatSettings = Field(default_factory=QatSettings)
    evaluation: EvaluationSettings = Field(default_factory=EvaluationSettings)


class DeviceProfile(_Strict):
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9._-]*$")
    description: str
    hardware: Hardware
    deployment: Deployment
    budgets: Budgets = Field(default_factory=Budgets)
    compression: Compression = Field(default_factory=Compression)


# ---------------------------------------------------------------- loading

PROFILE_SUFFIXES = (".yaml", ".yml")


def builtin_profile_dir() -> Path:
    """The shipped profiles: ``profiles/`` in a checkout (or editable install), ``edgekd/builtin_profiles`` in a wheel."""
    package_dir = Path(__file__).resolve().parent
    for candidate in (package_dir.parent / "profiles", package_dir / "builtin_profiles"):
        if candidate.is_dir() and any(candidate.glob("*.yaml")):
            return candidate
    raise EdgekdError("edgekd's built-in profiles are missing from this installation", fix="reinstall edgekd")


def builtin_profile_names() -> list[str]:
    return sorted(p.stem for p in builtin_profile_dir().glob("*.yaml"))


def _resolve_profile_path(name_or_path: str | Path) -> Path:
    text = str(name_or_path)
    looks_like_path = text.endswith(PROFILE_SUFFIXES) or "/" in text or "\\" in text
    if looks_like_path:
        path = Path(text).expanduser()
        if not path.is_file():
            raise EdgekdError(
                f"profile file not found: {path}",
                fix="check the path, or pass a built-in profile name "
                f"({', '.join(builtin_profile_names())})",
            )
        return path
    path = builtin_profile_dir() / f"{text}.yaml"
    if not path.is_file():
        names = builtin_profile_names()
        close = difflib.get_close_matches(text, names, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise EdgekdError(
            f"unknown profile {text!r}",
            fix=f"{hint}built-in profiles: {', '.join(names)}; or pass a path to a YAML file "
            "(edgekd profiles list shows them)",
        )
    return path


def validate_profile(data: dict[str, Any], source: str) -> DeviceProfile:
    try:
        return DeviceProfile.model_validate(data)
    except ValidationError as exc:
        details = describe_validation_errors(exc, DeviceProfile)
        details += [p for p in _cross_field_problems(data) if p not in details]
        raise EdgekdError(
            f"profile {source} has {len(details)} problem{'s' if len(details) != 1 else ''}:",
            details=details,
            fix="edit the profile (or the --set value) at the key paths above; "
            "`edgekd profiles show raspberry-pi-5` prints a valid example",
        ) from None


def load_profile(name_or_path: str | Path = "raspberry-pi-5", overrides: list[str] | dict[str, Any] | None = None) -> DeviceProfile:
    """Load a built-in profile by name, or a YAML file by path, then apply ``overrides``.

    ``overrides`` is a list of ``"key.path=value"`` strings (as on the CLI) or a dict
    ``{"deployment.threads": 2}``.
    """
    path = _resolve_profile_path(name_or_path)
    data = _read_yaml(path)
    if isinstance(overrides, dict):
        pairs = [(k.split("."), v) for k, v in overrides.items()]
    else:
        pairs = parse_overrides(overrides)
    apply_overrides(data, pairs)
    source = str(path) if pairs == [] else f"{path} (with --set {', '.join('.'.join(p) for p, _ in pairs)})"
    return validate_profile(data, source)


def profile_to_yaml(profile: DeviceProfile) -> str:
    return yaml.safe_dump(profile.model_dump(mode="json"), sort_keys=False)
