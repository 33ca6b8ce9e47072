//! flowline-search: full-text product search, a projection of `catalog.events`.
//!
//! Each node keeps its own on-disk index (tantivy) fed by its own consumer group
//! (`search.indexer.<node_id>`), so the index is always rebuildable: delete it
//! and it is replayed from the log; `flowline search reindex` rebuilds it from
//! the catalog. The indexer commits the index before the group's positions
//! (`Handler::flush`), so a crash can only make it index an event twice, which
//! is harmless (documents are replaced by id).

pub mod routes;

use flowline_core::RecordedEvent;
use flowline_store::{Handler, HandlerError};
use serde::Serialize;
use std::ops::Bound;
use std::path::Path;
use std::sync::Mutex;
use tantivy::collector::{Count, TopDocs};
use tantivy::query::{
    AllQuery, BooleanQuery, BoostQuery, FuzzyTermQuery, Occur, Query, RangeQuery, TermQuery,
};
use tantivy::schema::{Field, IndexRecordOption, Schema, FAST, INDEXED, STORED, STRING, TEXT};
use tantivy::{
    doc, DocAddress, Index, IndexReader, IndexWriter, Order, ReloadPolicy, TantivyDocument, Term,
};

pub use flowline_catalog::TOPIC;

#[derive(Clone, Copy)]
struct Fields {
    id: Field,
    title: Field,
    description: Field,
    category: Field,
    brand: Field,
    attr: Field,
    price: Field,
    in_stock: Field,
    popularity: Field,
    created: Field,
    source: Field,
}

fn schema() -> (Schema, Fields) {
    let mut b = Schema::builder();
    let f = Fields {
        id: b.add_text_field("id", STRING | STORED),
        title: b.add_text_field("title", TEXT | STORED),
        description: b.add_text_field("description", TEXT),
        category: b.add_text_field("category", STRING | FAST),
        brand: b.add_text_field("brand", STRING | FAST),
        // `name=value`, one per attribute value: filters and facet counts.
        attr: b.add_text_field("attr", STRING | FAST),
        price: b.add_i64_field("price", INDEXED | FAST),
        in_stock: b.add_u64_field("in_stock", INDEXED | FAST),
        popularity: b.add_f64_field("popularity", FAST),
        created: b.add_i64_field("created", FAST),
        // The product as the catalog published it, returned as is.
        source: b.add_text_field("source", STORED),
    };
    (b.build(), f)
}

#[derive(Debug, Clone)]
pub enum SearchError {
    Index(String),
}

impl std::error::Error for SearchError {}

impl std::fmt::Display for SearchError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SearchError::Index(e) => write!(f, "search index: {e}"),
        }
    }
}

impl From<tantivy::TantivyError> for SearchError {
    fn from(e: tantivy::TantivyError) -> Self {
        SearchError::Index(e.to_string())
    }
}

/// The index of one node.
pub struct SearchIndex {
    writer: Mutex<IndexWriter>,
    reader: IndexReader,
    f: Fields,
    /// Called after each commit is visible (drops cached result pages).
    on_commit: Box<dyn Fn() + Send + Sync>,
}

/// How results are ordered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sort {
    Relevance,
    Popularity,
    PriceAsc,
    PriceDesc,
    Newest,
}

