//! The HTTP endpoints every worker serves for operators: `GET /metrics` (Prometheus text format)
//! and `GET /healthz` (ready only when the consumer has partitions assigned and the database
//! answers).
//!
//! The runtime knows no database: a worker hands [`Health`] a check to run, so the same server
//! fits workers with a PostgreSQL pool, an SQLite file or no database at all.

use std::fmt;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use futures::future::BoxFuture;
use futures::FutureExt;
use serde::Serialize;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::metrics;

/// The exposition format Prometheus expects from `/metrics`.
pub const METRICS_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// How long `/healthz` waits for the database. Probes have deadlines of their own (Kubernetes'
/// default is 1 s), and a hung database must read as not ready rather than hang the probe.
pub const DEFAULT_DATABASE_TIMEOUT: Duration = Duration::from_secs(2);

/// A database check: resolves to `Err(why)` when the database does not answer.
pub type DatabaseCheck = Arc<dyn Fn() -> BoxFuture<'static, Result<(), String>> + Send + Sync>;

/// What `/healthz` reports. Cheap to clone; every clone shares the same state, so the consume
/// loop's rebalance callback and the server see the same flag.
#[derive(Clone)]
pub struct Health {
    inner: Arc<HealthInner>,
}

struct HealthInner {
    assigned: watch::Sender<bool>,
    database: Option<DatabaseCheck>,
    database_timeout: Duration,
}

impl fmt::Debug for Health {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Health")
            .field("assigned", &self.is_assigned())
            .field("database_check", &self.inner.database.is_some())
            .field("database_timeout", &self.inner.database_timeout)
            .finish()
    }
}

impl Default for Health {
    fn default() -> Health {
        Health::new()
    }
}

impl Health {
    /// Health of a worker without a database: ready once its consumer has an assignment.
    pub fn new() -> Health {
        Health::build(None, DEFAULT_DATABASE_TIMEOUT)
    }

    /// Health of a worker whose database must also answer `check`, e.g.
    /// `Health::with_database(move || { let pool = pool.clone(); async move {
    /// sqlx::query("SELECT 1").execute(&pool).await.map(|_| ()) } })`.
    pub fn with_database<F, Fut, E>(check: F) -> Health
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), E>> + Send + 'static,
        E: fmt::Display,
    {
        let check: DatabaseCheck =
            Arc::new(move || check().map(|r| r.map_err(|e| e.to_string())).boxed());
        Health::build(Some(check), DEFAULT_DATABASE_TIMEOUT)
    }

    /// A handle whose database check pings `db`.
    pub fn of_database(db: &crate::db::Db) -> Health {
        let db = db.clone();
        Health::with_database(move || {
            let db = db.clone();
            async move {
                if db.ping().await {
                    Ok(())
                } else {
                    Err("the database does not answer")
                }
            }
        })
    }

    /// The same checks with another limit on the database's answer. A builder step: clones
    /// taken before it do not share the new handle's state.
    pub fn database_timeout(self, timeout: Duration) -> Health {
        let database = self.inner.database.clone();
        let health = Health::build(database, timeout);
        health.set_assigned(self.is_assigned());
        health
    }

    fn build(database: Option<DatabaseCheck>, database_timeout: Duration) -> Health {
        Health {
            inner: Arc::new(HealthInner {
                assigned: watch::Sender::new(false),
                database,
                database_timeout,
            }),
        }
    }

    /// Whether the consumer holds at least one partition; set from the rebalance callback.
    pub fn set_assigned(&self, assigned: bool) {
        self.inner.assigned.send_replace(assigned);
    }

    pub fn is_assigned(&self) -> bool {
        *self.inner.assigned.borrow()
    }

    /// Resolves once the consumer holds at least one partition (at once if it does now).
    pub async fn assigned(&self) {
        let mut assigned = self.inner.assigned.subscribe();
        // The sender lives in `self`, so the channel cannot close while this waits.
        let _ = assigned.wait_for(|assigned| *assigned).await;
    }

    /// Whether the database answers its check in time (true for a worker without one).
    pub async fn database_answers(&self) -> bool {
        !matches!(self.check_database().await, Some(Err(_)))
    }

    /// The database check's result, or none for a worker without a database.
    async fn check_database(&self) -> Option<Result<(), String>> {
        let check = self.inner.database.as_ref()?;
        Some(
            match tokio::time::timeout(self.inner.database_timeout, check()).await {
                Ok(result) => result.map_err(|e| format!("error: {e}")),
                Err(_) => Err(format!(
                    "no answer within {} ms",
                    self.inner.database_timeout.as_millis()
                )),
            },
        )
    }

    /// Runs the checks.
    pub async fn report(&self) -> HealthReport {
        let consumer = if self.is_assigned() {
            "assigned".to_owned()
        } else {
            "no partitions assigned".to_owned()
        };
        let database = match self.check_database().await {
            None => "not used".to_owned(),
            Some(Ok(())) => "ok".to_owned(),
            Some(Err(e)) => e,
        };
        let ready = self.is_assigned() && matches!(database.as_str(), "ok" | "not used");
        HealthReport {
            status: if ready { "ready" } else { "not_ready" },
            consumer,
            database,
        }
    }
}

