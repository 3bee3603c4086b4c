//! Databases: PostgreSQL in production, SQLite for the embedded default, chosen by the URL.
//!
//! Every query is written once and runs on both: the [`query_as!`](crate::query_as) and
//! [`execute!`](crate::execute) macros expand the same text and binds for each backend. To keep
//! the text portable, queries do no arithmetic on amounts (SQLite has no exact decimal type;
//! the sums and differences are computed in Rust with `rust_decimal` while the rows are locked),
//! take the time as a bound [`Timestamp`] rather than `now()`, and mark row locks with
//! `FOR UPDATE`, which SQLite does without: a write transaction there holds the whole database
//! (`BEGIN IMMEDIATE`).
//!
//! Each worker owns one schema and touches no other worker's tables. On PostgreSQL its pool
//! sets `search_path` to that schema; on SQLite each schema is a file of its own
//! (`sqlite:DIR` → `DIR/<schema>.db`). Either way queries name tables without a schema.

use std::borrow::Cow;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use chrono::{DateTime, SubsecRound, Utc};
use rust_decimal::Decimal;
pub use sqlx;
use sqlx::encode::IsNull;
use sqlx::error::BoxDynError;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions, Postgres};
use sqlx::sqlite::{
    Sqlite, SqliteConnectOptions, SqliteError, SqliteJournalMode, SqlitePool, SqlitePoolOptions,
    SqliteSynchronous,
};
use sqlx::Connection as _;
use sqlx::{Decode, Encode, Type};

/// The schemas, one per worker that keeps state. Do not change: they name PostgreSQL schemas
/// and SQLite files.
pub const SCHEMAS: [&str; 5] = ["coordinator", "account", "risk", "audit", "reconciler"];

/// The PostgreSQL migrations of every schema, embedded in the binary.
pub static POSTGRES: sqlx::migrate::Migrator = sqlx::migrate!("../../migrations/postgres");

/// The SQLite migrations, one migrator per schema file.
fn sqlite_migrator(schema: &str) -> Option<&'static sqlx::migrate::Migrator> {
    static COORDINATOR: sqlx::migrate::Migrator =
        sqlx::migrate!("../../migrations/sqlite/coordinator");
    static ACCOUNT: sqlx::migrate::Migrator = sqlx::migrate!("../../migrations/sqlite/account");
    static RISK: sqlx::migrate::Migrator = sqlx::migrate!("../../migrations/sqlite/risk");
    static AUDIT: sqlx::migrate::Migrator = sqlx::migrate!("../../migrations/sqlite/audit");
    static RECONCILER: sqlx::migrate::Migrator =
        sqlx::migrate!("../../migrations/sqlite/reconciler");
    match schema {
        "coordinator" => Some(&COORDINATOR),
        "account" => Some(&ACCOUNT),
        "risk" => Some(&RISK),
        "audit" => Some(&AUDIT),
        "reconciler" => Some(&RECONCILER),
        _ => None,
    }
}

/// Prepared statements kept per connection (sqlx's default is 100).
const STATEMENT_CACHE: usize = 1024;

/// A connection pool on either backend.
#[derive(Debug, Clone)]
pub enum Db {
    Postgres(PgPool),
    Sqlite(SqlitePool),
}

/// A transaction on either backend.
#[derive(Debug)]
pub enum Tx {
    Postgres(sqlx::Transaction<'static, Postgres>),
    Sqlite(sqlx::Transaction<'static, Sqlite>),
}

fn sqlite_dir(url: &str) -> Option<PathBuf> {
    let rest = url.strip_prefix("sqlite:")?;
    Some(PathBuf::from(rest.strip_prefix("//").unwrap_or(rest)))
}

/// Refuses a data directory that [`migrate`] has not made the files of `schemas` in: a
/// mistyped directory is named as such rather than made, empty, by a command that reads.
fn migrated(dir: &std::path::Path, schemas: &[&str]) -> Result<(), sqlx::Error> {
    for schema in schemas {
        // Only a file that is not there is missing; one that cannot be looked at says why.
        if !dir.join(format!("{schema}.db")).try_exists()? {
            let dir = if dir.as_os_str().is_empty() {
                "the current directory".to_owned()
            } else {
                dir.display().to_string()
            };
            return Err(sqlx::Error::Configuration(
                format!(
                    "{dir} holds no twophase data ({schema}.db is missing): `twophase migrate \
                     --database-url sqlite:DIR` makes a data directory, as `twophase dev` does"
                )
                .into(),
            ));
        }
    }
    Ok(())
}

fn sqlite_options(dir: &std::path::Path, schema: &str) -> SqliteConnectOptions {
    SqliteConnectOptions::new()
        .filename(dir.join(format!("{schema}.db")))
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(SqliteSynchronous::Full)
        .busy_timeout(Duration::from_secs(30))
        .foreign_keys(true)
        .statement_cache_capacity(STATEMENT_CACHE)
}

/// How long a PostgreSQL pool tries to open a connection, or waits for one, before it gives up.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// A pool with its first connection open, or why it could not be opened: a pool that gives up
/// says only that it timed out, so one connection more is tried for its error (refused, a
/// password, no such database).
async fn pg_pool(pool: PgPoolOptions, options: PgConnectOptions) -> Result<PgPool, sqlx::Error> {
    match pool.connect_with(options.clone()).await {
        Err(sqlx::Error::PoolTimedOut) => {
            let attempt = sqlx::PgConnection::connect_with(&options);
            Err(match tokio::time::timeout(CONNECT_TIMEOUT, attempt).await {
                Ok(Err(why)) => why,
                Ok(Ok(connection)) => {
                    let _ = connection.close().await;
                    sqlx::Error::PoolTimedOut
                }
                Err(_) => sqlx::Error::PoolTimedOut,
            })
        }
        pool => pool,
    }
}

/// How long a pooled PostgreSQL connection may have been idle and still be used without
/// testing it first.
const UNTESTED_IDLE: Duration = Duration::from_secs(1);

/// What a pool's statements find their rows by, which decides what PostgreSQL's planner may
/// choose for them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lookups {
    /// Anything: the planner's defaults (the audit store, reconciliation, the command line).
    Any,
    /// A key or an index, on tables that start empty: a saga worker's. PostgreSQL is told not
    /// to read a table whole where an index serves: a connection keeps the plan it made for a
    /// statement's first runs, and one made while the table was small (a sequential scan)
    /// would otherwise be kept until the first autoanalyze, every lookup reading the whole
    /// table as it grew. (Planning every run instead cost a sixth of the closed loop's
    /// throughput: BENCHMARKS.md.) Nor is any statement compiled to machine code: a scan that
    /// has no index to use (the in-flight gauges' count) is then costed past JIT's threshold,
    /// and compiling it took 0.2–0.5 s of a core on every call.
    Keyed,
}

impl Lookups {
    fn planner_settings(self) -> &'static [(&'static str, &'static str)] {
        match self {
            Lookups::Any => &[],
            Lookups::Keyed => &[("enable_seqscan", "off"), ("jit", "off")],
        }
    }
}

