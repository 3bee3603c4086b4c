//! One transfer is one trace: the spans every process exports over OTLP share the transfer's
//! trace id and form one tree, whether `twophase transfer` starts the trace or the producer
//! brings its own.

mod common;

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::routing::post;
use axum::Router;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::common::v1::KeyValue;
use prost::Message as _;
use twophase_messages::{AccountAction, AccountCommand, AccountCommandBody, Message};
use twophase_runtime::Outgoing;
use uuid::Uuid;

use common::{request, TestEnv};

/// One exported span, as the collector sees it.
#[derive(Debug, Clone)]
struct Collected {
    service: String,
    name: String,
    trace_id: String,
    span_id: String,
    /// Empty for a root span.
    parent_span_id: String,
    attributes: HashMap<String, String>,
}

type Spans = Arc<Mutex<Vec<Collected>>>;

fn text(attributes: &[KeyValue]) -> HashMap<String, String> {
    attributes
        .iter()
        .filter_map(|kv| {
            let value = match kv.value.as_ref()?.value.as_ref()? {
                Value::StringValue(s) => s.clone(),
                Value::IntValue(i) => i.to_string(),
                Value::BoolValue(b) => b.to_string(),
                Value::DoubleValue(d) => d.to_string(),
                _ => return None,
            };
            Some((kv.key.clone(), value))
        })
        .collect()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// `POST /v1/traces` with OTLP protobuf, the exporter's default.
async fn receive(State(spans): State<Spans>, body: Bytes) -> &'static str {
    let request = ExportTraceServiceRequest::decode(body).expect("an OTLP protobuf body");
    let mut collected = spans.lock().unwrap();
    for resource_spans in request.resource_spans {
        let service = resource_spans
            .resource
            .map(|r| text(&r.attributes))
            .and_then(|mut a| a.remove("service.name"))
            .unwrap_or_default();
        for span in resource_spans.scope_spans.into_iter().flat_map(|s| s.spans) {
            collected.push(Collected {
                service: service.clone(),
                name: span.name,
                trace_id: hex(&span.trace_id),
                span_id: hex(&span.span_id),
                parent_span_id: hex(&span.parent_span_id),
                attributes: text(&span.attributes),
            });
        }
    }
    ""
}

