# Rewrites an int8 `steper-export --quantize int8` graph (MatMulNBits, bits 8) so that its
# linear layers run as com.microsoft.DynamicQuantizeMatMul: the block-dequantized weight is
# re-quantized per output column (symmetric int8) and the activations are quantized per call
# (per tensor, dynamic) by ONNX Runtime: the MLAS u8s8 GEMM instead of the n-bit kernel.
#   python convert.py SRC.onnx DST.onnx [SKIP,...]   (SKIP: weight-name parts kept as MatMulNBits)
import sys, numpy as np, onnx
from onnx import helper as h, numpy_helper as nh
src, dst = sys.argv[1], sys.argv[2]
SKIP = [s for s in sys.argv[3].split(",") if s] if len(sys.argv) > 3 else []
m = onnx.load(src)
g = m.graph
inits = {t.name: t for t in g.initializer}
new_nodes, drop = [], set()
for n in g.node:
    if n.op_type != "MatMulNBits" or any(s in n.input[1] for s in SKIP):
        new_nodes.append(n); continue
    a = {x.name: h.get_attribute_value(x) for x in n.attribute}
    K, N, bits, bs = a["K"], a["N"], a["bits"], a["block_size"]
    assert bits == 8
    B = nh.to_array(inits[n.input[1]]).astype(np.int32) - 128   # [N, nb, bs]
    S = nh.to_array(inits[n.input[2]]).reshape(N, K // bs, 1)
    W = (B * S).reshape(N, K)                                     # dequantized [N, K]
    s = np.abs(W).max(axis=1) / 127.0
    s[s == 0] = 1.0
    Wq = np.clip(np.round(W / s[:, None]), -127, 127).astype(np.int8).T.copy()  # [K, N]
    base = n.input[1].removesuffix(".MatMulNBits.B")
    g.initializer.extend([nh.from_array(Wq, base + ".dq.W"), nh.from_array(s.astype(np.float32), base + ".dq.s"),
                          nh.from_array(np.zeros(N, np.int8), base + ".dq.zp")])
    drop.update(n.input[1:3])
    new_nodes.append(h.make_node("DynamicQuantizeMatMul", [n.input[0], base + ".dq.W", base + ".dq.s", base + ".dq.zp"],
                                 list(n.output), name=n.name + "_dq", domain="com.microsoft"))
del g.node[:]
g.node.extend(new_nodes)
keep = [t for t in g.initializer if t.name not in drop]
del g.initializer[:]
g.initializer.extend(keep)
onnx.save(m, dst)
print("converted", sum(1 for n in new_nodes if n.op_type == "DynamicQuantizeMatMul"))
