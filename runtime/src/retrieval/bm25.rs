//! BM25 retrieval over a tantivy index of `{id, title, text}` documents (feature `bm25`).
//!
//! Title and text are indexed with an English analyzer (simple tokenizer, long-token removal,
//! lower-casing, Lucene's English stop words, Snowball English stemming) registered as
//! [`ANALYZER`]. A query is analyzed the same way and scored by BM25 (tantivy: k1 = 1.2,
//! b = 0.75) over both fields, as a disjunction of its terms.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::{Deserialize, Serialize};
use tantivy::collector::TopDocs;
use tantivy::query::{BooleanQuery, Occur, Query, TermQuery};
use tantivy::schema::{
    Field, FieldType, IndexRecordOption, Schema, TextFieldIndexing, TextOptions, Value, STORED,
    STRING,
};
use tantivy::tokenizer::{
    Language, LowerCaser, RemoveLongFilter, SimpleTokenizer, Stemmer, StopWordFilter, TextAnalyzer,
};
use tantivy::{doc, Index, IndexReader, ReloadPolicy, TantivyDocument, Term};

use super::{Hit, Retriever};
use crate::data::Document;
use crate::error::{Error, Result};
use crate::progress::Progress;

/// Name of the English analyzer registered on every index this runtime writes or opens.
pub const ANALYZER: &str = "steper_en";
/// Tokens longer than this many bytes are dropped (tantivy's usual limit).
const MAX_TOKEN_BYTES: usize = 40;
/// Memory budget of the index writer.
const WRITER_MEMORY_BYTES: usize = 100_000_000;
/// Fields of the index schema.
#[derive(Debug, Clone, Copy)]
struct Fields {
    id: Field,
    title: Field,
    text: Field,
}

fn schema() -> (Schema, Fields) {
    let mut b = Schema::builder();
    let text_opts = TextOptions::default()
        .set_indexing_options(
            TextFieldIndexing::default()
                .set_tokenizer(ANALYZER)
                .set_index_option(IndexRecordOption::WithFreqsAndPositions),
        )
        .set_stored();
    let id = b.add_text_field("id", STRING | STORED);
    let title = b.add_text_field("title", text_opts.clone());
    let text = b.add_text_field("text", text_opts);
    (b.build(), Fields { id, title, text })
}

fn analyzer() -> Result<TextAnalyzer> {
    let stop = StopWordFilter::new(Language::English)
        .ok_or_else(|| Error::Internal("tantivy has no English stop-word list".into()))?;
    Ok(TextAnalyzer::builder(SimpleTokenizer::default())
        .filter(RemoveLongFilter::limit(MAX_TOKEN_BYTES))
        .filter(LowerCaser)
        .filter(stop)
        .filter(Stemmer::new(Language::English))
        .build())
}

fn index_err(path: &Path) -> impl Fn(tantivy::TantivyError) -> Error + '_ {
    move |e| Error::Index {
        path: path.to_path_buf(),
        message: e.to_string(),
    }
}

/// Options of [`build_index`].
#[derive(Debug, Clone, Copy, Default)]
pub struct IndexOptions {
    /// Show an indicatif progress bar (docs/s) on stderr.
    pub progress: bool,
}

/// What [`build_index`] did.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IndexStats {
    /// The index directory.
    pub path: PathBuf,
    /// Documents indexed.
    pub docs: usize,
    /// Wall time in seconds, commit included.
    pub seconds: f64,
    /// Documents per second.
    pub docs_per_sec: f64,
}

/// Indexes `docs` into a new directory `out`. The index is built in a temporary directory
/// beside `out` and renamed into place; `out` must not exist, or be an index written by this
/// runtime (it is replaced). An empty corpus is [`Error::EmptyCorpus`] (`source` names the file
/// it came from).
pub fn build_index(
    docs: &[Document],
    out: &Path,
    source: &Path,
    opts: IndexOptions,
) -> Result<IndexStats> {
    if docs.is_empty() {
        return Err(Error::EmptyCorpus {
            path: source.to_path_buf(),
        });
    }
    if out.exists() {
        // Refuse to clobber anything but one of our indexes.
        Bm25Index::open(out)?;
    }
    let start = Instant::now();
    let stage = steper_fsutil::StagingDir::new(out, steper_fsutil::Existing::Replace)?;
    let tmp = stage.path().to_path_buf();
    let result: Result<()> = (|| {
        let (schema, f) = schema();
        let index = Index::create_in_dir(&tmp, schema).map_err(index_err(out))?;
        index.tokenizers().register(ANALYZER, analyzer()?);
        let mut writer = index
            .writer_with_num_threads::<TantivyDocument>(1, WRITER_MEMORY_BYTES)
            .map_err(index_err(out))?;
        let bar = Progress::new(opts.progress, docs.len() as u64, "indexing");
        for d in docs {
            writer
                .add_document(doc!(f.id => d.id.as_str(), f.title => d.title.as_str(), f.text => d.text.as_str()))
                .map_err(index_err(out))?;
            bar.inc(1);
        }
        writer.commit().map_err(index_err(out))?;
        writer.wait_merging_threads().map_err(index_err(out))?;
        bar.finish_and_clear();
        Ok(())
    })();
    // on an error the staging directory is removed when `stage` drops
    result?;
    stage.commit()?;
    let seconds = start.elapsed().as_secs_f64();
    Ok(IndexStats {
        path: out.to_path_buf(),
        docs: docs.len(),
        seconds,
        docs_per_sec: docs.len() as f64 / seconds.max(f64::EPSILON),
    })
}

