//! flowline-catalog: products.
//!
//! Every write bumps the product's `version` (its ETag) and commits with a
//! `product.created|updated|deleted` event on `catalog.events` (key: product id)
//! in one transaction, listing the fields that changed — the feed the search
//! index and caches follow. Writes must name the version they change
//! (`If-Match`), so two admins cannot silently overwrite each other.

pub mod routes;
pub mod seed;

use flowline_core::{Currency, Envelope, ErrorCode, EventDraft, Money, Problem, Timestamp};
use flowline_http::{ApiError, RequestContext};
use flowline_store::outbox::{self, Relay};
use flowline_store::{Db, Migration, StoreError};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

pub const TOPIC: &str = "catalog.events";

const ALL_FIELDS: [&str; 10] = [
    "sku",
    "title",
    "description",
    "price",
    "original_price",
    "category",
    "brand",
    "attributes",
    "in_stock",
    "popularity_score",
];

pub const MIGRATIONS: &[Migration] = &[Migration {
    scope: "catalog",
    version: 1,
    name: "products",
    sqlite: include_str!("../migrations/sqlite/0001_products.sql"),
    postgres: include_str!("../migrations/postgres/0001_products.sql"),
}];

/// Multi-valued attributes, e.g. `{"color": ["blue", "red"], "size": ["m"]}`.
pub type Attributes = BTreeMap<String, Vec<String>>;

/// Money as documented (the core type has no schema dependency).
#[derive(utoipa::ToSchema)]
#[allow(dead_code)]
struct MoneyDoc {
    /// Minor units (e.g. cents).
    amount: i64,
    /// ISO 4217 code.
    currency: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Product {
    pub id: String,
    pub sku: String,
    pub title: String,
    pub description: String,
    #[schema(value_type = MoneyDoc)]
    pub price: Money,
    #[schema(value_type = Option<MoneyDoc>)]
    pub original_price: Option<Money>,
    pub category: String,
    pub brand: String,
    pub attributes: Attributes,
    pub in_stock: bool,
    pub popularity_score: f64,
    /// Bumped by every write; the ETag is `"v{version}"`.
    pub version: i64,
    pub created_at: String,
    pub updated_at: String,
}

/// A product to create.
#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewProduct {
    pub sku: String,
    pub title: String,
    #[serde(default)]
    pub description: String,
    #[schema(value_type = MoneyDoc)]
    pub price: Money,
    #[serde(default)]
    #[schema(value_type = Option<MoneyDoc>)]
    pub original_price: Option<Money>,
    pub category: String,
    pub brand: String,
    #[serde(default)]
    pub attributes: Attributes,
    #[serde(default = "yes")]
    pub in_stock: bool,
    #[serde(default)]
    pub popularity_score: f64,
}

fn yes() -> bool {
    true
}

/// Fields to change; absent ones stay.
#[derive(Debug, Clone, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ProductPatch {
    pub sku: Option<String>,
    pub title: Option<String>,
    pub description: Option<String>,
    #[schema(value_type = Option<MoneyDoc>)]
    pub price: Option<Money>,
    /// `null` clears it.
    #[serde(default, with = "double_option")]
    #[schema(value_type = Option<MoneyDoc>)]
    pub original_price: Option<Option<Money>>,
    pub category: Option<String>,
    pub brand: Option<String>,
    pub attributes: Option<Attributes>,
    pub in_stock: Option<bool>,
    pub popularity_score: Option<f64>,
}

mod double_option {
    use serde::{Deserialize, Deserializer};
    pub fn deserialize<'de, T: Deserialize<'de>, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<Option<T>>, D::Error> {
        Option::<T>::deserialize(d).map(Some)
    }
}

