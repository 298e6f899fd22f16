//! The Self-Ask demonstrations for the LLM teachers (`data/self_ask_prompts/demonstrations.txt`):
//! each is a real training question of `data/` whose passages are its own paragraphs, whose
//! intermediate answers are its annotated sub-answers (re-derived here from the data file with
//! the gold teacher's [`self_ask_hops`]) and whose final answer is a gold answer; each is laid
//! out exactly as the student's Self-Ask prompt; the file is taken as Self-Ask demonstrations by
//! the teachers and refused with IRCoT.

use std::collections::HashSet;

use anyhow::{bail, ensure, Context, Result};
use steper_runtime::data::{read_qa, PromptPassage, QaExample, ReadOptions};
use steper_runtime::prompt::{cap_words, PromptLayout};
use steper_runtime::Framework;
use steper_train::teacher::{self_ask_hops, OpenAiConfig, OpenAiTeacher, TeacherPrompt};

/// The demonstrations file, relative to `data/`.
const FILE: &str = "self_ask_prompts/demonstrations.txt";
/// How many demonstrations the file holds (a handful).
const DEMONSTRATIONS: usize = 6;
/// Dev files whose questions are held out for evaluation: no demonstration may come from them.
const DEV_FILES: [&str; 3] = [
    "musique_dev200.jsonl.gz",
    "2wikimultihopqa_dev164.jsonl.gz",
    "hotpotqa_dev500.jsonl.gz",
];

/// `(qid, file)` of each demonstration, from its `# qid: ID (FILE)` comment, in file order.
fn origins(text: &str) -> Result<Vec<(String, String)>> {
    text.lines()
        .filter_map(|l| l.strip_prefix("# qid: "))
        .map(|rest| {
            let (id, file) = rest
                .split_once(" (")
                .with_context(|| format!("`# qid: ID (FILE)` expected, got {rest:?}"))?;
            Ok((id.to_string(), file.trim_end_matches(')').to_string()))
        })
        .collect()
}

fn row(file: &str, id: &str) -> Result<QaExample> {
    let path = steper_test_support::data_file(&format!("{file}.jsonl.gz"))?;
    read_qa(&path, ReadOptions::default())?
        .rows
        .into_iter()
        .find(|q| q.id == id)
        .with_context(|| format!("{id} is not in {}", path.display()))
}

/// The parts of a Self-Ask demonstration: passages, question, (follow-up, answer) hops, the
/// final answer.
struct Parts {
    passages: Vec<PromptPassage>,
    question: String,
    hops: Vec<(String, String)>,
    answer: String,
}

fn parts(d: &str) -> Result<Parts> {
    let (head, tail) = d
        .split_once("\nQuestion: ")
        .or_else(|| d.strip_prefix("Question: ").map(|t| ("", t)))
        .context("no `Question:` line")?;
    let mut passages = Vec::new();
    for block in head.split("\n\n").filter(|b| !b.trim().is_empty()) {
        let (title, text) = block
            .strip_prefix("Wikipedia Title: ")
            .and_then(|b| b.split_once('\n'))
            .with_context(|| format!("not a passage: {block:?}"))?;
        passages.push(PromptPassage {
            title: title.to_string(),
            text: text.trim_end().to_string(),
        });
    }
    let mut lines = tail.lines();
    let question = lines.next().context("empty question")?.to_string();
    let (mut hops, mut answer) = (Vec::new(), None);
    let mut pending = None;
    for l in lines {
        if let Some(q) = l.strip_prefix("Follow up: ") {
            pending = Some(q.to_string());
        } else if let Some(a) = l.strip_prefix("Intermediate answer: ") {
            hops.push((
                pending.take().context("answer without follow-up")?,
                a.to_string(),
            ));
        } else if let Some(a) = l.strip_prefix("So the final answer is: ") {
            answer = Some(a.to_string());
        }
    }
    Ok(Parts {
        passages,
        question,
        hops,
        answer: answer.context("no final answer")?,
    })
}

