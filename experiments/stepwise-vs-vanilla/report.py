"""Aggregates experiments/stepwise-vs-vanilla/run.sh outputs into results.md (stdout too)."""
import json
import os
import statistics
import sys

out, secs, steps, seeds = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4].split()
os.makedirs(out, exist_ok=True)
MODES = ["steper", "uniform", "vanilla"]


def jsonl(path):
    with open(path) as f:
        return [json.loads(l) for l in f if l.strip()]


_logs = {}


def train_log(pdir, seed, mode):
    """The rows of one run's train_log.jsonl ([] when the run has none), read once."""
    path = os.path.join(pdir, f"seed{seed}", mode, "ckpt", "train_log.jsonl")
    if path not in _logs:
        _logs[path] = jsonl(path) if os.path.exists(path) else []
    return _logs[path]


def qa_types(path):
    return {q["id"]: q.get("type", "") for q in jsonl(path)} if os.path.exists(path) else {}


def metrics(records):
    n = len(records)
    if n == 0:
        return None
    conf = [t["mean_prob"] for r in records for t in r.get("trace", []) if t.get("mean_prob") is not None]
    return {
        "n": n,
        "em": sum(r["em"] for r in records) / n,
        "f1": sum(r["f1"] for r in records) / n,
        "acc": sum(r["acc"] for r in records) / n,
        "steps": sum(r["steps"] for r in records) / n,
        "conf": statistics.mean(conf) if conf else float("nan"),
    }


def mean_sd(xs):
    if not xs:
        return "–"
    if len(xs) == 1:
        return f"{xs[0]:.3f}"
    return f"{statistics.mean(xs):.3f} ± {statistics.stdev(xs):.3f}"


lines = [f"# STEPER vs uniform vs Vanilla-KD (seeds {' '.join(seeds)}; STEPS={steps})", ""]
for part, evalsets in [("synth", ["test"]), ("shared", ["hotpotqa_dev500", "musique_dev200"])]:
    pdir = os.path.join(out, part)
    if not os.path.isdir(pdir):
        continue
    types = qa_types(os.path.join(pdir, "world", "test.jsonl"))
    # optimizer steps of this part (the parts may differ: STEPS vs SHARED_STEPS), from a log
    logged = [train_log(pdir, seed, mode) for seed in seeds for mode in MODES]
    part_steps = next((str(rows[-1]["step"]) for rows in logged if rows), "?")
    for ev in evalsets:
        groups = [("all", None)]
        if types:
            groups += [(t, t) for t in sorted(set(types.values()))]
        lines += [f"## {part}: {ev} ({part_steps} steps)", "",
                  "| mode | subset | questions | EM | F1 | Acc | mean steps | per-step confidence |",
                  "|---|---|---|---|---|---|---|---|"]
        for mode in MODES:
            for gname, gtype in groups:
                per_seed = []
                for seed in seeds:
                    f = os.path.join(pdir, f"seed{seed}", mode, f"eval-{ev}.jsonl")
                    if not os.path.exists(f):
                        continue
                    recs = [r for r in jsonl(f) if gtype is None or types.get(r["id"]) == gtype]
                    m = metrics(recs)
                    if m:
                        per_seed.append(m)
                if not per_seed:
                    continue
                col = lambda k: mean_sd([m[k] for m in per_seed])
                lines.append(f"| {mode} | {gname} | {per_seed[0]['n']} | {col('em')} | {col('f1')} | {col('acc')} | "
                             f"{col('steps')} | {col('conf')} |")
        lines.append("")
    # held-out loss per target token at the last evaluation (teacher-forced; the same held-out
    # questions in every mode of a seed). Vanilla-KD has one record kind, Q + P -> whole chain +
    # answer, logged under aggregate, so its column is not the same target as the others'.
    lines += [f"## {part}: held-out loss at the end of training (mean over seeds)", "",
              "| mode | L_init | L_exp | L_agg (vanilla: whole chain + answer) |", "|---|---|---|---|"]
    for mode in MODES:
        finals = []
        for seed in seeds:
            evals = [r["eval"] for r in train_log(pdir, seed, mode) if r.get("eval")]
            if evals:
                finals.append(evals[-1])
        if not finals:
            continue
        cells = [mean_sd([e[k] for e in finals if e.get(k) is not None]) for k in ("L_init", "L_exp", "L_agg")]
        lines.append(f"| {mode} | " + " | ".join(cells) + " |")
    lines.append("")
    # σ trajectories and training time of the steper runs
    lines += [f"## {part}: σ (init / expand / aggregate) over training, steper mode", "",
              "| seed | step | σ_init | σ_exp | σ_agg | L_init (mean of last 10 steps) | L_exp | L_agg |", "|---|---|---|---|---|---|---|---|"]
    for seed in seeds:
        rows = train_log(pdir, seed, "steper")
        if not rows:
            continue
        picks = sorted({0, len(rows) // 4, len(rows) // 2, 3 * len(rows) // 4, len(rows) - 1})

        def window_mean(i, key, w=10):
            # batches are stage-homogeneous (length buckets), so a stage's loss is the mean over
            # the last w logged steps that had it
            vals = [r[key] for r in rows[max(0, i - w + 1): i + 1] if r.get(key) is not None]
            return "–" if not vals else f"{statistics.mean(vals):.3f}"

        for i in picks:
            r = rows[i]
            lines.append(f"| {seed} | {r['step']} | {r['sigma_init']:.3f} | {r['sigma_exp']:.3f} | {r['sigma_agg']:.3f} | "
                         f"{window_mean(i, 'L_init')} | {window_mean(i, 'L_exp')} | {window_mean(i, 'L_agg')} |")
    lines.append("")
    times = []
    for seed in seeds:
        for mode in MODES:
            t = os.path.join(pdir, f"seed{seed}", mode, "train_seconds")
            if os.path.exists(t):
                times.append(f"{mode}/seed{seed} {open(t).read().strip()} s")
    if times:
        lines += [f"Training + export time ({part}): " + ", ".join(times), ""]
lines.append(f"Experiment wall time (this invocation): {secs} s")
text = "\n".join(lines) + "\n"
tmp = os.path.join(out, "results.md.tmp")
open(tmp, "w").write(text)
os.replace(tmp, os.path.join(out, "results.md"))
print(text)
