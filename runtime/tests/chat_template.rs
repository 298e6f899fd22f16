//! The chat templates of tests/fixtures/chat render byte for byte as Hugging Face transformers
//! renders them. The expected texts were written by experiments/chat-template/render.py
//! (transformers' own Jinja environment, its clock pinned to templates.json's `time`); this test
//! pins `strftime_now` to the same instant.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use steper_runtime::prompt::ChatTemplate;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/chat")
}

#[derive(serde::Deserialize)]
struct TemplateCase {
    file: String,
    bos_token: Option<String>,
    eos_token: Option<String>,
}

#[derive(serde::Deserialize)]
struct Cases {
    time_unix: i64,
    templates: BTreeMap<String, TemplateCase>,
}

fn load_template(case: &TemplateCase, time: i64) -> Result<ChatTemplate> {
    let path = fixtures().join(&case.file);
    let source =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let mut tokens = BTreeMap::new();
    if let Some(b) = &case.bos_token {
        tokens.insert("bos_token".to_string(), b.clone());
    }
    if let Some(e) = &case.eos_token {
        tokens.insert("eos_token".to_string(), e.clone());
    }
    Ok(ChatTemplate::new(&source, &path, tokens)?.with_fixed_time(time))
}

#[test]
fn fixture_templates_render_as_transformers_does() -> Result<()> {
    let dir = fixtures();
    let cases: Cases = serde_json::from_str(&std::fs::read_to_string(dir.join("templates.json"))?)?;
    let mut conversations: Vec<(String, String)> = Vec::new();
    for entry in std::fs::read_dir(dir.join("conversations"))? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "json") {
            let name = path
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .context("conversation file name")?;
            conversations.push((name, std::fs::read_to_string(&path)?));
        }
    }
    conversations.sort();
    if conversations.len() < 4 || cases.templates.len() < 2 {
        bail!(
            "fixtures missing in {}: {} conversations, {} templates",
            dir.display(),
            conversations.len(),
            cases.templates.len()
        );
    }
    let mut checked = 0;
    for (tname, tcase) in &cases.templates {
        let template = load_template(tcase, cases.time_unix)?;
        for (cname, variables) in &conversations {
            let ok = dir.join(format!("{tname}.{cname}.txt"));
            let err = dir.join(format!("{tname}.{cname}.error.txt"));
            let got = template.render_json(variables);
            if ok.is_file() {
                let want = std::fs::read_to_string(&ok)?;
                let got = got.with_context(|| format!("{tname} × {cname}"))?;
                if got != want {
                    let at = got
                        .bytes()
                        .zip(want.bytes())
                        .take_while(|(a, b)| a == b)
                        .count();
                    bail!(
                        "{tname} × {cname}: differs from {} at byte {at}:\n got: {:?}\nwant: {:?}",
                        ok.display(),
                        &got[at.saturating_sub(40).min(got.len())..(at + 60).min(got.len())],
                        &want[at.saturating_sub(40).min(want.len())..(at + 60).min(want.len())]
                    );
                }
            } else if err.is_file() {
                let want = std::fs::read_to_string(&err)?;
                let e = match got {
                    Ok(text) => {
                        bail!("{tname} × {cname}: rendered {text:?}, expected the error {want:?}")
                    }
                    Err(e) => e.to_string(),
                };
                assert!(e.contains(want.trim()), "{tname} × {cname}: {e}");
                assert!(
                    e.contains(&tcase.file),
                    "the error names the template file: {e}"
                );
            } else {
                bail!(
                    "{tname} × {cname}: neither {} nor {}",
                    ok.display(),
                    err.display()
                );
            }
            checked += 1;
        }
    }
    assert_eq!(checked, cases.templates.len() * conversations.len());
    Ok(())
}

#[test]
fn strftime_now_follows_the_injected_clock() -> Result<()> {
    let t = ChatTemplate::new("{{ strftime_now('%d %b %Y') }}", "t.jinja", BTreeMap::new())?;
    assert_eq!(
        t.clone().with_fixed_time(0).render(&[], false)?,
        "01 Jan 1970"
    );
    assert_eq!(
        t.with_fixed_time(1_721_997_296).render(&[], false)?,
        "26 Jul 2024"
    );
    Ok(())
}

#[test]
fn a_broken_template_names_its_file_and_the_jinja_error() -> Result<()> {
    let dir = tempfile::tempdir()?;
    std::fs::write(
        dir.path().join("tokenizer_config.json"),
        r#"{"eos_token": "</s>", "chat_template": "{% for m in messages %}{{ m.content }{% endfor %}"}"#,
    )?;
    let e = ChatTemplate::from_model_dir(dir.path(), None)
        .err()
        .context("a template with a syntax error compiled")?
        .to_string();
    assert!(e.contains("tokenizer_config.json"), "{e}");
    assert!(e.contains("syntax error"), "{e}");
    // A list of named templates: the `default` one is taken, another by name, a missing name
    // lists the names there are.
    std::fs::write(
        dir.path().join("tokenizer_config.json"),
        r#"{"eos_token": {"content": "</s>"}, "chat_template": [
            {"name": "default", "template": "D{{ eos_token }}"},
            {"name": "tool_use", "template": "T"}]}"#,
    )?;
    let t = ChatTemplate::from_model_dir(dir.path(), None)?.context("no template")?;
    assert_eq!(t.render(&[], false)?, "D</s>");
    let t = ChatTemplate::from_model_dir(dir.path(), Some("tool_use"))?.context("no template")?;
    assert_eq!(t.render(&[], false)?, "T");
    let e = ChatTemplate::from_model_dir(dir.path(), Some("rag"))
        .err()
        .context("a missing name was accepted")?
        .to_string();
    assert!(e.contains("default, tool_use"), "{e}");
    Ok(())
}
