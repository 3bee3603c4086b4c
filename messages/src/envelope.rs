//! The envelope: what every message carries in its Kafka headers, following the CloudEvents
//! Kafka protocol binding in binary mode (`ce_*` headers, the payload is the data) plus the
//! saga's correlation, causation and W3C trace context headers.

use chrono::{DateTime, Datelike, Utc};
use uuid::Uuid;

use crate::SCHEMA_VERSION;

/// Header names. Do not change: producers in other languages and stored audit rows use them.
pub mod headers {
    pub const SPEC_VERSION: &str = "ce_specversion";
    pub const ID: &str = "ce_id";
    pub const TYPE: &str = "ce_type";
    pub const SOURCE: &str = "ce_source";
    pub const TIME: &str = "ce_time";
    pub const CONTENT_TYPE: &str = "content-type";
    pub const SCHEMA_VERSION: &str = "schema-version";
    pub const CORRELATION_ID: &str = "correlation-id";
    pub const CAUSATION_ID: &str = "causation-id";
    pub const TRACEPARENT: &str = "traceparent";
    pub const TRACESTATE: &str = "tracestate";
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envelope {
    /// Unique per message; consumers deduplicate on it.
    pub id: Uuid,
    pub message_type: String,
    pub schema_version: u32,
    /// The worker that produced the message, e.g. `/twophase/coordinator`.
    pub source: String,
    pub time: DateTime<Utc>,
    /// The transfer id.
    pub correlation_id: Option<String>,
    /// The id of the message that caused this one.
    pub causation_id: Option<Uuid>,
    pub traceparent: Option<String>,
    pub tracestate: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum EnvelopeError {
    #[error("header {0} is missing")]
    Missing(&'static str),
    #[error("header {name} is not valid: {value:?}")]
    Invalid { name: &'static str, value: String },
}

impl Envelope {
    /// A new envelope for a message caused by `cause` (continuing its correlation and trace).
    pub fn new(message_type: &str, source: &str, correlation_id: impl Into<String>) -> Envelope {
        Envelope {
            id: Uuid::new_v4(),
            message_type: message_type.to_owned(),
            schema_version: SCHEMA_VERSION,
            source: source.to_owned(),
            time: Utc::now(),
            correlation_id: Some(correlation_id.into()),
            causation_id: None,
            traceparent: None,
            tracestate: None,
        }
    }

    /// The headers to put on the Kafka record, in a fixed order.
    pub fn to_headers(&self) -> Vec<(&'static str, String)> {
        let mut out = vec![
            (headers::SPEC_VERSION, "1.0".to_owned()),
            (headers::ID, self.id.to_string()),
            (headers::TYPE, self.message_type.clone()),
            (headers::SOURCE, self.source.clone()),
            (headers::TIME, self.time.to_rfc3339()),
            (headers::CONTENT_TYPE, "application/json".to_owned()),
            (headers::SCHEMA_VERSION, self.schema_version.to_string()),
        ];
        let optional = [
            (headers::CORRELATION_ID, self.correlation_id.clone()),
            (
                headers::CAUSATION_ID,
                self.causation_id.map(|c| c.to_string()),
            ),
            (headers::TRACEPARENT, self.traceparent.clone()),
            (headers::TRACESTATE, self.tracestate.clone()),
        ];
        out.extend(optional.into_iter().filter_map(|(k, v)| v.map(|v| (k, v))));
        out
    }

    /// The message id a non-empty `ce_id` header stands for: itself if it is a UUID, else the
    /// UUID derived from it and `ce_source`. Do not change the derivation: deduplication and
    /// the audit store rely on a redelivered message getting the same id.
    pub fn id_of(ce_id: &str, ce_source: Option<&str>) -> Uuid {
        Uuid::parse_str(ce_id).unwrap_or_else(|_| {
            let seed = format!("{}\n{ce_id}", ce_source.unwrap_or_default());
            Uuid::new_v5(&Uuid::NAMESPACE_OID, seed.as_bytes())
        })
    }

    /// The message id of a record with no `ce_id`: derived from where it sits, so that it is
    /// the same on every redelivery. Do not change the derivation: the workers, the audit store
    /// and `twophase dlq` rely on it.
    pub fn position_id(topic: &str, partition: i32, offset: i64) -> Uuid {
        let position = format!("{topic}/{partition}/{offset}");
        Uuid::new_v5(&Uuid::NAMESPACE_OID, position.as_bytes())
    }

    /// Reads the envelope from record headers.
    ///
    /// Producers outside the project may publish requests with no headers at all, so the
    /// caller supplies what a missing header defaults to: the type the topic implies, an id
    /// derived from the record's position, and the record's own Kafka time, all of them the
    /// same on every redelivery (the time is now only for a record without one). A `ce_id`
    /// that is not a UUID (CloudEvents allows any non-empty string, unique within its
    /// `ce_source`) stands for the UUID derived from the two of them, the same on every
    /// redelivery.
    pub fn from_headers<'a>(
        record_headers: impl IntoIterator<Item = (&'a str, Option<&'a [u8]>)>,
        default_type: Option<&str>,
        fallback_id: impl FnOnce() -> Uuid,
        record_time: Option<DateTime<Utc>>,
    ) -> Result<Envelope, EnvelopeError> {
        // The last value of each known header counts; one without a value is no value.
        let mut last: std::collections::HashMap<&'static str, &[u8]> = Default::default();
        for (name, value) in record_headers {
            let Some(value) = value else { continue };
            if let Some(known) = KNOWN.iter().find(|k| **k == name) {
                last.insert(known, value);
            }
        }
        let mut found: std::collections::HashMap<&str, String> = Default::default();
        for (name, value) in last {
            let text = std::str::from_utf8(value).map_err(|_| EnvelopeError::Invalid {
                name,
                value: String::from_utf8_lossy(value).into_owned(),
            })?;
            found.insert(name, text.to_owned());
        }
        let message_type = match found.remove(headers::TYPE) {
            Some(t) => t,
            None => default_type
                .map(str::to_owned)
                .ok_or(EnvelopeError::Missing(headers::TYPE))?,
        };
        let id = match found.remove(headers::ID) {
            Some(v) if v.is_empty() => {
                return Err(EnvelopeError::Invalid {
                    name: headers::ID,
                    value: v,
                })
            }
            Some(v) => Envelope::id_of(&v, found.get(headers::SOURCE).map(String::as_str)),
            None => fallback_id(),
        };
        let schema_version = match found.remove(headers::SCHEMA_VERSION) {
            Some(v) => v.parse().map_err(|_| EnvelopeError::Invalid {
                name: headers::SCHEMA_VERSION,
                value: v,
            })?,
            None => 1,
        };
        let time = match found.remove(headers::TIME) {
            Some(v) => parse_time(&v).ok_or(EnvelopeError::Invalid {
                name: headers::TIME,
                value: v,
            })?,
            None => record_time.unwrap_or_else(Utc::now),
        };
        // The `ce_id` of the message that caused this one, read as a `ce_id` is: one that is
        // not a UUID stands for the UUID derived from it and this message's `ce_source`, the
        // id of the cause if the cause came from the same source.
        let causation_id = match found.remove(headers::CAUSATION_ID) {
            Some(v) if v.is_empty() => {
                return Err(EnvelopeError::Invalid {
                    name: headers::CAUSATION_ID,
                    value: v,
                })
            }
            Some(v) => Some(Envelope::id_of(
                &v,
                found.get(headers::SOURCE).map(String::as_str),
            )),
            None => None,
        };
        Ok(Envelope {
            id,
            message_type,
            schema_version,
            source: found.remove(headers::SOURCE).unwrap_or_default(),
            time,
            // Both are carried on every message the record causes: an oversized one must not
            // make those too large to publish.
            correlation_id: found
                .remove(headers::CORRELATION_ID)
                .map(|c| crate::excerpt(&c, MAX_CORRELATION_ID).into_owned()),
            causation_id,
            traceparent: found.remove(headers::TRACEPARENT),
            // W3C Trace Context lets a system drop a `tracestate` over 512 characters, and one
            // of anything but printable ASCII is not one.
            tracestate: found.remove(headers::TRACESTATE).filter(|t| {
                t.len() <= MAX_TRACESTATE && t.bytes().all(|b| (b' '..=b'~').contains(&b))
            }),
        })
    }
}

/// The most of a `correlation-id` header carried on, in bytes; a longer one is cut.
const MAX_CORRELATION_ID: usize = 256;

/// The longest `tracestate` carried on, in bytes.
const MAX_TRACESTATE: usize = 512;

const KNOWN: [&str; 10] = [
    headers::ID,
    headers::TYPE,
    headers::SOURCE,
    headers::TIME,
    headers::SCHEMA_VERSION,
    headers::CORRELATION_ID,
    headers::CAUSATION_ID,
    headers::TRACEPARENT,
    headers::TRACESTATE,
    headers::CONTENT_TYPE,
];

/// A `ce_time` (RFC 3339), with a leap second (`23:59:60`, which RFC 3339 allows) read as the
/// second after it, as a database stores it: whatever is derived from the time, a hash or an
/// answer, is then the same before and after it is stored.
///
/// A time whose UTC year is not 0000–9999 is no time a message carries: RFC 3339 writes four
/// digits, and a store that keeps times as RFC 3339 text could not read it back.
pub fn parse_time(text: &str) -> Option<DateTime<Utc>> {
    let time = DateTime::parse_from_rfc3339(text).ok()?.with_timezone(&Utc);
    match time.timestamp_subsec_nanos().checked_sub(1_000_000_000) {
        Some(into_next) => DateTime::from_timestamp(time.timestamp() + 1, into_next),
        None => Some(time),
    }
    .filter(in_rfc3339_range)
}

/// A record's Kafka timestamp (milliseconds since the epoch, which a producer may set to
/// anything) as a time, if it is one [`parse_time`] would take.
pub fn time_of_millis(ms: i64) -> Option<DateTime<Utc>> {
    DateTime::from_timestamp_millis(ms).filter(in_rfc3339_range)
}

fn in_rfc3339_range(time: &DateTime<Utc>) -> bool {
    (0..=9999).contains(&time.year())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_through_headers() {
        let mut e = Envelope::new(crate::types::VOTE, "/twophase/risk", "t-1");
        e.causation_id = Some(Uuid::new_v4());
        e.traceparent = Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into());
        let headers = e.to_headers();
        let back = Envelope::from_headers(
            headers.iter().map(|(k, v)| (*k, Some(v.as_bytes()))),
            None,
            || unreachable!("the id header is present"),
            None,
        )
        .unwrap();
        // RFC 3339 keeps nanoseconds, so the round trip is exact.
        assert_eq!(back, e);
    }

    /// What every message a record causes carries on stays small, however large it came.
    #[test]
    fn an_oversized_correlation_id_is_cut_and_an_oversized_or_garbled_tracestate_dropped() {
        let of = |correlation: &str, tracestate: &str| {
            Envelope::from_headers(
                [
                    (headers::CORRELATION_ID, Some(correlation.as_bytes())),
                    (headers::TRACESTATE, Some(tracestate.as_bytes())),
                ],
                Some(crate::types::TRANSFER_REQUESTED),
                Uuid::new_v4,
                None,
            )
            .unwrap()
        };
        let fits = of(&"c".repeat(256), &"v=1,".repeat(128));
        assert_eq!(fits.correlation_id, Some("c".repeat(256)));
        assert_eq!(fits.tracestate, Some("v=1,".repeat(128)));
        assert_eq!(of("c", "v=1\0").tracestate, None);
        let over = of(&"c".repeat(900_000), &"v=1,".repeat(129));
        assert_eq!(
            over.correlation_id,
            Some(format!("{}… (899744 more bytes)", "c".repeat(256)))
        );
        assert_eq!(over.tracestate, None);
    }

    #[test]
    fn a_leap_second_is_read_as_the_second_after_it() {
        let read = |text| parse_time(text).map(|t| t.to_rfc3339());
        assert_eq!(
            read("2026-12-06T08:00:00.123456789+01:00").as_deref(),
            Some("2026-12-06T07:00:00.123456789+00:00")
        );
        assert_eq!(
            read("2016-12-31T23:59:60.5Z").as_deref(),
            Some("2017-01-01T00:00:00.500+00:00")
        );
        assert_eq!(read("yesterday"), None);
    }

    #[test]
    fn a_time_past_the_years_rfc_3339_writes_is_none() {
        assert!(parse_time("9999-12-31T22:30:00-01:00").is_some());
        assert!(parse_time("0000-01-01T00:00:00Z").is_some());
        // Year 10000 and year -1 in UTC.
        assert_eq!(parse_time("9999-12-31T23:30:00-01:00"), None);
        assert_eq!(parse_time("0000-01-01T00:00:00+01:00"), None);
        assert!(time_of_millis(1_765_000_000_000).is_some());
        assert_eq!(time_of_millis(253_402_300_800_000), None);
        assert_eq!(time_of_millis(i64::MAX), None);
    }

    /// A producer's `causation-id` is often the `ce_id` of an event of its own, which need not
    /// be a UUID: it names the message that id stands for.
    #[test]
    fn a_causation_id_that_is_not_a_uuid_stands_for_the_id_it_names() {
        let of = |causation: &str| {
            Envelope::from_headers(
                [
                    (headers::CAUSATION_ID, Some(causation.as_bytes())),
                    (headers::SOURCE, Some(b"/shop".as_slice())),
                ],
                Some(crate::types::TRANSFER_REQUESTED),
                Uuid::new_v4,
                None,
            )
        };
        assert_eq!(
            of("order-41-evt").unwrap().causation_id,
            Some(Envelope::id_of("order-41-evt", Some("/shop")))
        );
        let uuid = Uuid::new_v4();
        assert_eq!(of(&uuid.to_string()).unwrap().causation_id, Some(uuid));
        assert!(of("").is_err());
    }

    /// Only the last value of a header counts: an earlier one that is not UTF-8 is not read,
    /// and a header without a value is skipped.
    #[test]
    fn the_last_value_of_a_repeated_header_counts() {
        let time = "2026-12-06T07:00:00Z";
        let e = Envelope::from_headers(
            [
                (headers::CORRELATION_ID, Some(b"\xff".as_slice())),
                (headers::CORRELATION_ID, Some(b"order-42".as_slice())),
                (headers::TIME, Some(time.as_bytes())),
                (headers::TIME, None),
            ],
            Some(crate::types::TRANSFER_REQUESTED),
            Uuid::new_v4,
            None,
        )
        .unwrap();
        assert_eq!(e.correlation_id.as_deref(), Some("order-42"));
        assert_eq!(e.time, time.parse::<DateTime<Utc>>().unwrap());
    }

    #[test]
    fn a_bare_request_gets_defaults() {
        let id = Uuid::new_v4();
        let written = "2026-12-06T07:00:00.123Z".parse().unwrap();
        let bare = |time| {
            Envelope::from_headers([], Some(crate::types::TRANSFER_REQUESTED), || id, time).unwrap()
        };
        let e = bare(Some(written));
        assert_eq!(e.id, id);
        assert_eq!(e.message_type, crate::types::TRANSFER_REQUESTED);
        assert_eq!(e.schema_version, 1);
        // The record's own time, so that what is answered with it is the same on every
        // redelivery; now only for a record without one.
        assert_eq!(e.time, written);
        let before = Utc::now();
        assert!(bare(None).time >= before);
    }

    #[test]
    fn an_id_that_is_not_a_uuid_stands_for_one_derived_from_it_and_its_source() {
        let id = |source: &str, id: &str| {
            Envelope::from_headers(
                [
                    (headers::ID, Some(id.as_bytes())),
                    (headers::SOURCE, Some(source.as_bytes())),
                ],
                Some(crate::types::TRANSFER_REQUESTED),
                || unreachable!("the id header is present"),
                None,
            )
            .map(|e| e.id)
        };
        let order = id("/shop", "order-42-evt").unwrap();
        assert_eq!(id("/shop", "order-42-evt").unwrap(), order);
        assert_ne!(id("/till", "order-42-evt").unwrap(), order);
        assert_ne!(id("/shop", "order-43-evt").unwrap(), order);
        let uuid = Uuid::new_v4().to_string();
        assert_eq!(id("/shop", &uuid).unwrap().to_string(), uuid);
        assert!(id("/shop", "").is_err());
    }

    #[test]
    fn a_bad_header_is_named() {
        let err = Envelope::from_headers(
            [(headers::SCHEMA_VERSION, Some(&b"two"[..]))],
            Some("x"),
            Uuid::new_v4,
            None,
        )
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "header schema-version is not valid: \"two\""
        );
    }
}
