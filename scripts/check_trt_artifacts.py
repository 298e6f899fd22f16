#!/usr/bin/env python3
"""Checks the project's TensorRT / ONNX Runtime artifacts against their real peers.

Run by scripts/check-trt-artifacts.sh, which builds the inputs; prints one JSON report and exits
1 on a mismatch (2 on bad arguments or a missing input).

1. INT8 tables: the ranges of our calibration.json written again by onnxruntime.quantization's
   write_calibration_table, compared value for value with our calibration.flatbuffers,
   calibration.cache and calibration.json, and read back the way ONNX Runtime's TensorRT
   execution provider reads them (ReadDynamicRange in
   onnxruntime/core/providers/tensorrt/tensorrt_execution_provider_utils.h).
2. Models (QDQ model, portable quantized exports): onnx.checker full check, strict shape
   inference, ONNX Runtime session creation with every graph optimization (its QDQ fusions)
   and one forward pass; every (domain, op_type, opset) with its attributes and input types
   looked up in the TensorRT ONNX parser's operator table (trt_operators.py).
3. Execution providers: the onnxruntime-gpu wheel's provider libraries (their DT_NEEDED
   libraries, whether they load), and what steper-run reports when asked for the CUDA and
   TensorRT providers with the CPU library and with the GPU wheel's library.
"""

import argparse
import ctypes
import json
import os
import re
import subprocess
import sys
import tempfile
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper, shape_inference
from onnxruntime.quantization.calibrate import TensorData
from onnxruntime.quantization.CalTableFlatBuffers.TrtTable import TrtTable
from onnxruntime.quantization.quant_utils import write_calibration_table

sys.path.insert(0, str(Path(__file__).resolve().parent))
from trt_operators import SOURCES, TABLES, lookup  # noqa: E402

# Relative difference allowed between the dynamic range ONNX Runtime's TensorRT provider reads
# from our native cache (f32 scale * 127, in f32) and the amax it came from: the scale is
# amax / 127 rounded to f32, so the product is within 2 ulp of amax.
CACHE_ROUNDTRIP_REL_TOL = 2.5e-7
# Tokens of the dummy prompt of the forward pass.
PROMPT_TOKENS = 4
# ONNX Runtime's fused forms of a DQ → MatMul pattern (its QDQ transformers' outputs).
FUSED_QUANT_OPS = {"QLinearMatMul", "MatMulInteger", "com.microsoft.MatMulIntegerToFloat",
                   "com.microsoft.MatMulNBits", "com.microsoft.DynamicQuantizeMatMul"}
# Seconds a steper-run provider probe may take.
PROBE_TIMEOUT_S = 300


def f32(x):
    return np.float32(x)


# ---------------------------------------------------------------- INT8 tables


def expected_ranges(calib_json):
    """name -> amax the tables must hold: collected ranges, smoothed ones replacing them."""
    amax = {t["name"]: f32(t["amax"]) for t in calib_json["tensors"]}
    for s in calib_json.get("smoothed_ranges") or []:
        amax[s["name"]] = f32(s["amax"])
    return amax


def read_flatbuffers(path):
    """(key, value text) in stored order, read by ONNX Runtime's own generated reader."""
    buf = path.read_bytes()
    t = TrtTable.GetRootAsTrtTable(buf, 0)
    out = []
    for i in range(t.DictLength()):
        kv = t.Dict(i)
        out.append((kv.Key().decode(), kv.Value().decode()))
    return out


def ort_ep_read_native_cache(text):
    """ONNX Runtime TensorRT EP's reading of a TensorRT cache: the header must contain `TRT-`;
    each line is split at its first ':' into name and hex scale; range = scale * 127 in f32."""
    lines = text.split("\n")
    if not lines or "TRT-" not in lines[0].split(":")[0]:
        raise ValueError("not a TensorRT generated calibration table")
    out = {}
    for line in lines[1:]:
        if not line:
            continue
        name, _, rest = line.partition(":")
        hexpart = rest.split(":")[0].strip()
        bits = int(hexpart, 16) if hexpart else 0
        scale = np.frombuffer(np.uint32(bits).tobytes(), dtype=np.float32)[0]
        out[name] = f32(scale * f32(127.0))
    return out


