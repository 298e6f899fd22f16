//! An export records every end id of a Llama-3.x-style checkpoint (config.json's and
//! generation_config.json's) and takes bf16 weights.

mod common;

use anyhow::Result;
use candle_core::DType;
use common::*;
use steper_models::{Checkpoint, TokenIds};
use steper_runtime::Manifest;

#[test]
fn manifest_and_genai_config_list_every_eos_id_of_a_bf16_checkpoint() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let ckpt = tmp.path().join("ckpt");
    let out = tmp.path().join("export");
    let mut cfg = tiny_config();
    let eos = cfg.eos_ids();
    let first = eos.first().copied().unwrap_or(2);
    let (second, third) = (first + 1, first + 2);
    cfg.eos_token_id = Some(TokenIds::Many(vec![first, second]));
    let w = tiny_weights(&cfg, 5)?.to_dtype(DType::BF16)?;
    Checkpoint::save(&ckpt, &cfg, &w, None)?;
    write_tokenizer(&ckpt.join("tokenizer.json"), cfg.vocab_size)?;
    std::fs::write(
        ckpt.join("generation_config.json"),
        format!("{{\"eos_token_id\": [{first}, {third}]}}"),
    )?;
    steper_export::export(&ckpt, &out, &Default::default())?;
    let m = Manifest::load(&out.join("steper.json"))?;
    assert_eq!(m.eos_token_ids, vec![first, second, third]);
    let genai: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("genai_config.json"))?)?;
    assert_eq!(
        genai["model"]["eos_token_id"],
        serde_json::json!([first, second, third])
    );
    Ok(())
}