/// Refuses what the catalog cannot hold, naming every offending field.
fn validate(p: &NewProduct) -> Result<(), ApiError> {
    let mut errors: Vec<(String, &str)> = Vec::new();
    let mut err = |field: &str, msg: &'static str| errors.push((field.to_owned(), msg));
    let text = |s: &str, min: usize, max: usize| {
        let n = s.chars().count();
        n >= min && n <= max && !s.chars().any(|c| c.is_control() && c != '\n')
    };
    if !text(&p.sku, 1, 64)
        || !p
            .sku
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        err("sku", "1 to 64 characters: letters, digits, - and _");
    }
    if !text(&p.title, 1, 200) || p.title.trim().is_empty() {
        err("title", "1 to 200 characters");
    }
    if !text(&p.description, 0, 5000) {
        err("description", "at most 5000 characters");
    }
    if p.price.amount < 0 {
        err("price.amount", "must not be negative");
    }
    if let Some(o) = p.original_price {
        if o.currency != p.price.currency {
            err("original_price.currency", "must be the price's currency");
        }
        if o.amount < p.price.amount {
            err("original_price.amount", "must not be below the price");
        }
    }
    if !text(&p.category, 1, 100) {
        err("category", "1 to 100 characters");
    }
    if !text(&p.brand, 1, 100) {
        err("brand", "1 to 100 characters");
    }
    if p.attributes.len() > 20 {
        err("attributes", "at most 20 attributes");
    }
    for (k, vs) in &p.attributes {
        if !text(k, 1, 50) || vs.is_empty() || vs.len() > 20 || vs.iter().any(|v| !text(v, 1, 50)) {
            err(
                &format!("attributes.{k}"),
                "name and 1 to 20 values, each 1 to 50 characters",
            );
        }
    }
    if !p.popularity_score.is_finite() || p.popularity_score < 0.0 {
        err("popularity_score", "a finite number, not negative");
    }
    if errors.is_empty() {
        return Ok(());
    }
    let mut problem =
        Problem::new(ErrorCode::ValidationFailed).with_detail("the product is not valid");
    for (field, msg) in errors {
        problem = problem.with_field(field, msg);
    }
    Err(problem.into())
}

type Row = (
    String,
    String,
    String,
    String,
    i64,
    Option<i64>,
    String,
    String,
    String,
    String,
    i64,
    f64,
    i64,
    i64,
    i64,
);
const COLUMNS: &str =
    "id, sku, title, description, price_amount, original_price_amount, currency, category, brand, \
    attributes, in_stock, popularity_score, version, created_at, updated_at";

fn product(r: Row) -> Result<Product, StoreError> {
    let currency = Currency::parse(&r.6)
        .map_err(|_| StoreError::CorruptEvent(format!("product {} currency", r.0)))?;
    Ok(Product {
        attributes: serde_json::from_str(&r.9)?,
        id: r.0,
        sku: r.1,
        title: r.2,
        description: r.3,
        price: Money {
            amount: r.4,
            currency,
        },
        original_price: r.5.map(|amount| Money { amount, currency }),
        category: r.7,
        brand: r.8,
        in_stock: r.10 != 0,
        popularity_score: r.11,
        version: r.12,
        created_at: Timestamp::from_micros(r.13).to_rfc3339(),
        updated_at: Timestamp::from_micros(r.14).to_rfc3339(),
    })
}

/// Filters and a page of the product list.
#[derive(Debug, Clone, Default)]
pub struct ListQuery {
    pub category: Option<String>,
    pub brand: Option<String>,
    /// The last id of the previous page.
    pub cursor: Option<String>,
    pub limit: i64,
}

pub struct Catalog {
    pub db: Db,
    relay: Relay,
    /// Product reads, cache-aside; dropped by this node's writes at once and by
    /// `catalog.events` (every node) through `invalidate`.
    cache: flowline_cache::Cache<Product>,
}

/// Why a cached read could not load.
#[derive(Debug, Clone)]
enum Load {
    NotFound,
    Store(String),
}

fn changed(a: &Product, b: &Product) -> Vec<&'static str> {
    let mut c = Vec::new();
    macro_rules! cmp {
        ($($f:ident),*) => { $( if a.$f != b.$f { c.push(stringify!($f)); } )* };
    }
    cmp!(
        sku,
        title,
        description,
        price,
        original_price,
        category,
        brand,
        attributes,
        in_stock,
        popularity_score
    );
    c
}

impl Catalog {
    /// Shares cached reads through Redis (distributed mode).
    pub fn with_l2(mut self, conn: flowline_cache::RedisConnection, key_prefix: &str) -> Self {
        self.cache = self.cache.with_l2(conn, key_prefix);
        self
    }

    pub async fn open(
        db: Db,
        relay: Relay,
        metrics: &flowline_cache::CacheMetrics,
    ) -> Result<Catalog, StoreError> {
        db.migrate(outbox::KERNEL_MIGRATIONS).await?;
        db.migrate(MIGRATIONS).await?;
        let cache = flowline_cache::Cache::new(
            "products",
            100_000,
            std::time::Duration::from_secs(300),
            |p: &Product| vec![format!("product:{}", p.id)],
            metrics,
        );
        Ok(Catalog { db, relay, cache })
    }