impl Db {
    /// A pool whose connections see only `schema`.
    pub async fn connect(url: &str, schema: &str, max_connections: u32) -> Result<Db, sqlx::Error> {
        Db::connect_for(url, schema, max_connections, Lookups::Any).await
    }

    /// A pool whose connections see only `schema` and run statements that find their rows by
    /// `lookups`.
    pub async fn connect_for(
        url: &str,
        schema: &str,
        max_connections: u32,
        lookups: Lookups,
    ) -> Result<Db, sqlx::Error> {
        if let Some(dir) = sqlite_dir(url) {
            migrated(&dir, &[schema])?;
            // SQLite has one writer at a time; more connections would only wait on its lock.
            let pool = SqlitePoolOptions::new()
                .max_connections(1)
                .connect_with(sqlite_options(&dir, schema))
                .await?;
            return Ok(Db::Sqlite(pool));
        }
        let options = PgConnectOptions::from_str(url)?
            .options([("search_path", schema)])
            .options(lookups.planner_settings().iter().copied())
            // A batch's statements name as many placeholders as it has rows (padded to a few
            // sizes), so one statement has a text per size.
            .statement_cache_capacity(STATEMENT_CACHE);
        let pool = PgPoolOptions::new()
            .max_connections(max_connections)
            .acquire_timeout(CONNECT_TIMEOUT)
            // sqlx tests a connection when it returns to the pool, and by default again when it
            // is taken: a round trip more on every transaction, a tenth of a saga worker's. A
            // connection that came back moments ago was just tested; one that sat idle may
            // have lost its server (a restart) and is tested before use.
            .test_before_acquire(false)
            .before_acquire(|conn, meta| {
                Box::pin(async move {
                    if meta.idle_for > UNTESTED_IDLE {
                        conn.ping().await?;
                    }
                    Ok(true)
                })
            });
        Ok(Db::Postgres(pg_pool(pool, options).await?))
    }

    /// A pool that sees every schema by name (`account.ledger`, `coordinator.transfers`), for
    /// checks that span workers: reconciliation reads, tests. On SQLite every schema file is
    /// attached under its name.
    pub async fn connect_all(url: &str) -> Result<Db, sqlx::Error> {
        if let Some(dir) = sqlite_dir(url) {
            migrated(&dir, &SCHEMAS)?;
            let attach: Vec<String> = SCHEMAS
                .iter()
                .map(|s| {
                    let file = dir.join(format!("{s}.db"));
                    format!(
                        "ATTACH DATABASE '{}' AS {s}",
                        file.display().to_string().replace('\'', "''")
                    )
                })
                .collect();
            let pool = SqlitePoolOptions::new()
                .max_connections(1)
                .after_connect(move |conn, _| {
                    let attach = attach.clone();
                    Box::pin(async move {
                        for statement in &attach {
                            sqlx::query(statement).execute(&mut *conn).await?;
                        }
                        Ok(())
                    })
                })
                .connect_with(
                    SqliteConnectOptions::new()
                        .filename(dir.join("overview.db"))
                        .create_if_missing(true)
                        .busy_timeout(Duration::from_secs(30)),
                )
                .await?;
            return Ok(Db::Sqlite(pool));
        }
        let pool = PgPoolOptions::new()
            .max_connections(5)
            .acquire_timeout(CONNECT_TIMEOUT);
        Ok(Db::Postgres(
            pg_pool(pool, PgConnectOptions::from_str(url)?).await?,
        ))
    }

