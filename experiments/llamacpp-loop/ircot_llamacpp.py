"""The reasoning loop (experiments/python-loop/ircot_loop.py) on llama.cpp through
llama-cpp-python, as an edge user would write it: one `Llama` on the GGUF, greedy token
streaming with `Llama.generate` and the loop's stop rule, and llama-cpp-python's own KV cache,
which keeps the longest common token prefix of consecutive prompts (a step's prompt extends the previous step's
passages, so only the new passages, the question and the reasoning are prefilled).

usage: ircot_llamacpp.py GGUF QA.jsonl LIMIT OUT.json [--threads 2] [--ctx 4096] [--steps 5]
       [--top-k 4]
"""
import argparse
import json
import os
import sys

import llama_cpp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python-loop"))
import ircot_loop  # noqa: E402


def common_prefix(a, b):
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("gguf")
    ap.add_argument("data")
    ap.add_argument("limit", type=int)
    ap.add_argument("out")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ctx", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--top-k", type=int, default=4)
    a = ap.parse_args()
    qs, docs = ircot_loop.load(a.data, a.limit)
    llm = llama_cpp.Llama(model_path=a.gguf, n_ctx=a.ctx, n_threads=a.threads,
                          n_threads_batch=a.threads, n_batch=512, verbose=False)

    eos = llm.token_eos()

    def generate(prompt):
        ids = llm.tokenize(prompt.encode("utf-8"), add_bos=True, special=False)
        # What llama-cpp-python reuses from its cache (it matches the same way).
        reused = common_prefix(llm.input_ids[: llm.n_tokens].tolist(), ids)
        if reused == len(ids):
            reused -= 1  # the last token is evaluated again for its logits
        out = []

        def no_eos_first(_input_ids, scores):
            if not out:
                scores[eos] = -np.inf
            return scores

        for t in llm.generate(ids, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0,
                              logits_processor=llama_cpp.LogitsProcessorList([no_eos_first])):
            if t == eos:
                break
            out.append(t)
            text = llm.detokenize(out).decode("utf-8", errors="ignore")
            if ircot_loop.step_done(text) or len(out) >= ircot_loop.MAX_NEW_TOKENS:
                break
        text = llm.detokenize(out).decode("utf-8", errors="ignore")
        return text, len(ids), len(out), len(ids) - reused

    engine = f"llama.cpp via llama-cpp-python {llama_cpp.__version__} (Python loop, {a.threads} threads)"
    result = ircot_loop.run(qs, docs, generate, engine, a.steps, a.top_k)
    json.dump(result, open(a.out, "w"), indent=1)
    print(json.dumps(result["summary"]))


if __name__ == "__main__":
    sys.exit(main())
