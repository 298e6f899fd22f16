//! The ONNX side of calibration: finding the quantizable MatMul / Gemm nodes, exposing their
//! tensors as extra outputs for range collection, rewriting the graph into QDQ form and
//! validating a QDQ graph.
//!
//! The QDQ form (what TensorRT 10 and ONNX Runtime's QDQ fusions expect): for every linear
//! layer, the activation input goes through `QuantizeLinear → DequantizeLinear` (per tensor,
//! symmetric int8, zero point 0, scale `amax / 127`) and the weight is stored as an int8
//! initializer (per output channel, `axis` attribute) read through `DequantizeLinear`. Everything
//! else — RMSNorm, RoPE, softmax and the attention score/value products, residual adds — stays
//! in float; the `lm_head` product is quantized only when asked.

use std::collections::{HashMap, HashSet};
use std::path::Path;

use prost::Message;
use tract_onnx::pb::{
    attribute_proto::AttributeType, tensor_proto::DataLocation, tensor_proto::DataType, type_proto,
    AttributeProto, ModelProto, NodeProto, TensorProto, TypeProto, ValueInfoProto,
};

use crate::{Error, Result};

/// Lowest opset with per-axis `DequantizeLinear`.
pub const MIN_QDQ_OPSET: i64 = 13;
/// Largest int8 magnitude used (symmetric: −127..=127).
pub const INT8_MAX: f32 = 127.0;

/// A linear layer to quantize: a MatMul / Gemm whose second input is a 2-D float initializer.
#[derive(Debug, Clone, PartialEq)]
pub struct Target {
    /// Node name (or `#index` when unnamed).
    pub node: String,
    /// `MatMul` or `Gemm`.
    pub op: String,
    /// The activation input (input 0).
    pub activation: String,
    /// The weight initializer (input 1).
    pub weight: String,
    /// The output tensor.
    pub output: String,
    /// Axis of the weight that indexes output channels.
    pub axis: usize,
    /// Output channels.
    pub out_channels: usize,
    /// Whether this is the vocabulary projection (output channels = vocab size).
    pub lm_head: bool,
}

/// Reads `model.onnx`, pulling external weights (if any) into the initializers.
pub fn load_onnx(path: &Path) -> Result<ModelProto> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let mut model = ModelProto::decode(bytes.as_slice()).map_err(|e| Error::Model {
        path: path.to_path_buf(),
        message: format!("not an ONNX model: {e}"),
    })?;
    let dir = path.parent().unwrap_or(Path::new("."));
    let graph = model.graph.as_mut().ok_or_else(|| Error::Model {
        path: path.to_path_buf(),
        message: "the model has no graph".into(),
    })?;
    let mut files: HashMap<String, Vec<u8>> = HashMap::new();
    for t in graph.initializer.iter_mut() {
        if t.data_location != Some(DataLocation::External as i32) {
            continue;
        }
        let get = |k: &str| {
            t.external_data
                .iter()
                .find(|e| e.key == k)
                .map(|e| e.value.clone())
        };
        let loc = get("location").ok_or_else(|| Error::Model {
            path: path.to_path_buf(),
            message: format!("initializer `{}`: external data without a location", t.name),
        })?;
        let offset: usize = get("offset").and_then(|v| v.parse().ok()).unwrap_or(0);
        let length: Option<usize> = get("length").and_then(|v| v.parse().ok());
        if !files.contains_key(&loc) {
            let p = dir.join(&loc);
            files.insert(
                loc.clone(),
                std::fs::read(&p).map_err(|e| Error::io(&p, e))?,
            );
        }
        let data = &files[&loc];
        let end = length.map(|l| offset + l).unwrap_or(data.len());
        if end > data.len() || offset > end {
            return Err(Error::Model {
                path: dir.join(&loc),
                message: format!(
                    "initializer `{}`: bytes {offset}..{end} beyond the file's {}",
                    t.name,
                    data.len()
                ),
            });
        }
        t.raw_data = data[offset..end].to_vec();
        t.data_location = Some(DataLocation::Default as i32);
        t.external_data.clear();
    }
    Ok(model)
}

