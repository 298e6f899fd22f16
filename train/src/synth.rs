//! A synthetic multi-hop world: entities with typed relations, one passage per entity plus
//! distractors that share names, and 2-, 3- and 4-hop questions with their gold reasoning chains.
//! Deterministic per seed; written in the corpus and QA formats of docs/DESIGN.md.

use std::collections::{BTreeMap, BTreeSet};

use rand::seq::{IndexedRandom, SliceRandom};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

/// Sizes of the world.
#[derive(Debug, Clone, Serialize)]
pub struct SynthConfig {
    /// Seed of everything.
    pub seed: u64,
    /// Countries.
    pub countries: usize,
    /// Cities.
    pub cities: usize,
    /// Companies.
    pub companies: usize,
    /// People.
    pub people: usize,
    /// Questions per hop count (2, 3, 4).
    pub questions_per_hop: usize,
    /// Share of question chains for dev and for test each.
    pub heldout_fraction: f64,
}

impl Default for SynthConfig {
    fn default() -> Self {
        SynthConfig {
            seed: 0,
            countries: 12,
            cities: 40,
            companies: 40,
            people: 160,
            questions_per_hop: 200,
            heldout_fraction: 0.15,
        }
    }
}

/// A passage of the corpus.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Passage {
    /// Corpus id.
    pub id: String,
    /// Title (the entity name).
    pub title: String,
    /// Text.
    pub text: String,
}

/// A paragraph attached to a question.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct QaParagraph {
    /// Title.
    pub title: String,
    /// Text.
    pub text: String,
    /// Whether it supports the answer.
    pub is_supporting: bool,
}

/// A question in the QA schema, plus its gold chain.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct QaItem {
    /// Question id.
    pub id: String,
    /// `synth`.
    pub dataset: String,
    /// The question.
    pub question: String,
    /// Gold answers.
    pub answers: Vec<String>,
    /// `2hop`, `3hop`, `4hop`.
    #[serde(rename = "type")]
    pub kind: String,
    /// Supporting paragraphs first (in chain order), then distractors.
    pub paragraphs: Vec<QaParagraph>,
    /// Titles of the supporting paragraphs in chain order.
    pub supporting_titles: Vec<String>,
    /// The gold reasoning: one sentence per hop, each taken from the passage of that hop.
    pub gold_reasoning: Vec<String>,
}

/// The generated world.
#[derive(Debug, Clone, Serialize)]
pub struct World {
    /// Every passage.
    pub corpus: Vec<Passage>,
    /// Training questions.
    pub train: Vec<QaItem>,
    /// Development questions.
    pub dev: Vec<QaItem>,
    /// Test questions.
    pub test: Vec<QaItem>,
}

const ONSETS: &[&str] = &[
    "b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "kr", "st", "th",
    "gl", "dr",
];
const VOWELS: &[&str] = &["a", "e", "i", "o", "u", "ae", "io", "ou"];
const CODAS: &[&str] = &["", "n", "r", "s", "l", "th", "m", "x", "nd"];

fn word(rng: &mut ChaCha8Rng, syllables: usize) -> String {
    let mut s = String::new();
    for _ in 0..syllables {
        s.push_str(ONSETS.choose(rng).copied().unwrap_or("b"));
        s.push_str(VOWELS.choose(rng).copied().unwrap_or("a"));
    }
    s.push_str(CODAS.choose(rng).copied().unwrap_or(""));
    let mut c = s.chars();
    match c.next() {
        Some(f) => f.to_uppercase().collect::<String>() + c.as_str(),
        None => s,
    }
}

fn unique(
    rng: &mut ChaCha8Rng,
    used: &mut BTreeSet<String>,
    make: impl Fn(&mut ChaCha8Rng) -> String,
) -> String {
    loop {
        let w = make(rng);
        if used.insert(w.clone()) {
            return w;
        }
    }
}

struct Person {
    name: String,
    city: usize,
    employer: usize,
}

