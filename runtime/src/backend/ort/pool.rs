//! The pool of sessions over one graph, and the session builder that applies the options and
//! registers the execution providers.

use std::sync::{Condvar, Mutex, MutexGuard};

use ::ort::ep::{self, ExecutionProviderDispatch};
use ::ort::session::builder::{GraphOptimizationLevel, PrepackedWeights, SessionBuilder};
use ::ort::session::Session;
use ::ort::value::DynValue;

use super::{backend_err, environment, ExecutionProvider, OptLevel, OrtOptions, TensorRtOptions};
use crate::error::{Error, Result};
use crate::generator::ProviderFallback;
use crate::manifest::Manifest;

fn dispatch(p: &ExecutionProvider, manifest: &Manifest) -> ExecutionProviderDispatch {
    match p {
        ExecutionProvider::Cpu => ep::CPU::default().build(),
        ExecutionProvider::Cuda { device_id } => {
            ep::CUDA::default().with_device_id(*device_id).build()
        }
        ExecutionProvider::TensorRt(o) => {
            let (min, opt, max) = trt_profiles(manifest, o);
            let mut t = ep::TensorRT::default()
                .with_device_id(o.device_id)
                .with_fp16(o.fp16)
                .with_int8(o.int8)
                .with_profile_min_shapes(min)
                .with_profile_opt_shapes(opt)
                .with_profile_max_shapes(max);
            if let Some(dir) = &o.engine_cache {
                t = t
                    .with_engine_cache(true)
                    .with_engine_cache_path(dir.display())
                    .with_timing_cache(true)
                    .with_timing_cache_path(dir.display());
            }
            if let Some(table) = &o.calibration_table {
                let name = table
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default();
                t = t
                    .with_int8_calibration_table_name(name)
                    .with_int8_use_native_calibration_table(
                        o.native_calibration_table
                            || table.extension().is_some_and(|e| e == "cache"),
                    );
            }
            if let Some(ws) = o.max_workspace_bytes {
                t = t.with_max_workspace_size(ws);
            }
            t.build()
        }
    }
}

/// TensorRT optimization profiles (min, opt, max) covering every input, the KV cache included:
/// `name:d0xd1x…` lists as TensorRT's EP expects them.
pub fn trt_profiles(manifest: &Manifest, o: &TensorRtOptions) -> (String, String, String) {
    let g = &manifest.graph;
    let ctx = manifest.context_length;
    let opt_len = o.profile_opt_len.min(ctx).max(1);
    let make = |b: usize, s: usize, p: usize| {
        let mut v = vec![
            format!("input_ids:{b}x{s}"),
            format!("attention_mask:{b}x{}", p + s),
            format!("position_ids:{b}x{s}"),
        ];
        for name in g.inputs.iter().skip(3) {
            v.push(format!("{name}:{b}x{}x{p}x{}", g.num_kv_heads, g.head_dim));
        }
        v.join(",")
    };
    (
        make(1, 1, 0),
        make(1, 1, opt_len),
        make(o.profile_max_batch.max(1), ctx, ctx),
    )
}

/// Weights shared by the sessions of a pool.
pub(super) struct SharedWeights {
    /// Initializers given to every session (`AddInitializer`).
    pub(super) initializers: Vec<(String, std::sync::Arc<DynValue>)>,
    /// Their prepacked forms.
    pub(super) prepacked: PrepackedWeights,
}

/// The sessions of an [`OrtGenerator`]: idle ones on a stack, callers wait for one when all are
/// checked out.
///
/// [`OrtGenerator`]: super::OrtGenerator
pub(super) struct SessionPool {
    pub(super) idle: Mutex<Vec<Session>>,
    pub(super) returned: Condvar,
    pub(super) size: usize,
    /// Keeps the shared weights alive as long as the sessions (ONNX Runtime requires the
    /// initializers and the container to outlive every session made with them). Declared after
    /// `idle` so that the sessions are dropped first.
    pub(super) _shared: Option<SharedWeights>,
}

/// A session checked out of a [`SessionPool`]; back on the stack when dropped.
pub(super) struct CheckedOut<'p> {
    pool: &'p SessionPool,
    session: Option<Session>,
}