def check_table_dir(d, mismatches):
    calib = json.loads((d / "calibration.json").read_text())
    exp = expected_ranges(calib)
    ours_fb = read_flatbuffers(d / "calibration.flatbuffers")
    ours_cache_text = (d / "calibration.cache").read_text()
    header = ours_cache_text.split("\n", 1)[0]
    names = [k for k, _ in ours_fb]
    r = {"dir": str(d), "method": calib.get("method"), "cache_header": header,
         "smoothed": bool(calib.get("smoothing")), "tensors_in_json": len(calib["tensors"]),
         "tensors_in_tables": len(names)}

    def bad(what, detail):
        mismatches.append({"check": f"tables:{d.name}:{what}", "detail": detail})

    missing = [n for n in names if n not in exp]
    if missing:
        bad("names", f"table keys without a range in calibration.json: {missing[:5]}")
    r["left_out_of_tables"] = sorted(set(exp) - set(names))
    r["key_order_sorted"] = names == sorted(names)

    # The peer: the same ranges written by onnxruntime.quantization (symmetric, as TensorRT
    # reads one value per tensor and uses it as ±range).
    cache = {n: TensorData(lowest=np.array(-exp[n], dtype=np.float32),
                           highest=np.array(exp[n], dtype=np.float32)) for n in names if n in exp}
    with tempfile.TemporaryDirectory() as tmp:
        write_calibration_table(cache, dir=tmp)
        peer_dir = Path(tmp)
        peer_fb = read_flatbuffers(peer_dir / "calibration.flatbuffers")
        peer_fb_bytes = (peer_dir / "calibration.flatbuffers").read_bytes()
        peer_cache_text = (peer_dir / "calibration.cache").read_text()
        peer_json = json.loads((peer_dir / "calibration.json").read_text())

    # calibration.flatbuffers: parsed content (f32 of the value text, as std::stof reads it).
    pf = dict(peer_fb)
    of = dict(ours_fb)
    fb_diff = [n for n in names if n in pf and f32(float(of[n])) != f32(float(pf[n]))]
    if set(of) != set(pf):
        bad("flatbuffers:keys", f"ours {len(of)} keys, peer {len(pf)}")
    if fb_diff:
        bad("flatbuffers:values", f"{len(fb_diff)} values differ, e.g. {fb_diff[:3]}")
    ours_bytes = (d / "calibration.flatbuffers").read_bytes()
    text_same = sum(1 for n in names if n in pf and of[n] == pf[n])
    r["flatbuffers"] = {
        "keys_equal": set(of) == set(pf), "values_equal_as_f32": not fb_diff,
        "bytes_equal": ours_bytes == peer_fb_bytes,
        "value_text_identical": text_same, "value_text_differs": len(names) - text_same,
        "example": next(({"key": n, "ours": of[n], "peer": pf[n]} for n in names
                         if n in pf and of[n] != pf[n]), None),
        "peer_key_order": "reversed (descending)" if [k for k, _ in peer_fb] == sorted(pf, reverse=True)
        else ("sorted" if [k for k, _ in peer_fb] == sorted(pf) else "other"),
        "ours_key_order": "sorted" if r["key_order_sorted"] else "other",
    }

    # calibration.cache: ours is TensorRT's native cache, the peer's a plain `name value` list
    # (not a format TensorRT or the EP's native reader accepts). Compare what the EP reads.
    ep = ort_ep_read_native_cache(ours_cache_text)
    peer_lines = {}
    for line in peer_cache_text.splitlines():
        k, _, v = line.rpartition(" ")
        peer_lines[k] = f32(float(v))
    worst, inexact = 0.0, 0
    for n in names:
        if n not in ep or n not in peer_lines:
            continue
        a, b = ep[n], peer_lines[n]
        if a != b:
            inexact += 1
        if b > 0:
            worst = max(worst, abs(float(a) - float(b)) / float(b))
    if set(ep) != set(peer_lines):
        bad("cache:keys", f"EP reads {len(ep)} names from ours, peer lists {len(peer_lines)}"
            f" (a tensor name with ':' is cut there by the EP's reader)")
    if worst > CACHE_ROUNDTRIP_REL_TOL:
        bad("cache:values", f"largest relative difference {worst:.3g}")
    try:
        ort_ep_read_native_cache(peer_cache_text)
        peer_native = True
    except ValueError:
        peer_native = False
    r["cache"] = {
        "names_equal_as_read_by_ort_trt_ep": set(ep) == set(peer_lines),
        "ranges_bit_equal": len(names) - inexact, "ranges_within_tol": inexact,
        "max_rel_diff": worst, "tolerance": CACHE_ROUNDTRIP_REL_TOL,
        "peer_file_is_trt_native_cache": peer_native,
        "names_with_colon": [n for n in names if ":" in n],
    }

    # calibration.json: different schemas; compare highest / lowest with amax.
    json_diff = []
    for n in names:
        p = peer_json.get(n)
        if p is None:
            json_diff.append(n)
            continue
        hi = p["highest"]
        hi = hi["data"] if isinstance(hi, dict) else hi
        if f32(np.asarray(hi, dtype=np.float64).reshape(-1)[0]) != exp[n]:
            json_diff.append(n)
    if json_diff or set(peer_json) != set(names):
        bad("json", f"{len(json_diff)} ranges differ / missing, e.g. {json_diff[:3]}")
    r["json"] = {"peer_schema": "name -> TensorData dict (lowest, highest)",
                 "ours_schema": "steper-calibration v1: tensors[] with every method's amax",
                 "ranges_equal": not json_diff}

    # What ONNX Runtime's writer would store from raw (min, max) instead of ±amax: the larger
    # of the two, not max |x| (the TensorRT EP then uses it as ±range).
    raw = [t for t in calib["tensors"] if t["name"] in of]
    under = [t["name"] for t in raw if max(t["max"], t["min"]) < max(abs(t["min"]), abs(t["max"]))]
    r["peer_from_raw_min_max_would_underrange"] = len(under)
    return r