struct Company {
    name: String,
    hq: usize,
    founder: usize,
}

/// Builds the world for `cfg`.
pub fn generate_world(cfg: &SynthConfig) -> World {
    let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed);
    let mut used = BTreeSet::new();
    let countries: Vec<String> = (0..cfg.countries.max(2))
        .map(|_| unique(&mut rng, &mut used, |r| word(r, 2)))
        .collect();
    let cities: Vec<(String, usize)> = (0..cfg.cities.max(2))
        .map(|_| {
            let n = unique(&mut rng, &mut used, |r| word(r, 2));
            (n, rng.random_range(0..countries.len()))
        })
        .collect();
    let surnames: Vec<String> = (0..(cfg.people / 2).max(2))
        .map(|_| unique(&mut rng, &mut used, |r| word(r, 2)))
        .collect();
    let n_people = cfg.people.max(4);
    let n_comp = cfg.companies.max(2);
    let mut people: Vec<Person> = Vec::new();
    let mut pnames = BTreeSet::new();
    for _ in 0..n_people {
        // Surnames repeat on purpose: people who share a name are each other's distractors.
        let name = loop {
            let syl = 1 + rng.random_range(0..2);
            let first = word(&mut rng, syl);
            let n = format!(
                "{first} {}",
                surnames.choose(&mut rng).cloned().unwrap_or_default()
            );
            if pnames.insert(n.clone()) && !used.contains(&n) {
                break n;
            }
        };
        people.push(Person {
            name,
            city: rng.random_range(0..cities.len()),
            employer: rng.random_range(0..n_comp),
        });
    }
    let suffixes = ["Corp", "Works", "Labs", "Group", "Industries"];
    let companies: Vec<Company> = (0..n_comp)
        .map(|_| {
            let base = unique(&mut rng, &mut used, |r| word(r, 2));
            Company {
                name: format!(
                    "{base} {}",
                    suffixes.choose(&mut rng).copied().unwrap_or("Corp")
                ),
                hq: rng.random_range(0..cities.len()),
                founder: rng.random_range(0..n_people),
            }
        })
        .collect();

    // Passages: one per entity; each fact is one sentence so a gold step is one sentence.
    let mut corpus = Vec::new();
    let mut sent = BTreeMap::new(); // (kind, idx, relation) -> sentence
    for (i, c) in countries.iter().enumerate() {
        let text = format!("{c} is a country. Its people are known as the {c}ans.");
        corpus.push(Passage {
            id: format!("country-{i}"),
            title: c.clone(),
            text,
        });
    }
    for (i, (c, k)) in cities.iter().enumerate() {
        let fact = format!("{c} is a city located in {}.", countries[*k]);
        sent.insert(("city", i, "country"), fact.clone());
        let text = format!("{fact} {c} has a river port and an old market.");
        corpus.push(Passage {
            id: format!("city-{i}"),
            title: c.clone(),
            text,
        });
    }
    for (i, co) in companies.iter().enumerate() {
        let hq = format!("{} is headquartered in {}.", co.name, cities[co.hq].0);
        let founder = format!("{} was founded by {}.", co.name, people[co.founder].name);
        sent.insert(("company", i, "hq"), hq.clone());
        sent.insert(("company", i, "founder"), founder.clone());
        corpus.push(Passage {
            id: format!("company-{i}"),
            title: co.name.clone(),
            text: format!("{hq} {founder}"),
        });
    }
    for (i, p) in people.iter().enumerate() {
        let born = format!("{} was born in {}.", p.name, cities[p.city].0);
        let works = format!("{} works for {}.", p.name, companies[p.employer].name);
        sent.insert(("person", i, "born"), born.clone());
        sent.insert(("person", i, "works"), works.clone());
        corpus.push(Passage {
            id: format!("person-{i}"),
            title: p.name.clone(),
            text: format!("{born} {works}"),
        });
    }
    let passage = |kind: &str, i: usize| -> &Passage {
        let id = format!("{kind}-{i}");
        corpus
            .iter()
            .find(|p| p.id == id)
            .expect("every entity has a passage")
    };

    // Questions: chains starting at a person.
    let mut items: Vec<(Vec<String>, QaItem)> = Vec::new();
    let mut seen_chains = BTreeSet::new();
    for hops in [2usize, 3, 4] {
        let mut made = 0;
        let mut tries = 0;
        while made < cfg.questions_per_hop && tries < cfg.questions_per_hop * 20 {
            tries += 1;
            let pi = rng.random_range(0..n_people);
            let p = &people[pi];
            let (question, chain, reasoning, answer): (
                String,
                Vec<(&str, usize)>,
                Vec<String>,
                String,
            ) = match hops {
                2 => (
                    format!("In which country was {} born?", p.name),
                    vec![("person", pi), ("city", p.city)],
                    vec![
                        sent[&("person", pi, "born")].clone(),
                        sent[&("city", p.city, "country")].clone(),
                    ],
                    countries[cities[p.city].1].clone(),
                ),
                3 => {
                    let co = &companies[p.employer];
                    (
                        format!(
                            "In which country is the company that {} works for headquartered?",
                            p.name
                        ),
                        vec![("person", pi), ("company", p.employer), ("city", co.hq)],
                        vec![
                            sent[&("person", pi, "works")].clone(),
                            sent[&("company", p.employer, "hq")].clone(),
                            sent[&("city", co.hq, "country")].clone(),
                        ],
                        countries[cities[co.hq].1].clone(),
                    )
                }
                _ => {
                    let co = &companies[p.employer];
                    let f = &people[co.founder];
                    if co.founder == pi {
                        continue;
                    }
                    (
                        format!("In which country was the founder of the company that {} works for born?", p.name),
                        vec![("person", pi), ("company", p.employer), ("person", co.founder), ("city", f.city)],
                        vec![
                            sent[&("person", pi, "works")].clone(),
                            sent[&("company", p.employer, "founder")].clone(),
                            sent[&("person", co.founder, "born")].clone(),
                            sent[&("city", f.city, "country")].clone(),
                        ],
                        countries[cities[f.city].1].clone(),
                    )
                }
            };
            let chain_ids: Vec<String> = chain.iter().map(|(k, i)| format!("{k}-{i}")).collect();
            if !seen_chains.insert((hops, chain_ids.clone())) {
                continue;
            }
            let mut paragraphs: Vec<QaParagraph> = chain
                .iter()
                .map(|(k, i)| {
                    let ps = passage(k, *i);
                    QaParagraph {
                        title: ps.title.clone(),
                        text: ps.text.clone(),
                        is_supporting: true,
                    }
                })
                .collect();
            // Distractors: people sharing the surname, then random passages.
            let surname = p.name.split(' ').nth(1).unwrap_or_default().to_string();
            let mut distract: Vec<usize> = (0..n_people)
                .filter(|&j| j != pi && people[j].name.ends_with(&surname))
                .collect();
            distract.truncate(3);
            for j in distract {
                let ps = passage("person", j);
                paragraphs.push(QaParagraph {
                    title: ps.title.clone(),
                    text: ps.text.clone(),
                    is_supporting: false,
                });
            }
            while paragraphs.len() < hops + 4 {
                let ps = corpus.choose(&mut rng).expect("corpus not empty");
                if !paragraphs.iter().any(|x| x.title == ps.title) {
                    paragraphs.push(QaParagraph {
                        title: ps.title.clone(),
                        text: ps.text.clone(),
                        is_supporting: false,
                    });
                }
            }
            let supporting_titles = chain
                .iter()
                .map(|(k, i)| passage(k, *i).title.clone())
                .collect();
            let item = QaItem {
                id: format!("synth-{}-{hops}hop-{made}", cfg.seed),
                dataset: "synth".into(),
                question,
                answers: vec![answer],
                kind: format!("{hops}hop"),
                paragraphs,
                supporting_titles,
                gold_reasoning: reasoning,
            };
            items.push((chain_ids, item));
            made += 1;
        }
    }
    // Split by starting person so that no chain (nor its first entity) is shared across splits.
    let mut starts: Vec<String> = items
        .iter()
        .map(|(c, _)| c[0].clone())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    starts.shuffle(&mut rng);
    let n_held = ((starts.len() as f64) * cfg.heldout_fraction).round() as usize;
    let dev_set: BTreeSet<String> = starts[..n_held].iter().cloned().collect();
    let test_set: BTreeSet<String> = starts[n_held..(2 * n_held).min(starts.len())]
        .iter()
        .cloned()
        .collect();
    let (mut train, mut dev, mut test) = (Vec::new(), Vec::new(), Vec::new());
    for (chain, item) in items {
        if dev_set.contains(&chain[0]) {
            dev.push(item);
        } else if test_set.contains(&chain[0]) {
            test.push(item);
        } else {
            train.push(item);
        }
    }
    World {
        corpus,
        train,
        dev,
        test,
    }
}

