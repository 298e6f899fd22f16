//! SmoothQuant-style smoothing: moving the activation outliers of each linear layer's input into
//! its weights before W8A8 quantization.
//!
//! A linear layer computes `Y = X·W` (`X` `[…, K]`, `W` `[K, N]`). With a positive factor `s_k`
//! per input channel, `Y = (X·diag(1/s))·(diag(s)·W)` exactly. Choosing
//! `s_k = max|X_k|^α / max|W_k,:|^(1-α)` (SmoothQuant, Xiao et al. 2023) flattens the channels
//! of `X` — SmolLM2's down_proj inputs reach 24,790 in one channel where the 99.99th
//! percentile of the tensor is 176 — so one per-tensor int8 scale fits them, while the weight's
//! per-output-channel int8 scales absorb the growth of its rows.
//!
//! Where `1/s` goes, by the producer of `X` (every layer sharing the same `X` shares one `s`,
//! computed from the largest of their weight rows):
//! - a `Mul` by a `[K]` initializer (RMSNorm's `γ`: the q/k/v and gate/up inputs) → `γ / s`;
//! - a `Mul` of two activations one of which is the output of a linear layer with a weight
//!   initializer (SwiGLU's `act(gate) · up`: the down_proj input) → that layer's output columns
//!   `/ s` (the up_proj weight, itself quantized per output channel, so nothing is lost);
//! - anything else (the o_proj input: the merged attention heads) → an explicit
//!   `Mul(X, 1/s)` node whose output the layers read instead.
//!
//! The smoothed tensor's range is its exact min/max (`max_k max|X_k| / s_k`), computed from the
//! per-channel maxima collected with the ranges; the fp32 function of the graph is unchanged
//! (up to rounding), which the tests check on the tiny export.

use std::collections::{HashMap, HashSet};
use std::path::Path;

use serde::Serialize;
use tract_onnx::pb::{tensor_proto::DataType, ModelProto, NodeProto, TensorProto};

use crate::graph::{graph_and_index, node_label, tensor_f32, Target};
use crate::{Error, Result};

/// Smallest / largest smoothing factor (keeps `1/s` and `s·W` finite and well scaled).
pub const SMOOTH_FACTOR_RANGE: (f32, f32) = (1e-4, 1e4);

/// Options of [`smooth`].
#[derive(Debug, Clone, PartialEq)]
pub struct SmoothOptions {
    /// Migration strength α in (0, 1]: 0 would leave the activations as they are, 1 moves all
    /// of their range into the weights.
    pub alpha: f32,
}

impl SmoothOptions {
    /// Checks α (the CLI's `--smooth-alpha`).
    pub fn new(alpha: f32) -> Result<Self> {
        if !(alpha > 0.0 && alpha <= 1.0) {
            return Err(Error::Option {
                option: "--smooth-alpha",
                expected: "a migration strength in (0, 1] (SmoothQuant uses 0.5–0.85)".into(),
                got: alpha.to_string(),
            });
        }
        Ok(SmoothOptions { alpha })
    }
}

/// How one activation tensor was smoothed.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SmoothedTensor {
    /// The activation tensor of the original graph.
    pub tensor: String,
    /// The tensor the linear layers read in the smoothed graph (the same name unless a `Mul`
    /// node was inserted).
    pub reads: String,
    /// Where `1/s` went: `norm` (γ of the producing Mul), `linear:<weight>` (the producing
    /// linear layer's output columns) or `mul` (an inserted node).
    pub folded_into: String,
    /// Linear layers reading it.
    pub layers: usize,
    /// Input channels.
    pub channels: usize,
    /// Largest / median channel maximum before smoothing.
    pub spread_before: f32,
    /// Largest / median channel maximum after smoothing.
    pub spread_after: f32,
    /// The smoothed tensor's amax (its exact min/max range).
    pub amax: f32,
}

/// What [`smooth`] did.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SmoothSummary {
    /// α used.
    pub alpha: f32,
    /// Activation tensors smoothed.
    pub tensors: Vec<SmoothedTensor>,
    /// Activation tensors left as they were, with the reason.
    pub skipped: Vec<(String, String)>,
    /// `Mul` nodes inserted.
    pub inserted_muls: usize,
}

/// A smoothed graph and the ranges of its smoothed activations.
#[derive(Debug, Clone)]
pub struct Smoothed {
    /// The smoothed fp32 graph.
    pub model: ModelProto,
    /// amax of every tensor the smoothing changed or created (name in the smoothed graph).
    pub amax: HashMap<String, f32>,
    /// What was done.
    pub summary: SmoothSummary,
}