/// A BM25 index opened for search. Cheap to share: `Send + Sync`, searches from many threads.
pub struct Bm25Index {
    path: PathBuf,
    index: Index,
    reader: IndexReader,
    fields: Fields,
}

impl std::fmt::Debug for Bm25Index {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bm25Index")
            .field("path", &self.path)
            .field("docs", &self.num_docs())
            .finish()
    }
}

impl Bm25Index {
    /// Opens an index written by [`build_index`]. A directory that is not a tantivy index, or
    /// holds one of another schema, is [`Error::IndexSchema`].
    pub fn open(path: &Path) -> Result<Self> {
        if !path.join("meta.json").is_file() {
            return Err(Error::IndexSchema {
                path: path.to_path_buf(),
                message: "no tantivy meta.json in the directory".into(),
            });
        }
        let index = Index::open_in_dir(path).map_err(index_err(path))?;
        let fields = check_schema(path, &index.schema())?;
        index.tokenizers().register(ANALYZER, analyzer()?);
        let reader = index
            .reader_builder()
            .reload_policy(ReloadPolicy::Manual)
            .try_into()
            .map_err(index_err(path))?;
        Ok(Bm25Index {
            path: path.to_path_buf(),
            index,
            reader,
            fields,
        })
    }

    /// The index directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Number of documents.
    pub fn num_docs(&self) -> u64 {
        self.reader.searcher().num_docs()
    }

    /// The analyzed terms of `text` (what the index sees).
    pub fn analyze(&self, text: &str) -> Result<Vec<String>> {
        let mut a = self
            .index
            .tokenizers()
            .get(ANALYZER)
            .ok_or_else(|| Error::Index {
                path: self.path.clone(),
                message: format!("analyzer {ANALYZER} not registered"),
            })?;
        let mut stream = a.token_stream(text);
        let mut out = Vec::new();
        while stream.advance() {
            out.push(stream.token().text.clone());
        }
        Ok(out)
    }

    fn query(&self, text: &str) -> Result<Option<Box<dyn Query>>> {
        let mut seen = HashSet::new();
        let mut clauses: Vec<(Occur, Box<dyn Query>)> = Vec::new();
        for t in self.analyze(text)? {
            if !seen.insert(t.clone()) {
                continue;
            }
            for field in [self.fields.title, self.fields.text] {
                let term = Term::from_field_text(field, &t);
                clauses.push((
                    Occur::Should,
                    Box::new(TermQuery::new(term, IndexRecordOption::WithFreqs)),
                ));
            }
        }
        if clauses.is_empty() {
            return Ok(None);
        }
        Ok(Some(Box::new(BooleanQuery::new(clauses))))
    }

    /// The best `k` documents for `query`, leaving out ids in `exclude`. A query with no
    /// searchable term (only stop words or punctuation) returns nothing.
    pub fn search(&self, query: &str, k: usize, exclude: &HashSet<String>) -> Result<Vec<Hit>> {
        let Some(q) = self.query(query)? else {
            return Ok(Vec::new());
        };
        if k == 0 {
            return Ok(Vec::new());
        }
        let searcher = self.reader.searcher();
        let limit = k + exclude.len();
        let top = searcher
            .search(&q, &TopDocs::with_limit(limit).order_by_score())
            .map_err(index_err(&self.path))?;
        let mut hits = Vec::with_capacity(k);
        for (score, addr) in top {
            let d: TantivyDocument = searcher.doc(addr).map_err(index_err(&self.path))?;
            let get = |f: Field| {
                d.get_first(f)
                    .and_then(|v| v.as_str())
                    .unwrap_or_default()
                    .to_string()
            };
            let id = get(self.fields.id);
            if exclude.contains(&id) {
                continue;
            }
            hits.push(Hit {
                id,
                title: get(self.fields.title),
                text: get(self.fields.text),
                score,
            });
            if hits.len() == k {
                break;
            }
        }
        Ok(hits)
    }
}