    /// Starts a transaction. On SQLite it takes the write lock at once, so two transactions
    /// never both read and then both try to write.
    pub async fn begin(&self) -> Result<Tx, sqlx::Error> {
        Ok(match self {
            Db::Postgres(pool) => Tx::Postgres(pool.begin().await?),
            Db::Sqlite(pool) => Tx::Sqlite(pool.begin_with("BEGIN IMMEDIATE").await?),
        })
    }

    /// Starts a read-only transaction whose reads all see one snapshot, so that they agree
    /// with each other while transfers go on: `REPEATABLE READ` on PostgreSQL. On SQLite a
    /// transaction holds the write lock, which is a snapshot already.
    pub async fn begin_snapshot(&self) -> Result<Tx, sqlx::Error> {
        let mut tx = self.begin().await?;
        if let Tx::Postgres(_) = tx {
            crate::execute!(
                &mut tx,
                "SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY"
            )?;
        }
        Ok(tx)
    }

    /// Whether the database answers, for health checks.
    pub async fn ping(&self) -> bool {
        let result = match self {
            Db::Postgres(pool) => sqlx::query("SELECT 1").execute(pool).await.map(|_| ()),
            Db::Sqlite(pool) => sqlx::query("SELECT 1").execute(pool).await.map(|_| ()),
        };
        result.is_ok()
    }

    pub async fn close(&self) {
        match self {
            Db::Postgres(pool) => pool.close().await,
            Db::Sqlite(pool) => pool.close().await,
        }
    }
}

impl Tx {
    pub async fn commit(self) -> Result<(), sqlx::Error> {
        match self {
            Tx::Postgres(tx) => tx.commit().await,
            Tx::Sqlite(tx) => tx.commit().await,
        }
    }
}

/// Applies every pending migration of every schema.
pub async fn migrate(url: &str) -> Result<(), sqlx::migrate::MigrateError> {
    if let Some(dir) = sqlite_dir(url) {
        std::fs::create_dir_all(&dir).map_err(sqlx::Error::Io)?;
        for schema in SCHEMAS {
            let pool = SqlitePoolOptions::new()
                .max_connections(1)
                .connect_with(sqlite_options(&dir, schema))
                .await?;
            sqlite_migrator(schema)
                .expect("every schema has SQLite migrations")
                .run(&pool)
                .await?;
            pool.close().await;
        }
        return Ok(());
    }
    let pool = PgPoolOptions::new().max_connections(1).connect(url).await?;
    POSTGRES.run(&pool).await?;
    pool.close().await;
    Ok(())
}

/// Creates the database `name` on the PostgreSQL server of `admin_url` (whose user may create
/// databases) and returns its URL. For tests, each of which starts on a database of its own.
pub async fn create_database(admin_url: &str, name: &str) -> Result<String, sqlx::Error> {
    let admin = PgPoolOptions::new()
        .max_connections(1)
        .connect(admin_url)
        .await?;
    sqlx::query(&format!("CREATE DATABASE {name}"))
        .execute(&admin)
        .await?;
    admin.close().await;
    let options = PgConnectOptions::from_str(admin_url)?.database(name);
    Ok(sqlx::ConnectOptions::to_url_lossy(&options).to_string())
}

/// The query text for SQLite: row locks dropped (its write transaction locks the database).
pub fn sqlite_text(sql: &str) -> Cow<'_, str> {
    if sql.contains(" FOR UPDATE") {
        Cow::Owned(
            sql.replace(" FOR UPDATE SKIP LOCKED", "")
                .replace(" FOR UPDATE", ""),
        )
    } else {
        Cow::Borrowed(sql)
    }
}

/// Runs `sqlx::query_as::<_, T>(sql).bind(..)...` with `$method` (`fetch_one`,
/// `fetch_optional`, `fetch_all`) on a [`Tx`].
#[macro_export]
macro_rules! query_as {
    ($tx:expr, $t:ty, $method:ident, $sql:expr $(, $bind:expr)* $(,)?) => {{
        // Bound here so that a `&format!(…)` text lives to the end of the query.
        let sql: &str = $sql;
        match $tx {
            $crate::db::Tx::Postgres(tx) => {
                $crate::db::sqlx::query_as::<_, $t>(sql)
                    $(.bind($bind))*
                    .$method(&mut **tx)
                    .await
            }
            $crate::db::Tx::Sqlite(tx) => {
                let sql = $crate::db::sqlite_text(sql);
                $crate::db::sqlx::query_as::<_, $t>(&sql)
                    $(.bind($bind))*
                    .$method(&mut **tx)
                    .await
            }
        }
    }};
}

/// Runs `sqlx::query_as::<_, T>(sql)` on a [`Tx`] and hands each row to `$each` as it comes,
/// so that a result of any size is never held whole.
#[macro_export]
macro_rules! for_each_row {
    ($tx:expr, $t:ty, $sql:expr, $each:expr $(,)?) => {{
        let sql: &str = $sql;
        match $tx {
            $crate::db::Tx::Postgres(tx) => {
                let rows = $crate::db::sqlx::query_as::<_, $t>(sql).fetch(&mut **tx);
                $crate::db::each_row(rows, $each).await
            }
            $crate::db::Tx::Sqlite(tx) => {
                let sql = $crate::db::sqlite_text(sql);
                let rows = $crate::db::sqlx::query_as::<_, $t>(&sql).fetch(&mut **tx);
                $crate::db::each_row(rows, $each).await
            }
        }
    }};
}

