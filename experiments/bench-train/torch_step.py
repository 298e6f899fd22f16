"""The training step of `steper-train bench-fit`, in PyTorch CPU, for a throughput comparison.

Same model shapes (read from the student's config.json: Llama with RMSNorm, RoPE, GQA, SwiGLU,
tied or untied head), same batch shape (batch_size x seq_len random tokens, loss on the last
target_len tokens of each row, rows cycling through the three stages), same objective
(sum_j exp(-2 s_j)/2 * L_j + s_j with learnable s_j), AdamW (no decay on norms and s), global
grad-norm clipping at 1.0, and the same freezing options. Prints one JSON report.

Variants (to compare like with like, and with what a user would write):
  --logits targets   the head and the loss only at target positions (what steper-train does);
  --logits all       HF-style: logits for every position, loss masked (a user's training step);
  --prefix-cache     the frozen bottom (embeddings frozen, below --top-layers) computed once under
                     no_grad before the timed steps and reused (steper-train fit --prefix-cache);
  --lora-rank R      LoRA adapters (W + alpha/R * B A, B zero-initialised) on --lora-targets of the
                     top --top-layers layers (all layers without it); every base weight frozen.
"""
import argparse
import json
import math
import resource
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


class RMSNorm(nn.Module):
    def __init__(self, d, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.eps = eps

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def rope(x, cos, sin):
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class LoraLinear(nn.Module):
    """A frozen nn.Linear plus a trainable rank-r update, as peft's LoRA does it."""

    def __init__(self, base, r, alpha):
        super().__init__()
        self.base = base
        self.lora_a = nn.Parameter(torch.empty(r, base.in_features).uniform_(-1, 1) / math.sqrt(base.in_features))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, r))
        self.scale = alpha / r

    def forward(self, x):
        return self.base(x) + (x @ self.lora_a.t()) @ self.lora_b.t() * self.scale


class Layer(nn.Module):
    def __init__(self, c):
        super().__init__()
        d, h, kv = c["hidden_size"], c["num_attention_heads"], c.get("num_key_value_heads", c["num_attention_heads"])
        self.h, self.kv, self.hd = h, kv, d // h
        self.q_proj = nn.Linear(d, h * self.hd, bias=False)
        self.k_proj = nn.Linear(d, kv * self.hd, bias=False)
        self.v_proj = nn.Linear(d, kv * self.hd, bias=False)
        self.o_proj = nn.Linear(h * self.hd, d, bias=False)
        i = c["intermediate_size"]
        self.gate_proj = nn.Linear(d, i, bias=False)
        self.up_proj = nn.Linear(d, i, bias=False)
        self.down_proj = nn.Linear(i, d, bias=False)
        eps = c.get("rms_norm_eps", 1e-5)
        self.input_layernorm = RMSNorm(d, eps)
        self.post_attention_layernorm = RMSNorm(d, eps)

    def forward(self, x, cos, sin):
        b, t, _ = x.shape
        y = self.input_layernorm(x)
        q = self.q_proj(y).view(b, t, self.h, self.hd).transpose(1, 2)
        k = self.k_proj(y).view(b, t, self.kv, self.hd).transpose(1, 2)
        v = self.v_proj(y).view(b, t, self.kv, self.hd).transpose(1, 2)
        q, k = rope(q, cos, sin), rope(k, cos, sin)
        rep = self.h // self.kv
        k = k.repeat_interleave(rep, dim=1)
        v = v.repeat_interleave(rep, dim=1)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.o_proj(a.transpose(1, 2).reshape(b, t, -1))
        y = self.post_attention_layernorm(x)
        return x + self.down_proj(F.silu(self.gate_proj(y)) * self.up_proj(y))