impl Retriever for Bm25Index {
    fn retrieve(&self, query: &str, k: usize, exclude: &HashSet<String>) -> Result<Vec<Hit>> {
        self.search(query, k, exclude)
    }
}

fn check_schema(path: &Path, schema: &Schema) -> Result<Fields> {
    let bad = |message: String| Error::IndexSchema {
        path: path.to_path_buf(),
        message,
    };
    let field = |name: &str, analyzed: bool| -> Result<Field> {
        let f = schema
            .get_field(name)
            .map_err(|_| bad(format!("field `{name}` is missing")))?;
        let entry = schema.get_field_entry(f);
        let FieldType::Str(opts) = entry.field_type() else {
            return Err(bad(format!("field `{name}` is not a text field")));
        };
        if !opts.is_stored() {
            return Err(bad(format!("field `{name}` is not stored")));
        }
        let tokenizer = opts
            .get_indexing_options()
            .map(|i| i.tokenizer().to_string())
            .ok_or_else(|| bad(format!("field `{name}` is not indexed")))?;
        let want = if analyzed { ANALYZER } else { "raw" };
        if tokenizer != want {
            return Err(bad(format!(
                "field `{name}`: expected tokenizer {want:?}, got {tokenizer:?}"
            )));
        }
        Ok(f)
    };
    Ok(Fields {
        id: field("id", false)?,
        title: field("title", true)?,
        text: field("text", true)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn docs() -> Vec<Document> {
        [
            (
                "0",
                "Paris",
                "Paris is the capital and largest city of France.",
            ),
            ("1", "Berlin", "Berlin is the capital of Germany."),
            (
                "2",
                "Eiffel Tower",
                "The Eiffel Tower is a tower in Paris, built in 1889.",
            ),
            (
                "3",
                "Running",
                "Runners were running in the marathon races.",
            ),
        ]
        .iter()
        .map(|(id, t, x)| Document {
            id: id.to_string(),
            title: t.to_string(),
            text: x.to_string(),
        })
        .collect()
    }

    #[test]
    fn indexes_searches_and_excludes_held_ids() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|e| Error::io("tmp", e))?;
        let out = dir.path().join("idx");
        let stats = build_index(&docs(), &out, Path::new("c.jsonl"), IndexOptions::default())?;
        assert_eq!(stats.docs, 4);
        let idx = Bm25Index::open(&out)?;
        assert_eq!(idx.num_docs(), 4);
        let hits = idx.search("Where is the Eiffel Tower?", 2, &HashSet::new())?;
        assert_eq!(hits[0].title, "Eiffel Tower");
        let held: HashSet<String> = ["2".to_string()].into();
        let hits = idx.search("Where in Paris is the Eiffel Tower?", 2, &held)?;
        assert!(hits.iter().all(|h| h.id != "2"));
        assert_eq!(hits[0].title, "Paris");
        // Stemming: Snowball maps "running" → "run".
        let hits = idx.search("run", 1, &HashSet::new())?;
        assert_eq!(hits[0].id, "3");
        // Only stop words: nothing to search.
        assert!(idx.search("the of and", 3, &HashSet::new())?.is_empty());
        assert_eq!(idx.analyze("The Runners")?, vec!["runner".to_string()]);
        // Rebuilding over our own index replaces it.
        build_index(
            &docs()[..2],
            &out,
            Path::new("c.jsonl"),
            IndexOptions::default(),
        )?;
        assert_eq!(Bm25Index::open(&out)?.num_docs(), 2);
        Ok(())
    }

    #[test]
    fn empty_corpus_and_foreign_directories_are_clear_errors() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|e| Error::io("tmp", e))?;
        let out = dir.path().join("idx");
        assert!(matches!(
            build_index(&[], &out, Path::new("empty.jsonl"), IndexOptions::default()),
            Err(Error::EmptyCorpus { .. })
        ));
        // Not an index at all.
        std::fs::create_dir_all(&out).map_err(|e| Error::io(&out, e))?;
        assert!(matches!(
            Bm25Index::open(&out),
            Err(Error::IndexSchema { .. })
        ));
        // build_index refuses to clobber a non-index directory.
        assert!(build_index(&docs(), &out, Path::new("c.jsonl"), IndexOptions::default()).is_err());
        // A tantivy index of another schema.
        let other = dir.path().join("other");
        std::fs::create_dir_all(&other).map_err(|e| Error::io(&other, e))?;
        let mut b = Schema::builder();
        b.add_text_field("body", tantivy::schema::TEXT);
        Index::create_in_dir(&other, b.build()).map_err(index_err(&other))?;
        match Bm25Index::open(&other) {
            Err(Error::IndexSchema { message, .. }) => {
                assert!(message.contains("`id`"), "{message}")
            }
            r => panic!("expected IndexSchema, got {r:?}"),
        }
        Ok(())
    }
}