# ---------------------------------------------------------------- models


def type_name(elem):
    return {1: "FP32", 10: "FP16", 16: "BF16", 6: "INT32", 7: "INT64", 9: "BOOL", 3: "INT8",
            2: "UINT8", 22: "INT4", 21: "UINT4", 11: "DOUBLE"}.get(elem, helper.tensor_dtype_to_string(elem))


def constant_names(g):
    names = {i.name for i in g.initializer}
    names |= {o for n in g.node if n.op_type == "Constant" for o in n.output}
    return names


def const_value(g, name):
    for i in g.initializer:
        if i.name == name:
            return numpy_helper.to_array(i)
    for n in g.node:
        if n.op_type == "Constant" and n.output[0] == name:
            return numpy_helper.to_array(n.attribute[0].t)
    return None


def attr_summary(a):
    v = helper.get_attribute_value(a)
    if isinstance(v, bytes):
        return v.decode(errors="replace")
    if isinstance(v, (int, float)):
        return v
    if isinstance(v, list) and len(v) <= 8:
        return list(v)
    return type(v).__name__


def dummy_inputs(sess):
    feeds = {}
    for i in sess.get_inputs():
        shape = []
        for k, dim in enumerate(i.shape):
            if isinstance(dim, int):
                shape.append(dim)
            elif k == 0:
                shape.append(1)
            elif i.name in ("input_ids", "position_ids", "attention_mask"):
                shape.append(PROMPT_TOKENS)
            else:
                shape.append(0)
        if i.name == "position_ids":
            feeds[i.name] = np.arange(PROMPT_TOKENS, dtype=np.int64).reshape(shape)
        elif i.name == "attention_mask":
            feeds[i.name] = np.ones(shape, dtype=np.int64)
        elif i.name == "input_ids":
            feeds[i.name] = (np.arange(PROMPT_TOKENS, dtype=np.int64) + 1).reshape(shape)
        else:
            dt = np.float16 if "float16" in i.type else np.float32
            feeds[i.name] = np.zeros(shape, dtype=dt)
    return feeds


