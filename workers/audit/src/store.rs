//! The audit table: appending batches to the hash chains, the filtered and paged reads of the
//! query API, a transfer's timeline, and the walk that verifies the chains.
//!
//! Every query is written once for PostgreSQL and SQLite. The filtered reads build their WHERE
//! clause from the filters given (an index per filter serves them), so their binds are a list
//! ([`Bind`]) rather than the fixed arguments of the `query_as!` macro.

use std::borrow::Cow;
use std::collections::HashMap;

use serde::Serialize;
use serde_json::Value;
use sqlx::postgres::PgRow;
use sqlx::sqlite::SqliteRow;
use sqlx::types::Json;
use sqlx::FromRow;
use twophase_runtime::db::{Db, Timestamp, Tx};
use twophase_runtime::{execute, query_as};
use uuid::Uuid;

use crate::chain::{canonical, row_hash, GENESIS};
use crate::record::{rfc3339, Entry};
use crate::AuditError;

/// A stored audit row.
#[derive(Debug, Clone, PartialEq, Serialize, sqlx::FromRow)]
pub struct Row {
    pub id: i64,
    #[sqlx(flatten)]
    #[serde(flatten)]
    pub entry: Entry,
    pub chain_seq: i64,
    #[serde(serialize_with = "rfc3339")]
    pub recorded_at: Timestamp,
    pub prev_hash: String,
    pub hash: String,
}

/// The columns of [`Row`], in the order of its fields.
const COLUMNS: &str = "id, topic, kafka_partition, kafka_offset, message_id, message_key, \
    event_type, entity_type, entity_id, transfer_id, action, actor_id, actor_type, \
    correlation_id, causation_id, trace_id, span_id, severity, payload_encoding, payload, \
    headers, ip_address, user_agent, occurred_at, occurred_at_us, chain_seq, recorded_at, \
    prev_hash, hash";

/// How many times a record is offered to a chain whose head keeps moving before the batch gives
/// up and is retried whole.
const CHAIN_ATTEMPTS: u32 = 5;

/// What appending a batch did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Appended {
    /// Rows written.
    pub inserted: usize,
    /// Records already stored (redelivered, or the same message published twice).
    pub duplicates: usize,
}

/// Appends `entries` in one transaction, each to the chain of its partition, skipping those
/// already stored. Entries of one partition must come in offset order.
pub async fn append(
    db: &Db,
    entries: &[Entry],
    recorded_at: Timestamp,
) -> Result<Appended, AuditError> {
    let mut tx = db.begin().await?;
    let mut heads: HashMap<(String, i32), (i64, String)> = HashMap::new();
    let mut appended = Appended::default();
    for entry in entries {
        let key = (entry.topic.clone(), entry.kafka_partition);
        let mut entry = Cow::Borrowed(entry);
        // Whether it was given an id of its own, its `ce_id` having named another message.
        let mut rekeyed = false;
        let mut attempt = 0;
        loop {
            attempt += 1;
            let (seq, prev_hash) = match heads.get(&key) {
                Some(head) => head.clone(),
                None => head(&mut tx, &key.0, key.1).await?,
            };
            let mut row = Row {
                id: 0,
                entry: entry.clone().into_owned(),
                chain_seq: seq + 1,
                recorded_at,
                prev_hash,
                hash: String::new(),
            };
            row.hash = row_hash(&row);
            if insert(&mut tx, &row).await? {
                heads.insert(key.clone(), (row.chain_seq, row.hash));
                appended.inserted += 1;
                if rekeyed {
                    tracing::warn!(
                        message.id = %row.entry.message_id,
                        topic = %entry.topic,
                        partition = entry.kafka_partition,
                        offset = entry.kafka_offset,
                        "a message id already stored named another message: kept under an id \
                         of its own"
                    );
                }
                break;
            }
            // Nothing inserted: the record is stored already, or its id names another message,
            // or another writer took the link. Whichever, the head is read afresh.
            heads.remove(&key);
            match stored(&mut tx, &entry).await? {
                // An id of its own already stored is this message's: it is derived from what
                // the message says.
                Some(same) if same || rekeyed => {
                    appended.duplicates += 1;
                    break;
                }
                Some(_) => {
                    // A producer that reused a `ce_id` for another message, or two outcomes
                    // of one transfer (the reconciler's `conflicting_outcome`): both are kept,
                    // this one under an id of its own.
                    entry.to_mut().message_id = reused_id(&entry);
                    rekeyed = true;
                    continue;
                }
                None => {}
            }
            if attempt >= CHAIN_ATTEMPTS {
                return Err(AuditError::ChainContention {
                    topic: entry.topic.clone(),
                    partition: entry.kafka_partition,
                    offset: entry.kafka_offset,
                });
            }
        }
    }
    tx.commit().await?;
    Ok(appended)
}