/// The graph of `m` (an error naming `path` when there is none) and its initializers by name.
pub(crate) fn graph_and_index<'a>(
    m: &'a mut ModelProto,
    path: &Path,
) -> Result<(&'a mut tract_onnx::pb::GraphProto, HashMap<String, usize>)> {
    let g = m.graph.as_mut().ok_or_else(|| Error::Model {
        path: path.to_path_buf(),
        message: "the model has no graph".into(),
    })?;
    let index = g
        .initializer
        .iter()
        .enumerate()
        .map(|(i, t)| (t.name.clone(), i))
        .collect();
    Ok((g, index))
}

fn attr<'a>(n: &'a NodeProto, name: &str) -> Option<&'a AttributeProto> {
    n.attribute.iter().find(|a| a.name == name)
}

pub(crate) fn node_label(n: &NodeProto, i: usize) -> String {
    if n.name.is_empty() {
        format!("#{i}")
    } else {
        n.name.clone()
    }
}

/// f32 values of a float initializer (raw or `float_data`).
pub fn tensor_f32(t: &TensorProto) -> Result<Vec<f32>> {
    if t.data_type != DataType::Float as i32 {
        return Err(Error::Unsupported(format!(
            "initializer `{}` has element type {} (only f32 exports are calibrated: use the fp32 export)",
            t.name, t.data_type
        )));
    }
    let n: usize = t.dims.iter().map(|&d| d.max(0) as usize).product();
    let v: Vec<f32> = if !t.raw_data.is_empty() {
        t.raw_data
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect()
    } else {
        t.float_data.clone()
    };
    if v.len() != n {
        return Err(Error::Unsupported(format!(
            "initializer `{}` holds {} values for dims {:?}",
            t.name,
            v.len(),
            t.dims
        )));
    }
    Ok(v)
}

/// The linear layers of `model` (MatMul / Gemm with a 2-D float initializer as second input).
/// `vocab_size` marks the `lm_head`. A model with none is an error naming `path`.
pub fn targets(model: &ModelProto, vocab_size: usize, path: &Path) -> Result<Vec<Target>> {
    let graph = model.graph.as_ref().ok_or_else(|| Error::Model {
        path: path.to_path_buf(),
        message: "the model has no graph".into(),
    })?;
    let inits: HashMap<&str, &TensorProto> = graph
        .initializer
        .iter()
        .map(|t| (t.name.as_str(), t))
        .collect();
    let mut out = Vec::new();
    for (i, n) in graph.node.iter().enumerate() {
        if !n.domain.is_empty() || (n.op_type != "MatMul" && n.op_type != "Gemm") {
            continue;
        }
        let (Some(a), Some(w)) = (n.input.first(), n.input.get(1)) else {
            continue;
        };
        let Some(t) = inits.get(w.as_str()) else {
            continue;
        };
        if t.dims.len() != 2 || t.data_type != DataType::Float as i32 {
            continue;
        }
        let axis = if n.op_type == "Gemm" {
            let trans_a = attr(n, "transA").map(|a| a.i).unwrap_or(0);
            let alpha = attr(n, "alpha").map(|a| a.f).unwrap_or(1.0);
            if trans_a != 0 || alpha != 1.0 {
                continue;
            }
            if attr(n, "transB").map(|a| a.i).unwrap_or(0) != 0 {
                0
            } else {
                1
            }
        } else {
            1
        };
        let out_channels = t.dims[axis] as usize;
        out.push(Target {
            node: node_label(n, i),
            op: n.op_type.clone(),
            activation: a.clone(),
            weight: w.clone(),
            output: n.output.first().cloned().unwrap_or_default(),
            axis,
            out_channels,
            lm_head: out_channels == vocab_size,
        });
    }
    if out.is_empty() {
        return Err(Error::NoQuantizable {
            path: path.to_path_buf(),
        });
    }
    Ok(out)
}

/// Every tensor a MatMul / Gemm reads (initializers excluded) or writes, each once, in graph
/// order: the tensors whose ranges calibration collects.
pub fn calibration_tensors(model: &ModelProto) -> Vec<String> {
    let Some(graph) = model.graph.as_ref() else {
        return Vec::new();
    };
    let inits: HashSet<&str> = graph.initializer.iter().map(|t| t.name.as_str()).collect();
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    for n in &graph.node {
        if !n.domain.is_empty() || (n.op_type != "MatMul" && n.op_type != "Gemm") {
            continue;
        }
        for t in n.input.iter().take(2).chain(n.output.iter().take(1)) {
            if !t.is_empty() && !inits.contains(t.as_str()) && seen.insert(t.clone()) {
                out.push(t.clone());
            }
        }
    }
    out
}