def check_model(path, kind, mismatches):
    r = {"path": str(path), "kind": kind}

    def bad(what, detail):
        mismatches.append({"check": f"model:{kind}:{what}", "detail": detail})

    m = onnx.load(str(path))
    r["ir_version"] = m.ir_version
    opsets = {o.domain or "ai.onnx": o.version for o in m.opset_import}
    r["opset_import"] = opsets
    try:
        onnx.checker.check_model(str(path), full_check=True)
        r["onnx_checker_full"] = "ok"
    except Exception as e:  # noqa: BLE001 - the peer's verdict is the result
        r["onnx_checker_full"] = f"error: {e}"
        bad("onnx.checker", str(e)[:300])
    try:
        inferred = shape_inference.infer_shapes(m, check_type=True, strict_mode=True, data_prop=True)
        r["shape_inference_strict"] = "ok"
    except Exception as e:  # noqa: BLE001
        inferred = m
        r["shape_inference_strict"] = f"error: {e}"
        bad("shape_inference", str(e)[:300])
    g = inferred.graph
    types = {}
    for vi in list(g.value_info) + list(g.input) + list(g.output):
        if vi.type.HasField("tensor_type"):
            types[vi.name] = vi.type.tensor_type.elem_type
    for i in g.initializer:
        types[i.name] = i.data_type
    for n in g.node:
        if n.op_type == "Constant":
            types[n.output[0]] = n.attribute[0].t.data_type
    untyped = [o for n in g.node for o in n.output if o and o not in types]
    r["outputs_without_inferred_type"] = len(untyped)

    # ONNX Runtime: session creation with every optimization (QDQ selectors and fusions), the
    # optimized graph's op counts, one forward pass; and with optimizations off.
    with tempfile.TemporaryDirectory() as tmp:
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.optimized_model_filepath = str(Path(tmp) / "opt.onnx")
        so.log_severity_level = 3
        try:
            sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
            opt = onnx.load(so.optimized_model_filepath)
            r["ort_session_all_optimizations"] = "ok"
            r["ort_optimized_ops"] = dict(Counter(
                f"{n.domain + '.' if n.domain else ''}{n.op_type}" for n in opt.graph.node))
            dq_out = {n.output[0] for n in m.graph.node if n.op_type == "DequantizeLinear"}
            r["ort_qdq_fusion"] = {
                "matmul_gemm_reading_a_dq": sum(
                    1 for n in m.graph.node
                    if n.op_type in ("MatMul", "Gemm") and any(i in dq_out for i in n.input)),
                "fused_quantized_matmuls": sum(
                    c for k, c in r["ort_optimized_ops"].items() if k in FUSED_QUANT_OPS),
            }
            out = sess.run(None, dummy_inputs(sess))
            logits = out[0]
            r["ort_forward"] = {"logits_shape": list(logits.shape),
                                "finite": bool(np.isfinite(logits).all())}
            if not np.isfinite(logits).all():
                bad("ort_forward", "non-finite logits")
        except Exception as e:  # noqa: BLE001
            r["ort_session_all_optimizations"] = f"error: {e}"
            bad("ort_session", str(e)[:300])
        so2 = ort.SessionOptions()
        so2.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        so2.log_severity_level = 3
        try:
            ort.InferenceSession(str(path), so2, providers=["CPUExecutionProvider"])
            r["ort_session_no_optimizations"] = "ok"
        except Exception as e:  # noqa: BLE001
            r["ort_session_no_optimizations"] = f"error: {e}"
            bad("ort_session_noopt", str(e)[:300])

    # Q/DQ conventions TensorRT needs: zero points 0 (symmetric), int8 / int4 storage.
    consts = constant_names(g)
    qdq = {"quantize": 0, "dequantize": 0, "nonzero_zero_points": 0, "block_size": set(),
           "axis": set(), "dq_types": set()}
    for n in g.node:
        if n.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        qdq["quantize" if n.op_type == "QuantizeLinear" else "dequantize"] += 1
        if len(n.input) > 2 and n.input[2]:
            zp = const_value(g, n.input[2])
            if zp is None or np.any(zp.astype(np.int64) != 0):
                qdq["nonzero_zero_points"] += 1
        for a in n.attribute:
            if a.name == "block_size":
                qdq["block_size"].add(a.i)
            if a.name == "axis":
                qdq["axis"].add(a.i)
        if n.op_type == "DequantizeLinear":
            qdq["dq_types"].add(type_name(types.get(n.input[0], 0)))
    consumers = Counter(i for n in g.node for i in n.input)
    dq_outputs = [n.output[0] for n in g.node if n.op_type == "DequantizeLinear"]
    # ONNX Runtime's QDQ selectors fuse a DQ only into its single consumer.
    qdq["dq_with_several_consumers"] = sum(1 for o in dq_outputs if consumers[o] > 1)
    qdq = {k: sorted(v) if isinstance(v, set) else v for k, v in qdq.items()}
    r["qdq"] = qdq

    # Every op against the TensorRT parser's tables.
    ops = defaultdict(lambda: {"count": 0, "attributes": {}, "input_types": set(),
                               "nonconstant_axes_inputs": 0})
    for n in g.node:
        dom = n.domain or "ai.onnx"
        key = (dom, n.op_type, opsets.get(dom))
        e = ops[key]
        e["count"] += 1
        for a in n.attribute:
            e["attributes"].setdefault(a.name, attr_summary(a))
        idx = [1] if n.op_type == "Where" else [0]
        for i in idx:
            if i < len(n.input) and n.input[i] in types:
                e["input_types"].add(type_name(types[n.input[i]]))
        if n.op_type == "Cast":
            e["input_types"].add("to:" + type_name(helper.get_attribute_value(n.attribute[0])))
        axes_input = {"Slice": 3, "Squeeze": 1, "Unsqueeze": 1, "ReduceMean": 1, "ReduceSum": 1}
        j = axes_input.get(n.op_type)
        if j is not None and j < len(n.input) and n.input[j] and n.input[j] not in consts:
            e["nonconstant_axes_inputs"] += 1
    op_rows = []
    for (dom, op, ver), e in sorted(ops.items()):
        row = {"domain": dom, "op_type": op, "opset": ver, "count": e["count"],
               "attributes": e["attributes"], "input_types": sorted(e["input_types"]),
               "trt": {}}
        for tv in TABLES:
            row["trt"][tv] = lookup(tv, dom, op, ver, e, qdq)
        op_rows.append(row)
    r["ops"] = op_rows
    r["trt_summary"] = {
        tv: {"unsupported": [f"{x['domain']}.{x['op_type']}" for x in op_rows
                             if x["trt"][tv]["status"] == "unsupported"],
             "restricted": [f"{x['op_type']}: {'; '.join(x['trt'][tv]['notes'])}" for x in op_rows
                            if x["trt"][tv]["status"] == "restricted"],
             "opset_in_range": SOURCES[tv]["opset_min"] <= opsets.get("ai.onnx", 0)
             <= SOURCES[tv]["opset_max"]}
        for tv in TABLES}
    return r


