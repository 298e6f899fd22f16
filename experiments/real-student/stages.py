#!/usr/bin/env python3
"""STEPER against Vanilla-KD, run in stages that each fit a session.

The protocol (PROTOCOL below) is fixed: SmolLM2-135M-Instruct, gold-teacher records of the same
training questions for every mode, STEPER / uniform / Vanilla-KD at two seeds and two capacities
(the top 2 layers; LoRA on every layer's attention and MLP projections), int8 exports, and the
evaluation of every model and of the base (zero-shot and with 2 IRCoT demonstrations) on all of
hotpotqa_dev500, musique_dev200 and 2wikimultihopqa_dev164, in chunks of CHUNK questions.

Every stage writes a small summary under the summaries folder (docs/results/stepwise-vs-vanilla):
`stages/NAME.json` (seconds, machine load, what it produced, hashes) and, for an evaluation
chunk, `eval/CONFIG/DATASET.cK.jsonl.gz` (one compact line per question: id, prediction, scores,
steps, forced, per-step confidence) that `steper-run compare` reads. A stage whose summary exists
is done. Large outputs (models, records, indexes) stay in the work folder (out/stepwise-vs-vanilla);
when one is missing in a later session, the stage that made it is run again and its hash is
checked against the committed one.

  stages.py list                     stages, done or not, with the compute each took
  stages.py run [--budget-minutes M] [--only REGEX] [--commit]
                                     runs the stages that are not done, in order, until the budget
                                     is spent; a fit that does not end in the budget is stopped and
                                     resumes from its last checkpoint on the next run
  stages.py report                   writes docs/results/DATE-stepwise-vs-vanilla.md from the
                                     committed summaries (the paired comparisons via steper-run
                                     compare) and says which cells are missing

--smoke runs a tiny version of the protocol into out/stepwise-vs-vanilla-smoke (its summaries
there too, never under docs/): a check of the runner in minutes whose numbers mean nothing.
"""

import argparse
import datetime
import gzip
import hashlib
import json
import os
import re
import shutil
import signal
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "data"

PROTOCOL = {
    "version": 1,
    "student": "SmolLM2-135M-Instruct (scripts/fetch-smollm2.sh, steper-train import)",
    # the first N questions of each train pool (gold teacher; those it passes give the records:
    # ≈ 80 % of HotpotQA's, 92 % of 2Wiki's, 42 % of MuSiQue's fit SmolLM2's context)
    "train": {"hotpotqa_trainpool1192": 360, "2wikimultihopqa_trainpool960": 340,
              "musique_train100": 100},
    "dev": {"hotpotqa_dev500": 500, "musique_dev200": 200, "2wikimultihopqa_dev164": 164},
    "min_questions": 600,
    "chunk": 100,
    "seeds": [0, 1],
    "modes": ["steper", "vanilla", "uniform"],
    "capacities": {
        "top2": ["--freeze-embeddings", "--top-layers", "2", "--prefix-cache-dtype", "f16",
                 "--warmup", "10", "--lr", "3e-4"],
        "lora": ["--freeze-embeddings", "--lora-rank", "16", "--lora-alpha", "32",
                 "--warmup", "10", "--lr", "1e-3"],
    },
    "fit": ["--epochs", "1", "--batch-size", "2", "--eval-fraction", "0.05",
            "--eval-every", "100", "--save-every", "100"],
    "steper_sigma_lr": "1e-2",
    "export": ["--quantize", "int8"],
    "eval": ["--workers", "2"],
    "demos": 2,
}

SMOKE = dict(PROTOCOL, train={"hotpotqa_trainpool1192": 4, "2wikimultihopqa_trainpool960": 4,
                              "musique_train100": 2},
             dev={"hotpotqa_dev500": 2, "musique_dev200": 1, "2wikimultihopqa_dev164": 1},
             chunk=2, seeds=[0], min_questions=1, fit=["--steps", "2", "--batch-size", "1", "--eval-fraction",
                                      "0.2", "--eval-every", "2", "--save-every", "1"])

DEMO_FILES = {"hotpotqa_dev500": "hotpotqa.txt", "musique_dev200": "musique.txt",
              "2wikimultihopqa_dev164": "2wikimultihopqa.txt"}