/// The body of `/healthz`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HealthReport {
    /// `ready` or `not_ready`.
    pub status: &'static str,
    /// `assigned`, or why not.
    pub consumer: String,
    /// `ok`, `not used`, or what went wrong.
    pub database: String,
}

impl HealthReport {
    pub fn is_ready(&self) -> bool {
        self.status == "ready"
    }
}

/// The routes, for callers that mount them in a server of their own.
pub fn router(health: Health) -> Router {
    Router::new()
        .route("/metrics", get(metrics_endpoint))
        .route("/healthz", get(healthz))
        .route("/livez", get(livez))
        .with_state(health)
}

/// Binds `addr` and serves [`router`] on a spawned task until `shutdown` is cancelled. Returns
/// the bound address, so that port 0 picks a free one.
pub async fn serve(
    addr: SocketAddr,
    health: Health,
    shutdown: CancellationToken,
) -> anyhow::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("listening for /metrics and /healthz on {addr}"))?;
    let bound = listener.local_addr()?;
    tokio::spawn(async move {
        let served = axum::serve(listener, router(health))
            .with_graceful_shutdown(shutdown.cancelled_owned())
            .await;
        if let Err(e) = served {
            tracing::error!(error = %e, "the /metrics and /healthz server stopped");
        }
    });
    tracing::info!(%bound, "serving /metrics and /healthz");
    Ok(bound)
}

async fn metrics_endpoint() -> Response {
    (
        [(header::CONTENT_TYPE, METRICS_CONTENT_TYPE)],
        metrics::render(),
    )
        .into_response()
}

async fn healthz(State(health): State<Health>) -> Response {
    let report = health.report().await;
    let code = if report.is_ready() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, Json(report)).into_response()
}