/// Runs a statement on a [`Tx`]; returns the number of rows it affected.
#[macro_export]
macro_rules! execute {
    ($tx:expr, $sql:expr $(, $bind:expr)* $(,)?) => {{
        let sql: &str = $sql;
        match $tx {
            $crate::db::Tx::Postgres(tx) => $crate::db::sqlx::query(sql)
                $(.bind($bind))*
                .execute(&mut **tx)
                .await
                .map(|r| r.rows_affected()),
            $crate::db::Tx::Sqlite(tx) => {
                let sql = $crate::db::sqlite_text(sql);
                $crate::db::sqlx::query(&sql)
                    $(.bind($bind))*
                    .execute(&mut **tx)
                    .await
                    .map(|r| r.rows_affected())
            }
        }
    }};
}

/// `sql` with `{rows}` replaced by the placeholders of `rows` rows of `width` values each,
/// numbered from `$first`: `$1, $2, $3` for single values in a list (`IN ({rows})`), `($1, $2),
/// ($3, $4)` for rows of a `VALUES {rows}` list, or of two or more values anywhere.
pub fn with_rows(sql: &str, first: usize, rows: usize, width: usize) -> String {
    let grouped = width > 1 || sql.contains("VALUES {rows}");
    let mut list = String::with_capacity(rows * width * 5);
    for row in 0..rows {
        if row > 0 {
            list.push_str(", ");
        }
        if grouped {
            list.push('(');
        }
        for column in 0..width {
            if column > 0 {
                list.push_str(", ");
            }
            list.push('$');
            list.push_str(&(first + row * width + column).to_string());
        }
        if grouped {
            list.push(')');
        }
    }
    sql.replace("{rows}", &list)
}

/// One column of `rows` as an array parameter, for a PostgreSQL statement that reads its rows
/// from one array per column (`unnest($1::uuid[], $2::text[])`): one text and one plan whatever
/// the number of rows, where a `VALUES` list has a text per size.
pub fn column<'a, R, T>(rows: &'a [R], value: impl FnMut(&'a R) -> T) -> Vec<T> {
    rows.iter().map(value).collect()
}

/// How many placeholder groups a statement over `rows` rows is given: the next of a few sizes
/// (1, 2, 3, 4, 6, 8, 12, 16, …), so that each statement has only a few texts and PostgreSQL
/// plans each text once, rather than a text per batch size planned at every run.
pub fn padded(rows: usize) -> usize {
    let mut size = 1;
    while size < rows {
        size = if size.is_power_of_two() && size >= 2 {
            size + size / 2
        } else {
            size.next_power_of_two().max(size + 1)
        };
    }
    size
}

/// Hands each row of `rows` to `each` as it comes, for [`for_each_row!`](crate::for_each_row):
/// the first error ends it.
#[doc(hidden)]
pub async fn each_row<T, E>(
    rows: impl futures::Stream<Item = Result<T, E>>,
    mut each: impl FnMut(T),
) -> Result<(), E> {
    use futures::TryStreamExt as _;
    let mut rows = std::pin::pin!(rows);
    while let Some(row) = rows.try_next().await? {
        each(row);
    }
    Ok(())
}

/// Runs a statement over a list of rows; the public macros below say which.
#[doc(hidden)]
#[macro_export]
macro_rules! __rows {
    (@make $t:ty, $sql:expr) => {
        $crate::db::sqlx::query_as::<_, $t>($sql)
    };
    (@make, $sql:expr) => {
        $crate::db::sqlx::query($sql)
    };
    // A statement over `rows` given `$count(rows.len())` placeholder groups; its row count.
    (@execute $tx:expr, $sql:expr, $rows:expr, $count:expr, |$row:pat_param| ($($bind:expr),+)) => {{
        let rows = $rows;
        if rows.is_empty() {
            Ok(0)
        } else {
            $crate::__rows!($tx, [], $sql, [], rows, $count(rows.len()), |$row| ($($bind),+),
                |query, conn| query.execute(conn).await.map(|r| r.rows_affected()))
        }
    }};
    (@bind $query:ident, $sql:expr, [$($t:ty)?], [$($first:expr),*], $rows:expr, $count:expr,
     |$row:pat_param| ($($bind:expr),+)) => {
        let $query = $crate::__rows!(@make $($t)?, $sql);
        $(let $query = $query.bind($first);)*
        let mut $query = $query;
        // The padding repeats the last row.
        let last = $rows.last().expect("rows are checked for none");
        let padding = std::iter::repeat(last).take($count - $rows.len());
        for $row in $rows.iter().chain(padding) {
            $($query = $query.bind($bind);)+
        }
    };
    ($tx:expr, [$($t:ty)?], $sql:expr, [$($first:expr),*], $rows:expr, $count:expr,
     |$row:pat_param| ($($bind:expr),+), |$query:ident, $conn:ident| $run:expr) => {{
        let rows = $rows;
        let count: usize = $count;
        let first = 1 $(+ { let _ = stringify!($first); 1 })*;
        let width = [$(stringify!($bind)),+].len();
        let sql = $crate::db::with_rows($sql, first, count, width);
        match $tx {
            $crate::db::Tx::Postgres(tx) => {
                $crate::__rows!(@bind $query, &sql, [$($t)?], [$($first),*], rows, count,
                    |$row| ($($bind),+));
                let $conn = &mut **tx;
                $run
            }
            $crate::db::Tx::Sqlite(tx) => {
                let sql = $crate::db::sqlite_text(&sql);
                $crate::__rows!(@bind $query, &sql, [$($t)?], [$($first),*], rows, count,
                    |$row| ($($bind),+));
                let $conn = &mut **tx;
                $run
            }
        }
    }};
}