/// The sequence number and hash of a chain's newest row (0 and [`GENESIS`] when empty).
async fn head(tx: &mut Tx, topic: &str, partition: i32) -> Result<(i64, String), sqlx::Error> {
    let head = query_as!(
        tx,
        (i64, String),
        fetch_optional,
        "SELECT chain_seq, hash FROM audit_log WHERE topic = $1 AND kafka_partition = $2 \
         ORDER BY chain_seq DESC LIMIT 1",
        topic,
        partition,
    )?;
    Ok(head.unwrap_or_else(|| (0, GENESIS.to_owned())))
}

/// The id of a message whose `ce_id` names another stored message: derived from that id, where
/// the record sits and what it says, so that a redelivery gets it again, and a third message
/// under the id an id of its own too. Do not change the derivation: stored rows are unique on
/// it.
fn reused_id(entry: &Entry) -> Uuid {
    let seed = format!(
        "reused/{}/{}/{}/{}/{}",
        entry.message_id,
        entry.topic,
        entry.kafka_partition,
        entry.kafka_offset,
        content(&entry.payload.0)
    );
    Uuid::new_v5(&Uuid::NAMESPACE_OID, seed.as_bytes())
}

/// A payload as canonical JSON: the same before and after a round trip through jsonb.
fn content(payload: &Value) -> String {
    let mut text = String::new();
    canonical(payload, &mut text);
    text
}

/// Whether a message is stored under the record's message id: the same on every delivery of
/// the record (its `ce_id`, or derived from where it sits when it has none), and whether it is
/// this one (the same topic and payload) or another under the same id. Its position alone says
/// nothing, as offsets start again when a topic is made anew.
async fn stored(tx: &mut Tx, entry: &Entry) -> Result<Option<bool>, sqlx::Error> {
    let found = query_as!(
        tx,
        (String, Json<Value>),
        fetch_optional,
        "SELECT topic, payload FROM audit_log WHERE message_id = $1",
        entry.message_id,
    )?;
    Ok(found.map(|(topic, Json(payload))| {
        topic == entry.topic && content(&payload) == content(&entry.payload.0)
    }))
}

/// Inserts a row unless one of its unique keys is taken; whether it was inserted.
async fn insert(tx: &mut Tx, row: &Row) -> Result<bool, sqlx::Error> {
    let e = &row.entry;
    let inserted = execute!(
        tx,
        "INSERT INTO audit_log (topic, kafka_partition, kafka_offset, message_id, message_key, \
         event_type, entity_type, entity_id, transfer_id, action, actor_id, actor_type, \
         correlation_id, causation_id, trace_id, span_id, severity, payload_encoding, payload, \
         headers, ip_address, user_agent, occurred_at, occurred_at_us, chain_seq, recorded_at, \
         prev_hash, hash) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, \
         $18, $19, $20, $21, $22, $23, $24, $25, $26, $27, $28) \
         ON CONFLICT DO NOTHING",
        &e.topic,
        e.kafka_partition,
        e.kafka_offset,
        e.message_id,
        &e.message_key,
        &e.event_type,
        &e.entity_type,
        &e.entity_id,
        &e.transfer_id,
        &e.action,
        &e.actor_id,
        &e.actor_type,
        &e.correlation_id,
        &e.causation_id,
        &e.trace_id,
        &e.span_id,
        &e.severity,
        &e.payload_encoding,
        &e.payload,
        &e.headers,
        &e.ip_address,
        &e.user_agent,
        e.occurred_at,
        e.occurred_at_us,
        row.chain_seq,
        row.recorded_at,
        &row.prev_hash,
        &row.hash,
    )?;
    Ok(inserted == 1)
}

/// A value bound to a query built at run time.
#[derive(Debug, Clone)]
pub enum Bind {
    Text(String),
    Time(Timestamp),
    Int(i64),
}

