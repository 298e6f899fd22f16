//! What a GGUF file stores, read back for comparison: every tensor's type and bytes as stored
//! (blocks, not values) and the metadata, printed.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, Result};
use candle_core::quantized::gguf_file::Content;
use candle_core::Device;

/// A GGUF file's tensors and metadata.
#[derive(Debug)]
pub struct GgufStored {
    /// Per tensor name: its GGML type (`Q4_1`, `F32`, ...) and its stored bytes.
    pub tensors: BTreeMap<String, (String, Vec<u8>)>,
    /// Per metadata key: its value as `Debug` prints it.
    pub metadata: BTreeMap<String, String>,
}

/// Reads `path`.
pub fn stored(path: &Path) -> Result<GgufStored> {
    let mut f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let content = Content::read(&mut f).with_context(|| format!("reading {}", path.display()))?;
    let mut tensors = BTreeMap::new();
    for (name, info) in &content.tensor_infos {
        let q = info.read(&mut f, content.tensor_data_offset, &Device::Cpu)?;
        tensors.insert(
            name.clone(),
            (format!("{:?}", q.dtype()), q.data()?.into_owned()),
        );
    }
    let metadata = content
        .metadata
        .iter()
        .map(|(k, v)| (k.clone(), format!("{v:?}")))
        .collect();
    Ok(GgufStored { tensors, metadata })
}
