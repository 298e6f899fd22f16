"""Loads the checkpoint our code wrote (bf16, sharded, index, generation_config.json) with
Hugging Face transformers, unchanged, and compares its logits with ours.

usage: python compare.py OUT_DIR   (OUT_DIR as given to the hf_roundtrip example)
Prints one JSON object; exits 1 when a check fails.
"""
import json
import sys
from pathlib import Path

import numpy as np
import safetensors.numpy
import torch
import transformers
from transformers import AutoModelForCausalLM, GenerationConfig

# Same weights, same f32 arithmetic up to operation order: per-logit difference allowed.
F32_LOGIT_ATOL = 1e-4
# bf16 activations in both implementations, different rounding points: a looser bound.
BF16_LOGIT_ATOL = 5e-2


def main() -> int:
    out = Path(sys.argv[1])
    ckpt = out / "checkpoint"
    ours = json.loads((out / "ours.json").read_text())
    ids = torch.tensor([ours["input_ids"]])
    rows = []
    ok = True
    for name, dtype, tol in [("f32", torch.float32, F32_LOGIT_ATOL), ("bf16", torch.bfloat16, BF16_LOGIT_ATOL)]:
        model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=dtype)
        model.eval()
        with torch.no_grad():
            theirs = model(ids).logits[0].float().numpy()
        mine = np.array(ours[f"logits_{name}"], dtype=np.float32)
        diff = float(np.abs(theirs - mine).max())
        argmax_agree = float((theirs.argmax(-1) == mine.argmax(-1)).mean())
        passed = diff <= tol
        ok &= passed
        rows.append({"compute": name, "max_abs_diff": diff, "tolerance": tol,
                     "argmax_agreement": argmax_agree, "passed": passed})

    # The weights transformers holds are our bf16 bytes, bit for bit.
    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.bfloat16)
    sd = model.state_dict()
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    mismatched = []
    for shard in shards:
        # numpy has no bf16: compare the raw 16-bit patterns.
        with open(ckpt / shard, "rb") as f:
            raw = f.read()
        header_len = int.from_bytes(raw[:8], "little")
        header = json.loads(raw[8:8 + header_len])
        base = 8 + header_len
        for k, meta in header.items():
            if k == "__metadata__":
                continue
            a, b = meta["data_offsets"]
            stored = np.frombuffer(raw[base + a:base + b], dtype=np.uint16)
            held = sd[k].contiguous().view(torch.int16).numpy().view(np.uint16).ravel()
            if meta["dtype"] != "BF16" or not np.array_equal(stored, held):
                mismatched.append(k)
    ok &= not mismatched
    gen = GenerationConfig.from_pretrained(ckpt)
    eos_ok = list(np.atleast_1d(gen.eos_token_id)) == ours["eos_ids"]
    ok &= eos_ok
    tied = model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    ok &= tied
    print(json.dumps({
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "shards": shards,
        "stored_dtype": ours["stored_dtype"],
        "logits": rows,
        "bf16_tensors_bit_exact": not mismatched,
        "mismatched_tensors": mismatched,
        "generation_config_eos": [int(x) for x in np.atleast_1d(gen.eos_token_id)],
        "our_eos_ids": ours["eos_ids"],
        "tied_embeddings_in_transformers": tied,
        "passed": bool(ok),
    }, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