/// A minimal OTLP/HTTP trace receiver on a loopback port: its endpoint and what it collected.
async fn collector() -> (String, Spans) {
    let spans = Spans::default();
    let app = Router::new()
        .route("/v1/traces", post(receive))
        .with_state(spans.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (endpoint, spans)
}

/// The spans of `trace_id` once they include the audit write of the transfer's outcome.
async fn trace_with_outcome_audited(
    spans: &Spans,
    trace_id: &str,
    events_topic: &str,
) -> Vec<Collected> {
    let started = Instant::now();
    loop {
        let trace: Vec<Collected> = spans
            .lock()
            .unwrap()
            .iter()
            .filter(|s| s.trace_id == trace_id)
            .cloned()
            .collect();
        let outcome_audited = trace
            .iter()
            .any(|s| s.service == "twophase-audit" && s.name == format!("audit {events_topic}"));
        if outcome_audited {
            return trace;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the outcome's audit span never arrived; trace {trace_id} so far: {trace:#?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Every span hangs under another of the trace, but for the roots; the roots are returned.
fn roots(trace: &[Collected]) -> Vec<&Collected> {
    let ids: BTreeSet<&str> = trace.iter().map(|s| s.span_id.as_str()).collect();
    assert_eq!(ids.len(), trace.len(), "span ids are unique");
    trace
        .iter()
        .filter(|s| !ids.contains(s.parent_span_id.as_str()))
        .collect()
}

fn services(trace: &[Collected]) -> BTreeSet<&str> {
    trace.iter().map(|s| s.service.as_str()).collect()
}

/// The spans of `transfer` anywhere, in any trace: they must all be in `trace_id`.
fn all_in_one_trace(spans: &Spans, transfer: &str, trace_id: &str) {
    let spans = spans.lock().unwrap();
    let elsewhere: Vec<&Collected> = spans
        .iter()
        .filter(|s| s.attributes.get("transfer.id").map(String::as_str) == Some(transfer))
        .filter(|s| s.trace_id != trace_id)
        .collect();
    assert!(
        elsewhere.is_empty(),
        "spans of {transfer} outside its trace {trace_id}: {elsewhere:#?}"
    );
}

/// Each participant's command span hangs under a coordinator span.
fn commands_hang_under_the_coordinator(trace: &[Collected], commands_topic: &str) {
    let by_id: HashMap<&str, &Collected> = trace.iter().map(|s| (s.span_id.as_str(), s)).collect();
    let commands: Vec<&Collected> = trace
        .iter()
        .filter(|s| s.name == format!("process {commands_topic}"))
        .collect();
    assert!(!commands.is_empty(), "no span processes {commands_topic}");
    for span in commands {
        let parent = by_id[span.parent_span_id.as_str()];
        assert_eq!(parent.service, "twophase-coordinator", "{span:#?}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn one_transfer_is_one_trace_across_every_worker() {
    let (endpoint, spans) = collector().await;
    let mut env = TestEnv::new("tracing").await;
    let otel = [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
        ("OTEL_BSP_SCHEDULE_DELAY", "100"),
    ];
    for worker in ["coordinator", "account", "risk", "audit"] {
        env.start_with(worker, &otel);
    }
    let a = env.open_account("USD", "100").await;
    let b = env.open_account("USD", "0").await;
    let events = env.topics.events();

    // `twophase transfer` starts the trace. Its id is given in upper case; the outcome it
    // waits for carries the id in lower case.
    let transfer = Uuid::new_v4().to_string();
    let output = env
        .command()
        .envs(otel)
        .args(["transfer", "--from", &a.to_string(), "--to", &b.to_string()])
        .args(["--amount", "10", "--currency", "USD", "--wait"])
        .args(["--id", &transfer.to_uppercase()])
        .output()
        .unwrap();
    assert_eq!(
        output.status.code(),
        Some(0),
        "the transfer completes: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let send = {
        let started = Instant::now();
        loop {
            let found = spans
                .lock()
                .unwrap()
                .iter()
                .find(|s| {
                    s.service == "twophase-cli"
                        && s.attributes.get("transfer.id") == Some(&transfer)
                })
                .cloned();
            if let Some(send) = found {
                break send;
            }
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "the CLI exported no span"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    let trace = trace_with_outcome_audited(&spans, &send.trace_id, &events).await;
    let tops = roots(&trace);
    assert_eq!(tops.len(), 1, "one tree: {tops:#?}");
    assert_eq!(tops[0].span_id, send.span_id, "rooted at the CLI's send");
    assert!(tops[0].parent_span_id.is_empty(), "{:#?}", tops[0]);
    let expected: BTreeSet<&str> = [
        "twophase-cli",
        "twophase-coordinator",
        "twophase-account",
        "twophase-risk",
        "twophase-audit",
    ]
    .into();
    assert_eq!(services(&trace), expected);
    // The decision and the outcome are spans of the coordinator's.
    for step in ["saga preparing", "saga committing", "saga completed"] {
        assert!(
            trace
                .iter()
                .any(|s| s.service == "twophase-coordinator" && s.name == step),
            "no coordinator span {step:?}"
        );
    }
    commands_hang_under_the_coordinator(&trace, &env.topics.account_commands());
    commands_hang_under_the_coordinator(&trace, &env.topics.risk_commands());
    all_in_one_trace(&spans, &transfer, &send.trace_id);
    // The coordinator's log lines of this transfer carry its trace id.
    let log = std::fs::read_to_string(env.log_dir.join("coordinator-0.log")).unwrap();
    assert!(
        log.lines()
            .any(|l| l.contains(&transfer) && l.contains(&send.trace_id)),
        "no coordinator log line names both {transfer} and trace {}",
        send.trace_id
    );

    // A producer that brings its own trace has the saga continue it.
    let (producer_trace, producer_span) = ("4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7");
    let second = request(a, b, "5", "USD");
    let mut outgoing = Outgoing::new(
        env.topics.requests(),
        &second.transfer_id,
        "/producer",
        &Message::TransferRequested(second.clone()),
    );
    outgoing.envelope.traceparent = Some(format!("00-{producer_trace}-{producer_span}-01"));
    let watcher = env.watcher().await;
    env.publisher.publish(&outgoing).await.unwrap();
    watcher
        .wait_for([second.transfer_id.clone()], Duration::from_secs(60))
        .await
        .unwrap();
    let trace = trace_with_outcome_audited(&spans, producer_trace, &events).await;
    for root in roots(&trace) {
        assert_eq!(
            root.parent_span_id, producer_span,
            "every root hangs under the producer's span: {root:#?}"
        );
    }
    assert!(services(&trace).is_superset(
        &[
            "twophase-coordinator",
            "twophase-account",
            "twophase-risk",
            "twophase-audit",
        ]
        .into()
    ));
    all_in_one_trace(&spans, &second.transfer_id, producer_trace);

    // A command whose payload cannot be read, under headers that can, is set aside in the trace
    // they carry: the dead letter's span and log lines are the transfer's.
    let (bad_trace, bad_span) = ("0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331");
    let hold = AccountCommand::new(
        AccountAction::Hold,
        AccountCommandBody {
            transfer_id: Uuid::new_v4(),
            account_id: a,
            amount: "1".parse().unwrap(),
            currency: "USD".into(),
        },
    );
    let mut unreadable = Outgoing::new(
        env.topics.account_commands(),
        a,
        "/producer",
        &Message::Account(hold),
    );
    unreadable.payload = b"{\"transfer_id\": ".to_vec();
    unreadable.envelope.traceparent = Some(format!("00-{bad_trace}-{bad_span}-01"));
    env.publisher.publish(&unreadable).await.unwrap();
    let started = Instant::now();
    loop {
        let account: Vec<Collected> = spans
            .lock()
            .unwrap()
            .iter()
            .filter(|s| s.service == "twophase-account" && s.trace_id == bad_trace)
            .cloned()
            .collect();
        if account.iter().any(|s| s.parent_span_id == bad_span) {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "no span of the account worker hangs under the unreadable command's: {account:#?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
