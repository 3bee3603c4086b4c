//! The hash chain that makes the audit log tamper-evident.
//!
//! Design: one chain per Kafka partition of origin, keyed by (topic, partition). A partition
//! belongs to one audit consumer at a time, so each chain has one writer and several audit
//! copies never contend on a global head; the unique key on (topic, partition, chain_seq) stops
//! two writers from both extending the same link during a rebalance (the loser re-reads the
//! head and tries again). Each row's `hash` is
//!
//! ```text
//! SHA-256( canonical JSON of [ "twophase-audit-v1", every stored column but id and hash, in
//!          a fixed order, prev_hash ] )
//! ```
//!
//! with `prev_hash` the `hash` of the row before it in its chain ([`GENESIS`] for the first).
//! Changing any column of a row breaks its own hash; deleting a row leaves a gap in `chain_seq`
//! and a `prev_hash` that links to nothing; rewriting a row and its hash breaks the next row's
//! link. Removing the newest rows of a chain is the one change a chain cannot show by itself:
//! `twophase audit verify` prints each chain's head so that it can be kept elsewhere.
//!
//! Canonical JSON: object keys sorted, no whitespace, strings as serde_json escapes them, and
//! numbers by value (an integral float is written as an integer), so that the payload read back
//! from PostgreSQL's jsonb, which normalizes number spelling and key order, hashes the same as
//! the payload written.

use serde_json::{json, Number, Value};
use sha2::{Digest, Sha256};

use crate::record::format_time;
use crate::store::Row;

/// The `prev_hash` of the first row of a chain.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// The version tag hashed with every row. Do not change: every stored hash includes it.
const VERSION: &str = "twophase-audit-v1";

/// The hash a row must carry: of its content and `prev_hash`. `id` and `hash` itself are left
/// out (the id is given by the database after the hash is computed).
pub fn row_hash(row: &Row) -> String {
    let e = &row.entry;
    // Do not reorder, add or remove fields: every stored hash depends on this exact list. A new
    // column means a new VERSION, and verify choosing the field list by version.
    let content = json!([
        VERSION,
        e.topic,
        e.kafka_partition,
        e.kafka_offset,
        row.chain_seq,
        e.message_id.to_string(),
        e.message_key,
        e.event_type,
        e.entity_type,
        e.entity_id,
        e.transfer_id,
        e.action,
        e.actor_id,
        e.actor_type,
        e.correlation_id,
        e.causation_id,
        e.trace_id,
        e.span_id,
        e.severity,
        e.payload_encoding,
        e.payload.0,
        e.headers.0,
        e.ip_address,
        e.user_agent,
        format_time(&e.occurred_at),
        e.occurred_at_us,
        format_time(&row.recorded_at),
        row.prev_hash,
    ]);
    let mut text = String::new();
    canonical(&content, &mut text);
    hex::encode(Sha256::digest(text.as_bytes()))
}

/// Writes `value` as canonical JSON.
pub fn canonical(value: &Value, out: &mut String) {
    match value {
        Value::Null => out.push_str("null"),
        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Value::Number(n) => out.push_str(&number(n)),
        Value::String(s) => out.push_str(&Value::String(s.clone()).to_string()),
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                canonical(item, out);
            }
            out.push(']');
        }
        Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            out.push('{');
            for (i, key) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&Value::String(key.clone()).to_string());
                out.push(':');
                canonical(&map[key], out);
            }
            out.push('}');
        }
    }
}

/// A number by value: integers as they are; floats in their shortest round-trip form, except
/// integral ones (and zero), which are written as integers, because jsonb may give `100.0` back
/// as `100` and `1e19` as `10000000000000000000`.
fn number(n: &Number) -> String {
    if let Some(i) = n.as_i64() {
        return i.to_string();
    }
    if let Some(u) = n.as_u64() {
        return u.to_string();
    }
    match n.as_f64() {
        Some(f) if f.is_finite() && f.fract() == 0.0 => {
            // Negative zero is zero: numeric has no sign for it.
            if f == 0.0 {
                "0".to_owned()
            } else {
                format!("{f:.0}")
            }
        }
        _ => n.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn canon(text: &str) -> String {
        let value: Value = serde_json::from_str(text).unwrap();
        let mut out = String::new();
        canonical(&value, &mut out);
        out
    }

    #[test]
    fn canonical_json_is_independent_of_spelling() {
        assert_eq!(
            canon(r#"{ "b": 1, "a": [true, null, "x\"y"] }"#),
            r#"{"a":[true,null,"x\"y"],"b":1}"#
        );
        // What jsonb may give back for what was written.
        for (written, read_back) in [
            ("100.0", "100"),
            ("1e2", "100"),
            ("1e19", "10000000000000000000"),
            ("-0.0", "0"),
            ("1.5e-7", "0.00000015"),
            ("12345678901234567890123", "12345678901234567890123"),
        ] {
            assert_eq!(canon(written), canon(read_back), "{written} vs {read_back}");
        }
        assert_ne!(canon("1.5"), canon("1.25"));
        assert_eq!(canon(r#""é\u00e9""#), "\"éé\"");
    }

    /// A row holds its payload as parsed, and its hash is of that; verifying parses what the
    /// row holds again. Every float must come back as the same float, or the row would seem
    /// changed: serde_json parses floats far from 1 exactly only with `float_roundtrip`.
    #[test]
    fn every_float_reads_back_as_itself() {
        let mut bits: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut floats = vec![7.070_317_276_112_831e-19, 0.1, 123.456];
        while floats.len() < 10_000 {
            bits ^= bits << 13;
            bits ^= bits >> 7;
            bits ^= bits << 17;
            let f = f64::from_bits(bits);
            if f.is_finite() {
                floats.push(f);
            }
        }
        for f in floats {
            let written = canon(&format!("{f:e}"));
            assert_eq!(canon(&written), written, "{f:e}");
        }
    }
}
