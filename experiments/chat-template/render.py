#!/usr/bin/env python3
"""Renders the chat-template fixtures exactly as Hugging Face transformers renders them.

Reads runtime/tests/fixtures/chat/templates.json (the templates, their special tokens, the
clock) and conversations/*.json (the variables: messages, tools, add_generation_prompt), renders
every pair
with transformers' own Jinja environment (`transformers.utils.chat_template_utils.
_compile_jinja_template`: ImmutableSandboxedEnvironment, trim_blocks, lstrip_blocks, loop
controls, raise_exception, strftime_now, tojson with ensure_ascii=False) and writes
`<template>.<conversation>.txt` beside the cases (or `<template>.<conversation>.error.txt` with
the exception message when the template raises). `strftime_now` reads `datetime.now()`; the
script pins that clock to templates.json's `time` so the outputs do not depend on the day.

The templates are the models' own: qwen2.5.jinja is `chat_template` of
Qwen/Qwen2.5-0.5B-Instruct's tokenizer_config.json (revision 7ae5576), llama-3.2.jinja is
meta-llama/Llama-3.2-3B-Instruct's (as llama.cpp keeps it in
models/templates/meta-llama-Llama-3.2-3B-Instruct.jinja), copied unchanged.

Usage (makes its own venv, no torch needed):
    python3 experiments/chat-template/render.py
"""
import json
import os
import subprocess
import sys
import venv

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
FIXTURES = os.path.join(ROOT, "runtime", "tests", "fixtures", "chat")
VENV = os.path.join(HERE, ".venv")


def ensure_venv():
    py = os.path.join(VENV, "bin", "python")
    if os.environ.get("CHAT_TEMPLATE_VENV") == "1":
        return
    if not os.path.exists(py):
        venv.create(VENV, with_pip=True)
        subprocess.check_call([py, "-m", "pip", "install", "-q", "transformers", "jinja2"])
    env = dict(os.environ, CHAT_TEMPLATE_VENV="1")
    sys.exit(subprocess.call([py, __file__] + sys.argv[1:], env=env))


def main():
    import datetime as dt

    import jinja2
    import transformers
    from transformers.utils import chat_template_utils as ctu

    with open(os.path.join(FIXTURES, "templates.json"), encoding="utf-8") as f:
        cases = json.load(f)
    conversations = {}
    conv_dir = os.path.join(FIXTURES, "conversations")
    for name in sorted(os.listdir(conv_dir)):
        if name.endswith(".json"):
            with open(os.path.join(conv_dir, name), encoding="utf-8") as f:
                conversations[name[: -len(".json")]] = json.load(f)
    fixed = dt.datetime.fromisoformat(cases["time"])

    class FixedClock(dt.datetime):
        @classmethod
        def now(cls, tz=None):
            return fixed

    # transformers' strftime_now calls `datetime.now()` of this module.
    ctu.datetime = FixedClock
    written = []
    for tname, t in cases["templates"].items():
        with open(os.path.join(FIXTURES, t["file"]), encoding="utf-8") as f:
            source = f.read()
        compiled = ctu._compile_jinja_template(source)
        for cname, conv in conversations.items():
            variables = dict(conv)
            variables["bos_token"] = t["bos_token"]
            variables["eos_token"] = t["eos_token"]
            base = os.path.join(FIXTURES, f"{tname}.{cname}")
            for stale in (base + ".txt", base + ".error.txt"):
                if os.path.exists(stale):
                    os.remove(stale)
            try:
                text = compiled.render(**variables)
                path = base + ".txt"
            except jinja2.exceptions.TemplateError as e:
                text = str(e)
                path = base + ".error.txt"
            with open(path, "w", encoding="utf-8", newline="") as f:
                f.write(text)
            written.append(os.path.relpath(path, ROOT))
    print(f"transformers {transformers.__version__}, jinja2 {jinja2.__version__}")
    for p in written:
        print(p)


if __name__ == "__main__":
    ensure_venv()
    main()
