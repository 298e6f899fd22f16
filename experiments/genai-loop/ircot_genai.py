"""The reasoning loop (experiments/python-loop/ircot_loop.py) on onnxruntime-genai: what a user
would write instead of `steper-run eval`. It loads OUR export through its genai_config.json, so
both sides run the same weights on the same questions. The prompt is re-run from scratch each
step (genai's generator has no cross-step prefix reuse through its Python API), as a user's
script would.

usage: ircot_genai.py MODEL_DIR QA.jsonl LIMIT OUT.json [--steps 5] [--top-k 4]
"""
import argparse
import json
import os
import sys

import onnxruntime_genai as og

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python-loop"))
import ircot_loop  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("data")
    ap.add_argument("limit", type=int)
    ap.add_argument("out")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--top-k", type=int, default=4)
    a = ap.parse_args()
    qs, docs = ircot_loop.load(a.data, a.limit)
    model = og.Model(a.model)
    tok = og.Tokenizer(model)
    eos = set()
    cfg = json.load(open(a.model + "/genai_config.json"))["model"]
    e = cfg.get("eos_token_id")
    eos.update(e if isinstance(e, list) else [e])

    def generate(prompt, max_new=ircot_loop.MAX_NEW_TOKENS):
        ids = tok.encode(prompt)
        p = og.GeneratorParams(model)
        p.set_search_options(do_sample=False, max_length=len(ids) + max_new)
        g = og.Generator(model, p)
        g.append_tokens(ids)
        out = []
        while not g.is_done() and len(out) < max_new:
            g.generate_next_token()
            t = int(g.get_next_tokens()[0])
            if t in eos:
                break
            out.append(t)
            if ircot_loop.step_done(tok.decode(out)):
                break
        return tok.decode(out), len(ids), len(out), len(ids)

    engine = "onnxruntime-genai " + getattr(og, "__version__", "?") + " (Python loop)"
    result = ircot_loop.run(qs, docs, generate, engine, a.steps, a.top_k)
    json.dump(result, open(a.out, "w"), indent=1)
    print(json.dumps(result["summary"]))


if __name__ == "__main__":
    sys.exit(main())