/// Like [`query_as!`](crate::query_as) with `fetch_all`, for a query over a list of rows:
/// `{rows}` in the text stands for one placeholder group per element of `rows` (a slice), and
/// the closure says what each element binds. Values in `[…]` before the rows are bound first,
/// as `$1`, `$2`, …; the rows' placeholders follow them. An empty list runs nothing and finds
/// nothing. The list is [`padded`] with its last row, so the query must find the same for a
/// row named twice as once (an `IN` list).
///
/// ```ignore
/// query_rows!(tx, (Uuid, String), "SELECT id, name FROM t WHERE id IN ({rows})", ids, |id| (*id))
/// query_rows!(tx, (Uuid,), "SELECT id FROM t WHERE at > $1 AND id IN ({rows})", [since], ids, |id| (*id))
/// ```
#[macro_export]
macro_rules! query_rows {
    ($tx:expr, $t:ty, $sql:expr, $rows:expr, |$row:pat_param| ($($bind:expr),+ $(,)?) $(,)?) => {
        $crate::query_rows!($tx, $t, $sql, [], $rows, |$row| ($($bind),+))
    };
    ($tx:expr, $t:ty, $sql:expr, [$($first:expr),* $(,)?], $rows:expr,
     |$row:pat_param| ($($bind:expr),+ $(,)?) $(,)?) => {{
        let rows = $rows;
        if rows.is_empty() {
            Ok(Vec::<$t>::new())
        } else {
            $crate::__rows!($tx, [$t], $sql, [$($first),*], rows, $crate::db::padded(rows.len()),
                |$row| ($($bind),+), |query, conn| query.fetch_all(conn).await)
        }
    }};
}

/// Like [`execute!`](crate::execute), for a multi-row `INSERT … VALUES {rows}` (see
/// [`query_rows!`](crate::query_rows)). An empty list runs nothing.
#[macro_export]
macro_rules! execute_rows {
    ($tx:expr, $sql:expr, $rows:expr, |$row:pat_param| ($($bind:expr),+ $(,)?) $(,)?) => {
        $crate::__rows!(@execute $tx, $sql, $rows, std::convert::identity, |$row| ($($bind),+))
    };
}

/// Like [`execute_rows!`](crate::execute_rows), for a statement that sets existing rows from a
/// list: `WITH v (…) AS (VALUES {rows}) UPDATE … FROM v WHERE …`. The list is [`padded`] with
/// its last row, which sets the same values again. Returns the number of rows updated.
#[macro_export]
macro_rules! update_rows {
    ($tx:expr, $sql:expr, $rows:expr, |$row:pat_param| ($($bind:expr),+ $(,)?) $(,)?) => {
        $crate::__rows!(@execute $tx, $sql, $rows, $crate::db::padded, |$row| ($($bind),+))
    };
}

/// An exact amount as stored: `NUMERIC` on PostgreSQL, decimal text on SQLite (whose own
/// numbers are floats).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct Amount(pub Decimal);

impl From<Amount> for Decimal {
    fn from(a: Amount) -> Decimal {
        a.0
    }
}

impl Type<Postgres> for Amount {
    fn type_info() -> sqlx::postgres::PgTypeInfo {
        <Decimal as Type<Postgres>>::type_info()
    }
}

impl Encode<'_, Postgres> for Amount {
    fn encode_by_ref(
        &self,
        buf: &mut sqlx::postgres::PgArgumentBuffer,
    ) -> Result<IsNull, BoxDynError> {
        Encode::<Postgres>::encode_by_ref(&self.0, buf)
    }
}

impl Decode<'_, Postgres> for Amount {
    fn decode(value: sqlx::postgres::PgValueRef<'_>) -> Result<Amount, BoxDynError> {
        Ok(Amount(<Decimal as Decode<Postgres>>::decode(value)?))
    }
}

impl Type<Sqlite> for Amount {
    fn type_info() -> sqlx::sqlite::SqliteTypeInfo {
        <String as Type<Sqlite>>::type_info()
    }
}

impl<'q> Encode<'q, Sqlite> for Amount {
    fn encode_by_ref(
        &self,
        buf: &mut Vec<sqlx::sqlite::SqliteArgumentValue<'q>>,
    ) -> Result<IsNull, BoxDynError> {
        Encode::<Sqlite>::encode(self.0.to_string(), buf)
    }
}

impl Decode<'_, Sqlite> for Amount {
    fn decode(value: sqlx::sqlite::SqliteValueRef<'_>) -> Result<Amount, BoxDynError> {
        let text = <&str as Decode<Sqlite>>::decode(value)?;
        Ok(Amount(text.parse()?))
    }
}

/// A point in time as stored: `timestamptz` on PostgreSQL, fixed-width RFC 3339 text on SQLite
/// (so that text order is time order). Kept to the millisecond on both, so a value read back
/// equals the value written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Timestamp(pub DateTime<Utc>);

impl Timestamp {
    pub fn now() -> Timestamp {
        Timestamp::from(Utc::now())
    }
}