impl SessionPool {
    pub(super) fn checkout(&self) -> Result<CheckedOut<'_>> {
        let poisoned = |_| backend_err("session pool mutex poisoned");
        let mut idle: MutexGuard<'_, Vec<Session>> = self.idle.lock().map_err(poisoned)?;
        loop {
            if let Some(session) = idle.pop() {
                return Ok(CheckedOut {
                    pool: self,
                    session: Some(session),
                });
            }
            idle = self.returned.wait(idle).map_err(poisoned)?;
        }
    }
}

impl CheckedOut<'_> {
    pub(super) fn session(&mut self) -> Result<&mut Session> {
        // Only `Drop` takes the session out, so this is always `Some`.
        self.session.as_mut().ok_or(Error::Misuse {
            call: "SessionPool::session",
            problem: "the session was returned to the pool".into(),
        })
    }
}

impl Drop for CheckedOut<'_> {
    fn drop(&mut self) {
        if let Some(s) = self.session.take() {
            let mut idle = self.pool.idle.lock().unwrap_or_else(|p| p.into_inner());
            idle.push(s);
            drop(idle);
            self.pool.returned.notify_one();
        }
    }
}

/// A session builder with `opts` applied and its providers registered; also returns the names
/// of the providers in use and those skipped (with `allow_fallback`).
pub(super) fn session_builder(
    manifest: &Manifest,
    opts: &OrtOptions,
    shared: Option<&SharedWeights>,
    first: bool,
) -> Result<(SessionBuilder, Vec<String>, Vec<ProviderFallback>)> {
    let env = environment(opts.library.as_deref())?;
    let mut b = Session::builder(&env).map_err(backend_err)?;
    b = b
        .with_optimization_level(match opts.opt_level {
            OptLevel::Disable => GraphOptimizationLevel::Disable,
            OptLevel::Basic => GraphOptimizationLevel::Level1,
            OptLevel::Extended => GraphOptimizationLevel::Level2,
            OptLevel::All => GraphOptimizationLevel::All,
        })
        .map_err(backend_err)?;
    if let Some(n) = opts.intra_threads {
        b = b.with_intra_threads(n).map_err(backend_err)?;
    }
    if !opts.memory_pattern {
        b = b.with_memory_pattern(false).map_err(backend_err)?;
    }
    if let (true, Some(path)) = (first, &opts.optimized_model) {
        // Initializers beside the graph: a real model's weights exceed protobuf's 2 GiB limit.
        let data = path
            .file_name()
            .map(|n| format!("{}.data", n.to_string_lossy()))
            .unwrap_or_else(|| "optimized.onnx.data".into());
        b = b
            .with_optimized_model_path(path)
            .map_err(backend_err)?
            .with_config_entry(
                "session.optimized_model_external_initializers_file_name",
                data,
            )
            .map_err(backend_err)?;
    }
    if let Some(w) = shared {
        b = b
            .with_prepacked_weights(&w.prepacked)
            .map_err(backend_err)?;
        for (name, value) in &w.initializers {
            b = b
                .with_initializer(name, std::sync::Arc::clone(value))
                .map_err(backend_err)?;
        }
    }
    let mut used: Vec<String> = Vec::new();
    let mut fallbacks = Vec::new();
    for p in &opts.providers {
        if let ExecutionProvider::TensorRt(TensorRtOptions {
            calibration_table: Some(t),
            ..
        }) = p
        {
            if !t.is_file() {
                return Err(Error::ProviderUnavailable {
                    provider: p.ort_name().into(),
                    reason: format!("calibration table {} not found", t.display()),
                });
            }
        }
        match dispatch(p, manifest).register(&mut b) {
            Ok(()) => used.push(p.ort_name().into()),
            Err(e) if opts.allow_fallback => fallbacks.push(ProviderFallback {
                provider: p.ort_name().into(),
                reason: e.to_string(),
            }),
            Err(e) => {
                return Err(Error::ProviderUnavailable {
                    provider: p.ort_name().into(),
                    reason: format!(
                        "{e} (GPU providers need the onnxruntime-gpu library and the CUDA/TensorRT libraries; allow_fallback continues on the next provider)"
                    ),
                })
            }
        }
    }
    if !used.iter().any(|u| u == "CPUExecutionProvider") {
        used.push("CPUExecutionProvider".into());
    }
    Ok((b, used, fallbacks))
}
