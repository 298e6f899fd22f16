# One MatMul [M, K] x [K, N] on ONNX Runtime CPU in five forms (fp32 MatMul, DynamicQuantizeMatMul
# with per-column int8 weights, MatMulNBits int8 / int4 at accuracy_level 4, int4 at level 1),
# 2 threads, median of 7 after warm-up: GFLOP/s and the error against the float product.
#   python gemm.py M K N
import numpy as np, onnx, onnxruntime as ort, time, sys
from onnx import helper as h, TensorProto as T, numpy_helper as nh
M, K, N = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
rng = np.random.default_rng(0)
W = rng.standard_normal((K, N)).astype(np.float32) * 0.05
A = rng.standard_normal((M, K)).astype(np.float32)
def model(nodes, inits, ms=True):
    g = h.make_graph(nodes, "g", [h.make_tensor_value_info("A", T.FLOAT, [None, K])],
                     [h.make_tensor_value_info("Y", T.FLOAT, [None, N])], inits)
    ops = [h.make_opsetid("", 17), h.make_opsetid("com.microsoft", 1)]
    return h.make_model(g, opset_imports=ops, ir_version=8).SerializeToString()
models = {}
models["fp32 MatMul"] = model([h.make_node("MatMul", ["A", "W"], ["Y"])], [nh.from_array(W, "W")])
# per-column symmetric int8
s = np.abs(W).max(axis=0) / 127.0
Wq = np.clip(np.round(W / s), -127, 127).astype(np.int8)
models["DynamicQuantizeMatMul int8 per-col"] = model([h.make_node("DynamicQuantizeMatMul", ["A", "Wq", "s", "zp"], ["Y"], domain="com.microsoft")],
    [nh.from_array(Wq, "Wq"), nh.from_array(s.astype(np.float32), "s"), nh.from_array(np.zeros(N, np.int8), "zp")])
def nbits(bits, bs=32, level=4):
    # MatMulNBits: B [N, K/bs, bs*bits/8] uint8, scales [N*K/bs]
    Wt = W.T.reshape(N, K // bs, bs)
    qmax = 2 ** (bits - 1) - 1
    sc = np.abs(Wt).max(axis=2, keepdims=True) / qmax
    q = np.clip(np.round(Wt / sc), -qmax - 1, qmax).astype(np.int32) + 2 ** (bits - 1)
    q = q.astype(np.uint8)
    if bits == 4:
        q = (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)
    return model([h.make_node("MatMulNBits", ["A", "B", "S"], ["Y"], domain="com.microsoft", K=K, N=N, bits=bits, block_size=bs, accuracy_level=level)],
                 [nh.from_array(q, "B"), nh.from_array(sc.reshape(-1).astype(np.float32), "S")])
models["MatMulNBits int8 acc4"] = nbits(8)
models["MatMulNBits int4 acc4"] = nbits(4)
models["MatMulNBits int4 acc1(fp32)"] = nbits(4, level=1)
so = ort.SessionOptions(); so.intra_op_num_threads = 2
ref = A @ W
for name, m in models.items():
    sess = ort.InferenceSession(m, so, providers=["CPUExecutionProvider"])
    y = sess.run(None, {"A": A})[0]
    for _ in range(2): sess.run(None, {"A": A})
    ts = []
    for _ in range(7):
        t = time.perf_counter(); sess.run(None, {"A": A}); ts.append(time.perf_counter() - t)
    t = sorted(ts)[3]
    err = np.abs(y - ref).max() / np.abs(ref).max()
    print(f"{name:40s} {t*1e3:8.2f} ms  {2*M*K*N/t/1e9:7.1f} GFLOP/s  rel err {err:.4f}")