impl From<DateTime<Utc>> for Timestamp {
    fn from(t: DateTime<Utc>) -> Timestamp {
        Timestamp(t.trunc_subsecs(3))
    }
}

impl From<Timestamp> for DateTime<Utc> {
    fn from(t: Timestamp) -> DateTime<Utc> {
        t.0
    }
}

impl Type<Postgres> for Timestamp {
    fn type_info() -> sqlx::postgres::PgTypeInfo {
        <DateTime<Utc> as Type<Postgres>>::type_info()
    }
}

impl Encode<'_, Postgres> for Timestamp {
    fn encode_by_ref(
        &self,
        buf: &mut sqlx::postgres::PgArgumentBuffer,
    ) -> Result<IsNull, BoxDynError> {
        Encode::<Postgres>::encode_by_ref(&self.0, buf)
    }
}

impl Decode<'_, Postgres> for Timestamp {
    fn decode(value: sqlx::postgres::PgValueRef<'_>) -> Result<Timestamp, BoxDynError> {
        Ok(Timestamp(<DateTime<Utc> as Decode<Postgres>>::decode(
            value,
        )?))
    }
}

impl Type<Sqlite> for Timestamp {
    fn type_info() -> sqlx::sqlite::SqliteTypeInfo {
        <String as Type<Sqlite>>::type_info()
    }
}

impl<'q> Encode<'q, Sqlite> for Timestamp {
    fn encode_by_ref(
        &self,
        buf: &mut Vec<sqlx::sqlite::SqliteArgumentValue<'q>>,
    ) -> Result<IsNull, BoxDynError> {
        // The same format as the migrations' `strftime('%Y-%m-%dT%H:%M:%fZ')` defaults.
        Encode::<Sqlite>::encode(self.0.format("%Y-%m-%dT%H:%M:%S%.3fZ").to_string(), buf)
    }
}

impl Decode<'_, Sqlite> for Timestamp {
    fn decode(value: sqlx::sqlite::SqliteValueRef<'_>) -> Result<Timestamp, BoxDynError> {
        let text = <&str as Decode<Sqlite>>::decode(value)?;
        Ok(Timestamp(
            DateTime::parse_from_rfc3339(text)?.with_timezone(&Utc),
        ))
    }
}

/// Text as a text column stores it: PostgreSQL's text (and jsonb) cannot hold NUL, so a NUL is
/// stored as U+FFFD, on SQLite too, and a query for text is asked in the same form.
pub fn stored_text(text: &str) -> Cow<'_, str> {
    if text.contains('\0') {
        text.replace('\0', "\u{FFFD}").into()
    } else {
        text.into()
    }
}

/// JSON as a jsonb column stores it: every string and key as [`stored_text`].
pub fn stored_json(value: serde_json::Value) -> serde_json::Value {
    use serde_json::Value;
    match value {
        Value::String(s) if s.contains('\0') => Value::String(stored_text(&s).into_owned()),
        Value::Array(items) => Value::Array(items.into_iter().map(stored_json).collect()),
        Value::Object(map) => Value::Object(
            map.into_iter()
                .map(|(k, v)| (stored_text(&k).into_owned(), stored_json(v)))
                .collect(),
        ),
        other => other,
    }
}