fn ratio_to_median(v: &[f32]) -> f32 {
    let mut s: Vec<f32> = v.iter().copied().filter(|x| x.is_finite()).collect();
    if s.is_empty() {
        return 0.0;
    }
    s.sort_by(|a, b| a.total_cmp(b));
    let med = s[s.len() / 2];
    let max = s[s.len() - 1];
    if med > 0.0 {
        max / med
    } else {
        f32::INFINITY
    }
}

fn float_tensor(name: &str, dims: &[i64], v: &[f32]) -> TensorProto {
    TensorProto {
        name: name.into(),
        dims: dims.to_vec(),
        data_type: DataType::Float as i32,
        raw_data: v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        ..Default::default()
    }
}

/// The smoothing factors of one group: `s_k = x_k^α / w_k^(1-α)` clamped to
/// [`SMOOTH_FACTOR_RANGE`]; 1 where either maximum is 0 or not finite.
pub fn factors(x_max: &[f32], w_max: &[f32], alpha: f32) -> Vec<f32> {
    x_max
        .iter()
        .zip(w_max)
        .map(|(&x, &w)| {
            if x > 0.0 && w > 0.0 && x.is_finite() && w.is_finite() {
                (x.powf(alpha) / w.powf(1.0 - alpha))
                    .clamp(SMOOTH_FACTOR_RANGE.0, SMOOTH_FACTOR_RANGE.1)
            } else {
                1.0
            }
        })
        .collect()
}