async fn fetch_all_dyn<T>(tx: &mut Tx, sql: &str, binds: &[Bind]) -> Result<Vec<T>, sqlx::Error>
where
    T: for<'r> FromRow<'r, PgRow> + for<'r> FromRow<'r, SqliteRow> + Send + Unpin,
{
    match tx {
        Tx::Postgres(tx) => {
            let mut query = sqlx::query_as::<_, T>(sql);
            for bind in binds {
                query = match bind {
                    Bind::Text(s) => query.bind(s.clone()),
                    Bind::Time(t) => query.bind(*t),
                    Bind::Int(i) => query.bind(*i),
                };
            }
            query.fetch_all(&mut **tx).await
        }
        Tx::Sqlite(tx) => {
            let mut query = sqlx::query_as::<_, T>(sql);
            for bind in binds {
                query = match bind {
                    Bind::Text(s) => query.bind(s.clone()),
                    Bind::Time(t) => query.bind(*t),
                    Bind::Int(i) => query.bind(*i),
                };
            }
            query.fetch_all(&mut **tx).await
        }
    }
}

/// The filters and page of `GET /audit/logs` and `twophase audit query`, already checked.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LogFilter {
    pub entity_type: Option<String>,
    pub entity_id: Option<String>,
    pub event_type: Option<String>,
    pub severity: Option<String>,
    /// Inclusive.
    pub start_time: Option<Timestamp>,
    /// Exclusive.
    pub end_time: Option<Timestamp>,
    /// Only the rows after this one, newest first: a page's [`Page::next`].
    pub before: Option<Cursor>,
    /// From 1.
    pub page: u32,
    /// 1 to [`MAX_PAGE_SIZE`].
    pub page_size: u32,
}

pub const MAX_PAGE_SIZE: u32 = 100;
pub const DEFAULT_PAGE_SIZE: u32 = 50;
/// How deep pages go: rows past this many need narrower filters (a time window). An offset
/// deeper than this would make the database walk and discard that many rows per request.
pub const MAX_WINDOW: u64 = 10_000;

/// Matching rows are counted up to this many: an exact count of a filter that matches most of
/// a large table would cost a scan of all of it on every page.
pub const COUNT_LIMIT: i64 = 100_000;

/// One page of rows, newest first, and how many rows match in all.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Page {
    pub rows: Vec<Row>,
    /// How many rows match; when more than [`COUNT_LIMIT`] do, [`COUNT_LIMIT`] (and
    /// `total_exact` is false).
    pub total: i64,
    /// Whether `total` is the exact count rather than a lower bound.
    pub total_exact: bool,
    pub page: u32,
    pub page_size: u32,
    /// Where the next page starts, as `before` takes it, if this page is full: rows written
    /// meanwhile do not move it, as they move a page number.
    pub next: Option<String>,
}

/// A row's place in the order of [`query`] (newest first, then the latest written first), as
/// text: `<occurred_at>,<id>`, the time in RFC 3339 to the millisecond.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cursor {
    pub occurred_at: Timestamp,
    pub id: i64,
}

impl Cursor {
    fn of(row: &Row) -> Cursor {
        Cursor {
            occurred_at: row.entry.occurred_at,
            id: row.id,
        }
    }
}

impl std::fmt::Display for Cursor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{},{}",
            crate::record::format_time(&self.occurred_at),
            self.id
        )
    }
}

impl std::str::FromStr for Cursor {
    type Err = String;

    fn from_str(s: &str) -> Result<Cursor, String> {
        let unlike = || format!("{s:?} is not a page's next, such as 2026-11-24T10:00:00.000Z,42");
        let (time, id) = s.rsplit_once(',').ok_or_else(unlike)?;
        let occurred_at = chrono::DateTime::parse_from_rfc3339(time).map_err(|_| unlike())?;
        Ok(Cursor {
            occurred_at: Timestamp::from(occurred_at.with_timezone(&chrono::Utc)),
            id: id.parse().map_err(|_| unlike())?,
        })
    }
}

