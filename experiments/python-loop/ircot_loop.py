"""The STEPER / IRCoT reasoning loop of docs/DESIGN.md as plain Python, engine-agnostic: what a
user would write instead of `steper-run eval`. An engine script (experiments/genai-loop,
experiments/llamacpp-loop) supplies `generate(prompt) -> (text, prompt_tokens, new_tokens,
prefilled_tokens)`; this module has the retrieval, the prompt, the step logic and the scoring.

Loop: query = question; BM25 (k1 0.9, b 0.4) top-k new passages (skip held ones, cap 15) over the
QA file's own paragraphs; prompt in the IRCoT layout (passages first, each capped at 100 words;
`Q:`; `A:` + prior sentences); greedy generation until EOS (banned as the first token), a newline after
the first non-blank character, a complete first sentence or 48 tokens (`step_done`); keep the first
sentence; `answer is:` → answer; else the sentence (wh-words and so/thus lead-ins removed) is the
next query; at the last step force `So the answer is:`.
"""
import gzip
import json
import math
import re
import string
import time
from collections import Counter, defaultdict

MAX_NEW_TOKENS = 48
MAX_PASSAGES = 15


STOP = set("a an and are as at be but by for if in into is it no not of on or such that the their then there these they this to was will with".split())


def tokens(text):
    return [w for w in re.findall(r"[a-z0-9]+", text.lower()) if w not in STOP]


class Bm25:
    """Plain BM25 (k1 0.9, b 0.4) over title + text."""

    def __init__(self, docs, k1=0.9, b=0.4):
        self.docs, self.k1, self.b = docs, k1, b
        self.tf = [Counter(tokens(d["title"] + " " + d["text"])) for d in docs]
        self.len = [sum(c.values()) for c in self.tf]
        self.avg = sum(self.len) / max(1, len(self.len))
        df = Counter(w for c in self.tf for w in c)
        n = len(docs)
        self.idf = {w: math.log(1 + (n - f + 0.5) / (f + 0.5)) for w, f in df.items()}
        self.post = defaultdict(list)
        for i, c in enumerate(self.tf):
            for w in c:
                self.post[w].append(i)

    def search(self, query, k, skip):
        score = defaultdict(float)
        for w in set(tokens(query)):
            idf = self.idf.get(w)
            if idf is None:
                continue
            for i in self.post[w]:
                f = self.tf[i][w]
                score[i] += idf * f * (self.k1 + 1) / (f + self.k1 * (1 - self.b + self.b * self.len[i] / self.avg))
        ranked = sorted((i for i in score if i not in skip), key=lambda i: -score[i])
        return ranked[:k]


def cap(text, n):
    return " ".join(text.split()[:n])


def render(question, passages, reasoning, suffix=None):
    s = "".join(f"Wikipedia Title: {p['title']}\n{cap(p['text'], 100)}\n\n" for p in passages)
    s += f"Q: {question}\nA:"
    for r in reasoning:
        s += " " + r
    if suffix:
        s += " " + suffix
    return s


def first_sentence(text):
    """The first sentence of the first non-empty line (a `.`, `!` or `?` followed by whitespace or
    the end; the runtime's rule also spares abbreviations and initials)."""
    line = text.lstrip().split("\n")[0]
    m = re.search(r"[.!?](\s|$)", line)
    return (line[: m.start() + 1] if m else line).strip()


def step_done(text):
    """The runtime's rule for ending a step's generation (besides an end-of-sequence token, which
    it bans as the first token, and the token limit): a newline after the first non-blank
    character, or a complete first sentence with more text after it."""
    if "\n" in text.lstrip():
        return True
    t = text.strip()
    return bool(t) and len(first_sentence(t)) < len(t)


WH = re.compile(r"^(so|thus|therefore|hence)\b[, ]*|\b(what|which|who|whom|whose|when|where|why|how)\b", re.I)


def normalize(s):
    s = s.lower()
    s = "".join(c for c in s if c not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def f1(pred, gold):
    p, g = normalize(pred).split(), normalize(gold).split()
    common = Counter(p) & Counter(g)
    same = sum(common.values())
    if same == 0:
        return 0.0
    pr, rc = same / len(p), same / len(g)
    return 2 * pr * rc / (pr + rc)



def load(data, limit):
    """The first `limit` questions of a QA file and the paragraphs of the whole file (the index)."""
    opener = gzip.open if data.endswith(".gz") else open
    qs = [json.loads(l) for l in opener(data, "rt") if l.strip()]
    seen, docs = set(), []
    for q in qs:
        for p in q["paragraphs"]:
            key = (p["title"], p["text"])
            if key not in seen:
                seen.add(key)
                docs.append({"title": p["title"], "text": p["text"]})
    return qs[:limit], docs


def run(qs, docs, generate, engine, steps=5, top_k=4):
    """Runs the loop over `qs`; returns {"summary": ..., "records": [...]}."""
    bm25 = Bm25(docs)
    t0 = time.perf_counter()
    em = f1s = 0.0
    prompt_tokens = prefilled = generated = 0
    rows = []
    for q in qs:
        held, reasoning, query, answer = [], [], q["question"], None
        held_ids = set()
        for step in range(1, steps + 1):
            for i in bm25.search(query, top_k, held_ids):
                if len(held) < MAX_PASSAGES:
                    held.append(docs[i])
                    held_ids.add(i)
            forced = step == steps
            prompt = render(q["question"], held, reasoning, "So the answer is:" if forced else None)
            text, n_in, n_out, n_pre = generate(prompt)
            prompt_tokens += n_in
            prefilled += n_pre
            generated += n_out
            sent = first_sentence(text)
            if forced:
                answer = sent.rstrip(".").strip()
                break
            m = re.search(r"answer is:?\s*(.*)", sent, re.I)
            if m:
                answer = m.group(1).strip().rstrip(".")
                break
            reasoning.append(sent)
            query = WH.sub(" ", sent).strip() or q["question"]
        golds = q["answers"]
        e1 = max(float(normalize(answer) == normalize(g)) for g in golds)
        f_1 = max(f1(answer, g) for g in golds)
        em += e1
        f1s += f_1
        rows.append({"id": q["id"], "prediction": answer, "em": e1, "f1": f_1, "steps": step,
                     "forced": forced})
    secs = time.perf_counter() - t0
    n = len(qs)
    summary = {
        "engine": engine,
        "questions": n,
        "em": em / n,
        "f1": f1s / n,
        "forced_share": sum(r["forced"] for r in rows) / n,
        "mean_steps": sum(r["steps"] for r in rows) / n,
        "seconds": secs,
        "questions_per_sec": n / secs,
        "prompt_tokens": prompt_tokens,
        "prefilled_tokens": prefilled,
        "generated_tokens": generated,
    }
    return {"summary": summary, "records": rows}
