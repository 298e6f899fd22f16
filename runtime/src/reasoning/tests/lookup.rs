//! Prompt-lookup decoding in the generator step model: the same steps as one token per call,
//! in fewer calls where the model copies from its prompt.

use super::super::{reason, Decoding, GeneratorStepModel, LoopOptions, PromptLookup, Reasoning};
use super::{hash_lm, loop_tokenizer, HashLm, ListRetriever};
use crate::error::{Error, Result};

/// One question's run and the model calls it took.
fn run(
    lm: &HashLm,
    lookup: Option<PromptLookup>,
    decoding: Decoding,
) -> Result<(Reasoning, usize)> {
    let tok = loop_tokenizer()?;
    let r = ListRetriever::new(20);
    *lm.calls
        .lock()
        .map_err(|_| Error::Internal("calls".into()))? = 0;
    let mut m = GeneratorStepModel::new(lm, &tok, &[lm.eos])
        .with_decoding(decoding)
        .with_prompt_lookup(lookup);
    let out = reason("Which doc ?", &r, &mut m, &LoopOptions::default())?;
    let calls = *lm
        .calls
        .lock()
        .map_err(|_| Error::Internal("calls".into()))?;
    Ok((out, calls))
}

/// What decoding decides, step by step (timings left out).
type StepView = (String, usize, usize, usize, usize, Option<f64>, Option<f64>);

fn steps(r: &Reasoning) -> Vec<StepView> {
    r.steps
        .iter()
        .map(|s| {
            (
                s.sentence.clone(),
                s.new_tokens,
                s.prompt_tokens,
                s.prefilled_tokens,
                s.reused_tokens,
                s.mean_prob,
                s.mean_entropy,
            )
        })
        .collect()
}

#[test]
fn prompt_lookup_gives_one_token_decodings_steps_in_fewer_calls_when_the_model_copies() -> Result<()>
{
    let tok = loop_tokenizer()?;
    let settings = [
        Some(PromptLookup::with_max_draft(1)),
        Some(PromptLookup::default()),
        Some(PromptLookup {
            max_ngram: 4,
            min_ngram: 1,
            max_draft: 16,
        }),
    ];
    for copy in [false, true] {
        let mut lm = hash_lm(&tok)?;
        lm.copy = copy;
        let (plain, plain_calls) = run(&lm, None, Decoding::Greedy)?;
        assert!(
            plain.steps.iter().map(|s| s.new_tokens).sum::<usize>() > 10,
            "copy {copy}: {:?}",
            plain.sentences()
        );
        for pl in settings {
            let (looked, calls) = run(&lm, pl, Decoding::Greedy)?;
            assert_eq!(looked.answer, plain.answer, "copy {copy}, {pl:?}");
            assert_eq!(steps(&looked), steps(&plain), "copy {copy}, {pl:?}");
            if copy {
                // The copying model's sentences are drafts the lookup finds: most tokens are
                // accepted in batches, so the calls drop well below one per token.
                assert!(
                    (calls as f64) < 0.8 * plain_calls as f64,
                    "{pl:?}: {calls} calls with lookup vs {plain_calls} without"
                );
            }
        }
    }
    Ok(())
}

#[test]
fn sampling_ignores_prompt_lookup() -> Result<()> {
    let tok = loop_tokenizer()?;
    let mut lm = hash_lm(&tok)?;
    lm.copy = true;
    let sample = Decoding::Sample {
        temperature: 0.7,
        seed: 3,
    };
    let (plain, plain_calls) = run(&lm, None, sample)?;
    let (looked, calls) = run(&lm, Some(PromptLookup::default()), sample)?;
    assert_eq!(steps(&looked), steps(&plain));
    assert_eq!(calls, plain_calls, "one call per token when sampling");
    Ok(())
}
