//! The graph's large initializers, read from the ONNX file once so that the sessions of a pool
//! share one copy of the weights.

use std::path::Path;

use ::ort::value::{DynValue, Tensor};

use super::backend_err;
use crate::error::{Error, Result};

/// The part of the ONNX protobuf schema (onnx.proto3 field numbers) that
/// [`shared_initializers`] reads; prost skips every other field.
mod onnx_pb {
    /// `ModelProto`: only the graph.
    #[derive(Clone, PartialEq, prost::Message)]
    pub(super) struct ModelProto {
        #[prost(message, optional, tag = "7")]
        pub graph: Option<GraphProto>,
    }

    /// `GraphProto`: only the initializers.
    #[derive(Clone, PartialEq, prost::Message)]
    pub(super) struct GraphProto {
        #[prost(message, repeated, tag = "5")]
        pub initializer: Vec<TensorProto>,
    }

    /// `TensorProto`: shape, element type, name, raw bytes and where the data lives.
    #[derive(Clone, PartialEq, prost::Message)]
    pub(super) struct TensorProto {
        #[prost(int64, repeated, tag = "1")]
        pub dims: Vec<i64>,
        #[prost(int32, tag = "2")]
        pub data_type: i32,
        #[prost(string, tag = "8")]
        pub name: String,
        #[prost(bytes = "vec", tag = "9")]
        pub raw_data: Vec<u8>,
        /// 0 default (inside the file), 1 external.
        #[prost(int32, optional, tag = "14")]
        pub data_location: Option<i32>,
    }
}

/// Fewest sessions at which their weights are shared. A single session lets ONNX Runtime drop
/// each weight once it is prepacked; shared weights are owned by the caller, so the shared
/// unpacked copy stays besides the shared packed one. Measured on SmolLM2-135M fp32 (resident
/// memory after load): 1 session 739 MiB; 2 sessions 1,460 MiB private vs 1,659 MiB shared;
/// 3 sessions 1,751 MiB shared (each further session ≈ 92 MiB), so sharing pays from 3 on.
pub const SHARE_WEIGHTS_FROM_SESSIONS: usize = 3;

/// Smallest initializer (bytes) shared between sessions; smaller ones (norm weights, shape
/// constants) stay in each session's graph.
pub const SHARED_INITIALIZER_MIN_BYTES: usize = 64 * 1024;

/// The graph's initializers worth sharing between sessions, decoded once from `model` as ONNX
/// Runtime values: float, float16, int8 and uint8 tensors of at least
/// `SHARED_INITIALIZER_MIN_BYTES` stored inside the file (external data stays with ONNX
/// Runtime).
pub(super) fn shared_initializers(model: &Path) -> Result<Vec<(String, std::sync::Arc<DynValue>)>> {
    use prost::Message as _;
    let bad = |message: String| Error::Model {
        path: model.to_path_buf(),
        message,
    };
    let bytes = std::fs::read(model).map_err(|e| Error::io(model, e))?;
    let proto = onnx_pb::ModelProto::decode(bytes.as_slice())
        .map_err(|e| bad(format!("not an ONNX model: {e}")))?;
    drop(bytes);
    let Some(graph) = proto.graph else {
        return Err(bad("ONNX model without a graph".into()));
    };
    let mut out = Vec::new();
    for t in graph.initializer {
        // 1: external data, left to ONNX Runtime
        if t.data_location == Some(1) || t.raw_data.len() < SHARED_INITIALIZER_MIN_BYTES {
            continue;
        }
        let dims: Vec<i64> = t.dims.clone();
        let n: usize = dims.iter().map(|&d| d.max(0) as usize).product();
        let raw = t.raw_data;
        let wrong = |size: usize| {
            bad(format!(
                "initializer {} holds {} bytes, its shape {:?} needs {}",
                t.name,
                raw.len(),
                dims,
                n * size
            ))
        };
        // TensorProto.DataType: 1 FLOAT, 2 UINT8, 3 INT8, 10 FLOAT16
        let value = match t.data_type {
            1 => {
                if raw.len() != n * 4 {
                    return Err(wrong(4));
                }
                let v: Vec<f32> = raw
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect();
                Tensor::from_array((dims, v))
                    .map_err(backend_err)?
                    .into_dyn()
            }
            10 => {
                if raw.len() != n * 2 {
                    return Err(wrong(2));
                }
                let v: Vec<half::f16> = raw
                    .chunks_exact(2)
                    .map(|c| half::f16::from_le_bytes([c[0], c[1]]))
                    .collect();
                Tensor::from_array((dims, v))
                    .map_err(backend_err)?
                    .into_dyn()
            }
            2 => {
                if raw.len() != n {
                    return Err(wrong(1));
                }
                Tensor::from_array((dims, raw))
                    .map_err(backend_err)?
                    .into_dyn()
            }
            3 => {
                if raw.len() != n {
                    return Err(wrong(1));
                }
                let v: Vec<i8> = raw.iter().map(|&b| b as i8).collect();
                Tensor::from_array((dims, v))
                    .map_err(backend_err)?
                    .into_dyn()
            }
            _ => continue,
        };
        out.push((t.name, std::sync::Arc::new(value)));
    }
    Ok(out)
}
