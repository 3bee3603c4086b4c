//! The audit query API, served by the audit worker beside `/metrics` and `/healthz`:
//!
//! - `GET /audit/logs?entity_type=&entity_id=&event_type=&severity=&start_time=&end_time=&before=&page=&page_size=`
//!   — matching rows newest first, `{ "rows": [...], "total": N, "total_exact": true, "page": p,
//!   "page_size": s, "next": … }`. Times are RFC 3339; `start_time` is inclusive and `end_time`
//!   exclusive. `page` counts from 1, `page_size` is 1 to 100 (50 if absent), and pages reach
//!   10,000 rows deep. A full page's `next` (else null), given back as `before`, starts the
//!   following page after its last row, however deep, and rows written meanwhile do not shift
//!   it as they shift page numbers; `page` then counts from there. Matching rows (after
//!   `before`, if given) are counted up to 100,000; past that `total` is 100000 and
//!   `total_exact` false, so that a broad filter on a large table answers as fast as a narrow
//!   one.
//! - `GET /transfers/{id}/timeline` — every audited message of a transfer by time then offset,
//!   each with `since_previous_ms`.
//!
//! A bad parameter is answered 400 with `{"error": "bad_parameter", "parameter": …, "message":
//! …}` saying which and why; an unknown one too, so that a misspelt filter never silently
//! returns everything.

use std::net::SocketAddr;

use anyhow::Context;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use chrono::{DateTime, Utc};
use serde_json::json;
use tokio_util::sync::CancellationToken;
use twophase_runtime::db::{Db, Timestamp};
use twophase_runtime::http::{self, Health};

use crate::record::{entity, Severity};
use crate::store::{self, LogFilter, DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE, MAX_WINDOW};

/// The parameters of `GET /audit/logs`.
pub const PARAMETERS: [&str; 9] = [
    "entity_type",
    "entity_id",
    "event_type",
    "severity",
    "start_time",
    "end_time",
    "before",
    "page",
    "page_size",
];

/// A parameter that cannot be used, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{parameter}: {message}")]
pub struct BadParameter {
    pub parameter: String,
    pub message: String,
}

fn bad(parameter: &str, message: impl Into<String>) -> BadParameter {
    BadParameter {
        parameter: parameter.to_owned(),
        message: message.into(),
    }
}

/// Checks query parameters (name, value) and turns them into a filter.
pub fn parse_filter<'a>(
    params: impl IntoIterator<Item = (&'a str, &'a str)>,
) -> Result<LogFilter, BadParameter> {
    let mut filter = LogFilter {
        page: 1,
        page_size: DEFAULT_PAGE_SIZE,
        ..LogFilter::default()
    };
    let mut seen: Vec<&str> = Vec::new();
    for (name, value) in params {
        let Some(known) = PARAMETERS.iter().find(|p| **p == name) else {
            return Err(bad(
                name,
                format!(
                    "unknown parameter; the parameters are {}",
                    PARAMETERS.join(", ")
                ),
            ));
        };
        if seen.contains(known) {
            return Err(bad(name, "given more than once"));
        }
        seen.push(known);
        let value = value.trim();
        if value.is_empty() {
            return Err(bad(name, "is empty; leave it out to not filter on it"));
        }
        match *known {
            "entity_type" => {
                if !entity::ALL.contains(&value) {
                    return Err(bad(
                        name,
                        format!("{value:?} is not one of {}", entity::ALL.join(", ")),
                    ));
                }
                filter.entity_type = Some(value.to_owned());
            }
            "entity_id" => {
                // Transfer and account ids are stored in their canonical form.
                filter.entity_id = Some(crate::record::normalize_transfer_id(value));
            }
            // As stored (PostgreSQL refuses a NUL in a text parameter).
            "event_type" => filter.event_type = Some(crate::record::indexed(value)),
            "severity" => {
                let Some(severity) = Severity::parse(value) else {
                    let all: Vec<&str> = Severity::ALL.iter().map(|s| s.as_str()).collect();
                    return Err(bad(
                        name,
                        format!("{value:?} is not one of {}", all.join(", ")),
                    ));
                };
                filter.severity = Some(severity.as_str().to_owned());
            }
            "start_time" => filter.start_time = Some(time(name, value)?),
            "end_time" => filter.end_time = Some(time(name, value)?),
            "before" => filter.before = Some(value.parse().map_err(|e| bad(name, e))?),
            "page" => {
                filter.page = value
                    .parse::<u32>()
                    .ok()
                    .filter(|p| *p >= 1)
                    .ok_or_else(|| {
                        bad(
                            name,
                            format!("{value:?} is not a whole number of at least 1"),
                        )
                    })?
            }
            "page_size" => {
                filter.page_size = value
                    .parse::<u32>()
                    .ok()
                    .filter(|s| (1..=MAX_PAGE_SIZE).contains(s))
                    .ok_or_else(|| {
                        bad(
                            name,
                            format!("{value:?} is not a whole number from 1 to {MAX_PAGE_SIZE}"),
                        )
                    })?
            }
            _ => unreachable!("every parameter is matched"),
        }
    }
    if let (Some(start), Some(end)) = (filter.start_time, filter.end_time) {
        if start >= end {
            return Err(bad(
                "end_time",
                "must be later than start_time (start_time is inclusive, end_time exclusive)",
            ));
        }
    }
    if u64::from(filter.page) * u64::from(filter.page_size) > MAX_WINDOW {
        return Err(bad(
            "page",
            format!(
                "page {} of {} rows reaches past the newest {MAX_WINDOW} rows; go on from a \
                 page's next (as before), or narrow the filters, to look further back",
                filter.page, filter.page_size
            ),
        ));
    }
    Ok(filter)
}

