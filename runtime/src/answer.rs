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
    "aug", "sep", "sept", "oct", "nov", "dec", "approx", "est", "u.s", "u.k", "e.g", "i.e",
];

/// The first sentence of a generation: the text up to the first newline, cut after the first
/// `.`, `!` or `?` that is followed by whitespace (or ends the text) and does not close an
/// abbreviation (`Dr.`, `St.`, `U.S.`) or a single initial (`J. R. R.`). Trimmed.
pub fn first_sentence(text: &str) -> &str {
    let line = text.trim_start().lines().next().unwrap_or("");
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
            // Numbers like "3." at the end are fine; "No. 5" handled above.
        }
        return line[..after].trim();
    }
    line.trim()
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
