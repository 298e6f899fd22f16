//! Reading generated text: the answer phrase (`answer is:? (.*)`), the first sentence of a
//! generation, and IRCoT's query cleaning.

/// The answer in `text` if it contains `answer is` (ASCII case-insensitive), optionally
/// followed by `:`, as IRCoT's `.* answer is:? (.*)\.?` reads it: the rest of the line after the
/// last occurrence, trimmed, with trailing periods stripped. `None` when the phrase is absent.
/// The answer may be empty (`So the answer is:` and nothing after it).
pub fn extract_answer(text: &str) -> Option<String> {
    const PHRASE: &str = "answer is";
    let lower = text.to_ascii_lowercase();
    // Last occurrence that ends at a word boundary (`answer is` + `:`, space or end).
    let mut found = None;
    let mut from = 0;
    while let Some(i) = lower[from..].find(PHRASE) {
        let start = from + i;
        let end = start + PHRASE.len();
        let next = lower[end..].chars().next();
        let word_start = start == 0 || !lower[..start].ends_with(char::is_alphanumeric);
        if word_start && matches!(next, None | Some(':') | Some(' ') | Some('\t') | Some('\n')) {
            found = Some(end);
        }
        from = start + 1;
    }
    let mut rest = &text[found?..];
    if let Some(r) = rest.strip_prefix(':') {
        rest = r;
    }
    let line = rest.trim_start().lines().next().unwrap_or("");
    Some(line.trim().trim_end_matches('.').trim_end().to_string())
}

/// Abbreviations whose period does not end a sentence.
const ABBREVIATIONS: &[&str] = &[
    "mr", "mrs", "ms", "dr", "st", "jr", "sr", "prof", "vs", "etc", "inc", "ltd", "co", "no", "mt",
    "ft", "gen", "col", "lt", "sgt", "capt", "rev", "jan", "feb", "mar", "apr", "jun", "jul",
    "aug", "sep", "sept", "oct", "nov", "dec", "approx", "est", "u.s", "u.k", "e.g", "i.e", "c",
    "ca", "fl", "vol", "pp", "ed", "nos", "ave", "blvd",
];

/// Byte offset just after the first sentence end in `line`: a `.`, `!` or `?` that is
/// followed by whitespace (or ends the text) and does not close an abbreviation (`Dr.`, `St.`,
/// `U.S.`, `c.`) or a single initial (`J. R. R.`).
fn sentence_end(line: &str) -> Option<usize> {
    let bytes = line.as_bytes();
    for (i, c) in line.char_indices() {
        if !matches!(c, '.' | '!' | '?') {
            continue;
        }
        let after = i + 1;
        let ends = after >= bytes.len() || bytes[after].is_ascii_whitespace();
        if !ends {
            continue;
        }
        if c == '.' {
            let word = line[..i]
                .rsplit(char::is_whitespace)
                .next()
                .unwrap_or("")
                .trim_start_matches(|ch: char| !ch.is_alphanumeric());
            let lower = word.to_lowercase();
            let initial = word.chars().count() == 1 && word.chars().all(char::is_uppercase);
            if initial || ABBREVIATIONS.contains(&lower.as_str()) {
                continue;
            }
        }
        return Some(after);
    }
    None
}

/// The first sentence of a generation: the text up to the first newline, cut after the first
/// sentence end (see [`split_sentences`] for the rule). Trimmed.
pub fn first_sentence(text: &str) -> &str {
    let line = text.trim_start().lines().next().unwrap_or("");
    match sentence_end(line) {
        Some(end) => line[..end].trim(),
        None => line.trim(),
    }
}

/// Splits a passage into sentences with the rule [`first_sentence`] uses (a `.`, `!` or `?`
/// followed by whitespace that does not close an abbreviation or an initial; newlines also
/// end a sentence), so a sentence taken from a passage is exactly what the loop keeps when a
/// model generates it. Trimmed, empty pieces dropped.
pub fn split_sentences(text: &str) -> Vec<&str> {
    let mut out = Vec::new();
    for line in text.lines() {
        let mut rest = line.trim();
        while !rest.is_empty() {
            match sentence_end(rest) {
                Some(end) => {
                    let s = rest[..end].trim();
                    if !s.is_empty() {
                        out.push(s);
                    }
                    rest = rest[end..].trim_start();
                }
                None => {
                    out.push(rest);
                    break;
                }
            }
        }
    }
    out
}