# ---------------------------------------------------------------- providers


def needed_libs(lib):
    out = subprocess.run(["readelf", "-d", str(lib)], capture_output=True, text=True).stdout
    needed = [line.split("[")[1].rstrip("]") for line in out.splitlines() if "(NEEDED)" in line]
    ldd = subprocess.run(["ldd", str(lib)], capture_output=True, text=True).stdout
    missing = sorted({line.split("=>")[0].strip() for line in ldd.splitlines() if "not found" in line})
    try:
        ctypes.CDLL(str(lib))
        load = "ok"
    except OSError as e:
        load = f"error: {e}"
    return {"needed": needed, "not_found_here": missing, "dlopen": load}


def probe(steper_run, lib, provider, fixture, extra):
    env = dict(os.environ, ORT_DYLIB_PATH=str(lib), RUST_BACKTRACE="0")
    cmd = [str(steper_run), "ask", "--model", str(fixture / "export"), "--index",
           str(fixture / "index"), "--provider", provider, *extra, "Who wrote it?"]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=PROBE_TIMEOUT_S)
    err = p.stderr.strip()
    return {"provider": provider, "args": extra, "library": str(lib), "exit_code": p.returncode,
            "panicked": "panicked" in err or p.returncode == 101,
            "stderr_tail": err[-600:]}