class StageError(Exception):
    pass


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_atomic(path, data):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "wb") as f:
        f.write(data if isinstance(data, bytes) else data.encode())
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load1():
    return round(os.getloadavg()[0], 2)


def cpu_children():
    """CPU seconds (user + system) of the waited-for child processes so far: a stage's compute,
    whatever else ran beside it and however long it was paused."""
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


class Runner:
    def __init__(self, args):
        self.smoke = args.smoke
        self.p = SMOKE if args.smoke else PROTOCOL
        name = "stepwise-vs-vanilla" + ("-smoke" if args.smoke else "")
        self.out = Path(args.out or ROOT / "out" / name)
        self.sums = Path(args.summaries or (self.out / "summaries" if args.smoke
                                             else ROOT / "docs" / "results" / name))
        self.bin = Path(args.bin or ROOT / "target" / "release")
        self.commit = getattr(args, "commit", False) and not args.smoke
        self.env = dict(os.environ)
        self._check_protocol()

    # -- bookkeeping ----------------------------------------------------------------------
    def _check_protocol(self):
        path = self.sums / "protocol.json"
        if path.exists():
            saved = json.loads(path.read_text())
            if saved["protocol"] != self.p:
                raise StageError(f"{path}: the committed protocol differs from this script's; "
                                 "a changed protocol needs a fresh summaries folder")
            self.started = saved["started"]
        else:
            self.started = datetime.date.today().isoformat()
            write_atomic(path, json.dumps({"started": self.started, "protocol": self.p},
                                          indent=2) + "\n")
            self._commit([path], "stepwise-vs-vanilla: the protocol")

    def _commit(self, paths, message):
        if not self.commit:
            return
        rel = [str(Path(p).resolve().relative_to(ROOT)) for p in paths]
        for attempt in range(5):  # another git command may hold the index lock for a moment
            added = subprocess.run(["git", "add", "--", *rel], cwd=ROOT)
            if added.returncode == 0 and subprocess.run(
                    ["git", "commit", "-q", "-m", message, "--", *rel], cwd=ROOT).returncode == 0:
                return
            time.sleep(2 + 3 * attempt)
        print(f"  warning: could not commit {' '.join(rel)}; commit it by hand", flush=True)

    def summary_path(self, name):
        return self.sums / "stages" / f"{name}.json"

    def done(self, name):
        return self.summary_path(name).exists()

    def summary(self, name):
        return json.loads(self.summary_path(name).read_text())

    def finish(self, name, body, extra_files=()):
        path = self.summary_path(name)
        write_atomic(path, json.dumps(body, indent=2, sort_keys=True) + "\n")
        self._commit([path, *extra_files],
                     f"stepwise-vs-vanilla: stage {name} ({body.get('seconds', 0):.0f} s)")

    def tool(self, name):
        path = self.bin / name
        if not path.exists():
            raise StageError(f"{path}: not built (cargo build --release -p steper-train "
                             "-p steper-export -p steper-runtime)")
        return str(path)

    def setup_env(self):
        if "ORT_DYLIB_PATH" not in self.env:
            lib = subprocess.run(["bash", "scripts/install-ort.sh"], cwd=ROOT, check=True,
                                 capture_output=True, text=True).stdout.strip()
            self.env["ORT_DYLIB_PATH"] = lib

    def sh(self, cmd, log, timeout=None):
        """Runs cmd with its output in log; returns True when it ended, False when the
        timeout stopped it (SIGKILL: every tool here resumes from its last durable state)."""
        log = Path(log)
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "ab") as f:
            f.write(f"$ {' '.join(map(str, cmd))}\n".encode())
            f.flush()
            proc = subprocess.Popen([str(c) for c in cmd], cwd=ROOT, env=self.env, stdout=f,
                                    stderr=subprocess.STDOUT, start_new_session=True)
            try:
                rc = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                return False
        if rc != 0:
            tail = log.read_text(errors="replace")[-1500:]
            raise StageError(f"{cmd[0]} exited with {rc}; log {log}:\n{tail}")
        return True

    # -- the stages -----------------------------------------------------------------------
    def runs(self):
        for cap in self.p["capacities"]:
            for seed in self.p["seeds"]:
                for mode in self.p["modes"]:
                    yield f"{cap}-{mode}-s{seed}"

    def chunks(self, dataset):
        n, c = self.p["dev"][dataset], self.p["chunk"]
        return [(k, k * c, min(n, (k + 1) * c)) for k in range((n + c - 1) // c)]

    def eval_stages(self, config):
        return [f"eval-{config}-{d}-c{k}" for d in self.p["dev"] for k, _, _ in self.chunks(d)]

    def plan(self):
        """Every stage in run order: the base and its evaluation first, then per seed the
        top-2-layer fits of STEPER and Vanilla-KD with their evaluations (the main
        comparison), uniform, the few-shot base, and the LoRA runs last."""
        order = ["base", "index", "records"]
        order += self.eval_stages("base")
        caps = list(self.p["capacities"])
        for cap in caps:
            for seed in self.p["seeds"]:
                for mode in self.p["modes"]:
                    run = f"{cap}-{mode}-s{seed}"
                    order += [f"fit-{run}", f"export-{run}"] + self.eval_stages(run)
            if cap == caps[0]:
                order += self.eval_stages("fewshot")
        return order

    def run_stage(self, name, budget_s):
        """Runs one stage; returns True when it finished, False when the budget stopped it."""
        if name == "base":
            return self.stage_base()
        if name == "index":
            return self.stage_index()
        if name == "records":
            return self.stage_records()
        m = re.fullmatch(r"fit-(\w+)-(\w+)-s(\d+)", name)
        if m:
            return self.stage_fit(name, m.group(1), m.group(2), int(m.group(3)), budget_s)
        m = re.fullmatch(r"export-(.+)", name)
        if m:
            return self.stage_export(name, m.group(1))
        m = re.fullmatch(r"eval-(.+)-(\w+_\w+)-c(\d+)", name)
        if m:
            return self.stage_eval(name, m.group(1), m.group(2), int(m.group(3)), budget_s)
        raise StageError(f"unknown stage {name}")

    def stage_base(self):
        t = time.time()
        base, onnx = self.out / "base", self.out / "base-onnx"
        gguf = subprocess.run(["bash", "scripts/fetch-smollm2.sh"], cwd=ROOT, check=True,
                              capture_output=True, text=True).stdout.strip()
        shutil.rmtree(base, ignore_errors=True)
        shutil.rmtree(onnx, ignore_errors=True)
        log = self.out / "logs" / "base.log"
        self.sh([self.tool("steper-train"), "import", "--gguf", gguf, "--out", base], log)
        self.sh([self.tool("steper-export"), "--checkpoint", base, "--out", onnx,
                 *self.p["export"]], log)
        return self.produced("base", t, {"weights_sha256": sha256(base / "model.safetensors"),
                                         "gguf": Path(gguf).name})

    def stage_index(self):
        t = time.time()
        for f in [*self.p["train"], *self.p["dev"]]:
            d = self.out / "index" / f
            shutil.rmtree(d, ignore_errors=True)
            self.sh([self.tool("steper-run"), "index", "--from-qa", DATA / f"{f}.jsonl.gz",
                     "--out", d], self.out / "logs" / "index.log")
        return self.produced("index", t, {"indexes": [*self.p["train"], *self.p["dev"]]})

    def stage_records(self):
        self.need("base")
        self.need("index")
        t = time.time()
        pools = {}
        for f, n in self.p["train"].items():
            d = self.out / "distill" / f
            shutil.rmtree(d, ignore_errors=True)
            self.sh([self.tool("steper-train"), "distill", "--teacher", "gold", "--data",
                     DATA / f"{f}.jsonl.gz", "--limit", n, "--index", self.out / "index" / f,
                     "--out", d, "--vanilla", "--fit-student", self.out / "base"],
                    self.out / "logs" / "records.log")
            s = json.loads((d / "summary.json").read_text())
            pools[f] = {k: s[k] for k in ("questions", "passed", "records", "vanilla_records")}
        rec = self.out / "records"
        rec.mkdir(parents=True, exist_ok=True)
        qids = {}
        for kind in ("stepwise", "vanilla"):
            lines = []
            for f in self.p["train"]:
                lines += (self.out / "distill" / f / f"{kind}.jsonl").read_text().splitlines()
            lines = [x for x in lines if x.strip()]
            qids[kind] = sorted({json.loads(x)["qid"] for x in lines})
            write_atomic(rec / f"{kind}.jsonl", "\n".join(lines) + "\n")
        if qids["stepwise"] != qids["vanilla"]:
            only = set(qids["stepwise"]) ^ set(qids["vanilla"])
            raise StageError(f"step-wise and Vanilla-KD records hold other questions: "
                             f"{sorted(only)[:5]}")
        if len(qids["stepwise"]) < self.p["min_questions"]:
            raise StageError(f"the gold teacher passed {len(qids['stepwise'])} training "
                             f"questions, fewer than the protocol's {self.p['min_questions']}: "
                             "take more of each pool")
        return self.produced("records", t, {
            "pools": pools, "questions": len(qids["stepwise"]),
            "stepwise_records": sum(1 for _ in open(rec / "stepwise.jsonl")),
            "vanilla_records": sum(1 for _ in open(rec / "vanilla.jsonl")),
            "stepwise_sha256": sha256(rec / "stepwise.jsonl"),
            "vanilla_sha256": sha256(rec / "vanilla.jsonl")})

    def stage_fit(self, name, cap, mode, seed, budget_s):
        self.need("records")
        run = self.out / "runs" / f"{cap}-{mode}-s{seed}"
        ckpt = run / "ckpt"
        kind = "vanilla" if mode == "vanilla" else "stepwise"
        args = [self.tool("steper-train"), "fit", "--student", self.out / "base",
                "--data", self.out / "records" / f"{kind}.jsonl", "--out", ckpt,
                "--mode", mode, "--seed", seed, *self.p["fit"], *self.p["capacities"][cap]]
        if cap == "top2":
            args += ["--prefix-cache", self.out / f"prefix-cache-{kind}"]
        if mode == "steper":
            args += ["--sigma-lr", self.p["steper_sigma_lr"]]
        spent_file = run / "fit-seconds.json"
        spent = json.loads(spent_file.read_text()) if spent_file.exists() else []
        t, l0, c0 = time.time(), load1(), cpu_children()
        ended = self.sh(args, run / "fit.log", timeout=budget_s)
        spent.append({"seconds": round(time.time() - t, 1), "load_start": l0,
                      "load_end": load1(), "ended": ended,
                      "cpu_seconds": round(cpu_children() - c0, 1)})
        write_atomic(spent_file, json.dumps(spent))
        if not ended:
            return False
        # the resumable checkpoints (≈ 1 GB with the optimizer state) are not needed once the
        # final model is written; twelve fits would otherwise fill the disk
        shutil.rmtree(ckpt / "checkpoints", ignore_errors=True)
        log = [json.loads(x) for x in (ckpt / "train_log.jsonl").read_text().splitlines() if x]
        evals = [{"step": r["step"], **r["eval"]} for r in log if r.get("eval")]
        sigma = [{"step": r["step"], "init": r["sigma_init"], "exp": r["sigma_exp"],
                  "agg": r["sigma_agg"]} for r in log
                 if r["step"] % 50 == 0 or r is log[-1]]
        body = {"seconds": round(sum(s["seconds"] for s in spent), 1), "segments": spent,
                "steps": log[-1]["step"] if log else 0, "heldout": evals,
                "sigma": sigma if mode == "steper" else [],
                "mean_tokens_per_sec": round(sum(r["tokens_per_sec"] for r in log)
                                             / max(len(log), 1), 1),
                "weights_sha256": sha256(ckpt / "model.safetensors"),
                "args": [str(a) for a in args[2:]]}
        self.finish(name, body)
        return True

    def stage_export(self, name, run):
        self.need(f"fit-{run}")
        t = time.time()
        d = self.out / "runs" / run / "onnx"
        shutil.rmtree(d, ignore_errors=True)
        self.sh([self.tool("steper-export"), "--checkpoint", self.out / "runs" / run / "ckpt",
                 "--out", d, *self.p["export"]], self.out / "runs" / run / "export.log")
        return self.produced(name, t, {"onnx_bytes": sum(p.stat().st_size
                                                         for p in d.iterdir())})

    def stage_eval(self, name, config, dataset, k, budget_s):
        model = self.out / "base-onnx" if config in ("base", "fewshot") \
            else self.out / "runs" / config / "onnx"
        self.need("base" if config in ("base", "fewshot") else f"export-{config}")
        self.need("index")
        _, lo, hi = self.chunks(dataset)[k]
        qfile = self.out / "questions" / f"{dataset}.c{k}.jsonl"
        if not qfile.exists():
            with gzip.open(DATA / f"{dataset}.jsonl.gz", "rt") as f:
                rows = [x for x in f.read().splitlines() if x.strip()][lo:hi]
            write_atomic(qfile, "\n".join(rows) + "\n")
        res = self.out / "eval" / config / f"{dataset}.c{k}.jsonl"
        res.parent.mkdir(parents=True, exist_ok=True)
        args = [self.tool("steper-run"), "eval", "--model", model, "--index",
                self.out / "index" / dataset, "--data", qfile, "--out", res, *self.p["eval"]]
        if config == "fewshot":
            args += ["--demos", f"{DATA / 'ircot_prompts' / DEMO_FILES[dataset]}:"
                                f"{self.p['demos']}"]
        t, l0, c0 = time.time(), load1(), cpu_children()
        if not self.sh(args, self.out / "logs" / f"{name}.log", timeout=budget_s):
            return False
        compact = []
        for line in res.read_text().splitlines():
            if not line.strip():
                continue
            r = json.loads(line)
            tr = r.get("trace", [])
            compact.append(json.dumps({
                "id": r["id"], "prediction": r["prediction"], "golds": r["golds"],
                "em": r["em"], "f1": r["f1"], "acc": r["acc"], "steps": r["steps"],
                "forced": r["forced"], "seconds": round(r["seconds"], 2),
                "error": r.get("error"),
                "step_p": [round(s.get("mean_prob", 0.0), 4) for s in tr],
                "step_h": [round(s.get("mean_entropy", 0.0), 4) for s in tr],
                "step_forced": [bool(s.get("forced")) for s in tr]}, ensure_ascii=False))
        cfile = self.sums / "eval" / config / f"{dataset}.c{k}.jsonl.gz"
        write_atomic(cfile, gzip.compress(("\n".join(compact) + "\n").encode(), mtime=0))
        s = json.loads(Path(f"{res}.summary.json").read_text())
        body = {"seconds": round(time.time() - t, 1), "load_start": l0, "load_end": load1(),
                "cpu_seconds": round(cpu_children() - c0, 1), "questions": s["questions"], "errors": s["errors"], "em": s["em"],
                "f1": s["f1"], "acc": s["acc"], "forced_share": s["forced_share"],
                "mean_steps": s["mean_steps"], "questions_per_sec": s["questions_per_sec"],
                "reuse_ratio": s.get("reuse_ratio"), "range": [lo, hi]}
        self.finish(name, body, [cfile])
        return True

    def produced(self, name, t, body):
        self.finish(name, {"seconds": round(time.time() - t, 1), "load_end": load1(), **body})
        return True

    def need(self, name):
        """Makes sure `name`'s large outputs exist in the work folder, redoing the stage when a
        later session lost them (and checking that it reproduces the committed hashes)."""
        if not self.done(name):
            raise StageError(f"stage {name} is not done yet")
        present = {
            "base": lambda: (self.out / "base-onnx" / "steper.json").exists(),
            "index": lambda: all((self.out / "index" / f / "meta.json").exists()
                                 for f in [*self.p["train"], *self.p["dev"]]),
            "records": lambda: (self.out / "records" / "vanilla.jsonl").exists(),
        }
        if name.startswith("fit-"):
            run = name[4:]
            ok = (self.out / "runs" / run / "ckpt" / "model.safetensors").exists()
        elif name.startswith("export-"):
            ok = (self.out / "runs" / name[7:] / "onnx" / "steper.json").exists()
        else:
            ok = present[name]()
        if ok:
            return
        committed = self.summary(name)
        print(f"  {name}: done in an earlier session, its outputs are gone here: redoing it",
              flush=True)
        self.summary_path(name).rename(self.summary_path(name).with_suffix(".json.was"))
        try:
            if not self.run_stage(name, None):
                raise StageError(f"redoing {name} did not finish")
        finally:
            was = self.summary_path(name).with_suffix(".json.was")
            now = self.summary(name) if self.done(name) else None
            if now is not None:
                for key in [k for k in committed if k.endswith("sha256")]:
                    if now.get(key) != committed[key]:
                        raise StageError(f"redone stage {name}: {key} {now.get(key)} differs "
                                         f"from the committed {committed[key]}")
                # keep the committed summary (its seconds are those of the first run)
                was.replace(self.summary_path(name))
            elif was.exists():
                was.replace(self.summary_path(name))


#: Load average at a stage's start below which the machine counts as quiet.
QUIET_LOAD = 1.0
#: Margin on an evaluation chunk's expected time.
ESTIMATE_MARGIN = 1.3


def estimate(r, name):
    """Seconds a stage is expected to take: an evaluation chunk from the slowest chunk of the
    same configuration (else of any configuration) that started on a quiet machine — chunks
    run beside other jobs took 3–4× longer and would keep every later chunk from starting —
    or from the slowest of all when none did, with a margin; None for fits (time-boxed)."""
    if not name.startswith("eval-"):
        return None if name.startswith("fit-") else 300
    config = re.fullmatch(r"eval-(.+)-\w+_\w+-c\d+", name).group(1)
    every = [json.loads(p.read_text()) for p in sorted((r.sums / "stages").glob("eval-*.json"))]
    own = [json.loads(p.read_text())
           for p in sorted((r.sums / "stages").glob(f"eval-{config}-*.json"))]

    def quiet_seconds(s):
        # the child processes' CPU time over the cores is what the stage costs on a quiet
        # machine, however long it was paused or shared; older summaries have only wall time,
        # which counts when the machine was quiet at the start
        if "cpu_seconds" in s:
            return s["cpu_seconds"] / (os.cpu_count() or 1)
        return s["seconds"] if s.get("load_start", QUIET_LOAD) < QUIET_LOAD else None

    for pool in (own, every):
        rates = [q / max(s["questions"], 1) for s in pool
                 if (q := quiet_seconds(s)) is not None]
        if rates:
            return max(rates) * r.p["chunk"] * ESTIMATE_MARGIN
    rates = [s["seconds"] / max(s["questions"], 1) for s in every]
    return (max(rates) if rates else 12.0) * r.p["chunk"] * ESTIMATE_MARGIN


def cmd_list(r, _args):
    total = 0.0
    for name in r.plan():
        if r.done(name):
            s = r.summary(name)
            total += s.get("seconds", 0)
            print(f"done     {name:48s} {s.get('seconds', 0):8.0f} s")
        else:
            print(f"pending  {name}")
    print(f"compute so far: {total / 3600:.2f} h")


def cmd_run(r, args):
    r.setup_env()
    deadline = time.time() + args.budget_minutes * 60
    pattern = re.compile(args.only) if args.only else None
    for name in r.plan():
        if r.done(name) or (pattern and not pattern.search(name)):
            continue
        left = deadline - time.time()
        need = estimate(r, name)
        if name.startswith("fit-"):
            need = 600  # a fit is time-boxed, but less than this is mostly loading
        if left < 120 or need > left:
            print(f"stop: {name} needs ~{(need or 600) / 60:.0f} min, {left / 60:.0f} left",
                  flush=True)
            return
        print(f"[{time.strftime('%H:%M:%S')}] {name}", flush=True)
        if not r.run_stage(name, left if name.startswith(("fit-", "eval-")) else None):
            print(f"  {name}: stopped at the budget; it resumes on the next run", flush=True)
            return
        print(f"  done in {r.summary(name)['seconds']:.0f} s", flush=True)
    print("every stage is done")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--smoke", action="store_true", help="a tiny protocol, outputs in out/ only")
    ap.add_argument("--out", help="work folder (out/stepwise-vs-vanilla)")
    ap.add_argument("--summaries", help="summaries folder (docs/results/stepwise-vs-vanilla)")
    ap.add_argument("--bin", help="the release binaries (target/release)")
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("list", help="the stages, done or not")
    run = sub.add_parser("run", help="run pending stages within a budget")
    run.add_argument("--budget-minutes", type=float, default=55.0)
    run.add_argument("--only", help="only the stages whose name matches this regex")
    run.add_argument("--commit", action="store_true",
                     help="git-commit each stage's summary as soon as it exists")
    rep = sub.add_parser("report", help="write the results document from the summaries")
    rep.add_argument("--resamples", type=int, default=10000)
    args = ap.parse_args()
    try:
        r = Runner(args)
        if args.cmd == "report":
            from report_stages import write_report
            write_report(r, args)
        else:
            {"list": cmd_list, "run": cmd_run}[args.cmd](r, args)
    except StageError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
