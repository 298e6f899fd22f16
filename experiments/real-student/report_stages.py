"""The report of stages.py: docs/results/DATE-stepwise-vs-vanilla.md from the committed summaries.

Every figure comes from the summaries folder: the per-question compact records of each evaluation
chunk (joined per dataset, then paired by `steper-run compare`), the fits' held-out losses and σ,
and each stage's compute. Cells whose stages are not done are listed as missing, never filled in.
"""

import gzip
import json
import subprocess
import tempfile
from pathlib import Path

PAPER = ("The paper reports, for an 8B student, HotpotQA Acc 54.8 → 61.0 with STEPER over "
         "Vanilla-KD and +9.5 % on average over its datasets.")
LABEL = {"base": "base (zero-shot)", "fewshot": "base + 2 IRCoT demonstrations"}


def label(config):
    if config in LABEL:
        return LABEL[config]
    cap, mode, seed = config.split("-")
    mode = {"steper": "STEPER", "vanilla": "Vanilla-KD", "uniform": "uniform"}[mode]
    cap = {"top2": "top 2 layers", "lora": "LoRA r16, every layer"}[cap]
    return f"{mode}, {cap}, seed {seed[1:]}"


def configs(r):
    return ["base", "fewshot", *r.runs()]


def complete(r, config):
    """Datasets whose every chunk of `config` is evaluated."""
    return [d for d in r.p["dev"]
            if all(r.done(f"eval-{config}-{d}-c{k}") for k, _, _ in r.chunks(d))]


def records(r, config, dataset):
    rows = []
    for k, _, _ in r.chunks(dataset):
        path = r.sums / "eval" / config / f"{dataset}.c{k}.jsonl.gz"
        rows += [json.loads(x) for x in gzip.decompress(path.read_bytes()).decode().splitlines()
                 if x.strip()]
    return rows


def pct(x):
    return f"{100 * x:.1f}"


def metrics_table(r, done):
    lines = ["| configuration | " + " | ".join(d for d in r.p["dev"]) + " | pooled | forced "
             "(pooled) | steps (pooled) |",
             "|---|" + "---|" * (len(r.p["dev"]) + 3)]
    for config in configs(r):
        if not done[config]:
            continue
        cells, pooled = [], []
        for d in r.p["dev"]:
            if d in done[config]:
                rows = records(r, config, d)
                pooled += rows
                cells.append(" / ".join(pct(sum(x[m] for x in rows) / len(rows))
                                        for m in ("em", "f1", "acc")))
            else:
                cells.append("missing")
        n = len(pooled)
        whole = len(done[config]) == len(r.p["dev"])
        pool = " / ".join(pct(sum(x[m] for x in pooled) / n) for m in ("em", "f1", "acc")) \
            if whole else "—"
        forced = pct(sum(x["forced"] for x in pooled) / n) + " %" if whole else "—"
        steps = f"{sum(x['steps'] for x in pooled) / n:.2f}" if whole else "—"
        lines.append(f"| {label(config)} | " + " | ".join(cells) +
                     f" | {pool} | {forced} | {steps} |")
    if len(lines) == 2:
        return "No configuration has a whole dataset evaluated yet (see the progress below)."
    return "\n".join(lines)