def option_keys_we_set(root):
    """Provider option keys our runtime's `dispatch` sets, through the `ort` crate's builder
    methods (each method maps to one ONNX Runtime key in ort's src/ep/{cuda,tensorrt}.rs)."""
    meta = json.loads(subprocess.run(
        ["cargo", "metadata", "--format-version", "1", "--offline"], cwd=root,
        capture_output=True, text=True, check=True).stdout)
    pkg = next(p for p in meta["packages"] if p["name"] == "ort")
    ep_dir = Path(pkg["manifest_path"]).parent / "src" / "ep"
    src = (Path(root) / "runtime/src/backend/ort/pool.rs").read_text()
    body = src[src.index("fn dispatch("):]
    body = body[:body.index("\n}\n")]
    out = {"ort_crate": f"{pkg['name']} {pkg['version']}"}
    for ep, file, start in (("cuda", "cuda.rs", "ep::CUDA"), ("tensorrt", "tensorrt.rs", "ep::TensorRT")):
        mapping = dict(re.findall(r'pub fn (with_\w+)\([^)]*\)\s*->\s*Self\s*=\s*"(\w+)"',
                                  (ep_dir / file).read_text()))
        seg = body[body.index(start):]
        nxt = [seg.find(x, 1) for x in ("ep::CUDA", "ep::TensorRT", "ExecutionProvider::")]
        nxt = [x for x in nxt if x > 0]
        seg = seg[:min(nxt)] if nxt else seg
        methods = sorted(set(re.findall(r"\.(with_\w+)\(", seg)))
        out[ep] = {m: mapping.get(m) for m in methods}
    return out


