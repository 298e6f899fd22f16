"""The TensorRT ONNX parser's operator support, for the operators a STEPER export can contain.

Transcribed (support flag, supported types, restriction) from onnx/onnx-tensorrt docs/operators.md
in two versions, named in SOURCES; only the rows of operators our exports use or may use are
kept. An operator not listed here is reported as `not_in_table` (check it against the source).
"""

ARITH = ["FP32", "FP16", "BF16", "INT32", "INT64"]
FLOAT = ["FP32", "FP16", "BF16"]
ALL = ARITH + ["BOOL"]

SOURCES = {
    "10.1": {
        "repository": "onnx/onnx-tensorrt",
        "path": "docs/operators.md",
        "commit": "96e781103cfc4adf4a6bb557e94bac8e693f6f4c",
        "ref": "branch 10.1-GA (ONNX-TensorRT 10.1 GA release, 2024-06-17)",
        "header": "TensorRT 10.0 supports operators in the inclusive range of opset 9 to opset 20",
        "opset_min": 9,
        "opset_max": 20,
    },
    "10.15": {
        "repository": "onnx/onnx-tensorrt",
        "path": "docs/operators.md",
        "commit": None,
        "ref": "the TensorRT 10.15 text of the file (docs/Changelog.md: 10.15 GA release, 2026-02-02);"
        " read from a public-code index that does not name its commit",
        "header": "TensorRT 10.15 supports operators in the inclusive range of opset 9 to opset 24",
        "opset_min": 9,
        "opset_max": 24,
    },
    "11.x": None,
}
# No docs/operators.md for TensorRT 11 was found in onnx/onnx-tensorrt (the newest text found is
# 10.15); TensorRT 11 is checked through its migration guide instead (see the results document).
del SOURCES["11.x"]

_COMMON = {
    "Add": ("Y", ARITH, None),
    "And": ("Y", ["BOOL"], None),
    "Cast": ("Y", ARITH + ["UINT8", "BOOL"], None),
    "Concat": ("Y", ALL, None),
    "Div": ("Y", ARITH, None),
    "Equal": ("Y", ARITH, None),
    "Erf": ("Y", FLOAT, None),
    "Exp": ("Y", FLOAT, None),
    "Expand": ("Y", ALL, None),
    "Gather": ("Y", ALL, None),
    "Gemm": ("Y", FLOAT, None),
    "Greater": ("Y", ARITH, None),
    "Identity": ("Y", ALL, None),
    "Less": ("Y", ARITH, None),
    "LessOrEqual": ("Y", ARITH, None),
    "Log": ("Y", FLOAT, None),
    "MatMul": ("Y", FLOAT, None),
    "Max": ("Y", ARITH, None),
    "Min": ("Y", ARITH, None),
    "Mul": ("Y", ARITH, None),
    "Neg": ("Y", ARITH, None),
    "Not": ("Y", ["BOOL"], None),
    "QuantizeLinear": ("Y", FLOAT, "`y_zero_point` must be 0"),
    "Range": ("Y", ARITH, None),
    "ReduceMax": ("Y", ARITH, "`axes` must be an initializer"),
    "ReduceMean": ("Y", ARITH, "`axes` must be an initializer"),
    "ReduceSum": ("Y", ARITH, "`axes` must be an initializer"),
    "Reshape": ("Y", ALL, None),
    "Shape": ("Y", ALL, None),
    "Sigmoid": ("Y", FLOAT, None),
    "Softmax": ("Y", FLOAT, None),
    "Split": ("Y", ALL, None),
    "Sqrt": ("Y", FLOAT, None),
    "Sub": ("Y", ARITH, None),
    "Tile": ("Y", ALL, None),
    "Transpose": ("Y", ALL, None),
    "Trilu": ("Y", ALL, None),
    "Where": ("Y", ALL, None),
    "DynamicQuantizeLinear": ("N", [], None),
    "MatMulInteger": ("N", [], None),
    "QLinearMatMul": ("N", [], None),
}