impl LogFilter {
    /// The WHERE clause and its binds. Placeholders are numbered in the order they appear,
    /// which SQLite needs.
    fn clause(&self) -> (String, Vec<Bind>) {
        let mut conditions = Vec::new();
        let mut binds = Vec::new();
        let mut text = |column: &str, value: &Option<String>| {
            if let Some(v) = value {
                binds.push(Bind::Text(v.clone()));
                conditions.push(format!("{column} = ${}", binds.len()));
            }
        };
        text("entity_type", &self.entity_type);
        text("entity_id", &self.entity_id);
        text("event_type", &self.event_type);
        text("severity", &self.severity);
        if let Some(t) = self.start_time {
            binds.push(Bind::Time(t));
            conditions.push(format!("occurred_at >= ${}", binds.len()));
        }
        if let Some(t) = self.end_time {
            binds.push(Bind::Time(t));
            conditions.push(format!("occurred_at < ${}", binds.len()));
        }
        if let Some(c) = self.before {
            binds.push(Bind::Time(c.occurred_at));
            let earlier = binds.len();
            binds.push(Bind::Time(c.occurred_at));
            binds.push(Bind::Int(c.id));
            conditions.push(format!(
                "(occurred_at < ${earlier} OR (occurred_at = ${} AND id < ${}))",
                earlier + 1,
                earlier + 2
            ));
        }
        let clause = if conditions.is_empty() {
            String::new()
        } else {
            format!(" WHERE {}", conditions.join(" AND "))
        };
        (clause, binds)
    }
}

/// The rows matching `filter`, newest first, one page of them.
pub async fn query(db: &Db, filter: &LogFilter) -> Result<Page, sqlx::Error> {
    let (clause, mut binds) = filter.clause();
    let mut tx = db.begin().await?;
    let mut count_binds = binds.clone();
    count_binds.push(Bind::Int(COUNT_LIMIT + 1));
    let count_sql = format!(
        "SELECT count(*) FROM (SELECT 1 FROM audit_log{clause} LIMIT ${}) AS matching",
        count_binds.len()
    );
    let counted = fetch_all_dyn::<(i64,)>(&mut tx, &count_sql, &count_binds)
        .await?
        .first()
        .map_or(0, |(n,)| *n);
    let offset = i64::from(filter.page.saturating_sub(1)) * i64::from(filter.page_size);
    binds.push(Bind::Int(i64::from(filter.page_size)));
    binds.push(Bind::Int(offset));
    let n = binds.len();
    let sql = format!(
        "SELECT {COLUMNS} FROM audit_log{clause} ORDER BY occurred_at DESC, id DESC \
         LIMIT ${} OFFSET ${n}",
        n - 1
    );
    let rows = fetch_all_dyn::<Row>(&mut tx, &sql, &binds).await?;
    tx.commit().await?;
    let next = rows
        .last()
        .filter(|_| rows.len() == filter.page_size as usize)
        .map(|last| Cursor::of(last).to_string());
    Ok(Page {
        rows,
        total: counted.min(COUNT_LIMIT),
        total_exact: counted <= COUNT_LIMIT,
        page: filter.page,
        page_size: filter.page_size,
        next,
    })
}

/// One step of a transfer's timeline.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Step {
    #[serde(flatten)]
    pub row: Row,
    /// Milliseconds since the previous step (to the microsecond); null for the first.
    pub since_previous_ms: Option<f64>,
}

/// The most steps a timeline shows; a transfer has a few dozen messages at most, even with
/// every commit re-sent many times.
const MAX_STEPS: i64 = 10_000;

/// Every audited message of a transfer, by time then offset.
pub async fn timeline(db: &Db, transfer_id: &str) -> Result<Vec<Step>, sqlx::Error> {
    let id = crate::record::normalize_transfer_id(transfer_id);
    let mut tx = db.begin().await?;
    let sql = format!(
        "SELECT {COLUMNS} FROM audit_log WHERE transfer_id = $1 \
         ORDER BY occurred_at_us, kafka_offset, id LIMIT $2"
    );
    let rows = fetch_all_dyn::<Row>(&mut tx, &sql, &[Bind::Text(id), Bind::Int(MAX_STEPS)]).await?;
    tx.commit().await?;
    let mut previous: Option<i64> = None;
    Ok(rows
        .into_iter()
        .map(|row| {
            let at = row.entry.occurred_at_us;
            let since_previous_ms = previous.map(|p| (at - p) as f64 / 1000.0);
            previous = Some(at);
            Step {
                row,
                since_previous_ms,
            }
        })
        .collect())
}

/// The first broken link of a chain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Break {
    /// The row where the chain stops holding.
    pub id: i64,
    pub chain_seq: i64,
    pub problem: String,
}