fn float_output(name: &str) -> ValueInfoProto {
    ValueInfoProto {
        name: name.into(),
        r#type: Some(TypeProto {
            denotation: String::new(),
            value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                elem_type: DataType::Float as i32,
                shape: None,
            })),
        }),
        doc_string: String::new(),
    }
}

/// A copy of `model` with `tensors` added as graph outputs (those that are not outputs yet).
pub fn augment(model: &ModelProto, tensors: &[String]) -> ModelProto {
    let mut m = model.clone();
    if let Some(g) = m.graph.as_mut() {
        let have: HashSet<String> = g.output.iter().map(|o| o.name.clone()).collect();
        for t in tensors {
            if !have.contains(t) {
                g.output.push(float_output(t));
            }
        }
    }
    m
}

/// Options of [`quantize_qdq`].
#[derive(Debug, Clone, Default)]
pub struct QdqOptions {
    /// Quantize the vocabulary projection too (kept float by default: it sets every logit).
    pub quantize_lm_head: bool,
    /// Layers kept in float: those whose node or weight name contains one of these.
    pub keep_float: Vec<String>,
}

impl QdqOptions {
    /// Whether `t` is quantized under these options.
    pub fn quantizes(&self, t: &Target) -> bool {
        (self.quantize_lm_head || !t.lm_head) && !self.keeps_float(t)
    }

    /// Whether `t` is kept in float by a `keep_float` pattern.
    pub fn keeps_float(&self, t: &Target) -> bool {
        self.keep_float
            .iter()
            .any(|p| t.node.contains(p.as_str()) || t.weight.contains(p.as_str()))
    }

    /// Every `keep_float` pattern must match a layer of `targets` (a typo would otherwise
    /// quantize everything silently).
    pub fn check_keep_float(&self, targets: &[Target]) -> Result<()> {
        for p in &self.keep_float {
            if p.is_empty()
                || !targets
                    .iter()
                    .any(|t| t.node.contains(p.as_str()) || t.weight.contains(p.as_str()))
            {
                return Err(Error::Option {
                    option: "--keep-float",
                    expected: format!(
                        "part of a linear layer's node or weight name (e.g. `down_proj`, `{}`)",
                        targets.first().map(|t| t.weight.as_str()).unwrap_or("")
                    ),
                    got: p.clone(),
                });
            }
        }
        Ok(())
    }
}

/// What a QDQ graph holds.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct QdqSummary {
    /// `QuantizeLinear` nodes (activations).
    pub quantize_nodes: usize,
    /// `DequantizeLinear` nodes (activations and weights).
    pub dequantize_nodes: usize,
    /// MatMul / Gemm nodes whose inputs are both dequantized.
    pub quantized_linears: usize,
    /// Linear layers left in float (lm_head unless asked, `keep_float` layers).
    pub float_linears: usize,
    /// int8 weight bytes.
    pub int8_weight_bytes: usize,
}

fn scalar_f32(name: &str, v: f32) -> TensorProto {
    TensorProto {
        name: name.into(),
        data_type: DataType::Float as i32,
        raw_data: v.to_le_bytes().to_vec(),
        ..Default::default()
    }
}

fn int8_tensor(name: &str, dims: &[i64], v: &[i8]) -> TensorProto {
    TensorProto {
        name: name.into(),
        dims: dims.to_vec(),
        data_type: DataType::Int8 as i32,
        raw_data: v.iter().map(|&x| x as u8).collect(),
        ..Default::default()
    }
}

fn node(
    op: &str,
    name: String,
    inputs: &[&str],
    output: &str,
    attrs: Vec<AttributeProto>,
) -> NodeProto {
    NodeProto {
        input: inputs.iter().map(|s| s.to_string()).collect(),
        output: vec![output.to_string()],
        name,
        op_type: op.into(),
        domain: String::new(),
        attribute: attrs,
        doc_string: String::new(),
    }
}

