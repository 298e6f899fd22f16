//! What the chat layout costs the cross-step KV reuse: a four-step run of the loop's prompts
//! (two passages retrieved per step, one sentence generated per step) tokenized with
//! SmolLM2-135M-Instruct's tokenizer, in the plain layout and inside a ChatML template
//! (tests/fixtures/chat/qwen2.5.jinja, whose `<|im_start|>` / `<|im_end|>` are SmolLM2's special
//! tokens too). At each step the cache holds the previous prompt and its sentence; the tokens
//! re-prefilled are those after the longest common prefix with the new prompt (what
//! `GeneratorStepModel` keeps). Prints both reuse ratios; asserts that the chat layout
//! re-prefills at most the template's closing markup more per step than the plain one.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{anyhow, Result};
use steper_runtime::data::PromptPassage;
use steper_runtime::prompt::{ChatTemplate, PromptLayout};
use tokenizers::Tokenizer;

/// Extra tokens the chat layout may re-prefill per step: `<|im_end|>`, `\n`, `<|im_start|>`,
/// `assistant`, `\n` between the question and `A:` (the plain layout has `\n` there).
const MARKUP_TOKENS: usize = 5;

fn passage(step: usize, i: usize) -> PromptPassage {
    let words: Vec<String> = (0..60)
        .map(|w| format!("word{}", (step * 131 + i * 17 + w * 7) % 97))
        .collect();
    PromptPassage {
        title: format!("Title {step}-{i}"),
        text: words.join(" "),
    }
}

/// (tokens re-prefilled, prompt tokens) per step after the first.
fn reuse(layout: &PromptLayout, tok: &Tokenizer) -> Result<Vec<(usize, usize)>> {
    let enc = |s: &str| -> Result<Vec<u32>> {
        Ok(tok
            .encode(s, false)
            .map_err(|e| anyhow!("{e}"))?
            .get_ids()
            .to_vec())
    };
    let question = "Which county is the city near the valley in?";
    let mut passages = Vec::new();
    let mut reasoning: Vec<String> = Vec::new();
    let mut cached: Option<Vec<u32>> = None;
    let mut out = Vec::new();
    for step in 1..=4 {
        passages.push(passage(step, 0));
        passages.push(passage(step, 1));
        let prompt = layout.render(question, &passages, &reasoning, 100, None)?;
        let ids = enc(&prompt)?;
        if let Some(prev) = &cached {
            let common = prev.iter().zip(&ids).take_while(|(a, b)| a == b).count();
            out.push((ids.len() - common.min(ids.len() - 1), ids.len()));
        }
        let sentence = format!("Step {step} finds the city in county {step}.");
        let mut held = ids;
        held.extend(enc(&format!(" {sentence}"))?);
        cached = Some(held);
        reasoning.push(sentence);
    }
    Ok(out)
}

#[test]
fn chat_layout_costs_only_its_markup_in_re_prefilled_tokens() -> Result<()> {
    let tok = Tokenizer::from_file(steper_test_support::smollm2_tokenizer()?)
        .map_err(|e| anyhow!("{e}"))?;
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/chat");
    let source = std::fs::read_to_string(fixtures.join("qwen2.5.jinja"))?;
    let chat = PromptLayout::chat(ChatTemplate::new(
        &source,
        fixtures.join("qwen2.5.jinja"),
        BTreeMap::from([("eos_token".to_string(), "<|im_end|>".to_string())]),
    )?);
    let plain = reuse(&PromptLayout::Plain, &tok)?;
    let chatted = reuse(&chat, &tok)?;
    let ratio = |v: &[(usize, usize)]| {
        let (re, all): (usize, usize) = v.iter().fold((0, 0), |(a, b), (r, t)| (a + r, b + t));
        (re, all, 1.0 - re as f64 / all as f64)
    };
    let (pr, pa, pratio) = ratio(&plain);
    let (cr, ca, cratio) = ratio(&chatted);
    println!(
        "steps 2-4: plain re-prefilled {pr} of {pa} prompt tokens (reuse {pratio:.3}); chat re-prefilled {cr} of {ca} (reuse {cratio:.3}); per step plain {plain:?} chat {chatted:?}"
    );
    for ((p, _), (c, _)) in plain.iter().zip(&chatted) {
        assert!(
            *c <= p + MARKUP_TOKENS,
            "chat re-prefills {c} tokens where plain re-prefills {p}"
        );
    }
    assert!(cratio > 0.4, "chat reuse ratio {cratio}");
    Ok(())
}