    /// A product, from the cache when it is there.
    pub async fn get(&self, id: &str) -> Result<Product, ApiError> {
        let loaded = self
            .cache
            .get_or_load(id, async {
                match self.find(id).await {
                    Ok(Some(p)) => Ok(p),
                    Ok(None) => Err(Load::NotFound),
                    Err(e) => Err(Load::Store(e.to_string())),
                }
            })
            .await;
        match loaded {
            Ok(p) => Ok(p),
            Err(e) => match &*e {
                Load::NotFound => Err(Problem::new(ErrorCode::NotFound)
                    .with_detail("no such product")
                    .into()),
                Load::Store(e) => {
                    tracing::error!(error = %e, "product read failed");
                    Err(Problem::new(ErrorCode::Internal).into())
                }
            },
        }
    }

    /// Drops a product's cached reads (called for every `catalog.events` event).
    pub async fn invalidate(&self, id: &str) {
        self.cache.invalidate_tag(&format!("product:{id}")).await;
    }

    /// The product as stored now: writes compare versions against this, never
    /// against a cached copy another node may not have dropped yet.
    async fn current(&self, id: &str) -> Result<Product, ApiError> {
        self.find(id).await?.ok_or_else(|| {
            Problem::new(ErrorCode::NotFound)
                .with_detail("no such product")
                .into()
        })
    }

    async fn find(&self, id: &str) -> Result<Option<Product>, StoreError> {
        let sql = format!("SELECT {COLUMNS} FROM products WHERE id = $1");
        let row: Option<Row> = flowline_store::on_pool!(&self.db, |p| sqlx::query_as(&sql)
            .bind(id)
            .fetch_optional(p)
            .await)?;
        row.map(product).transpose()
    }

    /// One page, ordered by id (UUIDv7: creation order), and the next cursor.
    pub async fn list(&self, q: &ListQuery) -> Result<(Vec<Product>, Option<String>), ApiError> {
        let sql = format!(
            "SELECT {COLUMNS} FROM products
             WHERE ($1 = '' OR category = $1) AND ($2 = '' OR brand = $2) AND id > $3
             ORDER BY id LIMIT $4"
        );
        let rows: Vec<Row> = flowline_store::on_pool!(&self.db, |p| sqlx::query_as(&sql)
            .bind(q.category.as_deref().unwrap_or(""))
            .bind(q.brand.as_deref().unwrap_or(""))
            .bind(q.cursor.as_deref().unwrap_or(""))
            .bind(q.limit + 1)
            .fetch_all(p)
            .await)
        .map_err(StoreError::from)?;
        let mut items = rows
            .into_iter()
            .map(product)
            .collect::<Result<Vec<_>, _>>()?;
        let next = if items.len() as i64 > q.limit {
            items.truncate(q.limit as usize);
            items.last().map(|p| p.id.clone())
        } else {
            None
        };
        Ok((items, next))
    }

    pub async fn create(&self, ctx: &RequestContext, new: NewProduct) -> Result<Product, ApiError> {
        validate(&new)?;
        let p = Product::from_new(new, flowline_core::id::new_id().to_string(), 1, None);
        let mut tx = self.db.begin().await?;
        if let Err(e) = insert(&mut tx, &p, false).await {
            if e.as_database_error()
                .is_some_and(|d| d.is_unique_violation())
            {
                return Err(sku_taken());
            }
            return Err(StoreError::from(e).into());
        }
        self.emit(&mut tx, ctx, "product.created", &p, &ALL_FIELDS)
            .await?;
        tx.commit().await?;
        self.relay.notify();
        Ok(p)
    }

    /// Creates many products in one transaction (seeding, imports): each gets its
    /// `product.created` event like a single create. Returns how many were new
    /// (existing SKUs are skipped, so a re-run is harmless).
    pub async fn create_many(
        &self,
        ctx: &RequestContext,
        batch: Vec<NewProduct>,
    ) -> Result<usize, ApiError> {
        for p in &batch {
            validate(p)?;
        }
        let mut tx = self.db.begin().await?;
        let mut created = 0;
        for new in batch {
            let p = Product::from_new(new, flowline_core::id::new_id().to_string(), 1, None);
            if insert(&mut tx, &p, true).await.map_err(StoreError::from)? == 1 {
                self.emit(&mut tx, ctx, "product.created", &p, &ALL_FIELDS)
                    .await?;
                created += 1;
            }
        }
        tx.commit().await?;
        self.relay.notify();
        Ok(created)
    }