#[test]
fn demonstrations_are_train_questions_with_their_annotated_answers() -> Result<()> {
    let text = steper_test_support::data_text(FILE)?;
    let path = steper_test_support::data_file(FILE)?;
    let prompt = TeacherPrompt::load(&path)?;
    assert_eq!(prompt.framework, Some(Framework::SelfAsk));
    assert_eq!(prompt.demonstrations.len(), DEMONSTRATIONS);
    let origins = origins(&text)?;
    assert_eq!(
        origins.len(),
        DEMONSTRATIONS,
        "one `# qid:` line per demonstration"
    );
    let mut dev_ids = HashSet::new();
    for f in DEV_FILES {
        let p = steper_test_support::data_file(f)?;
        dev_ids.extend(
            read_qa(&p, ReadOptions::default())?
                .rows
                .into_iter()
                .map(|q| q.id),
        );
    }
    let mut datasets = HashSet::new();
    for (d, (id, file)) in prompt.demonstrations.iter().zip(&origins) {
        ensure!(
            file.contains("train") && !dev_ids.contains(id),
            "{id} ({file}) is not a training question"
        );
        let q = row(file, id)?;
        let source = q.extra.get("source").and_then(|v| v.as_str()).unwrap_or("");
        ensure!(source.contains("train"), "{id}: source {source:?}");
        datasets.insert(q.dataset.clone());
        let p = parts(d).with_context(|| format!("demonstration {id}"))?;
        assert_eq!(p.question, q.question, "{id}");
        // Intermediate answers: the annotated sub-answers, in order, as the gold teacher gives.
        let gold = self_ask_hops(&q).map_err(|e| anyhow::anyhow!("{id}: {e}"))?;
        let answers: Vec<&str> = p.hops.iter().map(|h| h.1.as_str()).collect();
        let expected: Vec<&str> = gold.iter().map(|h| h.answer.as_str()).collect();
        assert_eq!(answers, expected, "{id}: intermediate answers");
        ensure!(
            q.answers.contains(&p.answer),
            "{id}: final answer {:?} is not a gold answer {:?}",
            p.answer,
            q.answers
        );
        // Passages: the question's own paragraphs, every hop's supporting one among them.
        for ps in &p.passages {
            let own = q
                .paragraphs
                .iter()
                .find(|x| x.title == ps.title)
                .with_context(|| format!("{id}: no paragraph {:?}", ps.title))?;
            assert_eq!(
                ps.text,
                cap_words(&own.text, usize::MAX),
                "{id}: {}",
                ps.title
            );
        }
        for h in &gold {
            if let Some(t) = &h.paragraph {
                ensure!(
                    p.passages.iter().any(|x| &x.title == t),
                    "{id}: hop {:?} has its paragraph {t:?} missing",
                    h.question
                );
            }
        }
        // The layout is the student's: the demonstration re-renders from its parts.
        let steps: Vec<String> = p
            .hops
            .iter()
            .map(|(f, a)| format!("Follow up: {f}\nIntermediate answer: {a}"))
            .collect();
        let rendered = PromptLayout::Plain.render_for(
            Framework::SelfAsk,
            &p.question,
            &p.passages,
            &steps,
            usize::MAX,
            Some(&format!("So the final answer is: {}", p.answer)),
        )?;
        assert_eq!(d, &rendered, "{id}: not the student's Self-Ask layout");
    }
    assert_eq!(
        datasets,
        HashSet::from(["musique".to_string(), "2wikimultihopqa".to_string()]),
        "demonstrations from both MuSiQue and 2WikiMultiHopQA"
    );
    Ok(())
}

#[test]
fn openai_teacher_sends_self_ask_demonstrations_before_the_self_ask_prompt() -> Result<()> {
    let path = steper_test_support::data_file(FILE)?;
    let prompt = TeacherPrompt::load(&path)?;
    prompt.check(Framework::SelfAsk)?;
    let student = PromptLayout::Plain.render_for(
        Framework::SelfAsk,
        "Who?",
        &[PromptPassage {
            title: "A".into(),
            text: "a b".into(),
        }],
        &[],
        usize::MAX,
        None,
    )?;
    let mut cfg = OpenAiConfig::new("http://127.0.0.1:9", "t");
    cfg.prompt = Some(prompt.clone());
    let body = OpenAiTeacher::new(cfg.clone(), None)?.request_body(&student, 8);
    let sent = body["prompt"].as_str().context("no prompt")?;
    assert_eq!(sent, prompt.completion_prompt(&student));
    assert!(sent.starts_with(&prompt.instruction));
    assert!(sent.ends_with(&format!("\n\n{student}")));
    for d in &prompt.demonstrations {
        assert!(sent.contains(&format!("{d}\n\n")));
    }
    cfg.chat = true;
    let body = OpenAiTeacher::new(cfg, None)?.request_body(&student, 8);
    let user = body["messages"][1]["content"].as_str().context("no user")?;
    assert!(user.starts_with(&prompt.demonstrations[0]));
    assert!(user.ends_with(&student));
    assert_eq!(body["messages"][0]["content"], prompt.instruction.as_str());
    Ok(())
}

#[test]
fn demonstrations_and_framework_must_agree() -> Result<()> {
    let sa = TeacherPrompt::load(&steper_test_support::data_file(FILE)?)?;
    let e = sa.check(Framework::Ircot).unwrap_err().to_string();
    assert!(e.contains("self-ask") && e.contains("ircot"), "{e}");
    let ircot = TeacherPrompt::default_fewshot()?;
    assert_eq!(ircot.framework, Some(Framework::Ircot));
    let e = ircot.check(Framework::SelfAsk).unwrap_err().to_string();
    assert!(e.contains("demonstrations.txt"), "{e}");
    ircot.check(Framework::Ircot)?;
    let theirs = steper_test_support::data_file("ircot_prompts/musique.txt")?;
    let p =
        TeacherPrompt::from_spec(&format!("ircot:{}:1", theirs.display()))?.context("a prompt")?;
    if p.check(Framework::SelfAsk).is_ok() {
        bail!("IRCoT's own demonstrations taken for Self-Ask");
    }
    Ok(())
}