fn time(name: &str, value: &str) -> Result<Timestamp, BadParameter> {
    DateTime::parse_from_rfc3339(value)
        .map(|t| Timestamp::from(t.with_timezone(&Utc)))
        .map_err(|e| {
            bad(
                name,
                format!("{value:?} is not an RFC 3339 time such as 2026-11-24T10:00:00Z ({e})"),
            )
        })
}

#[derive(Debug, Clone)]
struct ApiState {
    db: Db,
}

/// The API's routes.
pub fn router(db: Db) -> Router {
    Router::new()
        .route("/audit/logs", get(logs))
        .route("/transfers/{id}/timeline", get(timeline))
        .with_state(ApiState { db })
}

/// Binds `addr` and serves the API, `/metrics` and `/healthz` on a spawned task until
/// `shutdown`. Returns the bound address (port 0 picks a free one).
pub async fn serve(
    addr: SocketAddr,
    db: Db,
    health: Health,
    shutdown: CancellationToken,
) -> anyhow::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("listening for the audit API on {addr}"))?;
    serve_on(listener, db, health, shutdown)
}

/// [`serve`] on a listener already bound.
pub fn serve_on(
    listener: tokio::net::TcpListener,
    db: Db,
    health: Health,
    shutdown: CancellationToken,
) -> anyhow::Result<SocketAddr> {
    let bound = listener.local_addr()?;
    let app = router(db).merge(http::router(health));
    tokio::spawn(async move {
        let served = axum::serve(listener, app)
            .with_graceful_shutdown(shutdown.cancelled_owned())
            .await;
        if let Err(e) = served {
            tracing::error!(error = %e, "the audit API server stopped");
        }
    });
    Ok(bound)
}

fn bad_request(e: BadParameter) -> Response {
    let body = json!({
        "error": "bad_parameter",
        "parameter": e.parameter,
        "message": e.message,
    });
    (StatusCode::BAD_REQUEST, Json(body)).into_response()
}