#[derive(Debug, Clone, Default)]
pub struct SearchQuery {
    pub q: String,
    pub category: Option<String>,
    pub brand: Option<String>,
    pub price_min: Option<i64>,
    pub price_max: Option<i64>,
    pub in_stock: Option<bool>,
    /// `(name, value)` attribute filters, all required.
    pub attrs: Vec<(String, String)>,
    pub sort: Option<Sort>,
    pub page: usize,
    pub per_page: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct Hit {
    pub product: serde_json::Value,
    /// The title with matched words in `<b>…</b>`.
    pub highlight: String,
    pub score: f32,
}

#[derive(Debug, Clone, Serialize)]
pub struct SearchResult {
    pub total: usize,
    pub page: usize,
    pub per_page: usize,
    pub hits: Vec<Hit>,
    /// Counts over every match (not just this page): category, brand, and each attribute.
    pub facets: serde_json::Value,
}

impl SearchIndex {
    /// Opens the index in `dir`, creating it if missing. `fresh` says whether it
    /// was just created (the caller then replays the log into it).
    pub fn open(
        dir: &Path,
        on_commit: Box<dyn Fn() + Send + Sync>,
    ) -> Result<(SearchIndex, bool), SearchError> {
        std::fs::create_dir_all(dir)
            .map_err(|e| SearchError::Index(format!("{}: {e}", dir.display())))?;
        let (schema, f) = schema();
        let fresh = !dir.join("meta.json").exists();
        let mmap = tantivy::directory::MmapDirectory::open(dir)
            .map_err(|e| SearchError::Index(e.to_string()))?;
        let index = Index::open_or_create(mmap, schema)?;
        let writer = index.writer(64 * 1024 * 1024)?;
        let reader = index
            .reader_builder()
            .reload_policy(ReloadPolicy::Manual)
            .try_into()?;
        Ok((
            SearchIndex {
                writer: Mutex::new(writer),
                reader,
                f,
                on_commit,
            },
            fresh,
        ))
    }

    /// Replaces (or adds) a product document from its published JSON.
    pub fn upsert(&self, p: &serde_json::Value) -> Result<(), SearchError> {
        let f = self.f;
        let id = p["id"]
            .as_str()
            .ok_or_else(|| SearchError::Index("product without id".into()))?;
        let mut d = doc!(
            f.id => id,
            f.title => p["title"].as_str().unwrap_or(""),
            f.description => p["description"].as_str().unwrap_or(""),
            f.category => p["category"].as_str().unwrap_or(""),
            f.brand => p["brand"].as_str().unwrap_or(""),
            f.price => p["price"]["amount"].as_i64().unwrap_or(0),
            f.in_stock => u64::from(p["in_stock"].as_bool().unwrap_or(false)),
            f.popularity => p["popularity_score"].as_f64().unwrap_or(0.0),
            f.created => flowline_core::Timestamp::parse_rfc3339(p["created_at"].as_str().unwrap_or(""))
                .map(|t| t.as_micros())
                .unwrap_or(0),
            f.source => p.to_string(),
        );
        if let Some(attrs) = p["attributes"].as_object() {
            for (name, values) in attrs {
                for v in values
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|v| v.as_str())
                {
                    d.add_text(f.attr, format!("{name}={v}"));
                }
            }
        }
        let w = self.writer.lock().expect("poisoned");
        w.delete_term(Term::from_field_text(f.id, id));
        w.add_document(d)?;
        Ok(())
    }

    pub fn remove(&self, id: &str) {
        let w = self.writer.lock().expect("poisoned");
        w.delete_term(Term::from_field_text(self.f.id, id));
    }

    /// Makes pending changes durable and visible.
    pub fn commit(&self) -> Result<(), SearchError> {
        self.writer.lock().expect("poisoned").commit()?;
        self.reader.reload()?;
        (self.on_commit)();
        Ok(())
    }

    /// Drops every document (a full reindex starts here).
    pub fn clear(&self) -> Result<(), SearchError> {
        self.writer
            .lock()
            .expect("poisoned")
            .delete_all_documents()?;
        Ok(())
    }

    pub fn num_docs(&self) -> u64 {
        self.reader.searcher().num_docs()
    }