/// Per-output-channel symmetric int8 quantization of a 2-D weight `[rows, cols]` along `axis`:
/// returns (int8 values, scales). A channel of zeros gets scale 1 (any positive scale is exact).
pub fn quantize_weight(w: &[f32], rows: usize, cols: usize, axis: usize) -> (Vec<i8>, Vec<f32>) {
    let channels = if axis == 0 { rows } else { cols };
    let mut amax = vec![0f32; channels];
    for r in 0..rows {
        for c in 0..cols {
            let ch = if axis == 0 { r } else { c };
            amax[ch] = amax[ch].max(w[r * cols + c].abs());
        }
    }
    let scales: Vec<f32> = amax
        .iter()
        .map(|&a| if a > 0.0 { a / INT8_MAX } else { 1.0 })
        .collect();
    let mut q = Vec::with_capacity(w.len());
    for r in 0..rows {
        for c in 0..cols {
            let s = scales[if axis == 0 { r } else { c }];
            q.push(
                (w[r * cols + c] / s)
                    .round_ties_even()
                    .clamp(-INT8_MAX, INT8_MAX) as i8,
            );
        }
    }
    (q, scales)
}

/// The activation scale for a range: `amax / 127`, or 1 for an all-zero tensor.
pub fn activation_scale(amax: f32) -> f32 {
    if amax > 0.0 {
        amax / INT8_MAX
    } else {
        1.0
    }
}

/// Rewrites `model` into QDQ form with activation ranges `amax` (tensor → amax). Every
/// quantized activation must have a range.
pub fn quantize_qdq(
    model: &ModelProto,
    amax: &HashMap<String, f32>,
    opts: QdqOptions,
    vocab_size: usize,
    path: &Path,
) -> Result<(ModelProto, QdqSummary)> {
    let opset = model
        .opset_import
        .iter()
        .find(|o| o.domain.is_empty())
        .map(|o| o.version)
        .unwrap_or(0);
    if opset < MIN_QDQ_OPSET {
        return Err(Error::Model {
            path: path.to_path_buf(),
            message: format!("opset {opset}: per-channel QDQ needs opset {MIN_QDQ_OPSET} or later"),
        });
    }
    let all = targets(model, vocab_size, path)?;
    let chosen: Vec<&Target> = all.iter().filter(|t| opts.quantizes(t)).collect();
    let mut m = model.clone();
    let (g, init_index) = graph_and_index(&mut m, path)?;

    let mut summary = QdqSummary {
        float_linears: all.len() - chosen.len(),
        ..Default::default()
    };
    let mut new_inits: Vec<TensorProto> = Vec::new();
    let mut weight_nodes: Vec<NodeProto> = Vec::new();
    let mut weight_dq: HashMap<String, String> = HashMap::new();
    // activation → (Q node, DQ node, dequantized name)
    let mut act_qdq: HashMap<String, (NodeProto, NodeProto, String)> = HashMap::new();
    let by_node: HashMap<&str, &Target> = chosen.iter().map(|t| (t.node.as_str(), *t)).collect();

    for t in &chosen {
        if !weight_dq.contains_key(&t.weight) {
            let w = &g.initializer[init_index[&t.weight]];
            let data = tensor_f32(w)?;
            let (rows, cols) = (w.dims[0] as usize, w.dims[1] as usize);
            let (q, scales) = quantize_weight(&data, rows, cols, t.axis);
            let qn = format!("{}_quantized", t.weight);
            let sn = format!("{}_scale", t.weight);
            let zn = format!("{}_zero_point", t.weight);
            let dqn = format!("{}_dequantized", t.weight);
            summary.int8_weight_bytes += q.len();
            new_inits.push(int8_tensor(&qn, &w.dims, &q));
            new_inits.push(TensorProto {
                name: sn.clone(),
                dims: vec![scales.len() as i64],
                data_type: DataType::Float as i32,
                raw_data: scales.iter().flat_map(|s| s.to_le_bytes()).collect(),
                ..Default::default()
            });
            new_inits.push(int8_tensor(
                &zn,
                &[scales.len() as i64],
                &vec![0; scales.len()],
            ));
            weight_nodes.push(node(
                "DequantizeLinear",
                format!("{}/DequantizeLinear", t.weight),
                &[&qn, &sn, &zn],
                &dqn,
                vec![AttributeProto {
                    name: "axis".into(),
                    r#type: AttributeType::Int as i32,
                    i: t.axis as i64,
                    ..Default::default()
                }],
            ));
            weight_dq.insert(t.weight.clone(), dqn);
        }
        if !act_qdq.contains_key(&t.activation) {
            let a = *amax.get(&t.activation).ok_or_else(|| {
                Error::Stats(format!("no range collected for tensor `{}`", t.activation))
            })?;
            if !a.is_finite() || a < 0.0 {
                return Err(Error::BadRange {
                    tensor: t.activation.clone(),
                    amax: a,
                });
            }
            let base = &t.activation;
            let sn = format!("{base}_scale");
            let zn = format!("{base}_zero_point");
            let qn = format!("{base}_quantized");
            let dqn = format!("{base}_dequantized");
            new_inits.push(scalar_f32(&sn, activation_scale(a)));
            new_inits.push(int8_tensor(&zn, &[], &[0]));
            let q = node(
                "QuantizeLinear",
                format!("{base}/QuantizeLinear"),
                &[base, &sn, &zn],
                &qn,
                vec![],
            );
            let dq = node(
                "DequantizeLinear",
                format!("{base}/DequantizeLinear"),
                &[&qn, &sn, &zn],
                &dqn,
                vec![],
            );
            act_qdq.insert(base.clone(), (q, dq, dqn));
        }
    }

    let old = std::mem::take(&mut g.node);
    let mut nodes = weight_nodes;
    let mut emitted: HashSet<String> = HashSet::new();
    for (i, mut n) in old.into_iter().enumerate() {
        if let Some(t) = by_node.get(node_label(&n, i).as_str()) {
            let (q, dq, dqn) = &act_qdq[&t.activation];
            if emitted.insert(t.activation.clone()) {
                nodes.push(q.clone());
                nodes.push(dq.clone());
            }
            n.input[0] = dqn.clone();
            n.input[1] = weight_dq[&t.weight].clone();
        }
        nodes.push(n);
    }
    g.node = nodes;
    g.initializer.extend(new_inits);
    // Float weights no node reads any more (tied embeddings stay: the Gather reads them).
    let used: HashSet<&str> = g
        .node
        .iter()
        .flat_map(|n| n.input.iter().map(|s| s.as_str()))
        .collect();
    let keep: Vec<bool> = g
        .initializer
        .iter()
        .map(|t| used.contains(t.name.as_str()))
        .collect();
    let mut k = keep.iter();
    g.initializer.retain(|_| *k.next().unwrap_or(&true));
    for p in m.metadata_props.iter_mut() {
        if p.key == "steper.dtype" {
            p.value = "int8".into();
        }
    }
    let check = validate_qdq(&m, path)?;
    summary.quantize_nodes = check.quantize_nodes;
    summary.dequantize_nodes = check.dequantize_nodes;
    summary.quantized_linears = check.quantized_linears;
    Ok((m, summary))
}