/// Smooths the inputs of `targets` (the linear layers to be quantized) with the per-channel
/// maxima `channel_amax` (activation tensor → max |x| per input channel, the last dimension).
/// A tensor without maxima is an error naming it; one whose layers cannot be smoothed exactly
/// (a weight also read elsewhere, such as a tied embedding) is skipped with the reason.
pub fn smooth(
    model: &ModelProto,
    targets: &[&Target],
    channel_amax: &HashMap<String, Vec<f32>>,
    opts: &SmoothOptions,
    path: &Path,
) -> Result<Smoothed> {
    let mut m = model.clone();
    let (g, init_index) = graph_and_index(&mut m, path)?;
    let mut readers: HashMap<String, Vec<usize>> = HashMap::new();
    let mut producer: HashMap<String, usize> = HashMap::new();
    for (i, n) in g.node.iter().enumerate() {
        for t in &n.input {
            readers.entry(t.clone()).or_default().push(i);
        }
        for t in &n.output {
            producer.insert(t.clone(), i);
        }
    }
    let outputs: HashSet<String> = g.output.iter().map(|o| o.name.clone()).collect();
    let by_label: HashMap<String, usize> = g
        .node
        .iter()
        .enumerate()
        .map(|(i, n)| (node_label(n, i), i))
        .collect();

    // Groups: activation → its layers, in graph order.
    let mut order: Vec<String> = Vec::new();
    let mut groups: HashMap<String, Vec<(&Target, usize)>> = HashMap::new();
    for t in targets {
        let idx = *by_label.get(&t.node).ok_or_else(|| Error::Model {
            path: path.to_path_buf(),
            message: format!("no node `{}` in the graph", t.node),
        })?;
        if !groups.contains_key(&t.activation) {
            order.push(t.activation.clone());
        }
        groups
            .entry(t.activation.clone())
            .or_default()
            .push((t, idx));
    }
    let target_nodes: HashSet<usize> = groups.values().flatten().map(|(_, i)| *i).collect();

    // Weights are edited in place here and written back at the end.
    let mut data: HashMap<String, Vec<f32>> = HashMap::new();
    let load = |data: &mut HashMap<String, Vec<f32>>,
                name: &str,
                g: &tract_onnx::pb::GraphProto|
     -> Result<()> {
        if !data.contains_key(name) {
            let t = &g.initializer[init_index[name]];
            data.insert(name.to_string(), tensor_f32(t)?);
        }
        Ok(())
    };
    let dims_of = |name: &str, g: &tract_onnx::pb::GraphProto| -> Vec<i64> {
        g.initializer[init_index[name]].dims.clone()
    };

    let mut summary = SmoothSummary {
        alpha: opts.alpha,
        tensors: Vec::new(),
        skipped: Vec::new(),
        inserted_muls: 0,
    };
    let mut amax_out = HashMap::new();
    let mut new_inits: Vec<TensorProto> = Vec::new();
    let mut inserted: Vec<(usize, NodeProto)> = Vec::new(); // (before node index, node)
    let mut rewire: Vec<(usize, String)> = Vec::new(); // (node index, new input 0)

    for act in &order {
        let layers = &groups[act];
        let x = channel_amax.get(act).ok_or_else(|| {
            Error::Stats(format!(
                "no per-channel maxima for tensor `{act}` (ranges made before smoothing existed: \
                 collect again without --ranges)"
            ))
        })?;
        let k = x.len();
        // Every weight: [K, N] with input channels on the axis other than the output axis, read
        // by this group's layers only.
        let mut skip = None;
        for (t, _) in layers {
            let d = dims_of(&t.weight, g);
            let in_axis = 1 - t.axis;
            if d.len() != 2 || d[in_axis] as usize != k {
                skip = Some(format!(
                    "weight `{}` {:?} has no input dimension of {k} channels",
                    t.weight, d
                ));
                break;
            }
            let r = readers.get(&t.weight).map(Vec::as_slice).unwrap_or(&[]);
            if r.iter().any(|i| !target_nodes.contains(i)) {
                skip = Some(format!(
                    "weight `{}` is also read by a node that is not a quantized linear layer",
                    t.weight
                ));
                break;
            }
        }
        if let Some(why) = skip {
            summary.skipped.push((act.clone(), why));
            continue;
        }
        let mut w_max = vec![0f32; k];
        for (t, _) in layers {
            load(&mut data, &t.weight, g)?;
            let d = dims_of(&t.weight, g);
            let (rows, cols) = (d[0] as usize, d[1] as usize);
            let w = &data[&t.weight];
            for r in 0..rows {
                for c in 0..cols {
                    let ch = if t.axis == 1 { r } else { c };
                    w_max[ch] = w_max[ch].max(w[r * cols + c].abs());
                }
            }
        }
        let s = factors(x, &w_max, opts.alpha);
        for (t, _) in layers {
            let d = dims_of(&t.weight, g);
            let (rows, cols) = (d[0] as usize, d[1] as usize);
            let w = data.get_mut(&t.weight).expect("loaded above");
            for r in 0..rows {
                for c in 0..cols {
                    w[r * cols + c] *= s[if t.axis == 1 { r } else { c }];
                }
            }
        }

        // Where 1/s goes.
        let layer_nodes: HashSet<usize> = layers.iter().map(|(_, i)| *i).collect();
        let only_ours = readers
            .get(act)
            .is_some_and(|r| r.iter().all(|i| layer_nodes.contains(i)))
            && !outputs.contains(act);
        let mut folded: Option<String> = None;
        if let (true, Some(&p)) = (only_ours, producer.get(act)) {
            let pn = &g.node[p];
            if pn.op_type == "Mul" && pn.domain.is_empty() && pn.input.len() == 2 {
                // RMSNorm's γ.
                for inp in &pn.input {
                    if let Some(&ii) = init_index.get(inp) {
                        let t = &g.initializer[ii];
                        let n: i64 = t.dims.iter().product();
                        let sole = readers.get(inp).is_some_and(|r| r.len() == 1);
                        if n as usize == k && *t.dims.last().unwrap_or(&0) as usize == k && sole {
                            load(&mut data, inp, g)?;
                            for (v, f) in data.get_mut(inp).expect("loaded").iter_mut().zip(&s) {
                                *v /= f;
                            }
                            folded = Some("norm".into());
                            break;
                        }
                    }
                }
                // act(gate) · up: the output columns of the linear layer producing one factor.
                if folded.is_none() {
                    for inp in &pn.input {
                        let Some(&q) = producer.get(inp) else {
                            continue;
                        };
                        let qn = &g.node[q];
                        if qn.op_type != "MatMul" || !qn.domain.is_empty() || qn.input.len() != 2 {
                            continue;
                        }
                        let wname = &qn.input[1];
                        if !init_index.contains_key(wname) {
                            continue;
                        }
                        let d = dims_of(wname, g);
                        let sole_out = readers.get(inp).is_some_and(|r| r.len() == 1);
                        let sole_w = readers.get(wname).is_some_and(|r| r.len() == 1);
                        if d.len() == 2 && d[1] as usize == k && sole_out && sole_w {
                            load(&mut data, wname, g)?;
                            let cols = k;
                            let w = data.get_mut(wname).expect("loaded");
                            for (j, v) in w.iter_mut().enumerate() {
                                *v /= s[j % cols];
                            }
                            folded = Some(format!("linear:{wname}"));
                            break;
                        }
                    }
                }
            }
        }
        let reads = match &folded {
            Some(_) => act.clone(),
            None => {
                let inv: Vec<f32> = s.iter().map(|v| 1.0 / v).collect();
                let iname = format!("{act}_smooth_inv");
                let oname = format!("{act}_smoothed");
                new_inits.push(float_tensor(&iname, &[k as i64], &inv));
                let first = layers.iter().map(|(_, i)| *i).min().unwrap_or(0);
                inserted.push((
                    first,
                    NodeProto {
                        input: vec![act.clone(), iname],
                        output: vec![oname.clone()],
                        name: format!("{act}/SmoothQuant"),
                        op_type: "Mul".into(),
                        domain: String::new(),
                        attribute: vec![],
                        doc_string: String::new(),
                    },
                ));
                for (_, i) in layers {
                    rewire.push((*i, oname.clone()));
                }
                summary.inserted_muls += 1;
                oname
            }
        };
        let after: Vec<f32> = x.iter().zip(&s).map(|(a, f)| a / f).collect();
        let amax = after.iter().copied().fold(0f32, f32::max);
        amax_out.insert(reads.clone(), amax);
        summary.tensors.push(SmoothedTensor {
            tensor: act.clone(),
            reads,
            folded_into: folded.unwrap_or_else(|| "mul".into()),
            layers: layers.len(),
            channels: k,
            spread_before: ratio_to_median(x),
            spread_after: ratio_to_median(&after),
            amax,
        });
    }

    // Write back: edited initializers, rewired inputs, inserted nodes (before their first
    // reader, so the order stays topological).
    for (name, v) in data {
        let t = &mut g.initializer[init_index[&name]];
        t.raw_data = v.iter().flat_map(|x| x.to_le_bytes()).collect();
        t.float_data.clear();
    }
    for (i, name) in rewire {
        g.node[i].input[0] = name;
    }
    g.initializer.extend(new_inits);
    if !inserted.is_empty() {
        let mut before: HashMap<usize, Vec<NodeProto>> = HashMap::new();
        for (i, n) in inserted {
            before.entry(i).or_default().push(n);
        }
        let old = std::mem::take(&mut g.node);
        for (i, n) in old.into_iter().enumerate() {
            if let Some(ns) = before.remove(&i) {
                g.node.extend(ns);
            }
            g.node.push(n);
        }
    }
    Ok(Smoothed {
        model: m,
        amax: amax_out,
        summary,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn factors_balance_activation_and_weight_maxima() {
        // α = 0.5: s = sqrt(x / w), so x/s = w·s = sqrt(x·w) for every channel.
        let x = [100.0, 1.0, 4.0];
        let w = [0.01, 1.0, 0.25];
        let s = factors(&x, &w, 0.5);
        for ((a, b), f) in x.iter().zip(&w).zip(&s) {
            let balanced = (a * b).sqrt();
            assert!((a / f - balanced).abs() <= 1e-5 * balanced);
            assert!((b * f - balanced).abs() <= 1e-5 * balanced);
        }
    }

    #[test]
    fn factors_are_one_where_a_channel_is_empty_and_clamped_elsewhere() {
        let s = factors(&[0.0, 5.0, 1e12, f32::NAN], &[1.0, 0.0, 1e-12, 1.0], 0.5);
        assert_eq!(s[0], 1.0);
        assert_eq!(s[1], 1.0);
        assert_eq!(s[2], SMOOTH_FACTOR_RANGE.1);
        assert_eq!(s[3], 1.0);
    }

    #[test]
    fn alpha_outside_its_range_is_an_error_naming_the_option() {
        for a in [0.0, -0.5, 1.5, f32::NAN] {
            let e = SmoothOptions::new(a).unwrap_err().to_string();
            assert!(e.contains("--smooth-alpha"), "{e}");
        }
        assert_eq!(SmoothOptions::new(0.5).unwrap().alpha, 0.5);
    }

    #[test]
    fn spread_is_the_largest_over_the_median() {
        assert_eq!(ratio_to_median(&[1.0, 2.0, 8.0]), 4.0);
        assert_eq!(ratio_to_median(&[]), 0.0);
    }
}
