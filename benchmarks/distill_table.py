"""Pruning and healing the default teacher: the table of issue "pruning and distillation".

Rows, all on the held-out split of the default corpus, the same token budget for every
healing run (``--steps`` x batch 4 x 256 tokens), the same seed and data order:
  1. teacher (30 layers)
  2. depth-pruned to 24 layers by Block Influence, no healing
  3. pruned, healed with cross-entropy only
  4. pruned, healed with logit KD (forward KL, T=2, alpha=0.7)
  5. pruned, healed with logit + hidden-state + attention KD
Also: Block Influence and angular distance against the measured loss increase of dropping
each block (Spearman rank correlation, and which blocks each would remove).

    .venv/bin/python benchmarks/distill_table.py              # about 1 hour on 2 cores
    .venv/bin/python benchmarks/distill_table.py --steps 2    # smoke test
    .venv/bin/python benchmarks/distill_table.py --evaluate-student export/default-pi5/student

``--evaluate-student DIR`` scores one already distilled student (a Hugging Face directory,
such as the ``student/`` of an ``edgekd compress`` run) with the same held-out and
out-of-domain sets, and prints its row; no pruning analysis, no training.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import asdict

import numpy as np
import torch
from common import default_setup, license_blocks, write_result


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--keep", type=int, default=24)
    ap.add_argument("--name", default="distill_table", help="results/NAME.json")
    ap.add_argument("--skip-loss-increase", action="store_true", help="skip the slow per-block loss-increase analysis")
    ap.add_argument("--evaluate-student", metavar="DIR", help="only score this distilled student (Hugging Face directory)")
    args = ap.parse_args()

    from edgekd.methods.distill import DistillConfig, distill
    from edgekd.methods.evaluate import evaluate, torch_logits_fn
    from edgekd.methods.models import model_summary
    from edgekd.methods.prune import (
        calibration_loss,
        loss_increase_scores,
        make_student,
        score_blocks,
        select_layers,
        spearman,
    )

    torch.manual_seed(0)
    setup = default_setup()
    ds = setup.profile.compression.distill
    block_len = setup.profile.compression.data.block_len
    teacher, t_model = setup.teacher, setup.teacher.model
    held, train, calib = setup.heldout, setup.train, setup.calibration
    t_fn = torch_logits_fn(t_model)
    log = lambda *a: print(*a, file=sys.stderr, flush=True)  # noqa: E731
    ood = out_of_domain_sets(teacher, block_len)
    rows = []

    def add_row(name: str, model, tokens: int, wall: float) -> None:
        m = evaluate(torch_logits_fn(model), held, t_fn)
        info = model_summary(model)
        extra = {f"perplexity_{k}": evaluate(torch_logits_fn(model), v).perplexity for k, v in ood.items()}
        rows.append({"row": name, "params": info["params"], "layers": info["layers"], "perplexity": m.perplexity,
                     "kl_to_teacher": m.kl_to_teacher, "top1_agreement": m.top1_agreement,
                     "training_tokens": tokens, "wall_time_s": wall, **extra})
        log(rows[-1])

    if args.evaluate_student:
        from transformers import AutoModelForCausalLM

        student = AutoModelForCausalLM.from_pretrained(args.evaluate_student).eval()
        add_row(f"student from {args.evaluate_student}", student, 0, 0.0)
        write_result(f"{args.name}_student", {"rows": rows, "student": args.evaluate_student})
        print_rows(rows)
        return 0

    # ---- pruning scores
    t0 = time.perf_counter()
    scores = score_blocks(t_model, calib)
    score_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    if args.skip_loss_increase:
        scores.loss_increase = scores.block_influence
        heldout_li = scores.block_influence
    else:
        scores.loss_increase = loss_increase_scores(t_model, calib[:8])
        heldout_li = loss_increase_scores(t_model, held[:12])  # analysis only: never used to choose blocks
    li_calib_s = time.perf_counter() - t0
    log("scores done", score_s, li_calib_s)
    drop = t_model.config.num_hidden_layers - args.keep
    removed = {m: sorted(set(range(30)) - set(select_layers(scores, args.keep, m))) for m in ("block_influence", "angular", "loss_increase")}
    ranking = {
        "spearman_bi_vs_heldout_loss_increase": spearman(scores.block_influence, heldout_li),
        "spearman_angular_vs_heldout_loss_increase": spearman(scores.angular_distance, heldout_li),
        "spearman_calib_vs_heldout_loss_increase": spearman(scores.loss_increase, heldout_li),
        "removed_blocks": removed,
        "removed_by_heldout_loss_increase": sorted(np.argsort(heldout_li, kind="stable")[:drop].tolist()),
    }

    # ---- rows
    add_row("teacher (30 layers)", t_model, 0, 0.0)
    keep = select_layers(scores, args.keep, "block_influence")
    add_row(f"pruned to {args.keep}, no healing", make_student(t_model, keep), 0, 0.0)
    variants = [
        ("pruned + CE only", dict(alpha=0.0, w_logit=1.0)),
        ("pruned + logit KD", dict(alpha=ds.alpha, temperature=ds.temperature)),
        ("pruned + logit + hidden + attention KD", dict(alpha=ds.alpha, temperature=ds.temperature, w_hidden=1.0, w_attention=1.0)),
    ]
    for name, kw in variants:
        student = make_student(t_model, keep)
        cfg = DistillConfig(steps=args.steps, batch_size=ds.batch_size, learning_rate=ds.learning_rate, seed=ds.seed, **kw)
        out = distill(student, t_model, train, cfg, keep)
        add_row(name, student, out.tokens, out.wall_time_s)
        rows[-1]["final_train_losses"] = out.summary()
        rows[-1]["config"] = asdict(cfg)

    result = {"rows": rows, "pruning_scores": {**scores.to_dict(), "heldout_loss_increase": heldout_li},
              "ranking": ranking, "score_seconds": score_s, "loss_increase_seconds_8_blocks": li_calib_s,
              "steps": args.steps, "keep": args.keep, "heldout_blocks": int(len(held)), "block_len": block_len,
              "baseline_calibration_loss": calibration_loss(t_model, calib[:8])}
    write_result(args.name, result)

    print_rows(rows)
    print(f"Spearman vs held-out loss increase: BI {ranking['spearman_bi_vs_heldout_loss_increase']:.3f}, "
          f"angular {ranking['spearman_angular_vs_heldout_loss_increase']:.3f}, "
          f"calibration loss increase {ranking['spearman_calib_vs_heldout_loss_increase']:.3f}")
    for m, r in removed.items():
        print(f"removed by {m}: {r}")
    print(f"removed by held-out loss increase: {ranking['removed_by_heldout_loss_increase']}")
    return 0


def print_rows(rows: list[dict]) -> None:
    print("| row | params | layers | held-out perplexity | KL to teacher | top-1 agreement | perplexity, out-of-domain text | "
          "perplexity, teacher samples | training tokens | wall time (s) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['row']} | {r['params'] / 1e6:.1f} M | {r['layers']} | {r['perplexity']:.3f} | "
              f"{0 if r['row'].startswith('teacher') else r['kl_to_teacher']:.4f} | {r['top1_agreement']:.4f} | "
              f"{r['perplexity_license']:.3f} | {r['perplexity_teacher_samples']:.3f} | "
              f"{r['training_tokens']:,} | {r['wall_time_s']:.0f} |")
    print()


def out_of_domain_sets(teacher, block_len: int) -> dict[str, np.ndarray]:
    """Two evaluation sets outside the training domain (Python documentation):

    - ``license``: CPython's LICENSE.txt (legal English prose; ships with every Python);
    - ``teacher_samples``: text sampled from the teacher at temperature 1 (seeded). A student's
      perplexity here is its cross-entropy against the teacher's own distribution, so it
      rewards being close to the teacher rather than to the training corpus.
    """
    torch.manual_seed(0)
    prompts = ["The", "In", "A", "When", "Python", "It", "We", "This"]
    samples = []
    for p in prompts:
        ids = teacher.tokenizer(p, return_tensors="pt").input_ids
        with torch.no_grad():
            out = teacher.model.generate(ids, max_new_tokens=block_len - ids.shape[1], do_sample=True, temperature=1.0,
                                         top_k=0, top_p=1.0, min_new_tokens=block_len - ids.shape[1],
                                         pad_token_id=teacher.tokenizer.pad_token_id)
        samples.append(out[0, :block_len].numpy().astype(np.int32))
    return {"license": license_blocks(teacher.tokenizer, block_len), "teacher_samples": np.stack(samples)}


if __name__ == "__main__":
    sys.exit(main())
