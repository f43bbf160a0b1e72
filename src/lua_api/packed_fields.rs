//! The hidden field of an event without headers: the receipt time and the
//! strings that only lazy fields read (`ev.id`, `ev.reply`, a small body for
//! `ev.data` and `ev.payload`, and for `ev.meta` the span's `traceparent` and
//! a JetStream ack subject), in one byte string.
//!
//! Building an event table then makes one Lua string for all of them instead
//! of one each, and a handler that never reads them pays nothing more. Layout:
//! the receipt time (f64, seconds since the epoch, native order), then each
//! field as a native-order `u32` length (`u32::MAX` when absent) and its bytes.

/// The fields, borrowed from the event or from the packed bytes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PackedFields<'a> {
    pub received: f64,
    pub id: Option<&'a [u8]>,
    pub reply: Option<&'a [u8]>,
    pub span: Option<&'a [u8]>,
    pub ack_subject: Option<&'a [u8]>,
    /// The body, when it is packed too (else it is the table's `data` field).
    pub data: Option<&'a [u8]>,
}

/// Which of the strings to read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Field {
    Id,
    Reply,
    Span,
    AckSubject,
    Data,
}

const ABSENT: u32 = u32::MAX;
const TIME: usize = size_of::<f64>();
const LENGTH: usize = size_of::<u32>();

impl<'a> PackedFields<'a> {
    fn strings(&self) -> [Option<&'a [u8]>; 5] {
        [self.id, self.reply, self.span, self.ack_subject, self.data]
    }

    /// The packed length, or `None` when a string is too long to pack (4 GiB).
    pub fn packed_len(&self) -> Option<usize> {
        self.strings().iter().try_fold(TIME, |total, string| {
            let bytes = string.map_or(0, <[u8]>::len);
            (bytes < ABSENT as usize).then_some(total + LENGTH + bytes)
        })
    }

    /// Writes the packed form into `out`, which must be exactly [`Self::packed_len`] long.
    pub fn write(&self, out: &mut [u8]) {
        out[..TIME].copy_from_slice(&self.received.to_ne_bytes());
        let mut at = TIME;
        for string in self.strings() {
            let length = string.map_or(ABSENT, |bytes| bytes.len() as u32);
            out[at..at + LENGTH].copy_from_slice(&length.to_ne_bytes());
            at += LENGTH;
            if let Some(bytes) = string {
                out[at..at + bytes.len()].copy_from_slice(bytes);
                at += bytes.len();
            }
        }
    }

    /// Reads packed bytes back; `None` when they are not a packed form (a
    /// script can store anything under the hidden key).
    pub fn read(packed: &'a [u8]) -> Option<Self> {
        let received = f64::from_ne_bytes(packed.get(..TIME)?.try_into().ok()?);
        let mut rest = &packed[TIME..];
        let mut next = || -> Option<Option<&'a [u8]>> {
            let length = u32::from_ne_bytes(rest.get(..LENGTH)?.try_into().ok()?);
            rest = &rest[LENGTH..];
            if length == ABSENT {
                return Some(None);
            }
            let (bytes, after) = rest.split_at_checked(length as usize)?;
            rest = after;
            Some(Some(bytes))
        };
        let fields =
            PackedFields { received, id: next()?, reply: next()?, span: next()?, ack_subject: next()?, data: next()? };
        rest.is_empty().then_some(fields)
    }

    pub fn get(&self, field: Field) -> Option<&'a [u8]> {
        match field {
            Field::Id => self.id,
            Field::Reply => self.reply,
            Field::Span => self.span,
            Field::AckSubject => self.ack_subject,
            Field::Data => self.data,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_read_back_as_written_absent_and_empty_apart() {
        let fields = PackedFields {
            received: 1_700_000_000.25,
            id: Some(b"ORDERS:42"),
            reply: None,
            span: Some(b""),
            ack_subject: Some(b"$JS.ACK.ORDERS.work.1.42.42.1700000000000000000.0"),
            data: Some(b"{}"),
        };
        let mut out = vec![0; fields.packed_len().unwrap()];
        fields.write(&mut out);
        assert_eq!(PackedFields::read(&out), Some(fields));
        assert_eq!(PackedFields::read(&out).unwrap().get(Field::Id), Some(&b"ORDERS:42"[..]));
    }

    #[test]
    fn anything_else_reads_as_none() {
        let fields = PackedFields {
            received: 1.0,
            id: Some(b"x"),
            reply: Some(b"y"),
            span: None,
            ack_subject: None,
            data: None,
        };
        let mut out = vec![0; fields.packed_len().unwrap()];
        fields.write(&mut out);
        for cut in 0..out.len() {
            assert_eq!(PackedFields::read(&out[..cut]), None, "cut at {cut}");
        }
        let mut longer = out.clone();
        longer.push(0);
        assert_eq!(PackedFields::read(&longer), None);
        let mut lying = out.clone();
        lying[TIME..TIME + LENGTH].copy_from_slice(&1000u32.to_ne_bytes());
        assert_eq!(PackedFields::read(&lying), None);
        assert_eq!(PackedFields::read(b"a script's string"), None);
    }
}