    async fn emit(
        &self,
        tx: &mut flowline_store::Tx,
        ctx: &RequestContext,
        kind: &str,
        p: &Product,
        changes: &[&str],
    ) -> Result<(), StoreError> {
        let payload = serde_json::json!({ "product_id": p.id, "version": p.version, "changes": changes, "product": p });
        let ev = Envelope::stamp(
            EventDraft::new(TOPIC, kind, &p.id, payload),
            &ctx.correlation_id,
            Some(&ctx.request_id),
        );
        outbox::enqueue(tx, &ev).await
    }

    /// Applies `patch` if the product is still at `expected` version (`None`: `If-Match: *`).
    pub async fn update(
        &self,
        ctx: &RequestContext,
        id: &str,
        expected: Option<i64>,
        patch: ProductPatch,
    ) -> Result<Product, ApiError> {
        let current = self.current(id).await?;
        if expected.is_some_and(|v| v != current.version) {
            return Err(stale(current.version));
        }
        let next = NewProduct {
            sku: patch.sku.unwrap_or_else(|| current.sku.clone()),
            title: patch.title.unwrap_or_else(|| current.title.clone()),
            description: patch
                .description
                .unwrap_or_else(|| current.description.clone()),
            price: patch.price.unwrap_or(current.price),
            original_price: patch.original_price.unwrap_or(current.original_price),
            category: patch.category.unwrap_or_else(|| current.category.clone()),
            brand: patch.brand.unwrap_or_else(|| current.brand.clone()),
            attributes: patch
                .attributes
                .unwrap_or_else(|| current.attributes.clone()),
            in_stock: patch.in_stock.unwrap_or(current.in_stock),
            popularity_score: patch.popularity_score.unwrap_or(current.popularity_score),
        };
        validate(&next)?;
        let now = Timestamp::now();
        let mut p = Product::from_new(
            next,
            current.id.clone(),
            current.version + 1,
            Some(current.created_at.clone()),
        );
        let changes = changed(&current, &p);
        if changes.is_empty() {
            return Ok(current);
        }
        let mut tx = self.db.begin().await?;
        // Compare-and-set on the version: a concurrent writer makes this touch no row.
        let n = flowline_store::on_tx!(&mut tx, |c| {
            sqlx::query(
            "UPDATE products SET sku = $3, title = $4, description = $5, price_amount = $6,
                original_price_amount = $7, currency = $8, category = $9, brand = $10, attributes = $11,
                in_stock = $12, popularity_score = $13, version = version + 1, updated_at = $14
             WHERE id = $1 AND version = $2"
        )
        .bind(&p.id)
        .bind(current.version)
        .bind(&p.sku)
        .bind(&p.title)
        .bind(&p.description)
        .bind(p.price.amount)
        .bind(p.original_price.map(|m| m.amount))
        .bind(p.price.currency.as_str())
        .bind(&p.category)
        .bind(&p.brand)
        .bind(serde_json::to_string(&p.attributes).map_err(StoreError::from)?)
        .bind(i64::from(p.in_stock))
        .bind(p.popularity_score)
        .bind(now.as_micros())
        .execute(c)
        .await
        .map(|r| r.rows_affected())
        });
        let n = match n {
            Ok(n) => n,
            Err(e)
                if e.as_database_error()
                    .is_some_and(|d| d.is_unique_violation()) =>
            {
                return Err(sku_taken());
            }
            Err(e) => return Err(StoreError::from(e).into()),
        };
        if n == 0 {
            tx.rollback().await?;
            let now_version = self.find(id).await?.map(|p| p.version).unwrap_or(0);
            return Err(stale(now_version));
        }
        p.version = current.version + 1;
        self.emit(&mut tx, ctx, "product.updated", &p, &changes)
            .await?;
        tx.commit().await?;
        self.invalidate(&p.id).await;
        self.relay.notify();
        Ok(p)
    }

    /// Follows inventory: sets `in_stock` when it differs (a `product.updated`
    /// naming `in_stock` results). A product the catalog does not have is ignored.
    pub async fn set_in_stock(
        &self,
        ctx: &RequestContext,
        id: &str,
        in_stock: bool,
    ) -> Result<(), ApiError> {
        let patch = ProductPatch {
            in_stock: Some(in_stock),
            ..Default::default()
        };
        match self.update(ctx, id, None, patch).await {
            Err(e) if e.0.code == ErrorCode::NotFound.as_str() => Ok(()),
            other => other.map(|_| ()),
        }
    }

