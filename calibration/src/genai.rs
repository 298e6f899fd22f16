//! The int8 export's `genai_config.json`: the fp32 export's file pointing at the int8 model.

use std::path::Path;

use serde_json::{json, Value};

use crate::{Error, Result};

/// Reads the fp32 export's `genai_config.json` text (read from `path`) and returns the int8
/// export's: `model.decoder.filename` set to `int8_model`, `model.steper_dtype` set to `int8`.
/// A file that is not a JSON object, or whose `model` or `model.decoder` is not an object, is an
/// [`Error::Model`] naming the file and the field.
pub fn int8_genai_config(text: &str, path: &Path, int8_model: &str) -> Result<Value> {
    let bad = |message: String| Error::Model {
        path: path.to_path_buf(),
        message,
    };
    let mut v: Value =
        serde_json::from_str(text).map_err(|e| bad(format!("not a genai_config.json: {e}")))?;
    let root = v
        .as_object_mut()
        .ok_or_else(|| bad(format!("expected a JSON object, got {}", kind(text))))?;
    if let Some(model) = root.get_mut("model") {
        let model = model
            .as_object_mut()
            .ok_or_else(|| bad("field `model`: expected an object".into()))?;
        if let Some(decoder) = model.get_mut("decoder") {
            decoder
                .as_object_mut()
                .ok_or_else(|| bad("field `model.decoder`: expected an object".into()))?
                .insert("filename".into(), json!(int8_model));
        }
        model.insert("steper_dtype".into(), json!("int8"));
    }
    Ok(v)
}

/// The first character of a JSON text, as a hint of what it holds.
fn kind(text: &str) -> &'static str {
    match text.trim_start().chars().next() {
        Some('[') => "an array",
        Some('"') => "a string",
        Some('t' | 'f') => "a boolean",
        Some('n') => "null",
        _ => "a number",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const INT8: &str = "model.int8.onnx";

    #[test]
    fn the_decoder_file_and_dtype_are_set() -> Result<()> {
        let v = int8_genai_config(
            r#"{"model": {"decoder": {"filename": "model.onnx"}, "type": "llama"}}"#,
            Path::new("genai_config.json"),
            INT8,
        )?;
        assert_eq!(v["model"]["decoder"]["filename"], INT8);
        assert_eq!(v["model"]["steper_dtype"], "int8");
        assert_eq!(v["model"]["type"], "llama");
        Ok(())
    }

    /// Found by fuzzing: `{"model": 1}` panicked (serde_json's index assignment on a number).
    #[test]
    fn a_genai_config_whose_model_is_not_an_object_is_refused_naming_the_field() {
        for (text, field) in [
            (r#"{"model": 1}"#, "field `model`"),
            (r#"{"model": [{"decoder": {}}]}"#, "field `model`"),
            (r#"{"model": {"decoder": "x"}}"#, "field `model.decoder`"),
            (r#"{"model": {"decoder": null}}"#, "field `model.decoder`"),
            ("[1]", "expected a JSON object"),
        ] {
            let e = int8_genai_config(text, Path::new("dir/genai_config.json"), INT8)
                .expect_err(text)
                .to_string();
            assert!(
                e.contains("dir/genai_config.json") && e.contains(field),
                "{text}: {e}"
            );
        }
    }
}