class Llama(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.c = c
        d = c["hidden_size"]
        self.embed_tokens = nn.Embedding(c["vocab_size"], d)
        self.layers = nn.ModuleList(Layer(c) for _ in range(c["num_hidden_layers"]))
        self.norm = RMSNorm(d, c.get("rms_norm_eps", 1e-5))
        self.tied = c.get("tie_word_embeddings", False)
        if not self.tied:
            self.lm_head = nn.Linear(d, c["vocab_size"], bias=False)
        hd = d // c["num_attention_heads"]
        theta = c.get("rope_theta", 10000.0)
        self.inv_freq = 1.0 / (theta ** (torch.arange(0, hd, 2).float() / hd))

    def rope(self, t):
        freqs = torch.outer(torch.arange(t).float(), self.inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos()[None, None], emb.sin()[None, None]

    def bottom(self, ids, k):
        """Hidden states after the first k layers."""
        cos, sin = self.rope(ids.shape[1])
        x = self.embed_tokens(ids)
        for layer in self.layers[:k]:
            x = layer(x, cos, sin)
        return x

    def top(self, x, k):
        """Hidden states after layers k.. (before the final norm)."""
        cos, sin = self.rope(x.shape[1])
        for layer in self.layers[k:]:
            x = layer(x, cos, sin)
        return x

    def head(self, h):
        w = self.embed_tokens.weight if self.tied else self.lm_head.weight
        return self.norm(h) @ w.t()

    def forward(self, ids):
        return self.head(self.top(self.bottom(ids, 0), 0))


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--config", required=True, help="the student's config.json")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--target-len", type=int, default=16)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup-steps", type=int, default=2)
    ap.add_argument("--freeze-embeddings", action="store_true")
    ap.add_argument("--top-layers", type=int)
    ap.add_argument("--threads", type=int, default=0, help="0: torch's default")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--logits", choices=["all", "targets"], default="all")
    ap.add_argument("--prefix-cache", action="store_true")
    ap.add_argument("--lora-rank", type=int)
    ap.add_argument("--lora-alpha", type=float)
    ap.add_argument("--lora-targets", default="q,k,v,o,gate,up,down")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    c = json.load(open(a.config))
    model = Llama(c)
    n_layers = c["num_hidden_layers"]
    for name, p in model.named_parameters():
        train = True
        if a.freeze_embeddings and name.startswith("embed_tokens"):
            train = False
        if a.top_layers is not None and name.startswith("layers."):
            train = int(name.split(".")[1]) + a.top_layers >= n_layers
        p.requires_grad_(train)
    first_top = n_layers - a.top_layers if a.top_layers is not None else 0
    if a.lora_rank:
        for p in model.parameters():
            p.requires_grad_(False)
        alpha = a.lora_alpha if a.lora_alpha is not None else 2.0 * a.lora_rank
        names = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj",
                 "gate": "gate_proj", "up": "up_proj", "down": "down_proj"}
        for layer in model.layers[first_top:]:
            for t in a.lora_targets.split(","):
                n = names[t.strip()]
                setattr(layer, n, LoraLinear(getattr(layer, n), a.lora_rank, alpha))
    frozen_bottom = first_top if (a.freeze_embeddings or a.lora_rank) else 0
    s = nn.Parameter(torch.zeros(3))
    decay = [p for n, p in model.named_parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.requires_grad and p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.01}, {"params": no_decay + [s], "weight_decay": 0.0}], lr=1e-3
    )
    B, T, L = a.batch_size, a.seq_len, a.target_len
    g = torch.Generator().manual_seed(a.seed)
    ids = torch.randint(0, c["vocab_size"], (B, T), generator=g)
    stage = torch.arange(B) % 3
    target_mask = torch.zeros(B, T - 1)
    target_mask[:, T - 1 - L :] = 1.0
    cached = None
    if a.prefix_cache:
        with torch.no_grad():
            cached = model.bottom(ids[:, :-1], frozen_bottom)
    times = []
    for step in range(a.warmup_steps + a.steps):
        t0 = time.perf_counter()
        if cached is not None:
            h = model.top(cached, frozen_bottom)
        else:
            h = model.top(model.bottom(ids[:, :-1], frozen_bottom), frozen_bottom)
        if a.logits == "targets":
            # Only target rows reach the head; non-target rows get nll 0 (masked anyway).
            rows = target_mask.reshape(-1).nonzero().squeeze(1)
            logits = model.head(h.reshape(-1, h.shape[-1])[rows])
            nll_rows = F.cross_entropy(logits, ids[:, 1:].reshape(-1)[rows], reduction="none")
            nll = torch.zeros(B * (T - 1)).index_put((rows,), nll_rows).view(B, T - 1)
        else:
            logits = model.head(h)
            nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none").view(B, T - 1)
        total = 0.0
        for j in range(3):
            m = target_mask * (stage == j).float()[:, None]
            if m.sum() > 0:
                lj = (nll * m).sum() / m.sum()
                total = total + torch.exp(-2 * s[j]) / 2 * lj + s[j]
        opt.zero_grad(set_to_none=True)
        total.backward()
        params = [p for p in model.parameters() if p.requires_grad] + [s]
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        dt = time.perf_counter() - t0
        if step >= a.warmup_steps:
            times.append(dt)
    tokens_per_step = B * (T - 1)
    times_sorted = sorted(times)
    n_total = sum(p.numel() for p in model.parameters())
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(json.dumps({
        "framework": f"pytorch {torch.__version__}",
        "config": vars(a),
        "total_parameters": n_total,
        "trainable_parameters": n_train,
        "tokens_per_step": tokens_per_step,
        "median_step_seconds": times_sorted[len(times) // 2],
        "tokens_per_sec": tokens_per_step * len(times) / sum(times),
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
        "threads": torch.get_num_threads(),
    }, indent=2))


if __name__ == "__main__":
    main()
