"""lm-evaluation-harness over the runtimes that ship the files: exact log-likelihoods from their logits.

lm-eval's own GGUF path scores through a server's completion API, one token's top log-probs at a
time, which makes multiple-choice tasks wrong or slow (lm-eval issues #2887, #2525, #1472). Here
a model class scores the whole sequence context + continuation in one pass of the runtime
(llama.cpp through llama-cpp-python, onnxruntime) and sums the continuation's log-softmax, as
lm-eval's HF model does in torch; the torch student and teacher go through lm-eval's own HF
model. This is the one module that imports lm-eval.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..errors import EdgekdError
from ..methods.evaluate import LogitsFn, log_softmax


def _lm_eval() -> Any:
    try:
        import lm_eval
    except ImportError:
        raise EdgekdError("task evaluation needs lm-evaluation-harness", fix="pip install 'edgekd[eval]' (or pip install lm-eval)") from None
    return lm_eval


def runtime_lm(logits: LogitsFn, tokenizer: Any, max_length: int) -> Any:
    """An lm-eval model over ``logits`` (a runtime's LogitsFn: (1, L) token ids -> (1, L, V) logits)."""
    _lm_eval()
    from lm_eval.api.model import TemplateLM

    class RuntimeLM(TemplateLM):
        def __init__(self) -> None:
            super().__init__()
            self.tokenizer = tokenizer
            self.max_length = max_length

        @property
        def eot_token_id(self) -> int:
            return tokenizer.eos_token_id

        @property
        def prefix_token_id(self) -> int:
            return tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id

        def tok_encode(self, string: str, **kwargs: Any) -> list[int]:
            return tokenizer(string, add_special_tokens=False)["input_ids"]

        def _loglikelihood_tokens(self, requests: list, disable_tqdm: bool = False, **kwargs: Any) -> list[tuple[float, bool]]:
            out = []
            for key, context, continuation in requests:
                ll, greedy = score(logits, context, continuation, self.max_length)
                out.append((ll, greedy))
                self.cache_hook.add_partial("loglikelihood", key, (ll, greedy))
            return out

        def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False) -> list[float]:
            from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

            out = []
            for (text,) in [r.args for r in requests]:
                windows = map(make_disjoint_window, get_rolling_token_windows(
                    token_list=self.tok_encode(text), prefix_token=self.prefix_token_id, max_seq_len=self.max_length, context_len=1))
                out.append(sum(score(logits, list(ctx), list(cont), self.max_length)[0] for ctx, cont in windows))
            return out

        def generate_until(self, requests: list, disable_tqdm: bool = False) -> list[str]:
            raise EdgekdError("generation tasks are not scored through the runtimes here",
                              fix="choose log-likelihood tasks (multiple choice, perplexity), or score the torch model")

    return RuntimeLM()


def score(logits: LogitsFn, context: list[int], continuation: list[int], max_length: int) -> tuple[float, bool]:
    """log p(continuation | context) from one pass over their concatenation (left-truncated to
    ``max_length`` + 1 tokens), and whether every continuation token is the argmax."""
    seq = (list(context) + list(continuation))[-(max_length + 1):]
    z = np.asarray(logits(np.asarray([seq[:-1]], dtype=np.int64)))[0]
    n = len(continuation)
    logp = log_softmax(z[-n:]).astype(np.float64)
    targets = np.asarray(seq[-n:])
    return float(logp[np.arange(n), targets].sum()), bool((z[-n:].argmax(-1) == targets).all())


def hf_lm(model: Any, tokenizer: Any, batch_size: int = 1) -> Any:
    """lm-eval's own HF model over a loaded torch model (the teacher, a student)."""
    _lm_eval()
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)


def write_multiple_choice_task(folder: str | Path, name: str, items: list[dict[str, Any]], target_delimiter: str = " ") -> Path:
    """A multiple-choice task of one's own for lm-eval's include path: ``items`` ({"question",
    "choices", "answer" (index)}) as JSONL beside the task YAML that reads them (no download)."""
    import json

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    data = (folder / f"{name}.jsonl").resolve()
    data.write_text("".join(json.dumps(i) + "\n" for i in items))
    (folder / f"{name}.yaml").write_text(
        f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\n"
        "output_type: multiple_choice\ndoc_to_text: \"{{question}}\"\ndoc_to_choice: \"{{choices}}\"\n"
        f"doc_to_target: \"{{{{answer}}}}\"\ntarget_delimiter: {json.dumps(target_delimiter)}\nmetric_list:\n  - metric: acc\n")
    return folder


def run_tasks(lm: Any, tasks: list[str], limit: int | None = None, include_path: str | Path | None = None) -> dict[str, dict[str, float]]:
    """Accuracy (and other metrics) per task: ``lm_eval.simple_evaluate`` on ``lm``; tasks download
    their data as lm-eval does, or come from ``include_path`` (task YAMLs of one's own)."""
    lm_eval = _lm_eval()
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(include_path) if include_path else None)
    try:
        out = lm_eval.simple_evaluate(model=lm, tasks=tasks, limit=limit, task_manager=manager, log_samples=False,
                                      bootstrap_iters=0)
    except Exception as exc:  # a task lm-eval cannot find or fetch
        raise EdgekdError(f"lm-eval could not run {', '.join(tasks)}: {exc}",
                          fix="check the task names (lm-eval --tasks list); offline, tasks need their data cached or --include-path") from None
    return {task: {k.split(",")[0]: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
            for task, metrics in out["results"].items()}