fn database_error(e: sqlx::Error) -> Response {
    let e = anyhow::Error::new(e);
    tracing::error!(error = format!("{e:#}"), "audit query failed");
    let body = json!({ "error": "database", "message": format!("{e:#}") });
    (StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response()
}

async fn logs(
    State(state): State<ApiState>,
    params: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> Response {
    let params = match params {
        Ok(Query(params)) => params,
        Err(e) => return bad_request(bad("query", e.body_text())),
    };
    let filter = match parse_filter(params.iter().map(|(k, v)| (k.as_str(), v.as_str()))) {
        Ok(filter) => filter,
        Err(e) => return bad_request(e),
    };
    match store::query(&state.db, &filter).await {
        Ok(page) => Json(store::to_json(&page)).into_response(),
        Err(e) => database_error(e),
    }
}

async fn timeline(State(state): State<ApiState>, Path(id): Path<String>) -> Response {
    match store::timeline(&state.db, &id).await {
        Ok(steps) if steps.is_empty() => {
            let body = json!({
                "error": "not_found",
                "message": format!("no audited message of transfer {id}"),
            });
            (StatusCode::NOT_FOUND, Json(body)).into_response()
        }
        Ok(steps) => Json(json!({
            "transfer_id": crate::record::normalize_transfer_id(&id),
            "steps": store::to_json(&steps),
        }))
        .into_response(),
        Err(e) => database_error(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(query: &[(&str, &str)]) -> Result<LogFilter, BadParameter> {
        parse_filter(query.iter().copied())
    }

    #[test]
    fn filters_are_read_and_defaults_applied() {
        let f = parse(&[]).unwrap();
        assert_eq!((f.page, f.page_size), (1, DEFAULT_PAGE_SIZE));
        let f = parse(&[
            ("entity_type", "transfer"),
            ("entity_id", "A0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A11"),
            ("severity", "critical"),
            ("start_time", "2026-11-24T10:00:00+01:00"),
            ("end_time", "2026-11-24T10:00:00Z"),
            ("page", "3"),
            ("page_size", "100"),
            ("event_type", "twophase.transfer\0.requested"),
        ])
        .unwrap();
        assert_eq!(
            f.entity_id.as_deref(),
            Some("a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11")
        );
        assert_eq!(
            f.event_type.as_deref(),
            Some("twophase.transfer\u{FFFD}.requested")
        );
        assert_eq!(
            f.start_time.unwrap().0.to_rfc3339(),
            "2026-11-24T09:00:00+00:00"
        );
        assert_eq!((f.page, f.page_size), (3, 100));
    }

    /// A query, the parameter it must be refused for, and a part of the reason.
    type Refusal = (
        &'static [(&'static str, &'static str)],
        &'static str,
        &'static str,
    );

    #[test]
    fn each_bad_parameter_is_named() {
        let cases: [Refusal; 12] = [
            (&[("page", "0")], "page", "at least 1"),
            (&[("page", "x")], "page", "at least 1"),
            (&[("page_size", "0")], "page_size", "from 1 to 100"),
            (&[("page_size", "101")], "page_size", "from 1 to 100"),
            (
                &[("severity", "fatal")],
                "severity",
                "not one of info, warning, error, critical",
            ),
            (
                &[("entity_type", "user")],
                "entity_type",
                "not one of transfer, account",
            ),
            (&[("start_time", "yesterday")], "start_time", "RFC 3339"),
            (
                &[("end_time", "2026-13-01T00:00:00Z")],
                "end_time",
                "RFC 3339",
            ),
            (
                &[
                    ("start_time", "2026-11-24T10:00:00Z"),
                    ("end_time", "2026-11-24T10:00:00Z"),
                ],
                "end_time",
                "later than start_time",
            ),
            (&[("sevrity", "info")], "sevrity", "unknown parameter"),
            (
                &[("severity", "info"), ("severity", "error")],
                "severity",
                "more than once",
            ),
            (
                &[("page", "101"), ("page_size", "100")],
                "page",
                "10000 rows",
            ),
        ];
        for (query, parameter, message) in cases {
            let e = parse(query).unwrap_err();
            assert_eq!(e.parameter, parameter, "{query:?}");
            assert!(e.message.contains(message), "{query:?}: {}", e.message);
        }
        assert_eq!(
            parse(&[("event_type", " ")]).unwrap_err().parameter,
            "event_type"
        );
    }
}
