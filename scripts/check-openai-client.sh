#!/usr/bin/env bash
# The official `openai` Python client (PyPI, in a venv under .cache/) against `steper-run serve`
# on loopback: models.list, chat.completions.create (plain and stream=True) and
# completions.create. The model is the tiny test export of steper-test-support (or MODEL=dir),
# copied to .cache/openai-client/model with a ChatML chat template written into its
# tokenizer_config.json (or the model's own template when it has one); INDEX is its BM25 index.
# Prints what the client received and exits non-zero when a call fails or returns an empty or
# malformed answer.
#
# Environment: MODEL, INDEX (default: the newest target/steper-test-fixtures/tiny-*),
# PORT (default 18090), OPENAI_REQ (pip requirement, default openai).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PORT="${PORT:-18090}"
VENV="$ROOT/.cache/openai-client-venv"
WORK="$ROOT/.cache/openai-client"
REQ="${OPENAI_REQ:-openai}"

if [[ -z "${MODEL:-}" ]]; then
  TINY="$(ls -dt target/steper-test-fixtures/tiny-*/ 2>/dev/null | head -n1 || true)"
  if [[ -z "$TINY" ]]; then
    echo "no tiny export: run 'cargo run -p steper-test-support --bin steper-test-fixture' (or any runtime test) first, or set MODEL and INDEX" >&2
    exit 2
  fi
  MODEL="${TINY%/}/export"
  INDEX="${INDEX:-${TINY%/}/index}"
fi
[[ -d "${INDEX:-}" ]] || { echo "INDEX ($INDEX) is not a directory" >&2; exit 2; }

if ! "$VENV/bin/python" -c "import openai" 2>/dev/null; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --disable-pip-version-check "$REQ" >&2
fi
export ORT_DYLIB_PATH="${ORT_DYLIB_PATH:-$(bash scripts/install-ort.sh)}"
cargo build --quiet -p steper-runtime --bin steper-run >&2

rm -rf "$WORK"
mkdir -p "$WORK/model"
cp "$MODEL"/* "$WORK/model/"
"$VENV/bin/python" - "$WORK/model/tokenizer_config.json" <<'PY'
import json, os, sys
path = sys.argv[1]
cfg = json.load(open(path)) if os.path.exists(path) else {}
if not cfg.get("chat_template"):
    cfg["chat_template"] = (
        "{%- for message in messages %}{{- '<|im_start|>' + message.role + '\\n' + message.content"
        " + '<|im_end|>' + '\\n' }}{%- endfor %}{%- if add_generation_prompt %}"
        "{{- '<|im_start|>assistant\\n' }}{%- endif %}")
json.dump(cfg, open(path, "w"), indent=2)
PY

target/debug/steper-run serve --model "$WORK/model" --index "$INDEX" \
  --addr "127.0.0.1:$PORT" --model-name tiny-chat >"$WORK/server.log" 2>&1 &
SERVER=$!
trap 'kill "$SERVER" 2>/dev/null || true' EXIT
for _ in $(seq 1 240); do
  if curl -sf "http://127.0.0.1:$PORT/healthz" >/dev/null; then break; fi
  if ! kill -0 "$SERVER" 2>/dev/null; then cat "$WORK/server.log" >&2; exit 1; fi
  sleep 0.5
done
curl -sf "http://127.0.0.1:$PORT/healthz" >/dev/null || { cat "$WORK/server.log" >&2; exit 1; }

"$VENV/bin/python" - "$PORT" <<'PY'
import sys
import openai
from openai import OpenAI

client = OpenAI(base_url=f"http://127.0.0.1:{sys.argv[1]}/v1", api_key="unused")
print(f"openai {openai.__version__}")
models = client.models.list()
ids = [m.id for m in models.data]
print("models.list:", ids)
assert ids == ["tiny-chat"], ids

messages = [{"role": "system", "content": "Answer briefly."},
            {"role": "user", "content": "Who wrote the book?"}]
r = client.chat.completions.create(model="tiny-chat", messages=messages, max_tokens=12,
                                   temperature=0, logprobs=True, top_logprobs=2)
text = r.choices[0].message.content
print("chat.completions.create:", repr(text), r.choices[0].finish_reason, r.usage)
assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
assert r.usage.completion_tokens > 0 and text
assert r.choices[0].logprobs is not None and len(r.choices[0].logprobs.content) > 0

stream = client.chat.completions.create(model="tiny-chat", messages=messages, max_tokens=12,
                                        temperature=0, stream=True,
                                        stream_options={"include_usage": True})
pieces, finish, usage = [], None, None
for chunk in stream:
    assert chunk.object == "chat.completion.chunk", chunk
    if chunk.usage is not None:
        usage = chunk.usage
    for c in chunk.choices:
        if c.delta.content:
            pieces.append(c.delta.content)
        if c.finish_reason:
            finish = c.finish_reason
streamed = "".join(pieces)
print("chat stream:", repr(streamed), finish, usage)
assert streamed == text, (streamed, text)
assert finish in ("stop", "length") and usage is not None

c = client.completions.create(model="tiny-chat", prompt="Q: Who wrote the book?\nA:",
                              max_tokens=8, temperature=0)
print("completions.create:", repr(c.choices[0].text))

try:
    client.chat.completions.create(model="tiny-chat", messages=[{"content": "no role"}])
    raise SystemExit("a message without a role was accepted")
except openai.BadRequestError as e:
    print("bad request:", e.status_code, e.body)
print("ok")
PY