/// Checks a QDQ graph: every `QuantizeLinear` feeds only (and at least one)
/// `DequantizeLinear`; every `DequantizeLinear` reads a `QuantizeLinear` output or an int8
/// initializer; all scales are positive and finite, all zero points zero, per-axis scales match
/// their axis. Returns the counts.
pub fn validate_qdq(model: &ModelProto, path: &Path) -> Result<QdqSummary> {
    let bad = |message: String| Error::Model {
        path: path.to_path_buf(),
        message,
    };
    let g = model
        .graph
        .as_ref()
        .ok_or_else(|| bad("the model has no graph".into()))?;
    let inits: HashMap<&str, &TensorProto> =
        g.initializer.iter().map(|t| (t.name.as_str(), t)).collect();
    let mut consumers: HashMap<&str, Vec<&NodeProto>> = HashMap::new();
    for n in &g.node {
        for i in &n.input {
            consumers.entry(i.as_str()).or_default().push(n);
        }
    }
    let graph_outputs: HashSet<&str> = g.output.iter().map(|o| o.name.as_str()).collect();
    let q_outputs: HashSet<&str> = g
        .node
        .iter()
        .filter(|n| n.op_type == "QuantizeLinear")
        .filter_map(|n| n.output.first().map(|s| s.as_str()))
        .collect();
    let dq_outputs: HashSet<&str> = g
        .node
        .iter()
        .filter(|n| n.op_type == "DequantizeLinear")
        .filter_map(|n| n.output.first().map(|s| s.as_str()))
        .collect();
    let check_params = |n: &NodeProto| -> Result<usize> {
        let label = if n.name.is_empty() {
            &n.op_type
        } else {
            &n.name
        };
        let s = n
            .input
            .get(1)
            .and_then(|s| inits.get(s.as_str()))
            .ok_or_else(|| bad(format!("{label}: scale is not an initializer")))?;
        let scales = tensor_f32(s)?;
        if scales.is_empty() || scales.iter().any(|&v| !(v.is_finite() && v > 0.0)) {
            return Err(bad(format!("{label}: scales must be positive and finite")));
        }
        let z = n
            .input
            .get(2)
            .and_then(|s| inits.get(s.as_str()))
            .ok_or_else(|| bad(format!("{label}: zero point is not an initializer")))?;
        if z.data_type != DataType::Int8 as i32 {
            return Err(bad(format!("{label}: zero point must be int8 (symmetric)")));
        }
        let zeros = if z.raw_data.is_empty() {
            &z.int32_data.iter().map(|&v| v as u8).collect::<Vec<_>>()[..]
        } else {
            &z.raw_data[..]
        };
        if zeros.iter().any(|&b| b != 0) || zeros.len() != scales.len() {
            return Err(bad(format!(
                "{label}: zero points must be 0, one per scale"
            )));
        }
        Ok(scales.len())
    };
    let mut s = QdqSummary::default();
    for n in &g.node {
        let label = if n.name.is_empty() {
            &n.op_type
        } else {
            &n.name
        };
        match n.op_type.as_str() {
            "QuantizeLinear" => {
                s.quantize_nodes += 1;
                if check_params(n)? != 1 {
                    return Err(bad(format!(
                        "{label}: activations are quantized per tensor"
                    )));
                }
                let out = n.output.first().map(|s| s.as_str()).unwrap_or("");
                let c = consumers.get(out).map(|v| v.as_slice()).unwrap_or(&[]);
                if c.is_empty()
                    || graph_outputs.contains(out)
                    || c.iter().any(|d| d.op_type != "DequantizeLinear")
                {
                    return Err(bad(format!(
                        "{label}: a QuantizeLinear must feed DequantizeLinear nodes only"
                    )));
                }
            }
            "DequantizeLinear" => {
                s.dequantize_nodes += 1;
                let n_scales = check_params(n)?;
                let x = n.input.first().map(|s| s.as_str()).unwrap_or("");
                if let Some(t) = inits.get(x) {
                    if t.data_type != DataType::Int8 as i32 {
                        return Err(bad(format!(
                            "{label}: dequantized initializer `{x}` is not int8"
                        )));
                    }
                    if n_scales > 1 {
                        let axis = attr(n, "axis").map(|a| a.i).unwrap_or(1);
                        let ax = if axis < 0 {
                            axis + t.dims.len() as i64
                        } else {
                            axis
                        };
                        if t.dims.get(ax as usize).copied() != Some(n_scales as i64) {
                            return Err(bad(format!(
                                "{label}: {n_scales} scales for axis {axis} of dims {:?}",
                                t.dims
                            )));
                        }
                    }
                } else if !q_outputs.contains(x) {
                    return Err(bad(format!("{label}: input `{x}` is neither a QuantizeLinear output nor an int8 initializer")));
                } else if n_scales != 1 {
                    return Err(bad(format!(
                        "{label}: activations are dequantized per tensor"
                    )));
                }
            }
            "MatMul" | "Gemm" => {
                let both = n
                    .input
                    .iter()
                    .take(2)
                    .all(|i| dq_outputs.contains(i.as_str()));
                if both {
                    s.quantized_linears += 1;
                }
            }
            _ => {}
        }
    }
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Largest error of a symmetric int8 round trip: half a quantization step.
    const HALF_STEP: f32 = 0.5;

    #[test]
    fn weights_quantize_per_output_channel() {
        // [2 rows, 3 cols], MatMul layout: output channels are columns (axis 1).
        let w = [1.0, -0.5, 0.0, -2.0, 0.25, 0.0];
        let (q, s) = quantize_weight(&w, 2, 3, 1);
        assert_eq!(s, vec![2.0 / 127.0, 0.5 / 127.0, 1.0]);
        assert_eq!(q, vec![64, -127, 0, -127, 64, 0]);
        for (i, &x) in w.iter().enumerate() {
            let back = q[i] as f32 * s[i % 3];
            assert!((back - x).abs() <= HALF_STEP * s[i % 3] + 1e-7);
        }
        // Gemm transB layout [out, in]: rows are channels.
        let (_, s0) = quantize_weight(&w, 2, 3, 0);
        assert_eq!(s0, vec![1.0 / 127.0, 2.0 / 127.0]);
    }

    #[test]
    fn activation_scale_is_positive() {
        assert_eq!(activation_scale(127.0), 1.0);
        assert_eq!(activation_scale(0.0), 1.0);
    }
}