/// Whether a database error may go away on retry: the server or network is unavailable, a new
/// connection is refused its login, the pool is exhausted, or a concurrent transaction won a
/// race (serialization failure, deadlock, a busy SQLite file, a unique violation on a dedupe
/// key — the retry then finds the winner's row).
pub fn is_transient(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::Io(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed
        | sqlx::Error::Tls(_)
        | sqlx::Error::Protocol(_) => true,
        // SQLite: 5 busy, 6 locked, 7 out of memory, 10 an I/O error, 13 a full disk (and
        // their extended codes), as PostgreSQL's 53 and 58030; 2067/1555 unique.
        sqlx::Error::Database(db) if db.try_downcast_ref::<SqliteError>().is_some() => {
            let code = db.code().unwrap_or_default();
            db.is_unique_violation()
                || matches!(
                    code.parse::<i32>().map(|c| c & 0xff),
                    Ok(5 | 6 | 7 | 10 | 13)
                )
        }
        sqlx::Error::Database(db) => {
            let code = db.code().unwrap_or_default();
            // PostgreSQL: 08 connection exception; 40 transaction rollback (serialization,
            // deadlock); 53 insufficient resources; 57P0x shutting down or starting.
            code.starts_with("08")
                || code.starts_with("40")
                || code.starts_with("53")
                || code.starts_with("57P")
                || code == "23505"
                // Statement timeout or cancellation, lock not available: load, not the message.
                || code == "57014"
                || code == "55P03"
                // A read-only transaction: the session reached a standby, as after a failover
                // until the address points at the new primary.
                || code == "25006"
                // An I/O error on the server's disk: the disk, not the message.
                || code == "58030"
                // A new connection refused its login (28: a rotated password, a changed
                // pg_hba.conf or role) or its database (3D000): the set-up, not the message.
                || code.starts_with("28")
                || code == "3D000"
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sqlite_text_drops_row_locks_only() {
        assert_eq!(
            sqlite_text("SELECT a FROM t WHERE id = $1 FOR UPDATE"),
            "SELECT a FROM t WHERE id = $1"
        );
        assert_eq!(
            sqlite_text("SELECT * FROM t LIMIT $1 FOR UPDATE SKIP LOCKED"),
            "SELECT * FROM t LIMIT $1"
        );
        assert!(matches!(sqlite_text("SELECT 1"), Cow::Borrowed(_)));
    }

    #[test]
    fn row_lists_are_padded_to_few_sizes() {
        let sizes: Vec<usize> = (1..=100).map(padded).collect();
        let mut distinct = sizes.clone();
        distinct.dedup();
        assert_eq!(
            distinct,
            [1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128]
        );
        assert!((1..=100).all(|n| padded(n) >= n));
    }

    #[test]
    fn rows_become_numbered_placeholders() {
        assert_eq!(with_rows("x IN ({rows})", 1, 3, 1), "x IN ($1, $2, $3)");
        assert_eq!(
            with_rows("VALUES {rows}", 1, 2, 3),
            "VALUES ($1, $2, $3), ($4, $5, $6)"
        );
        assert_eq!(
            with_rows("a > $1 AND x IN ({rows})", 2, 2, 1),
            "a > $1 AND x IN ($2, $3)"
        );
        assert_eq!(
            with_rows("FROM (VALUES {rows}) AS v", 3, 2, 1),
            "FROM (VALUES ($3), ($4)) AS v"
        );
    }

    /// On the real PostgreSQL of `scripts/test.sh` (skipped without it): a count that no index
    /// serves, planned in a `Keyed` pool, is neither a plan PostgreSQL compiles to machine code
    /// nor kept from using an index where one serves.
    #[tokio::test]
    async fn keyed_pools_use_indexes_and_compile_nothing() {
        let Ok(url) = std::env::var("TWOPHASE_TEST_DATABASE_URL") else {
            return;
        };
        let schema = format!("keyed_{}", uuid::Uuid::new_v4().simple());
        let admin = PgPoolOptions::new()
            .max_connections(1)
            .connect(&url)
            .await
            .unwrap();
        for sql in [
            format!("CREATE SCHEMA {schema}"),
            format!("CREATE TABLE {schema}.t (id int PRIMARY KEY, status text NOT NULL)"),
            format!("INSERT INTO {schema}.t SELECT i, 'done' FROM generate_series(1, 100) i"),
        ] {
            sqlx::query(&sql).execute(&admin).await.unwrap();
        }
        let Db::Postgres(keyed) = Db::connect_for(&url, &schema, 1, Lookups::Keyed)
            .await
            .unwrap()
        else {
            unreachable!("a PostgreSQL URL")
        };
        let plan = |sql: &str| {
            let keyed = keyed.clone();
            let sql = format!("EXPLAIN (FORMAT JSON) {sql}");
            async move {
                let (plan,): (serde_json::Value,) =
                    sqlx::query_as(&sql).fetch_one(&keyed).await.unwrap();
                plan.to_string()
            }
        };
        let count = plan("SELECT status, count(*) FROM t GROUP BY status").await;
        assert!(!count.contains("\"JIT\""), "compiled: {count}");
        let lookup = plan("SELECT status FROM t WHERE id = 7").await;
        assert!(lookup.contains("Index Scan"), "not by its key: {lookup}");
        sqlx::query(&format!("DROP SCHEMA {schema} CASCADE"))
            .execute(&admin)
            .await
            .unwrap();
    }

    /// On the real PostgreSQL of `scripts/test.sh` (skipped without it): a pooled connection
    /// whose server process went away while it sat idle (a database restart, an
    /// administrator's `pg_terminate_backend`) is tested and replaced before a transaction
    /// would be begun on it, although connections are not tested each time they are taken.
    #[tokio::test]
    async fn a_connection_that_lost_its_server_while_idle_is_replaced() {
        let Ok(url) = std::env::var("TWOPHASE_TEST_DATABASE_URL") else {
            return;
        };
        let admin = PgPoolOptions::new()
            .max_connections(1)
            .connect(&url)
            .await
            .unwrap();
        let db = Db::connect_for(&url, "public", 1, Lookups::Keyed)
            .await
            .unwrap();
        let backend = |db: Db| async move {
            let mut tx = db.begin().await.unwrap();
            let (pid,): (i32,) =
                query_as!(&mut tx, (i32,), fetch_one, "SELECT pg_backend_pid()").unwrap();
            tx.commit().await.unwrap();
            pid
        };
        let first = backend(db.clone()).await;
        let (terminated,): (bool,) = sqlx::query_as("SELECT pg_terminate_backend($1, 10000)")
            .bind(first)
            .fetch_one(&admin)
            .await
            .unwrap();
        assert!(terminated);
        // What makes a connection suspect is the time it has been idle.
        tokio::time::sleep(UNTESTED_IDLE + Duration::from_millis(200)).await;
        let second = backend(db.clone()).await;
        assert_ne!(first, second);
        db.close().await;
    }

    /// A server that refuses connections is named as such, not as a pool that timed out.
    #[tokio::test]
    async fn a_database_out_of_reach_is_said_to_be_so() {
        // Port 1 on loopback: nothing listens there.
        let url = "postgres://twophase@127.0.0.1:1/twophase";
        let refused = Db::connect(url, "account", 1).await.unwrap_err();
        assert!(
            matches!(&refused, sqlx::Error::Io(e) if e.kind() == std::io::ErrorKind::ConnectionRefused),
            "{refused}"
        );
    }

    /// A SQLite database of its own in a new directory, which the test removes.
    async fn scratch_sqlite() -> (Db, PathBuf) {
        let dir = std::env::temp_dir().join(format!("twophase-db-{}", uuid::Uuid::new_v4()));
        // An empty file is an empty database, as `migrate` would leave it.
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::File::create(dir.join("scratch.db")).unwrap();
        let db = Db::connect(&format!("sqlite:{}", dir.display()), "scratch", 1)
            .await
            .unwrap();
        (db, dir)
    }

    /// The error each statement fails with, on a fresh transaction of `db`.
    async fn errors_of(db: &Db, statements: &[&str]) -> Vec<sqlx::Error> {
        let mut errors = Vec::new();
        for sql in statements {
            let mut tx = db.begin().await.unwrap();
            errors.push(execute!(&mut tx, sql).expect_err(sql));
        }
        errors
    }

    #[tokio::test]
    async fn on_sqlite_a_lost_race_or_a_full_disk_is_transient_and_a_bad_statement_is_not() {
        let (db, dir) = scratch_sqlite().await;
        let mut tx = db.begin().await.unwrap();
        execute!(&mut tx, "CREATE TABLE t (id INTEGER PRIMARY KEY)").unwrap();
        execute!(&mut tx, "INSERT INTO t VALUES (1)").unwrap();
        tx.commit().await.unwrap();
        let [race, bad] = <[sqlx::Error; 2]>::try_from(
            errors_of(&db, &["INSERT INTO t VALUES (1)", "SELECT * FROM nowhere"]).await,
        )
        .unwrap();
        assert!(is_transient(&race), "{race}");
        assert!(!is_transient(&bad), "{bad}");
        // A full disk, as PostgreSQL's 53100 is: the file may not grow (SQLite's floor for
        // the limit is the file's size), so a row that needs a new page finds no room.
        let mut tx = db.begin().await.unwrap();
        execute!(&mut tx, "CREATE TABLE blobs (b BLOB)").unwrap();
        tx.commit().await.unwrap();
        let mut tx = db.begin().await.unwrap();
        execute!(&mut tx, "PRAGMA max_page_count = 1").unwrap();
        let full = execute!(&mut tx, "INSERT INTO blobs VALUES (randomblob(100000))").unwrap_err();
        assert_eq!(
            full.as_database_error().and_then(|d| d.code()).as_deref(),
            Some("13"),
            "{full}"
        );
        assert!(is_transient(&full), "{full}");
        drop(tx);
        db.close().await;
        std::fs::remove_dir_all(dir).unwrap();
    }

    /// On the real PostgreSQL of `scripts/test.sh` (skipped without it): a lost race, a full or
    /// failing disk or a refused login is retried; bad data and a missing grant are not,
    /// although their codes are all digits, as SQLite's are.
    #[tokio::test]
    async fn on_postgresql_races_disks_and_refused_logins_are_transient_and_bad_data_is_not() {
        let Ok(url) = std::env::var("TWOPHASE_TEST_DATABASE_URL") else {
            return;
        };
        let db = Db::connect(&url, "public", 1).await.unwrap();
        let cases = [
            ("40001", true),  // serialization failure
            ("40P01", true),  // deadlock
            ("23505", true),  // unique violation: the winner's row is there on retry
            ("25006", true),  // read-only transaction: a standby, during a failover
            ("53100", true),  // disk full
            ("58030", true),  // I/O error
            ("28P01", true),  // a new connection's password refused
            ("28000", true),  // a new connection's login refused
            ("3D000", true),  // a new connection's database not there
            ("22021", false), // a character the encoding cannot hold (a NUL in text)
            ("22022", false), // indicator overflow
            ("42501", false), // insufficient privilege
            ("22P02", false), // invalid text representation
        ];
        let raise: Vec<String> = cases
            .iter()
            .map(|(code, _)| {
                format!("DO $$ BEGIN RAISE EXCEPTION 'raised' USING ERRCODE = '{code}'; END $$")
            })
            .collect();
        let raise: Vec<&str> = raise.iter().map(String::as_str).collect();
        let errors = errors_of(&db, &raise).await;
        for ((code, transient), error) in cases.iter().zip(&errors) {
            let raised = error.as_database_error().and_then(|d| d.code());
            assert_eq!(raised.as_deref(), Some(*code), "{error}");
            assert_eq!(is_transient(error), *transient, "{code}");
        }
        db.close().await;
    }

    #[tokio::test]
    async fn amounts_and_times_round_trip_exactly_on_sqlite() {
        let (db, dir) = scratch_sqlite().await;
        let mut tx = db.begin().await.unwrap();
        execute!(
            &mut tx,
            "CREATE TABLE t (a TEXT NOT NULL, at TEXT NOT NULL)"
        )
        .unwrap();
        let amount = Amount("12345678901234567890.123456".parse().unwrap());
        let at = Timestamp::now();
        execute!(&mut tx, "INSERT INTO t (a, at) VALUES ($1, $2)", amount, at).unwrap();
        let (back, back_at): (Amount, Timestamp) = query_as!(
            &mut tx,
            (Amount, Timestamp),
            fetch_one,
            "SELECT a, at FROM t"
        )
        .unwrap();
        assert_eq!((back, back_at), (amount, at));
        tx.commit().await.unwrap();
        db.close().await;
        std::fs::remove_dir_all(dir).unwrap();
    }
}