/// Words IRCoT removes from a sentence before using it as the next query.
const WH_WORDS: &[&str] = &[
    "what", "which", "who", "whom", "whose", "when", "where", "why", "how",
];
/// Lead-ins removed from the start of a sentence.
const LEAD_INS: &[&str] = &["so", "thus", "therefore", "hence"];

/// The next query from a generated sentence (IRCoT): `so`/`thus`/`therefore`/`hence` lead-ins
/// removed from the start, wh-words removed everywhere, whitespace collapsed. When nothing is
/// left, the sentence itself.
pub fn clean_query(sentence: &str) -> String {
    let mut words: Vec<&str> = sentence.split_whitespace().collect();
    let bare = |w: &str| {
        w.trim_matches(|c: char| !c.is_alphanumeric())
            .to_lowercase()
    };
    while let Some(first) = words.first() {
        if LEAD_INS.contains(&bare(first).as_str()) {
            words.remove(0);
        } else {
            break;
        }
    }
    let kept: Vec<&str> = words
        .into_iter()
        .filter(|w| !WH_WORDS.contains(&bare(w).as_str()))
        .collect();
    if kept.is_empty() {
        sentence.split_whitespace().collect::<Vec<_>>().join(" ")
    } else {
        kept.join(" ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extracts_the_answer() {
        assert_eq!(
            extract_answer("So the answer is: Paris."),
            Some("Paris".into())
        );
        assert_eq!(
            extract_answer("So the answer is Paris"),
            Some("Paris".into())
        );
        assert_eq!(
            extract_answer("Thus, the answer is: Chief of Protocol..  "),
            Some("Chief of Protocol".into())
        );
        assert_eq!(
            extract_answer("The Answer Is: yes.\nmore"),
            Some("yes".into())
        );
        assert_eq!(extract_answer("So the answer is:"), Some(String::new()));
        // The last occurrence wins, as with IRCoT's greedy `.*`.
        assert_eq!(
            extract_answer("The answer is unclear. So the answer is: 1912."),
            Some("1912".into())
        );
        assert_eq!(extract_answer("He was born in 1912."), None);
        assert_eq!(extract_answer("The answerisn't here."), None);
        assert_eq!(extract_answer("No answer issued."), None);
    }

    #[test]
    fn splits_passages_like_first_sentence() {
        let text = "Publix is one of the largest U.S. chains. It was founded by G. Jenkins in 1930! Is it? Yes\nNew line.";
        let s = split_sentences(text);
        assert_eq!(
            s,
            vec![
                "Publix is one of the largest U.S. chains.",
                "It was founded by G. Jenkins in 1930!",
                "Is it?",
                "Yes",
                "New line."
            ]
        );
        for x in &s {
            assert_eq!(first_sentence(x), *x);
        }
        assert!(split_sentences("  ").is_empty());
    }

    #[test]
    fn cuts_the_first_sentence() {
        assert_eq!(
            first_sentence(" He was born in 1912. He died."),
            "He was born in 1912."
        );
        assert_eq!(first_sentence("Is it? Yes."), "Is it?");
        assert_eq!(
            first_sentence("Dr. Who lived in St. Louis. Then"),
            "Dr. Who lived in St. Louis."
        );
        assert_eq!(
            first_sentence("J. R. R. Tolkien served the U.S. Army. x"),
            "J. R. R. Tolkien served the U.S. Army."
        );
        assert_eq!(
            first_sentence("It cost 3.5 million\nnext line"),
            "It cost 3.5 million"
        );
        assert_eq!(
            first_sentence("So the answer is: Paris."),
            "So the answer is: Paris."
        );
        assert_eq!(first_sentence(""), "");
        assert_eq!(
            first_sentence(
                "Aspasius ( ; Greek: Ἀσπάσιος ; c. 80 – c. 150 AD) was a philosopher. Next."
            ),
            "Aspasius ( ; Greek: Ἀσπάσιος ; c. 80 – c. 150 AD) was a philosopher."
        );
    }

    #[test]
    fn cleans_queries_like_ircot() {
        assert_eq!(
            clean_query("So, the woman who portrayed Corliss Archer is Shirley Temple."),
            "the woman portrayed Corliss Archer is Shirley Temple."
        );
        assert_eq!(
            clean_query("Therefore Thus what year did it open?"),
            "year did it open?"
        );
        assert_eq!(clean_query("Who?"), "Who?");
        assert_eq!(
            clean_query("Sonny Liston fought Ali."),
            "Sonny Liston fought Ali."
        );
    }
}