    fn text_query(&self, q: &str) -> Box<dyn Query> {
        let words: Vec<String> = q
            .split(|c: char| !c.is_alphanumeric())
            .filter(|w| !w.is_empty())
            .map(str::to_lowercase)
            .collect();
        if words.is_empty() {
            return Box::new(AllQuery);
        }
        let f = self.f;
        let per_word: Vec<(Occur, Box<dyn Query>)> = words
            .iter()
            .map(|w| {
                let term = |field| Term::from_field_text(field, w);
                let mut alts: Vec<(Occur, Box<dyn Query>)> = vec![
                    // Title weighs twice the description (like `title^2`).
                    (
                        Occur::Should,
                        Box::new(BoostQuery::new(
                            Box::new(TermQuery::new(term(f.title), IndexRecordOption::WithFreqs)),
                            2.0,
                        )),
                    ),
                    (
                        Occur::Should,
                        Box::new(TermQuery::new(
                            term(f.description),
                            IndexRecordOption::WithFreqs,
                        )),
                    ),
                ];
                // Typo tolerance for words of 5+ letters: one edit, transpositions count as one.
                if w.chars().count() >= 5 {
                    alts.push((
                        Occur::Should,
                        Box::new(BoostQuery::new(
                            Box::new(FuzzyTermQuery::new(term(f.title), 1, true)),
                            0.5,
                        )),
                    ));
                    alts.push((
                        Occur::Should,
                        Box::new(BoostQuery::new(
                            Box::new(FuzzyTermQuery::new(term(f.description), 1, true)),
                            0.25,
                        )),
                    ));
                }
                (
                    Occur::Must,
                    Box::new(BooleanQuery::new(alts)) as Box<dyn Query>,
                )
            })
            .collect();
        Box::new(BooleanQuery::new(per_word))
    }

    pub fn search(&self, sq: &SearchQuery) -> Result<SearchResult, SearchError> {
        let f = self.f;
        let mut clauses: Vec<(Occur, Box<dyn Query>)> = vec![(Occur::Must, self.text_query(&sq.q))];
        let exact = |field, v: &str| -> Box<dyn Query> {
            Box::new(TermQuery::new(
                Term::from_field_text(field, v),
                IndexRecordOption::Basic,
            ))
        };
        if let Some(c) = &sq.category {
            clauses.push((Occur::Must, exact(f.category, c)));
        }
        if let Some(b) = &sq.brand {
            clauses.push((Occur::Must, exact(f.brand, b)));
        }
        for (name, value) in &sq.attrs {
            clauses.push((Occur::Must, exact(f.attr, &format!("{name}={value}"))));
        }
        if sq.price_min.is_some() || sq.price_max.is_some() {
            let lo = sq.price_min.map_or(Bound::Unbounded, |v| {
                Bound::Included(Term::from_field_i64(f.price, v))
            });
            let hi = sq.price_max.map_or(Bound::Unbounded, |v| {
                Bound::Included(Term::from_field_i64(f.price, v))
            });
            clauses.push((Occur::Must, Box::new(RangeQuery::new(lo, hi))));
        }
        if let Some(s) = sq.in_stock {
            clauses.push((
                Occur::Must,
                Box::new(TermQuery::new(
                    Term::from_field_u64(f.in_stock, u64::from(s)),
                    IndexRecordOption::Basic,
                )),
            ));
        }
        let query = BooleanQuery::new(clauses);
        let searcher = self.reader.searcher();
        let offset = (sq.page - 1) * sq.per_page;
        let top = TopDocs::with_limit(sq.per_page).and_offset(offset);
        let aggs: tantivy::aggregation::agg_req::Aggregations =
            serde_json::from_value(serde_json::json!({
                "category": { "terms": { "field": "category", "size": 50 } },
                "brand": { "terms": { "field": "brand", "size": 50 } },
                "attr": { "terms": { "field": "attr", "size": 200 } },
            }))
            .map_err(|e| SearchError::Index(e.to_string()))?;
        let agg = tantivy::aggregation::AggregationCollector::from_aggs(aggs, Default::default());
        let (docs, total, agg_res): (Vec<(f32, DocAddress)>, usize, _) =
            match sq.sort.unwrap_or(Sort::Relevance) {
                Sort::Relevance => searcher.search(&query, &(top.order_by_score(), Count, agg))?,
                Sort::Popularity => by(searcher.search(
                    &query,
                    &(
                        top.order_by_fast_field::<f64>("popularity", Order::Desc),
                        Count,
                        agg,
                    ),
                )?),
                Sort::PriceAsc => by(searcher.search(
                    &query,
                    &(
                        top.order_by_fast_field::<i64>("price", Order::Asc),
                        Count,
                        agg,
                    ),
                )?),
                Sort::PriceDesc => by(searcher.search(
                    &query,
                    &(
                        top.order_by_fast_field::<i64>("price", Order::Desc),
                        Count,
                        agg,
                    ),
                )?),
                Sort::Newest => by(searcher.search(
                    &query,
                    &(
                        top.order_by_fast_field::<i64>("created", Order::Desc),
                        Count,
                        agg,
                    ),
                )?),
            };
        let snippets = tantivy::snippet::SnippetGenerator::create(&searcher, &query, f.title)?;
        let mut hits = Vec::with_capacity(docs.len());
        for (score, addr) in docs {
            let d: TantivyDocument = searcher.doc(addr)?;
            let source = d
                .get_first(f.source)
                .and_then(|v| tantivy::schema::Value::as_str(&v).map(str::to_owned))
                .unwrap_or_default();
            let product: serde_json::Value = serde_json::from_str(&source).unwrap_or_default();
            let highlight = snippets.snippet_from_doc(&d).to_html();
            let highlight = if highlight.is_empty() {
                product["title"].as_str().unwrap_or("").to_owned()
            } else {
                highlight
            };
            hits.push(Hit {
                product,
                highlight,
                score,
            });
        }
        Ok(SearchResult {
            total,
            page: sq.page,
            per_page: sq.per_page,
            hits,
            facets: facets(&serde_json::to_value(agg_res).unwrap_or_default()),
        })
    }
}