    pub async fn delete(
        &self,
        ctx: &RequestContext,
        id: &str,
        expected: Option<i64>,
    ) -> Result<(), ApiError> {
        let current = self.current(id).await?;
        let version = expected.unwrap_or(current.version);
        let mut tx = self.db.begin().await?;
        let n = flowline_store::on_tx!(&mut tx, |c| sqlx::query(
            "DELETE FROM products WHERE id = $1 AND version = $2"
        )
        .bind(id)
        .bind(version)
        .execute(c)
        .await
        .map(|r| r.rows_affected()))
        .map_err(StoreError::from)?;
        if n == 0 {
            tx.rollback().await?;
            return Err(stale(current.version));
        }
        let payload = serde_json::json!({ "product_id": id, "version": current.version });
        let ev = Envelope::stamp(
            EventDraft::new(TOPIC, "product.deleted", id, payload),
            &ctx.correlation_id,
            Some(&ctx.request_id),
        );
        outbox::enqueue(&mut tx, &ev).await?;
        tx.commit().await?;
        self.invalidate(id).await;
        self.relay.notify();
        Ok(())
    }
}

impl Product {
    /// A product from validated input, at `version`; a new one unless `created_at` is given.
    fn from_new(new: NewProduct, id: String, version: i64, created_at: Option<String>) -> Product {
        let now = Timestamp::now().to_rfc3339();
        Product {
            id,
            sku: new.sku,
            title: new.title.trim().to_owned(),
            description: new.description,
            price: new.price,
            original_price: new.original_price,
            category: new.category,
            brand: new.brand,
            attributes: new.attributes,
            in_stock: new.in_stock,
            popularity_score: new.popularity_score,
            version,
            created_at: created_at.unwrap_or_else(|| now.clone()),
            updated_at: now,
        }
    }
}

/// Inserts a new product row; with `skip_existing`, an existing SKU is left
/// alone (0 rows) instead of failing.
async fn insert(
    tx: &mut flowline_store::Tx,
    p: &Product,
    skip_existing: bool,
) -> Result<u64, sqlx::Error> {
    const SQL: &str = "INSERT INTO products (id, sku, title, description, price_amount, original_price_amount,
            currency, category, brand, attributes, in_stock, popularity_score, version, created_at, updated_at)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, 1, $13, $13)";
    let sql = if skip_existing {
        format!("{SQL} ON CONFLICT (sku) DO NOTHING")
    } else {
        SQL.to_owned()
    };
    let now = Timestamp::parse_rfc3339(&p.created_at)
        .map(|t| t.as_micros())
        .unwrap_or_default();
    let attributes =
        serde_json::to_string(&p.attributes).map_err(|e| sqlx::Error::Encode(Box::new(e)))?;
    flowline_store::on_tx!(tx, |c| sqlx::query(&sql)
        .bind(&p.id)
        .bind(&p.sku)
        .bind(&p.title)
        .bind(&p.description)
        .bind(p.price.amount)
        .bind(p.original_price.map(|m| m.amount))
        .bind(p.price.currency.as_str())
        .bind(&p.category)
        .bind(&p.brand)
        .bind(&attributes)
        .bind(i64::from(p.in_stock))
        .bind(p.popularity_score)
        .bind(now)
        .execute(c)
        .await
        .map(|r| r.rows_affected()))
}

fn sku_taken() -> ApiError {
    Problem::new(ErrorCode::Conflict)
        .with_detail("a product with this sku exists")
        .with_field("sku", "already used")
        .into()
}

fn stale(current: i64) -> ApiError {
    Problem::new(ErrorCode::PreconditionFailed)
        .with_detail(format!(
            "the product is now at version {current}; re-read it and retry"
        ))
        .into()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> NewProduct {
        serde_json::from_value(serde_json::json!({
            "sku": "TS-1", "title": "Basic Cotton T-Shirt", "price": {"amount": 8990, "currency": "BRL"},
            "category": "t-shirts", "brand": "techcorp-basics", "attributes": {"color": ["blue"]},
        }))
        .unwrap()
    }

    #[test]
    fn validation_names_every_bad_field() {
        assert!(validate(&base()).is_ok());
        let mut p = base();
        p.price.amount = -1;
        p.sku = "has space".into();
        p.title = "x".repeat(201);
        p.attributes.insert("size".into(), vec![]);
        p.popularity_score = f64::NAN;
        p.original_price = Some(Money {
            amount: 10,
            currency: Currency::parse("USD").unwrap(),
        });
        let e = validate(&p).unwrap_err();
        let fields: Vec<&str> = e.0.errors.iter().map(|f| f.field.as_str()).collect();
        for f in [
            "sku",
            "title",
            "price.amount",
            "original_price.currency",
            "attributes.size",
            "popularity_score",
        ] {
            assert!(fields.contains(&f), "{f} not named in {fields:?}");
        }
        assert_eq!(e.0.code, "validation_failed");
    }
}
