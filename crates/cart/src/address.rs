//! Shipping addresses: a user's own, at most [`MAX_ADDRESSES`] of them.

use crate::Carts;
use flowline_core::{ErrorCode, Problem, Timestamp};
use flowline_http::ApiError;
use flowline_store::StoreError;
use serde::{Deserialize, Serialize};

/// Addresses one user may keep.
pub const MAX_ADDRESSES: i64 = 20;

/// ISO 3166-1 alpha-2 codes currently assigned.
const COUNTRIES: &str = "\
AD AE AF AG AI AL AM AO AQ AR AS AT AU AW AX AZ BA BB BD BE BF BG BH BI BJ BL BM BN BO BQ BR BS \
BT BV BW BY BZ CA CC CD CF CG CH CI CK CL CM CN CO CR CU CV CW CX CY CZ DE DJ DK DM DO DZ EC EE \
EG EH ER ES ET FI FJ FK FM FO FR GA GB GD GE GF GG GH GI GL GM GN GP GQ GR GS GT GU GW GY HK HM \
HN HR HT HU ID IE IL IM IN IO IQ IR IS IT JE JM JO JP KE KG KH KI KM KN KP KR KW KY KZ LA LB LC \
LI LK LR LS LT LU LV LY MA MC MD ME MF MG MH MK ML MM MN MO MP MQ MR MS MT MU MV MW MX MY MZ NA \
NC NE NF NG NI NL NO NP NR NU NZ OM PA PE PF PG PH PK PL PM PN PR PS PT PW PY QA RE RO RS RU RW \
SA SB SC SD SE SG SH SI SJ SK SL SM SN SO SR SS ST SV SX SY SZ TC TD TF TG TH TJ TK TL TM TN TO \
TR TT TV TW TZ UA UG UM US UY UZ VA VC VE VG VI VN VU WF WS YE YT ZA ZM ZW";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Address {
    pub id: String,
    pub user_id: String,
    pub name: String,
    pub line1: String,
    pub line2: Option<String>,
    pub city: String,
    pub region: Option<String>,
    pub postal_code: String,
    /// ISO 3166-1 alpha-2, e.g. `BR`.
    pub country: String,
    /// WGS 84 degrees, when known: delivery routes are planned with them.
    pub latitude: Option<f64>,
    pub longitude: Option<f64>,
    pub created_at: String,
}

/// An address to keep. Text is trimmed; empty optional fields are dropped.
#[derive(Debug, Clone, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields, default)]
pub struct NewAddress {
    /// Recipient, 1 to 100 characters.
    #[schema(required = true)]
    pub name: String,
    /// 1 to 200 characters.
    #[schema(required = true)]
    pub line1: String,
    /// At most 200 characters.
    pub line2: Option<String>,
    /// 1 to 100 characters.
    #[schema(required = true)]
    pub city: String,
    /// State or province, at most 100 characters.
    pub region: Option<String>,
    /// 1 to 20 letters, digits, spaces and `-`.
    #[schema(required = true)]
    pub postal_code: String,
    /// ISO 3166-1 alpha-2, upper case (`BR`, `US`).
    #[schema(required = true)]
    pub country: String,
    /// -90 to 90; given together with `longitude`.
    pub latitude: Option<f64>,
    /// -180 to 180.
    pub longitude: Option<f64>,
}

/// Trims and checks every field, naming each bad one.
fn validate(a: NewAddress) -> Result<NewAddress, ApiError> {
    let mut p = Problem::new(ErrorCode::ValidationFailed).with_detail("the address is not valid");
    let mut text = |field: &str, s: &str, min: usize, max: usize| {
        let n = s.chars().count();
        let ok = n >= min && n <= max && !s.chars().any(char::is_control);
        if !ok {
            let msg = if min == 0 {
                format!("at most {max} characters")
            } else {
                format!("{min} to {max} characters")
            };
            p.errors.push(flowline_core::problem::FieldError {
                field: field.to_owned(),
                message: msg,
            });
        }
    };
    let a = NewAddress {
        name: a.name.trim().to_owned(),
        line1: a.line1.trim().to_owned(),
        line2: a
            .line2
            .map(|s| s.trim().to_owned())
            .filter(|s| !s.is_empty()),
        city: a.city.trim().to_owned(),
        region: a
            .region
            .map(|s| s.trim().to_owned())
            .filter(|s| !s.is_empty()),
        postal_code: a.postal_code.trim().to_owned(),
        country: a.country,
        latitude: a.latitude,
        longitude: a.longitude,
    };
    text("name", &a.name, 1, 100);
    text("line1", &a.line1, 1, 200);
    text("line2", a.line2.as_deref().unwrap_or(""), 0, 200);
    text("city", &a.city, 1, 100);
    text("region", a.region.as_deref().unwrap_or(""), 0, 100);
    let postal_ok = (1..=20).contains(&a.postal_code.chars().count())
        && a.postal_code
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == ' ' || c == '-');
    if !postal_ok {
        p = p.with_field(
            "postal_code",
            "1 to 20 characters: letters, digits, spaces and -",
        );
    }
    let country_ok = a.country.len() == 2
        && a.country.bytes().all(|b| b.is_ascii_uppercase())
        && COUNTRIES.split(' ').any(|c| c == a.country);
    if !country_ok {
        p = p.with_field(
            "country",
            "an ISO 3166-1 alpha-2 code in upper case, e.g. BR",
        );
    }
    match (a.latitude, a.longitude) {
        (None, None) => {}
        (Some(lat), Some(lon)) => {
            if !(-90.0..=90.0).contains(&lat) {
                p = p.with_field("latitude", "-90 to 90");
            }
            if !(-180.0..=180.0).contains(&lon) {
                p = p.with_field("longitude", "-180 to 180");
            }
        }
        (None, Some(_)) => p = p.with_field("latitude", "give both coordinates or neither"),
        (Some(_), None) => p = p.with_field("longitude", "give both coordinates or neither"),
    }
    if p.errors.is_empty() {
        Ok(a)
    } else {
        Err(p.into())
    }
}

