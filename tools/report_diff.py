"""Compare two report.json files, timings aside: print every other path whose value differs.

    python tools/report_diff.py A/report.json B/report.json [--rename OLD=NEW ...]

Volatile values (wall times, timestamps, the run directory, benchmark timings, memory and
energy readings, the host's measured ceilings) are dropped before comparing; so are table
cells and budget readings that come from them. ``--rename a.b=c.d`` moves a key of A to a new
path before comparing (a profile key renamed between the two versions).
"""
from __future__ import annotations

import argparse
import json
import sys

VOLATILE_KEYS = {
    "wall_time_s", "seconds", "created_at", "finished_at", "run_dir", "load_s", "step_s", "train_wall_time_s",
    "tokens_per_s", "pp_tokens_per_s", "tg_tokens_per_s", "ttft_ms", "peak_rss_mb", "baseline_rss_mb",
    "cpu_s_per_token", "energy", "host_perf", "projection", "load", "warnings", "host", "model",
}
# budget readings from a timing or a memory sample (the file size is compared)
VOLATILE_BUDGETS = {"min_decode_tokens_per_s", "max_ttft_ms", "max_peak_memory_mb", "max_energy_mj_per_token"}
# report tables whose cells are measurements, by title prefix -> columns kept
MEASURED_TABLES = {"On-device benchmark": [0, 1, 2, 7], "PROJECTION": [0]}


def clean(x):
    if isinstance(x, dict):
        drop = VOLATILE_KEYS | ({"measured", "passed"} if x.get("budget") in VOLATILE_BUDGETS else set())
        return {k: clean(v) for k, v in x.items() if k not in drop}
    if isinstance(x, list):
        return [clean(v) for v in x]
    return x


def normalise(report: dict) -> dict:
    r = clean(report)
    for title, table in r.get("tables", {}).items():
        keep = next((cols for prefix, cols in MEASURED_TABLES.items() if title.startswith(prefix)), None)
        if keep is not None:
            table["rows"] = [[row[i] for i in keep] for row in table["rows"]]
    return r


def move(d: dict, old: str, new: str) -> None:
    *head, last = old.split(".")
    chain = [d]
    for part in head:
        chain.append(chain[-1].get(part, {}))
    if last not in chain[-1]:
        return
    value = chain[-1].pop(last)
    for parent, part, node in zip(chain[-2::-1], head[::-1], chain[:0:-1]):  # drop parents the move emptied
        if not node:
            parent.pop(part)
    *head, last = new.split(".")
    node = d
    for part in head:
        node = node.setdefault(part, {})
    node[last] = value


def diff(a, b, path=""):
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in list(a) + [k for k in b if k not in a]:
            out += diff(a.get(k, "<absent>"), b.get(k, "<absent>"), f"{path}.{k}" if path else k)
        return out
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in diff(x, y, f"{path}[{i}]")]
    return [] if a == b else [f"{path}: {json.dumps(a)[:120]} -> {json.dumps(b)[:120]}"]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("a")
    ap.add_argument("b")
    ap.add_argument("--rename", action="append", default=[], metavar="OLD=NEW")
    args = ap.parse_args()
    a, b = (normalise(json.load(open(p))) for p in (args.a, args.b))
    for item in args.rename:
        old, new = item.split("=")
        move(a, old, new)
    found = diff(a, b)
    print("\n".join(found) if found else "identical, timings aside")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
