"""onnxruntime-genai helpers shared by the benchmark scripts (run with the genai venv's python).

    genai_bench.py threads DIR N          set genai_config.json's intra-op thread count to N
    genai_bench.py decode DIR PROMPT NEW  greedy, PROMPT synthetic ids then NEW tokens: one
                                          warm-up run, one measured; prints {"prefill_tok_s",
                                          "decode_tok_s"}

The prompt ids are those `steper-run bench-decode` uses, (i * 7919 + 17) % vocab.
"""
import json
import os
import sys
import time


def threads(out, n):
    p = os.path.join(out, "genai_config.json")
    c = json.load(open(p))
    c["model"]["decoder"].setdefault("session_options", {})["intra_op_num_threads"] = n
    with open(p + ".tmp", "w") as f:
        f.write(json.dumps(c, indent=2))
    os.replace(p + ".tmp", p)


def decode(out, prompt, new):
    import onnxruntime_genai as og

    model = og.Model(og.Config(out))
    vocab = json.load(open(os.path.join(out, "genai_config.json")))["model"]["vocab_size"]
    ids = [(i * 7919 + 17) % vocab for i in range(prompt)]

    def run():
        p = og.GeneratorParams(model)
        p.set_search_options(do_sample=False, max_length=prompt + new, min_length=prompt + new)
        g = og.Generator(model, p)
        t0 = time.perf_counter()
        g.append_tokens(ids)
        tp = time.perf_counter() - t0
        n, t1 = 0, time.perf_counter()
        while n < new and not g.is_done():
            g.generate_next_token()
            n += 1
        return prompt / tp, n / (time.perf_counter() - t1)

    run()
    pre, dec = run()
    print(json.dumps({"prefill_tok_s": pre, "decode_tok_s": dec}))


if __name__ == "__main__":
    cmd, out, *rest = sys.argv[1:]
    if cmd == "threads":
        threads(out, int(rest[0]))
    elif cmd == "decode":
        decode(out, int(rest[0]), int(rest[1]))
    else:
        sys.exit(f"genai_bench.py: unknown command {cmd!r} (threads, decode)")