/// `/livez`, for a liveness probe: 200 while the process serves. A worker that is not ready (a
/// copy with no partitions, one waiting out an outage) is alive, and a restart would help
/// neither; one that can do no more (a fatal Kafka error) exits by itself.
async fn livez() -> Response {
    (
        StatusCode::OK,
        Json(serde_json::json!({ "status": "alive" })),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    /// A plain HTTP/1.0 GET, so that no HTTP client is needed: the server closes the connection
    /// after the response. Returns the status code, the headers and the body.
    async fn get(addr: SocketAddr, path: &str) -> (u16, String, String) {
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        stream
            .write_all(format!("GET {path} HTTP/1.0\r\nHost: test\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).await.unwrap();
        let (head, body) = response.split_once("\r\n\r\n").unwrap();
        let code = head.split(' ').nth(1).unwrap().parse().unwrap();
        (code, head.to_ascii_lowercase(), body.to_owned())
    }

    async fn start(health: Health) -> (SocketAddr, CancellationToken) {
        let shutdown = CancellationToken::new();
        let addr = serve("127.0.0.1:0".parse().unwrap(), health, shutdown.clone())
            .await
            .unwrap();
        (addr, shutdown)
    }

    #[tokio::test]
    async fn assigned_resolves_once_a_clone_reports_an_assignment() {
        let health = Health::new();
        let rebalance_callback = health.clone();
        let waiting = health.assigned();
        tokio::pin!(waiting);
        assert!(
            futures::poll!(&mut waiting).is_pending(),
            "no partitions yet: still waiting"
        );
        rebalance_callback.set_assigned(true);
        tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .expect("the assignment ends the wait");
        // Already assigned: no wait at all.
        assert!(health.assigned().now_or_never().is_some());
    }

    #[tokio::test]
    async fn metrics_are_served_in_the_text_format() {
        assert!(METRICS_CONTENT_TYPE.starts_with(prometheus::TEXT_FORMAT));
        let (addr, shutdown) = start(Health::new()).await;
        let (code, head, body) = get(addr, "/metrics").await;
        assert_eq!(code, 200);
        assert!(
            head.contains("content-type: text/plain; version=0.0.4"),
            "{head}"
        );
        assert!(
            body.contains("# TYPE twophase_transfers_total counter"),
            "{body}"
        );
        let (code, _, _) = get(addr, "/nothing").await;
        assert_eq!(code, 404);
        shutdown.cancel();
    }

    #[tokio::test]
    async fn ready_only_when_assigned_and_the_database_answers() {
        let database_up = Arc::new(AtomicBool::new(true));
        let calls = Arc::new(AtomicUsize::new(0));
        let health = Health::with_database({
            let database_up = database_up.clone();
            let calls = calls.clone();
            move || {
                calls.fetch_add(1, Ordering::Relaxed);
                let up = database_up.load(Ordering::Relaxed);
                async move {
                    if up {
                        Ok(())
                    } else {
                        Err("connection refused")
                    }
                }
            }
        });
        let (addr, shutdown) = start(health.clone()).await;

        let (code, head, body) = get(addr, "/healthz").await;
        assert_eq!(code, 503);
        assert!(head.contains("content-type: application/json"), "{head}");
        let report: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(report["status"], "not_ready");
        assert_eq!(report["consumer"], "no partitions assigned");
        assert_eq!(report["database"], "ok");

        health.set_assigned(true);
        let (code, _, body) = get(addr, "/healthz").await;
        assert_eq!(code, 200, "{body}");
        assert_eq!(
            serde_json::from_str::<serde_json::Value>(&body).unwrap(),
            serde_json::json!({"status": "ready", "consumer": "assigned", "database": "ok"})
        );

        database_up.store(false, Ordering::Relaxed);
        let (code, _, body) = get(addr, "/healthz").await;
        assert_eq!(code, 503);
        let report: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(report["database"], "error: connection refused");
        // Every probe asks the database afresh.
        assert_eq!(calls.load(Ordering::Relaxed), 3);
        // Not ready, but alive: a liveness probe must not restart a worker waiting it out.
        let (code, _, body) = get(addr, "/livez").await;
        assert_eq!((code, body.as_str()), (200, r#"{"status":"alive"}"#));
        assert_eq!(
            calls.load(Ordering::Relaxed),
            3,
            "liveness asks no database"
        );

        // A revoked assignment makes it not ready again.
        database_up.store(true, Ordering::Relaxed);
        health.set_assigned(false);
        assert_eq!(get(addr, "/healthz").await.0, 503);
        shutdown.cancel();
    }

    #[tokio::test]
    async fn a_hung_database_reads_as_not_ready() {
        let health = Health::with_database(|| async {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            Ok::<(), String>(())
        })
        .database_timeout(Duration::from_millis(50));
        health.set_assigned(true);
        let report = health.report().await;
        assert!(!report.is_ready());
        assert_eq!(report.database, "no answer within 50 ms");
    }

    #[tokio::test]
    async fn a_worker_without_a_database_is_ready_once_assigned() {
        let health = Health::new();
        assert!(!health.report().await.is_ready());
        health.set_assigned(true);
        let report = health.report().await;
        assert!(report.is_ready());
        assert_eq!(report.database, "not used");
    }

    #[tokio::test]
    async fn the_server_stops_on_shutdown() {
        let (addr, shutdown) = start(Health::new()).await;
        assert_eq!(get(addr, "/healthz").await.0, 503);
        shutdown.cancel();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while tokio::net::TcpStream::connect(addr).await.is_ok() {
            assert!(tokio::time::Instant::now() < deadline, "still accepting");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[tokio::test]
    async fn binding_a_taken_port_says_which() {
        let (addr, shutdown) = start(Health::new()).await;
        let err = serve(addr, Health::new(), CancellationToken::new())
            .await
            .unwrap_err();
        assert!(format!("{err:#}").contains(&addr.to_string()), "{err:#}");
        shutdown.cancel();
    }
}