/// Writes `corpus.jsonl`, `train.jsonl`, `dev.jsonl` and `test.jsonl` into `dir` (each file
/// atomically).
pub fn write_world(w: &World, dir: &std::path::Path) -> crate::Result<()> {
    fn lines<T: Serialize>(rows: &[T]) -> String {
        let mut s = String::new();
        for r in rows {
            s.push_str(&serde_json::to_string(r).unwrap_or_default());
            s.push('\n');
        }
        s
    }
    steper_fsutil::write_atomic(&dir.join("corpus.jsonl"), lines(&w.corpus).as_bytes())?;
    steper_fsutil::write_atomic(&dir.join("train.jsonl"), lines(&w.train).as_bytes())?;
    steper_fsutil::write_atomic(&dir.join("dev.jsonl"), lines(&w.dev).as_bytes())?;
    steper_fsutil::write_atomic(&dir.join("test.jsonl"), lines(&w.test).as_bytes())?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deterministic_per_seed() {
        let cfg = SynthConfig {
            questions_per_hop: 30,
            ..Default::default()
        };
        let a = serde_json::to_string(&generate_world(&cfg)).unwrap();
        let b = serde_json::to_string(&generate_world(&cfg)).unwrap();
        assert_eq!(a, b);
        let c = serde_json::to_string(&generate_world(&SynthConfig { seed: 1, ..cfg })).unwrap();
        assert_ne!(a, c);
    }

    #[test]
    fn splits_share_no_chain_start_and_chains_are_consistent() {
        let w = generate_world(&SynthConfig {
            questions_per_hop: 60,
            ..Default::default()
        });
        assert!(!w.train.is_empty() && !w.dev.is_empty() && !w.test.is_empty());
        let first = |items: &[QaItem]| -> BTreeSet<String> {
            items
                .iter()
                .map(|q| q.supporting_titles[0].clone())
                .collect()
        };
        let (tr, de, te) = (first(&w.train), first(&w.dev), first(&w.test));
        assert!(tr.is_disjoint(&de) && tr.is_disjoint(&te) && de.is_disjoint(&te));
        for q in w.train.iter().chain(&w.dev).chain(&w.test) {
            let hops: usize = q.kind[..1].parse().unwrap();
            assert_eq!(q.gold_reasoning.len(), hops);
            assert_eq!(q.supporting_titles.len(), hops);
            // Each reasoning sentence is in its supporting passage; the last names the answer.
            for (s, t) in q.gold_reasoning.iter().zip(&q.supporting_titles) {
                let p = q.paragraphs.iter().find(|p| &p.title == t).unwrap();
                assert!(p.text.contains(s.as_str()) && p.is_supporting);
            }
            assert!(q.gold_reasoning.last().unwrap().contains(&q.answers[0]));
        }
        for h in ["2hop", "3hop", "4hop"] {
            assert!(w.test.iter().any(|q| q.kind == h), "no {h} in test");
        }
    }
}