/// What the walk found in one chain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ChainReport {
    pub topic: String,
    pub partition: i32,
    pub rows: i64,
    /// The newest row's position and hash: keep them elsewhere to detect the newest rows being
    /// removed later.
    pub head_seq: i64,
    pub head_hash: String,
    pub broken: Option<Break>,
}

/// Rows read per query while walking a chain.
const WALK_PAGE: i64 = 2_000;

/// Walks every chain from its first row and reports, per chain, the first link that does not
/// hold: a row whose content does not match its hash, a missing row, or a row that does not
/// link to the one before it.
pub async fn verify(db: &Db) -> Result<Vec<ChainReport>, sqlx::Error> {
    let mut tx = db.begin().await?;
    let chains = query_as!(
        &mut tx,
        (String, i32),
        fetch_all,
        "SELECT DISTINCT topic, kafka_partition FROM audit_log ORDER BY topic, kafka_partition",
    )?;
    tx.commit().await?;
    let mut reports = Vec::with_capacity(chains.len());
    for (topic, partition) in chains {
        reports.push(verify_chain(db, topic, partition).await?);
    }
    Ok(reports)
}

async fn verify_chain(db: &Db, topic: String, partition: i32) -> Result<ChainReport, sqlx::Error> {
    let sql = format!(
        "SELECT {COLUMNS} FROM audit_log WHERE topic = $1 AND kafka_partition = $2 \
         AND chain_seq > $3 ORDER BY chain_seq LIMIT $4"
    );
    let mut report = ChainReport {
        topic,
        partition,
        rows: 0,
        head_seq: 0,
        head_hash: GENESIS.to_owned(),
        broken: None,
    };
    // The previous row: its id, seq and stored hash.
    let mut previous: Option<(i64, i64, String)> = None;
    loop {
        let binds = [
            Bind::Text(report.topic.clone()),
            Bind::Int(i64::from(partition)),
            Bind::Int(report.head_seq),
            Bind::Int(WALK_PAGE),
        ];
        let mut tx = db.begin().await?;
        let rows = fetch_all_dyn::<Row>(&mut tx, &sql, &binds).await?;
        tx.commit().await?;
        let done = (rows.len() as i64) < WALK_PAGE;
        for row in rows {
            if report.broken.is_none() {
                report.broken = check_link(&row, previous.as_ref());
            }
            report.rows += 1;
            report.head_seq = row.chain_seq;
            report.head_hash = row.hash.clone();
            previous = Some((row.id, row.chain_seq, row.hash));
        }
        if done {
            return Ok(report);
        }
    }
}

/// Whether `row` holds as the successor of `previous` (id, seq, hash); what is wrong if not.
pub fn check_link(row: &Row, previous: Option<&(i64, i64, String)>) -> Option<Break> {
    let broken = |problem: String| {
        Some(Break {
            id: row.id,
            chain_seq: row.chain_seq,
            problem,
        })
    };
    let (expected_seq, expected_prev) = match previous {
        Some((_, seq, hash)) => (seq + 1, hash.as_str()),
        None => (1, GENESIS),
    };
    if row.chain_seq != expected_seq {
        return broken(match previous {
            Some((id, seq, _)) => format!(
                "row {} follows row {id} (seq {seq}) at seq {}: rows of seq {expected_seq} to {} \
                 are missing (deleted)",
                row.id,
                row.chain_seq,
                row.chain_seq - 1
            ),
            None => format!(
                "the chain starts at seq {} with row {}: rows of seq 1 to {} are missing (deleted)",
                row.chain_seq,
                row.id,
                row.chain_seq - 1
            ),
        });
    }
    if row.prev_hash != expected_prev {
        return broken(match previous {
            Some((id, seq, hash)) => format!(
                "row {} links to prev_hash {} but row {id} (seq {seq}) before it has hash {hash}: \
                 row {id} was rewritten with a new hash, or this link was altered",
                row.id, row.prev_hash
            ),
            None => format!(
                "row {} is first in its chain but links to prev_hash {} rather than the genesis \
                 hash",
                row.id, row.prev_hash
            ),
        });
    }
    let computed = row_hash(row);
    if computed != row.hash {
        return broken(format!(
            "row {} does not match its hash: stored {}, computed from its content {computed}: \
             the row was changed after it was written",
            row.id, row.hash
        ));
    }
    None
}

/// A JSON view of any serializable value (for the API and `--json`).
pub fn to_json<T: Serialize>(value: &T) -> Value {
    serde_json::to_value(value).expect("audit rows serialize")
}