def check_providers(a, calib_dir, mismatches):
    capi = Path(a.ort_gpu_capi)
    r = {"wheel": a.ort_gpu_wheel, "libraries": {}}
    for name in ("libonnxruntime.so.1.31.1", "libonnxruntime_providers_shared.so",
                 "libonnxruntime_providers_cuda.so", "libonnxruntime_providers_tensorrt.so"):
        r["libraries"][name] = needed_libs(capi / name)
    # Every option key we set is one the provider library knows (its parser's key strings).
    keys = option_keys_we_set(Path(__file__).resolve().parent.parent)
    r["option_keys"] = {"ort_crate": keys["ort_crate"]}
    for ep, lib in (("cuda", "libonnxruntime_providers_cuda.so"),
                    ("tensorrt", "libonnxruntime_providers_tensorrt.so")):
        strings = set(subprocess.run(["strings", "-n", "6", str(capi / lib)], capture_output=True,
                                     text=True).stdout.split("\n"))
        rows = {m: {"key": k, "known_to_provider": k in strings} for m, k in keys[ep].items()}
        r["option_keys"][ep] = rows
        unknown = [f"{m}={v['key']}" for m, v in rows.items() if not v["known_to_provider"]]
        if unknown:
            mismatches.append({"check": f"provider:{ep}:option_keys",
                               "detail": f"keys not in {lib}: {unknown}"})
    gpu_lib = capi / "libonnxruntime.so.1.31.1"
    fixture = Path(a.fixture)
    table = calib_dir / "calibration.flatbuffers"
    trt = ["--trt-int8", "--trt-calibration-table", str(table)]
    probes = []
    for lib_kind, lib in (("cpu", Path(a.cpu_ort_lib)), ("gpu_wheel", gpu_lib)):
        for prov, extra in (("cuda", []), ("tensorrt", trt), ("tensorrt", trt + ["--allow-fallback"])):
            p = probe(a.steper_run, lib, prov, fixture, extra)
            p["library_kind"] = lib_kind
            probes.append(p)
    p = probe(a.steper_run, gpu_lib, "cpu", fixture, [])
    p["library_kind"] = "gpu_wheel"
    probes.append(p)
    for p in probes:
        if p["panicked"]:
            mismatches.append({"check": f"provider:{p['library_kind']}:{p['provider']}",
                               "detail": "steper-run panicked: " + p["stderr_tail"][-200:]})
        fallback = "--allow-fallback" in p["args"] or p["provider"] == "cpu"
        if fallback and p["exit_code"] != 0:
            mismatches.append({"check": f"provider:{p['library_kind']}:{p['provider']}:fallback",
                               "detail": "expected an answer on the CPU provider: " + p["stderr_tail"][-200:]})
        if not fallback and p["exit_code"] == 0:
            mismatches.append({"check": f"provider:{p['library_kind']}:{p['provider']}",
                               "detail": "registration succeeded on a machine without a GPU"})
        if not fallback and p["provider"] not in p["stderr_tail"].lower() \
                and "Execution" not in p["stderr_tail"]:
            mismatches.append({"check": f"provider:{p['library_kind']}:{p['provider']}:message",
                               "detail": "the error does not name the provider"})
    r["probes"] = probes
    return r


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--calib", action="append", required=True, help="steper-calibrate --out dir")
    ap.add_argument("--model", action="append", default=[], help="KIND=PATH of an ONNX model")
    ap.add_argument("--ort-gpu-capi", help="onnxruntime/capi of the unpacked onnxruntime-gpu wheel")
    ap.add_argument("--ort-gpu-wheel", help="the wheel's file name (reported)")
    ap.add_argument("--cpu-ort-lib", help="the CPU libonnxruntime.so of scripts/install-ort.sh")
    ap.add_argument("--steper-run", help="steper-run binary")
    ap.add_argument("--fixture", help="the tiny fixture directory")
    a = ap.parse_args()
    inputs = [Path(d) / f for d in a.calib
              for f in ("calibration.json", "calibration.flatbuffers", "calibration.cache")]
    inputs += [Path(spec.partition("=")[2]) for spec in a.model]
    if a.ort_gpu_capi:
        if not (a.cpu_ort_lib and a.steper_run and a.fixture):
            ap.error("--ort-gpu-capi needs --cpu-ort-lib, --steper-run and --fixture")
        inputs += [Path(a.ort_gpu_capi), Path(a.cpu_ort_lib), Path(a.steper_run),
                   Path(a.fixture) / "export", Path(a.fixture) / "index"]
    missing = [str(p) for p in inputs if not p.exists()]
    if missing:
        print(f"check_trt_artifacts.py: missing input(s): {', '.join(missing)}", file=sys.stderr)
        return 2
    mismatches = []
    report = {"format": "steper-trt-artifacts-check", "version": 1,
              "peers": {"onnxruntime": ort.__version__, "onnx": onnx.__version__,
                        "numpy": np.__version__},
              "trt_operator_tables": SOURCES}
    report["tables"] = [check_table_dir(Path(d), mismatches) for d in a.calib]
    models = []
    for spec in a.model:
        kind, _, path = spec.partition("=")
        models.append(check_model(Path(path), kind, mismatches))
    report["models"] = models
    if a.ort_gpu_capi:
        report["providers"] = check_providers(a, Path(a.calib[0]), mismatches)
    report["mismatches"] = mismatches
    report["ok"] = not mismatches
    print(json.dumps(report, indent=1, default=str))
    return 0 if not mismatches else 1


if __name__ == "__main__":
    sys.exit(main())