type Row = (
    String,
    String,
    String,
    String,
    Option<String>,
    String,
    Option<String>,
    String,
    String,
    Option<f64>,
    Option<f64>,
    i64,
);

const COLUMNS: &str = "id, user_id, name, line1, line2, city, region, postal_code, country, \
    latitude, longitude, created_at";

fn address(r: Row) -> Address {
    Address {
        id: r.0,
        user_id: r.1,
        name: r.2,
        line1: r.3,
        line2: r.4,
        city: r.5,
        region: r.6,
        postal_code: r.7,
        country: r.8,
        latitude: r.9,
        longitude: r.10,
        created_at: Timestamp::from_micros(r.11).to_rfc3339(),
    }
}

fn not_found() -> ApiError {
    Problem::new(ErrorCode::NotFound)
        .with_detail("no such address")
        .into()
}

impl Carts {
    /// Keeps a new address for `user_id`.
    pub async fn add_address(&self, user_id: &str, new: NewAddress) -> Result<Address, ApiError> {
        let a = validate(new)?;
        let now = Timestamp::now();
        let id = flowline_core::id::new_id().to_string();
        let mut tx = self.db.begin().await?;
        // Takes a slot under the user's counter row: concurrent creates wait on it.
        let slot = flowline_store::on_tx!(&mut tx, |c| sqlx::query(
            "INSERT INTO address_counts (user_id, n) VALUES ($1, 1)
             ON CONFLICT (user_id) DO UPDATE SET n = address_counts.n + 1
             WHERE address_counts.n < $2"
        )
        .bind(user_id)
        .bind(MAX_ADDRESSES)
        .execute(c)
        .await
        .map(|r| r.rows_affected()))
        .map_err(StoreError::from)?;
        if slot == 0 {
            tx.rollback().await?;
            return Err(Problem::new(ErrorCode::ValidationFailed)
                .with_detail(format!(
                    "at most {MAX_ADDRESSES} addresses; delete one first"
                ))
                .into());
        }
        let sql = format!(
            "INSERT INTO addresses ({COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)"
        );
        flowline_store::on_tx!(&mut tx, |c| sqlx::query(&sql)
            .bind(&id)
            .bind(user_id)
            .bind(&a.name)
            .bind(&a.line1)
            .bind(a.line2.as_deref())
            .bind(&a.city)
            .bind(a.region.as_deref())
            .bind(&a.postal_code)
            .bind(&a.country)
            .bind(a.latitude)
            .bind(a.longitude)
            .bind(now.as_micros())
            .execute(c)
            .await
            .map(|r| r.rows_affected()))
        .map_err(StoreError::from)?;
        tx.commit().await?;
        Ok(Address {
            id,
            user_id: user_id.to_owned(),
            name: a.name,
            line1: a.line1,
            line2: a.line2,
            city: a.city,
            region: a.region,
            postal_code: a.postal_code,
            country: a.country,
            latitude: a.latitude,
            longitude: a.longitude,
            created_at: now.to_rfc3339(),
        })
    }

    /// The user's addresses, oldest first.
    pub async fn addresses(&self, user_id: &str) -> Result<Vec<Address>, ApiError> {
        let sql = format!("SELECT {COLUMNS} FROM addresses WHERE user_id = $1 ORDER BY id");
        let rows: Vec<Row> = flowline_store::on_pool!(&self.db, |p| sqlx::query_as(&sql)
            .bind(user_id)
            .fetch_all(p)
            .await)
        .map_err(StoreError::from)?;
        Ok(rows.into_iter().map(address).collect())
    }

    /// One of the user's addresses; another user's is not found.
    pub async fn address(&self, user_id: &str, id: &str) -> Result<Address, ApiError> {
        let sql = format!("SELECT {COLUMNS} FROM addresses WHERE id = $1 AND user_id = $2");
        let row: Option<Row> = flowline_store::on_pool!(&self.db, |p| sqlx::query_as(&sql)
            .bind(id)
            .bind(user_id)
            .fetch_optional(p)
            .await)
        .map_err(StoreError::from)?;
        row.map(address).ok_or_else(not_found)
    }

    pub async fn delete_address(&self, user_id: &str, id: &str) -> Result<(), ApiError> {
        let mut tx = self.db.begin().await?;
        let n = flowline_store::on_tx!(&mut tx, |c| async move {
            let n = sqlx::query("DELETE FROM addresses WHERE id = $1 AND user_id = $2")
                .bind(id)
                .bind(user_id)
                .execute(&mut *c)
                .await?
                .rows_affected();
            if n > 0 {
                sqlx::query("UPDATE address_counts SET n = n - 1 WHERE user_id = $1 AND n > 0")
                    .bind(user_id)
                    .execute(&mut *c)
                    .await?;
            }
            Ok::<_, sqlx::Error>(n)
        }
        .await)
        .map_err(StoreError::from)?;
        if n == 0 {
            tx.rollback().await?;
            return Err(not_found());
        }
        tx.commit().await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn countries_are_the_assigned_codes() {
        let codes: Vec<&str> = COUNTRIES.split(' ').collect();
        assert_eq!(codes.len(), 249);
        assert!(codes.iter().all(|c| c.len() == 2));
        assert!(codes.windows(2).all(|w| w[0] < w[1]), "sorted, no repeats");
    }
}
