"""Aggregates experiments/real-student/run.sh outputs into $OUT/results.md (and stdout).

usage: report.py OUT SECONDS "SEEDS" "MODES" "DEV=N ..." (N: the question count evaluated, 0 = all)
"""
import json
import math
import os
import statistics
import sys

out, secs, seeds, modes = sys.argv[1], int(sys.argv[2]), sys.argv[3].split(), sys.argv[4].split()
LIMIT = dict(kv.split("=") for kv in sys.argv[5].split())
DEV = ["hotpotqa_dev500", "musique_dev200", "2wikimultihopqa_dev164"]
SHORT = {"hotpotqa_dev500": "HotpotQA", "musique_dev200": "MuSiQue", "2wikimultihopqa_dev164": "2Wiki"}


def jsonl(path):
    with open(path) as f:
        return [json.loads(l) for l in f if l.strip()]


def load(path):
    return json.load(open(path)) if os.path.exists(path) else None


def eval_records(config, dev):
    p = os.path.join(out, "eval", config, f"{dev}.n{LIMIT[dev]}.jsonl")
    return jsonl(p) if os.path.exists(p) else None


def scores(recs):
    n = len(recs)
    return {k: sum(r[k] for r in recs) / n for k in ("em", "f1", "acc")} | {
        "steps": sum(r["steps"] for r in recs) / n,
        "forced": sum(1 for r in recs if r["forced"]) / n,
        "n": n,
    }


def fmt(xs, pct=True):
    xs = [x * (100 if pct else 1) for x in xs if x is not None and not math.isnan(x)]
    if not xs:
        return "–"
    if len(xs) == 1:
        return f"{xs[0]:.1f}"
    return f"{statistics.mean(xs):.1f} ± {statistics.stdev(xs):.1f}"


def by_step(recs, key, max_step=5):
    """Mean of a per-step trace value at each step (non-forced steps only)."""
    acc = [[] for _ in range(max_step)]
    for r in recs:
        for t in r.get("trace", []):
            v = t.get(key)
            if v is not None and not t.get("forced") and 1 <= t["step"] <= max_step:
                acc[t["step"] - 1].append(v)
    return [statistics.mean(a) if a else None for a in acc]


configs = [("base", ["base"]), ("base + 2 IRCoT demos", ["base-fewshot"])] + [
    (m, [f"{m}-seed{s}" for s in seeds]) for m in modes
]
L = [f"# Real STEPER student: SmolLM2-135M-Instruct (seeds {' '.join(seeds)})", ""]

# records
L += ["## Gold-teacher records", "", "| train file | questions | passed | init / expand / aggregate | vanilla | mean steps | annotated / decomposition / fallback steps | bad indices skipped |", "|---|---|---|---|---|---|---|---|"]
for d in sorted(os.listdir(os.path.join(out, "distill"))) if os.path.isdir(os.path.join(out, "distill")) else []:
    s = load(os.path.join(out, "distill", d, "summary.json"))
    g = load(os.path.join(out, "distill", d, "gold_stats.json")) or {}
    if s:
        r = s["records"]
        L.append(f"| {d} | {s['questions']} | {s['passed']} ({100 * s['pass_rate']:.1f}%) | {r[0]} / {r[1]} / {r[2]} | {s['vanilla_records']} | {s['mean_steps']:.2f} | {g.get('annotated_steps', '–')} / {g.get('decomposition_steps', '–')} / {g.get('fallback_steps', '–')} | {g.get('out_of_range_indices', '–')} |")
L.append("")

# quality
L += ["## EM / F1 / Acc (%) per dataset (mean ± sd over seeds)", ""]
hdr = "| configuration | " + " | ".join(f"{SHORT[d]} EM | F1 | Acc | steps" for d in DEV) + " |"
L += [hdr, "|---|" + "---|---|---|---|" * len(DEV)]
for name, runs in configs:
    cells = []
    for d in DEV:
        ss = [scores(r) for r in (eval_records(c, d) for c in runs) if r]
        if not ss:
            cells.append("– | – | – | –")
            continue
        cells.append(" | ".join([fmt([s["em"] for s in ss]), fmt([s["f1"] for s in ss]), fmt([s["acc"] for s in ss]), fmt([s["steps"] for s in ss], pct=False)]))
    L.append(f"| {name} | " + " | ".join(cells) + " |")
L.append("")
L.append("Questions per dataset: " + ", ".join(f"{SHORT[d]} {len(eval_records('base', d) or [])}" for d in DEV) + " (the first N of each dev file).")
L.append("")

# confidence by step
L += ["## Per-step confidence (all datasets pooled, non-forced steps): mean token probability p̄ / mean entropy (nats)", "", "| configuration | step 1 | step 2 | step 3 | step 4 | step 5 |", "|---|---|---|---|---|---|"]
for name, runs in configs:
    recs = [r for c in runs for d in DEV for r in (eval_records(c, d) or [])]
    if not recs:
        continue
    p, h = by_step(recs, "mean_prob"), by_step(recs, "mean_entropy")
    L.append(f"| {name} | " + " | ".join("–" if a is None else f"{a:.3f} / {b:.2f}" for a, b in zip(p, h)) + " |")
L.append("")

# training: held-out losses, σ
L += ["## Training (per run)", "", "| run | steps | tok/s | final σ init / exp / agg | held-out loss init / exp / agg | fit s |", "|---|---|---|---|---|---|"]
tim = {}
if os.path.exists(os.path.join(out, "timings.tsv")):
    for l in open(os.path.join(out, "timings.tsv")):
        k, v = l.rstrip("\n").split("\t")
        tim[k] = int(v)
for m in modes:
    for s in seeds:
        run = f"{m}-seed{s}"
        log = os.path.join(out, "runs", run, "ckpt", "train_log.jsonl")
        if not os.path.exists(log):
            continue
        rows = jsonl(log)
        train = [r for r in rows if "total" in r]
        evals = [r["eval"] for r in rows if r.get("eval")]
        last = train[-1] if train else {}
        tps = statistics.mean(r.get("tokens_per_sec", 0) for r in train) if train else float("nan")
        sig = " / ".join(f"{last.get(k, float('nan')):.3f}" for k in ("sigma_init", "sigma_exp", "sigma_agg"))
        ev = evals[-1] if evals else {}
        held = " / ".join(str(round(v, 3)) if isinstance(v, (int, float)) else "–" for v in [ev.get(k) for k in ("L_init", "L_exp", "L_agg")])
        L.append(f"| {run} | {len(train)} | {tps:.0f} | {sig} | {held} | {tim.get('fit ' + run, '–')} |")
        traj = [r for i, r in enumerate(train) if i % max(1, len(train) // 6) == 0 or i == len(train) - 1]
        L.append(f"|  σ trajectory | " + ", ".join(f"{r['step']}: {r.get('sigma_init', 0):.2f}/{r.get('sigma_exp', 0):.2f}/{r.get('sigma_agg', 0):.2f}" for r in traj) + " | | | | |")
L.append("")
L += ["Charts: `runs/<run>/plots/losses.png`, `sigma.png`.", "", "## Time", ""]
for k, v in tim.items():
    L.append(f"- {k}: {v} s")
L.append(f"- whole run (this invocation): {secs} s")
text = "\n".join(L) + "\n"
tmp = os.path.join(out, "results.md.tmp")
open(tmp, "w").write(text)
os.replace(tmp, os.path.join(out, "results.md"))
print(text)
