//! Kafka record headers read and written as bytes.
//!
//! On the wire a header's name is bytes, and a producer outside the project (librdkafka's C
//! interface, a Go client) can write any. rdkafka reads a name as `&str` and panics when it is
//! not UTF-8 (its `Headers::try_get` unwraps the conversion), and writes names only from
//! `&str`. A worker that read such a record through rdkafka's `Headers` would panic on it at
//! every restart and never get past it; a dead letter could not carry the name on. So every
//! record's headers are read here, through librdkafka's own accessor, and copied here as they
//! were: values byte for byte, names up to a NUL byte, if one has any (librdkafka hands names
//! out as C strings, without their length).
#![allow(unsafe_code)]

use std::ffi::{c_void, CStr};
use std::ptr;

use rdkafka::bindings::{rd_kafka_header_add, rd_kafka_header_get_all, rd_kafka_headers_t};
use rdkafka::message::{BorrowedHeaders, OwnedHeaders};
use rdkafka::types::RDKafkaRespErr;

/// One header of a record, as it came.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RawHeader<'a> {
    pub name: &'a [u8],
    pub value: Option<&'a [u8]>,
}

impl<'a> RawHeader<'a> {
    /// The name, if it is UTF-8. Every header the project reads has an ASCII name, so a header
    /// without one is never one of them.
    pub fn name_text(&self) -> Option<&'a str> {
        std::str::from_utf8(self.name).ok()
    }
}

/// rdkafka's two kinds of message, whose header lists come from librdkafka. Sealed: a
/// `BorrowedHeaders` made any other way (it is a unit struct anyone can name) points nowhere.
pub trait Record: sealed::Sealed {
    fn header_list(&self) -> Option<&BorrowedHeaders>;
}

mod sealed {
    pub trait Sealed {}
    impl Sealed for rdkafka::message::BorrowedMessage<'_> {}
    impl Sealed for rdkafka::message::OwnedMessage {}
}

impl Record for rdkafka::message::BorrowedMessage<'_> {
    fn header_list(&self) -> Option<&BorrowedHeaders> {
        rdkafka::Message::headers(self)
    }
}

impl Record for rdkafka::message::OwnedMessage {
    fn header_list(&self) -> Option<&BorrowedHeaders> {
        rdkafka::Message::headers(self).map(OwnedHeaders::as_borrowed)
    }
}

/// Every header of a record, in order; none if it has none.
pub fn of(record: &impl Record) -> Vec<RawHeader<'_>> {
    record.header_list().map(all).unwrap_or_default()
}

/// librdkafka's header list behind rdkafka's zero-sized stand-in: rdkafka hands out a
/// `&BorrowedHeaders` whose address is the `rd_kafka_headers_t`, and converts back the same way
/// (rdkafka 0.39's `BorrowedHeaders::from_native_ptr` and `as_native_ptr`; the workspace pins
/// that version). Being zero-sized, the reference covers no bytes of the list, so librdkafka
/// may change the list behind it.
fn native(headers: &BorrowedHeaders) -> *mut rd_kafka_headers_t {
    (headers as *const BorrowedHeaders).cast_mut().cast()
}

fn all(headers: &BorrowedHeaders) -> Vec<RawHeader<'_>> {
    let list = native(headers);
    let mut out = Vec::new();
    for idx in 0.. {
        let mut name = ptr::null();
        let mut value = ptr::null();
        let mut size = 0;
        // SAFETY: `list` is a live header list for as long as `headers` is borrowed, and a
        // borrowed list is not changed. librdkafka answers an index past the end with an error
        // and writes nothing.
        let err = unsafe { rd_kafka_header_get_all(list, idx, &mut name, &mut value, &mut size) };
        if err != RDKafkaRespErr::RD_KAFKA_RESP_ERR_NO_ERROR {
            break;
        }
        // SAFETY: on success `name` is the header's NUL-terminated name and `value` null or
        // `size` bytes, both owned by the list and kept until it is changed or freed, which the
        // borrow of `headers` rules out for the returned lifetime.
        let header = unsafe {
            RawHeader {
                name: CStr::from_ptr(name).to_bytes(),
                value: (!value.is_null()).then(|| std::slice::from_raw_parts(value.cast(), size)),
            }
        };
        out.push(header);
    }
    out
}

/// `headers` with one more at the end, its name and value copied as they are.
pub fn add(headers: OwnedHeaders, header: RawHeader<'_>) -> OwnedHeaders {
    let (value, value_size) = match header.value {
        Some(v) => (v.as_ptr().cast::<c_void>(), as_size(v.len())),
        None => (ptr::null(), 0),
    };
    // SAFETY: `headers` is owned here, so nothing reads the list while librdkafka appends to it,
    // and the zero-sized reference `native` takes covers none of its bytes; librdkafka copies
    // the name and the value, which need to live only for the call.
    let err = unsafe {
        rd_kafka_header_add(
            native(headers.as_borrowed()),
            header.name.as_ptr().cast(),
            as_size(header.name.len()),
            value,
            value_size,
        )
    };
    // A list made by `OwnedHeaders::new` is writable; rdkafka's own `insert` asserts the same.
    assert_eq!(err, RDKafkaRespErr::RD_KAFKA_RESP_ERR_NO_ERROR);
    headers
}

fn as_size(len: usize) -> isize {
    isize::try_from(len).expect("a slice is never longer than isize::MAX")
}

#[cfg(test)]
mod tests {
    use rdkafka::message::{Header, Headers as _, OwnedMessage, Timestamp};

    use super::*;

    fn record(headers: OwnedHeaders) -> OwnedMessage {
        OwnedMessage::new(
            None,
            None,
            "t".into(),
            Timestamp::NotAvailable,
            0,
            0,
            Some(headers),
        )
    }

    #[test]
    fn names_that_are_not_utf8_are_read_and_copied_as_they_are() {
        let written = [
            RawHeader {
                name: b"ce_id",
                value: Some(b"1"),
            },
            RawHeader {
                name: b"x-\xff\xfe",
                value: Some(b"\x00\x01"),
            },
            RawHeader {
                name: b"empty",
                value: Some(b""),
            },
            RawHeader {
                name: b"none",
                value: None,
            },
        ];
        let headers = written.iter().fold(OwnedHeaders::new(), |h, w| add(h, *w));
        let message = record(headers);
        let read = of(&message);
        assert_eq!(read, written);
        assert_eq!(read[0].name_text(), Some("ce_id"));
        assert_eq!(read[1].name_text(), None);

        // A copy made from what was read is the same list again.
        let copy = read.iter().fold(OwnedHeaders::new(), |h, r| add(h, *r));
        assert_eq!(of(&record(copy)), written);
    }

    #[test]
    fn rdkafka_itself_panics_on_such_a_name() {
        // The reason this module exists: if rdkafka ever reads such names, it can go.
        let headers = add(
            OwnedHeaders::new(),
            RawHeader {
                name: b"\xff",
                value: None,
            },
        );
        let read = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            headers.try_get(0).map(|h| h.key.to_owned())
        }));
        assert!(read.is_err());
    }

    #[test]
    fn headers_written_through_rdkafka_read_the_same() {
        let headers = OwnedHeaders::new()
            .insert(Header {
                key: "a",
                value: Some("1"),
            })
            .insert(Header::<&str> {
                key: "b",
                value: None,
            });
        let message = record(headers);
        assert_eq!(
            of(&message),
            [
                RawHeader {
                    name: b"a",
                    value: Some(b"1"),
                },
                RawHeader {
                    name: b"b",
                    value: None,
                },
            ]
        );
        assert!(of(&record(OwnedHeaders::new())).is_empty());
    }
}