def progress_table(r):
    """Evaluation chunks done per configuration and dataset."""
    lines = ["| configuration | " + " | ".join(r.p["dev"]) + " |",
             "|---|" + "---|" * len(r.p["dev"])]
    for config in configs(r):
        cells = []
        for d in r.p["dev"]:
            chunks = r.chunks(d)
            done = sum(r.done(f"eval-{config}-{d}-c{k}") for k, _, _ in chunks)
            cells.append(f"{done} / {len(chunks)}")
        fit = "" if config in ("base", "fewshot") else \
            (" (fit done)" if r.done(f"fit-{config}") else " (not fitted)")
        lines.append(f"| {label(config)}{fit} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def confidence_table(r, done):
    lines = ["| configuration | step 1 | step 2 | step 3 | step 4 |", "|---|---|---|---|---|"]
    for config in configs(r):
        if len(done[config]) != len(r.p["dev"]):
            continue
        by_step = {}
        for d in r.p["dev"]:
            for x in records(r, config, d):
                for i, (p, h, f) in enumerate(zip(x["step_p"], x["step_h"], x["step_forced"])):
                    if not f:
                        by_step.setdefault(i, []).append((p, h))
        cells = []
        for i in range(4):
            v = by_step.get(i, [])
            cells.append(f"{sum(p for p, _ in v) / len(v):.2f} / "
                         f"{sum(h for _, h in v) / len(v):.2f}" if v else "–")
        lines.append(f"| {label(config)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def compare(r, runs, datasets, resamples):
    """`steper-run compare` of runs (the baseline first) on the datasets: (markdown, json)."""
    with tempfile.TemporaryDirectory() as tmp:
        args = []
        for config in runs:
            files = []
            for d in datasets:
                path = Path(tmp) / config / f"{d}.jsonl"
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text("".join(json.dumps(x) + "\n" for x in records(r, config, d)))
                files.append(str(path))
            args.append(f"{config}={','.join(files)}")
        base = [r.tool("steper-run"), "compare", *args, "--resamples", str(resamples)]
        md = subprocess.run(base, check=True, capture_output=True, text=True).stdout
        js = json.loads(subprocess.run([*base, "--json"], check=True, capture_output=True,
                                       text=True).stdout)
    return md, js


def verdict(js, what):
    """A plain sentence per run: the pooled EM difference and whether its interval excludes 0."""
    out = []
    for c in js["comparisons"]:
        cell = c["pooled"] or c["datasets"][0]
        em = next(m for m in cell["metrics"] if m["metric"] == "em")
        f1 = next(m for m in cell["metrics"] if m["metric"] == "f1")
        if em["low"] > 0:
            said = "ahead (the interval excludes 0)"
        elif em["high"] < 0:
            said = "behind (the interval excludes 0)"
        else:
            said = "not resolved (the interval includes 0)"
        st = cell["em_sign_test"]
        out.append(f"- {what(c['run'], js['baseline'])}, {cell['dataset']} "
                   f"({cell['questions']} questions): EM {100 * em['difference']:+.1f} "
                   f"[{100 * em['low']:+.1f}, {100 * em['high']:+.1f}], F1 "
                   f"{100 * f1['difference']:+.1f} [{100 * f1['low']:+.1f}, "
                   f"{100 * f1['high']:+.1f}]; exact only in the run {st['run_only']}, only in "
                   f"the baseline {st['baseline_only']} (sign test p = {st['p']:.3f}): {said}.")
    return out


def diff_rows(js):
    """Table rows: each run − the baseline per dataset and pooled, EM / F1 / Acc with intervals."""
    rows = []
    for c in js["comparisons"]:
        for cell in [*c["datasets"], *([c["pooled"]] if c["pooled"] else [])]:
            m = {x["metric"]: x for x in cell["metrics"]}
            diffs = [f"{100 * m[k]['difference']:+.1f} [{100 * m[k]['low']:+.1f}, "
                     f"{100 * m[k]['high']:+.1f}]" for k in ("em", "f1", "acc")]
            rows.append(f"| {label(c['run'])} − {label(js['baseline'])} | {cell['dataset']} | "
                        f"{cell['questions']} | " + " | ".join(diffs) +
                        f" | {cell['em_sign_test']['p']:.3f} |")
    return rows


def write_report(r, args):
    done = {c: complete(r, c) for c in configs(r)}
    parts, verdicts, table = [], [], []
    pairs = []
    for cap in r.p["capacities"]:
        for seed in r.p["seeds"]:
            s, v, u = (f"{cap}-{m}-s{seed}" for m in ("steper", "vanilla", "uniform"))
            pairs += [(v, [s]), (u, [s])]
    pairs.append(("base", [c for c in configs(r) if c != "base"]))
    for baseline, runs in pairs:
        runs = [x for x in runs if done[x]]
        common = [d for d in r.p["dev"] if d in done[baseline]
                  and all(d in done[x] for x in runs)]
        if not runs or not common:
            continue
        md, js = compare(r, [baseline, *runs], common, args.resamples)
        parts.append(f"<details><summary>steper-run compare against {label(baseline)}"
                     f"</summary>\n\n{md.strip()}\n\n</details>\n")
        verdicts += verdict(js, lambda run, base: f"{label(run)} − {label(base)}")
        table += diff_rows(js)

    stages = [(n, r.summary(n)) for n in r.plan() if r.done(n)]
    missing = [n for n in r.plan() if not r.done(n)]
    hours = sum(s.get("seconds", 0) for _, s in stages) / 3600
    fits = [(n, s) for n, s in stages if n.startswith("fit-")]
    rec = r.summary("records") if r.done("records") else None

    doc = [f"# STEPER against Vanilla-KD, paired (protocol started {r.started})", "",
           "- **Question:** with the same student, the same gold-teacher questions and the same "
           "optimizer budget, is σ-weighted step-wise distillation (STEPER) better than "
           "Vanilla-KD and than a uniform average of the stage losses, by an amount paired "
           "intervals over all 864 dev questions can resolve?",
           "- **Command:** `python3 experiments/real-student/stages.py run --commit` (repeated "
           "per session until every stage is done), then `python3 "
           "experiments/real-student/stages.py report`; the protocol is "
           "[protocol.json](stepwise-vs-vanilla/protocol.json), every stage's summary is in "
           "[stepwise-vs-vanilla/stages](stepwise-vs-vanilla/stages).",
           "- **Machine:** 2 CPU cores (each stage's load average is in its summary).",
           f"- **Compute so far:** {hours:.2f} h in {len(stages)} stages; "
           f"{len(missing)} stages not done.", ""]
    if rec:
        pools = ", ".join(f"{k}: {v['passed']} of {v['questions']}"
                          for k, v in rec["pools"].items())
        doc += ["## Training data", "",
                f"Gold-teacher records of {rec['questions']} training questions ({pools}): "
                f"{rec['stepwise_records']} step-wise records, {rec['vanilla_records']} "
                "whole-chain (Vanilla-KD) records, the same questions for every mode.", ""]
    doc += ["## EM / F1 / Acc in %", "", metrics_table(r, done), "",
            "## Paired comparisons (steper-run compare, 95 % paired bootstrap, "
            f"{args.resamples} resamples)", ""]
    doc += verdicts or ["No comparison has both of its sides evaluated yet."]
    if table:
        doc += ["", "| comparison | dataset | questions | EM | F1 | Acc | EM sign test p |",
                "|---|---|---:|---|---|---|---:|", *table]
    if parts:
        doc += ["", "The full tables (forced share, steps, Acc sign tests):", ""] + parts
    if any(len(done[c]) == len(r.p["dev"]) for c in configs(r)):
        doc += ["## Per-step confidence (p̄ / entropy in nats, non-forced steps, pooled)", "",
                confidence_table(r, done), ""]
    doc += ["## Progress: evaluation chunks done", "", progress_table(r), ""]
    if fits:
        doc += ["## Fits", "", "| run | steps | seconds | held-out loss init / exp / agg "
                "(last) | final σ init / exp / agg |", "|---|---|---|---|---|"]
        for n, s in fits:
            h = s["heldout"][-1] if s["heldout"] else {}
            loss = " / ".join(f"{h[k]:.3f}" if h.get(k) is not None else "–"
                              for k in ("L_init", "L_exp", "L_agg"))
            sig = s["sigma"][-1] if s["sigma"] else None
            sig = f"{sig['init']:.2f} / {sig['exp']:.2f} / {sig['agg']:.2f}" if sig else "–"
            doc.append(f"| {label(n[4:])} | {s['steps']} | {s['seconds']:.0f} | {loss} | {sig} |")
        doc += ["", "σ trajectories (every 50 steps) are in each STEPER fit's summary.", ""]
    doc += ["## Compute per stage", "", "| stage | seconds | load (1 min) |", "|---|---|---|"]
    for n, s in stages:
        load = s.get("load_end", s["segments"][-1]["load_end"] if s.get("segments") else "")
        doc.append(f"| {n} | {s.get('seconds', 0):.0f} | {load} |")
    doc += ["", "## Missing", ""]
    if missing:
        kinds = {}
        for n in missing:
            kinds.setdefault(n.split("-")[0], []).append(n)
        chunk_s = [s.get("seconds", 0) for n, s in stages if n.startswith("eval-")]
        est = ""
        if chunk_s:
            per = sum(chunk_s) / len(chunk_s)
            est = (f" The evaluation chunks done so far took {per / 60:.0f} minutes each on "
                   f"average; the {len(kinds.get('eval', []))} left would take ≈ "
                   f"{per * len(kinds.get('eval', [])) / 3600:.0f} hours at that rate, the fits "
                   "and exports beside them.")
        doc += [f"{len(missing)} stages are not done: "
                + ", ".join(f"{len(v)} {k}" for k, v in kinds.items())
                + " (the progress table above says which evaluation chunks)." + est]
    else:
        doc += ["Nothing: every cell of the protocol is measured."]
    doc += ["", "## Beside the paper", "", PAPER, ""]
    path = r.sums.parent / f"{r.started}-stepwise-vs-vanilla.md"
    if r.smoke:
        path = r.sums / "report.md"
    path.write_text("\n".join(doc))
    print(path)