TABLES = {
    "10.1": dict(
        _COMMON,
        Constant=("Y", ALL, "`sparse_value`, `value_string`, `value_strings` unsupported"),
        ConstantOfShape=("Y", ALL, None),
        CumSum=("Y", FLOAT, "`axis` must be an initializer"),
        DequantizeLinear=("Y", ["INT8", "FP8", "INT4"], "`x_zero_point` must be zero"),
        Pow=("Y", FLOAT, None),
        Slice=("Y", ALL, "`axes` must be an initializer"),
        Squeeze=("Y", ALL, "`axes` must be an initializer"),
        Unsqueeze=("Y", ALL, "`axes` must be a constant tensor"),
        ScatterND=("Y", ARITH, "`reduction` is not supported"),
    ),
    "10.15": dict(
        _COMMON,
        Constant=("Y", ALL + ["FP8", "FP4", "INT4"],
                  "`sparse_value`, `value_string`, `value_strings` unsupported"),
        ConstantOfShape=("Y", ALL + ["FP8", "FP4", "INT4"], None),
        CumSum=("Y", FLOAT, "`axis` must be a build-time constant"),
        DequantizeLinear=("Y", ["INT8", "FP8", "FP4", "INT4"], "`x_zero_point` must be zero"),
        Pow=("Y", ARITH, None),
        Slice=("Y", ALL, None),
        Squeeze=("Y", ALL, "`axes` must be resolvable to a constant"),
        Unsqueeze=("Y", ALL, "`axes` must be resolvable to a constant"),
        ScatterND=("Y", ARITH, "`reduction` other than `none` is not supported"),
        RMSNormalization=("Y", FLOAT, None),
        RotaryEmbedding=("Y", FLOAT, "`position_ids` must be INT64"),
        LayerNormalization=("Y", FLOAT, "only the first output `Y` is supported"),
    ),
}

# Inputs whose type is not the operator's data type (indices, shapes, scales): not checked.
_INDEX_TYPES = {"INT64", "INT32"}


def lookup(version, domain, op, opset, seen, qdq):
    """Support of `op` in `version`'s table for what the graph does with it: status
    `supported`, `restricted` (a restriction or a type the table does not list applies),
    `unsupported` (N, or a non-standard domain) or `not_in_table`."""
    out = {"status": "supported", "types": [], "restriction": None, "notes": []}
    if domain != "ai.onnx":
        out["status"] = "unsupported"
        out["notes"].append(f"domain {domain}: not an ONNX operator; the parser has no importer")
        return out
    row = TABLES[version].get(op)
    if row is None:
        out["status"] = "not_in_table"
        return out
    flag, types, restriction = row
    out["types"], out["restriction"] = types, restriction
    if flag != "Y":
        out["status"] = "unsupported"
        return out
    for t in seen["input_types"]:
        t = t.removeprefix("to:")
        if t not in types and not (op in ("Cast",) and t in _INDEX_TYPES):
            out["status"] = "restricted"
            out["notes"].append(f"type {t} not listed")
    if restriction and "axes" in restriction:
        if seen["nonconstant_axes_inputs"]:
            out["status"] = "restricted"
            out["notes"].append(f"{seen['nonconstant_axes_inputs']} node(s) with computed axes")
        else:
            out["notes"].append("axes constant: restriction met")
    if op in ("QuantizeLinear", "DequantizeLinear"):
        if qdq["nonzero_zero_points"]:
            out["status"] = "restricted"
            out["notes"].append(f"{qdq['nonzero_zero_points']} non-zero zero points")
        else:
            out["notes"].append("zero points all 0: restriction met")
    if op == "DequantizeLinear" and qdq["block_size"]:
        if "INT8" in qdq["dq_types"]:
            out["status"] = "restricted"
            out["notes"].append(
                f"blocked INT8 dequantization (block_size {qdq['block_size']}): the table states no "
                "limit; TensorRT's current Quantize/Dequantize layer reference lists block "
                "quantization for INT4, FP4, FP8 and INT8, earlier 10.x guides for INT4 weights "
                "only: unverified without TensorRT")
        else:
            out["notes"].append(f"blocked INT4 weights (block_size {qdq['block_size']}): weight-only INT4")
    return out