/// Sorted-by-field results carry the field value, not a score.
fn by<T, A>(
    (docs, total, agg): (Vec<(Option<T>, DocAddress)>, usize, A),
) -> (Vec<(f32, DocAddress)>, usize, A) {
    (
        docs.into_iter().map(|(_, d)| (0.0, d)).collect(),
        total,
        agg,
    )
}

/// `{"category": {"shoes": 3, …}, "brand": {…}, "attributes": {"color": {"blue": 2}}}`.
fn facets(aggs: &serde_json::Value) -> serde_json::Value {
    let buckets = |name: &str| -> Vec<(String, u64)> {
        aggs[name]["buckets"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|b| Some((b["key"].as_str()?.to_owned(), b["doc_count"].as_u64()?)))
            .collect()
    };
    let obj = |v: Vec<(String, u64)>| {
        serde_json::Value::Object(v.into_iter().map(|(k, n)| (k, n.into())).collect())
    };
    let mut attributes = serde_json::Map::new();
    for (key, n) in buckets("attr") {
        if let Some((name, value)) = key.split_once('=') {
            let e = attributes
                .entry(name.to_owned())
                .or_insert_with(|| serde_json::json!({}));
            e[value] = n.into();
        }
    }
    serde_json::json!({ "category": obj(buckets("category")), "brand": obj(buckets("brand")), "attributes": attributes })
}

/// Applies catalog events to the index; commits in `flush`.
pub struct Indexer(pub std::sync::Arc<SearchIndex>);

impl Handler for Indexer {
    async fn handle(&self, ev: &RecordedEvent) -> Result<(), HandlerError> {
        let e = &ev.envelope;
        match e.event_type.as_str() {
            "product.created" | "product.updated" => {
                self.0
                    .upsert(&e.payload["product"])
                    .map_err(HandlerError::permanent)?;
            }
            "product.deleted" => self.0.remove(&e.key),
            _ => {}
        }
        Ok(())
    }

    async fn flush(&self) -> Result<(), HandlerError> {
        let idx = self.0.clone();
        tokio::task::spawn_blocking(move || idx.commit())
            .await
            .map_err(HandlerError::transient)?
            .map_err(HandlerError::transient)
    }
}
