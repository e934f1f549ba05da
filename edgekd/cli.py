"""The ``edgekd`` command. The only place that turns exceptions into exit codes.

Exit codes: 0 ok, 1 a budget failed, 2 bad input (one message with the fix, no traceback).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .errors import EdgekdError

out = Console()
err = Console(stderr=True)

EXIT_OK, EXIT_BUDGETS, EXIT_BAD_INPUT = 0, 1, 2

MAIN_EPILOG = """\
examples:
  edgekd compress --profile raspberry-pi-5            embedded teacher + corpus, offline
  edgekd compress --profile phone --teacher ./my-hf-model --data corpus.jsonl
  edgekd compress --profile laptop --set deployment.threads=2 --set budgets.max_model_mb=150
  edgekd bench export/raspberry-pi-5-smollm2-135m-instruct/model-q4_0.gguf --profile raspberry-pi-5
  edgekd profiles list
  edgekd profiles check my-device.yaml
  edgekd report export/raspberry-pi-5-smollm2-135m-instruct

exit codes: 0 ok, 1 a budget failed, 2 bad input
"""


def _add_profile_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--profile", default="raspberry-pi-5", help="built-in profile name or path to a YAML file (default: %(default)s)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one profile field, e.g. --set deployment.threads=2 (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    from .versions import edgekd_version

    parser = argparse.ArgumentParser(
        prog="edgekd", description="Compress a language model for an edge device.",
        epilog=MAIN_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"edgekd {edgekd_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    c = sub.add_parser(
        "compress", help="prune, distill and evaluate a teacher for a device profile",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  edgekd compress --profile raspberry-pi-5\n"
        "  edgekd compress --profile phone --teacher ./hf-dir --data docs/ --run-name phone-v2\n"
        "  edgekd compress --profile raspberry-pi-5 --resume       continue an interrupted run\n"
        "  edgekd compress --profile laptop --time-budget 30m      fit the training steps to 30 minutes\n"
        "  edgekd compress --profile raspberry-pi-5 --data teacher  no corpus: train on the teacher's samples\n",
    )
    _add_profile_args(c)
    c.add_argument("--teacher", default=None, help="Hugging Face model directory or .gguf file (default: embedded SmolLM2-135M-Instruct)")
    c.add_argument("--data", default=None, help="corpus: .txt/.jsonl file, directory of text files, a saved datasets directory, or a Hub dataset id owner/name[@revision], or 'teacher': no corpus, the teacher's own samples (default: Python's bundled docs)")
    c.add_argument("--prompts", default=None, metavar="FILE.jsonl",
                   help='prompts for the teacher\'s samples, one {"messages": [...]} (rendered by the chat template) or '
                   '{"prompt": "..."} per line (see compression.data.generation and .mixture)')
    c.add_argument("--text-field", default="text", help="JSONL/datasets field holding the text (default: %(default)s)")
    c.add_argument("--output", default="export", help="root directory for runs (default: %(default)s)")
    c.add_argument("--run-name", default=None, help="run directory name (default: <profile>-<teacher>)")
    c.add_argument("--overwrite", action="store_true", help="replace an existing run of the same name")
    c.add_argument("--resume", action="store_true", help="continue an existing run, reusing finished stages")
    c.add_argument("--trust-remote-code", action="store_true", help="allow custom model code from the teacher directory")
    c.add_argument("--time-budget", default=None, metavar="DURATION",
                   help="wall-clock budget of the run, e.g. 30m or 1h30m: training steps are fitted to it from the step "
                   "time measured on this machine (default: the profile's compression.time_budget)")
    c.add_argument("--json", action="store_true", help="print the report as JSON on stdout")
    c.add_argument("--quiet", action="store_true", help="no progress output")

    b = sub.add_parser(
        "bench", help="benchmark an exported model (GGUF or ONNX) against a profile's budgets",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  edgekd bench model-q4_0.gguf --profile raspberry-pi-5\n"
        "  edgekd bench model-q4_0.gguf --profile raspberry-pi-5 --json --junit bench.xml\n"
        "  edgekd bench model-q4_0-genai --profile phone --energy-log meter.csv\n"
        "  edgekd bench model-q4_0.gguf --against teacher-f16.gguf --max-kl 0.06 --junit bench.xml\n",
    )
    b.add_argument("model", help="a .gguf (llama.cpp), an onnxruntime-genai folder (or the .onnx in it; onnxruntime-genai "
                   "where installed, else onnxruntime) or an edgekd .onnx file (onnxruntime)")
    _add_profile_args(b)
    b.add_argument("--threads", type=int, default=None,
                   help="threads (default: deployment.threads, capped at this machine's cores)")
    b.add_argument("--repeats", type=int, default=3, help="timed repeats after one warm-up (default: %(default)s)")
    b.add_argument("--prompt-tokens", type=int, default=128, help="prompt length for prefill/TTFT (default: %(default)s)")
    b.add_argument("--gen-tokens", type=int, default=64, help="decoded tokens per repeat (default: %(default)s)")
    b.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
    b.add_argument("--junit", default=None, metavar="FILE", help="write budgets as JUnit test cases")
    b.add_argument("--energy-log", default=None, metavar="CSV",
                   help="a power meter's log (unix_time_s,watts) covering the run: measured energy instead of the proxy")
    b.add_argument("--no-projection", dest="projection", action="store_false",
                   help="skip the roofline projection to the profile's device")
    b.add_argument("--budgets-on", choices=["measured", "projected"], default="measured",
                   help="check the speed budgets on this host's measurement (default) or on the projection to the device")
    b.add_argument("--against", default=None, metavar="REFERENCE",
                   help="the teacher as a file its runtime loads (its F16 or Q8_0 GGUF, an ONNX file): KL statistics of the "
                   "model against it, both in their runtimes, and the quality budgets (needs no torch)")
    b.add_argument("--data", default=None, help="held-out text for --against (as --data of compress), or a run's "
                   "corpus/heldout.npy (token blocks); default: the default corpus's held-out split")
    b.add_argument("--blocks", type=int, default=24, help="held-out blocks scored with --against (default: %(default)s)")
    b.add_argument("--max-kl", type=float, default=None, help="budgets.max_kl_to_teacher: fail (exit 1) above this mean KL")
    b.add_argument("--min-top1", type=float, default=None, help="budgets.min_top1_agreement: fail (exit 1) below this share")

    e = sub.add_parser(
        "eval", help="token KL statistics of a model against its teacher on held-out text, and the quality budgets",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  edgekd eval export/pi5/model-q4_0.gguf            against the embedded teacher\n"
        "  edgekd eval export/pi5                            every exported file of a run, against its teacher and its QAT master\n"
        "  edgekd eval model.gguf --against ./hf-teacher --data docs/ --max-kl 0.05 --junit quality.xml\n",
    )
    e.add_argument("model", help="a .gguf (llama.cpp), .onnx or onnxruntime-genai folder (onnxruntime), Hugging Face directory (torch), or an edgekd run directory")
    e.add_argument("--against", default=None, help="the reference, run in torch: a Hugging Face directory or .gguf "
                   "(default: a run's teacher, else the embedded SmolLM2-135M-Instruct)")
    e.add_argument("--data", default=None, help="held-out text as --data of compress (default: a run's split, else the default corpus's)")
    e.add_argument("--blocks", type=int, default=24, help="held-out blocks to score (default: %(default)s)")
    e.add_argument("--profile", default=None, help="a profile whose budgets.max_kl_to_teacher / min_top1_agreement apply")
    e.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="override a profile value")
    e.add_argument("--max-kl", type=float, default=None, help="fail (exit 1) above this mean KL to the teacher, nats/token")
    e.add_argument("--min-top1", type=float, default=None, help="fail (exit 1) below this share of positions with the teacher's top-1")
    e.add_argument("--tasks", default=None, help="lm-evaluation-harness tasks, comma-separated (e.g. hellaswag,arc_easy,piqa): "
                   "the model in its runtime and the teacher in torch, side by side")
    e.add_argument("--limit", type=int, default=None, help="items per task (default: all)")
    e.add_argument("--include-path", default=None, metavar="DIR", help="a folder of task YAMLs of your own (lm-eval's include_path)")
    e.add_argument("--min-acc", action="append", default=[], metavar="TASK=ACC", help="fail below this accuracy on a task (repeatable)")
    e.add_argument("--max-acc-drop", type=float, default=None, help="fail when a task's accuracy is this far below the teacher's")
    e.add_argument("--threads", type=int, default=None, help="runtime threads (default: this machine's cores)")
    e.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
    e.add_argument("--junit", default=None, metavar="FILE", help="write the quality budgets as JUnit test cases")
    e.add_argument("--quiet", action="store_true", help="no progress output")

    p = sub.add_parser("profiles", help="list, show or check device profiles")
    psub = p.add_subparsers(dest="profiles_command", metavar="ACTION")
    psub.add_parser("list", help="list built-in profiles")
    show = psub.add_parser("show", help="print a profile as YAML (after --set overrides)")
    show.add_argument("name")
    show.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    check = psub.add_parser("check", help="validate profile files; reports every problem")
    check.add_argument("files", nargs="+")

    r = sub.add_parser("report", help="re-render a stored run's report.md and print its summary")
    r.add_argument("run_dir")
    r.add_argument("--json", action="store_true", help="print report.json on stdout")
    return parser


# ---------------------------------------------------------------- commands


def cmd_profiles(args: argparse.Namespace) -> int:
    from .profiles import builtin_profile_names, load_profile, profile_to_yaml

    if args.profiles_command in (None, "list"):
        table = Table("name", "runtime", "export", "threads", "description")
        for name in builtin_profile_names():
            prof = load_profile(name)
            table.add_row(name, prof.deployment.runtime,
                          f"{'+'.join(prof.deployment.formats)} {prof.deployment.weight_format}",
                          str(prof.deployment.threads), prof.description)
        out.print(table)
        return EXIT_OK
    if args.profiles_command == "show":
        sys.stdout.write(profile_to_yaml(load_profile(args.name, args.overrides)))
        return EXIT_OK
    problems = []
    for f in args.files:
        try:
            load_profile(f if ("/" in f or f.endswith((".yaml", ".yml"))) else f"./{f}")
            out.print(f"{f}: ok")
        except EdgekdError as exc:
            problems.append(exc.render())
    if problems:
        raise EdgekdError("\n".join(problems))
    return EXIT_OK


def _print_report_summary(report) -> None:
    if report.evaluation:
        table = Table("model", "params", "perplexity", "KL/token", "top-1", title="held-out quality")
        for name, m in report.evaluation.items():
            fmt = lambda v, d=4: "n/a" if v is None else (f"{v:.{d}g}" if isinstance(v, float) else f"{v:,}")  # noqa: E731
            table.add_row(name, fmt(m.get("params")), fmt(m.get("perplexity")), fmt(m.get("kl_to_teacher")), fmt(m.get("top1_agreement")))
        out.print(table)
    checked = [b for b in report.budgets if b.passed is not None]
    if checked:
        verdict = "[green]all pass[/]" if report.passed else f"[red]{len(report.failures())} failed[/]"
        out.print(f"budgets: {len(checked)} checked on measured numbers, {verdict}")
    for line in report.failures():
        out.print(f"[red]budget failed[/]: {escape(line)}")
    for line in report.unchecked():
        out.print(f"[yellow]budget not measured[/]: {escape(line)}")
    out.print(f"report: {Path(report.run_dir) / 'report.md'}")


def cmd_compress(args: argparse.Namespace) -> int:
    from .pipeline.run import compress

    report = compress(
        teacher=args.teacher, profile=args.profile, data=args.data, output=args.output,
        run_name=args.run_name, overrides=args.overrides, overwrite=args.overwrite, resume=args.resume,
        trust_remote_code=args.trust_remote_code, text_field=args.text_field, quiet=args.quiet or args.json,
        time_budget=args.time_budget, prompts=args.prompts,
    )
    if args.json:
        print(json.dumps(report.to_dict(), indent=2, default=str))
    else:
        _print_report_summary(report)
    return EXIT_OK if report.passed else EXIT_BUDGETS


def cmd_report(args: argparse.Namespace) -> int:
    from .report import Report

    report = Report.load(args.run_dir)
    report.save(Path(args.run_dir))  # re-renders report.md from report.json
    if args.json:
        print(json.dumps(report.to_dict(), indent=2, default=str))
    else:
        _print_report_summary(report)
    return EXIT_OK if report.passed else EXIT_BUDGETS


def cmd_bench(args: argparse.Namespace) -> int:
    from .device.bench import bench
    from .device.results import print_bench, write_junit

    overrides = list(args.overrides or [])
    overrides += [f"budgets.max_kl_to_teacher={args.max_kl}"] if args.max_kl is not None else []
    overrides += [f"budgets.min_top1_agreement={args.min_top1}"] if args.min_top1 is not None else []
    result = bench(args.model, profile=args.profile, overrides=overrides, threads=args.threads,
                   repeats=args.repeats, prompt_tokens=args.prompt_tokens, gen_tokens=args.gen_tokens,
                   energy_log=args.energy_log, projection=args.projection, budgets_on=args.budgets_on,
                   against=args.against, data=args.data, quality_blocks=args.blocks)
    if args.junit:
        write_junit(result, args.junit)
    if args.json:
        print(json.dumps(result.to_dict(), indent=2, default=str))
    else:
        print_bench(result, out)
    return EXIT_OK if result.passed else EXIT_BUDGETS


def _task_floors(items: list[str]) -> dict[str, float]:
    floors = {}
    for item in items:
        task, _, value = item.partition("=")
        try:
            floors[task] = float(value)
        except ValueError:
            raise EdgekdError(f"--min-acc {item!r} is not TASK=ACCURACY", fix="write e.g. --min-acc arc_easy=0.4") from None
    return floors


def cmd_eval(args: argparse.Namespace) -> int:
    from .device.results import write_checks_junit
    from .profiles import load_profile
    from .progress import Reporter
    from .quality.check import evaluate
    from .quality.report import print_eval

    profile = load_profile(args.profile or "raspberry-pi-5", args.overrides) if args.profile or args.overrides else None
    floors = _task_floors(args.min_acc)
    result = evaluate(args.model, args.against, args.data, blocks=args.blocks, profile=profile, max_kl=args.max_kl,
                      min_top1=args.min_top1, threads=args.threads, reporter=Reporter(quiet=args.quiet or args.json),
                      tasks=args.tasks.split(",") if args.tasks else None, limit=args.limit, include_path=args.include_path,
                      min_accuracy=floors, max_accuracy_drop=args.max_acc_drop)
    if args.junit:
        write_checks_junit(args.junit, "edgekd eval " + Path(args.model).name, "edgekd.eval", result.checks)
    if args.json:
        print(json.dumps(result.to_dict(), indent=2, default=str))
    else:
        print_eval(result, out)
    return EXIT_OK if result.passed else EXIT_BUDGETS


COMMANDS = {"compress": cmd_compress, "bench": cmd_bench, "eval": cmd_eval, "profiles": cmd_profiles, "report": cmd_report}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return EXIT_BAD_INPUT
    try:
        return COMMANDS[args.command](args)
    except EdgekdError as exc:
        err.print(f"[bold red]error:[/] {escape(exc.render())}", highlight=False, soft_wrap=True)
        return exc.exit_code
    except KeyboardInterrupt:
        err.print("interrupted; completed stages are kept, continue with --resume")
        return 130


if __name__ == "__main__":
    sys.exit(main())
