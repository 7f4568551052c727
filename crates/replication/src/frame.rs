//! Frames: the messages two sites exchange over one websocket, and their binary encoding.
//!
//! Each websocket binary message is one frame: a tag byte, then fields as unsigned LEB128
//! integers, length-prefixed UTF-8 strings and length-prefixed bytes. Decoding never trusts a
//! length: every read is checked against what is left, entity kinds and ids are validated as
//! `EntityKey`s, and a frame with bytes left over is malformed. What a frame means is the
//! `session` module's business.

use store::{EntityKey, Seq};

use crate::error::{Error, Result};

/// The most items a decoder reserves room for before reading them: an item takes about 150
/// bytes in memory for as few as 6 on the wire, so reserving a count up front could ask for
/// far more than the frame's size.
const MAX_PREALLOCATED: usize = 1024;

/// The most entities one batch may hold, whatever the sites' `batch_entities` (the largest
/// value that setting takes): a frame with more rows or entries is malformed. Without this
/// bound, a frame of minimal rows would decode to about 24 times its size in memory.
pub const MAX_BATCH_ENTITIES: usize = 10_000;

/// The protocol version sent in [`Frame::Hello`]. Version 2 announced up to
/// [`BATCHES_IN_FLIGHT`] batches at once (version 1: one). Version 3 answers one [`Frame::Sync`]
/// in parts ([`Frame::ReplyPart`]s, then a [`Frame::Reply`]), each of about [`REPLY_BYTES`] at
/// most, so that the puller applies each part while the rest is on the wire. A hello of an older
/// version is refused; one of a later version is taken, and that peer speaks this one.
pub const PROTOCOL_VERSION: u64 = 3;

/// How many bytes of sync messages and documents one reply frame carries before the rest go in
/// the next; a single larger entry goes alone.
pub const REPLY_BYTES: usize = 1024 * 1024;

/// How many announced batches may be unacknowledged at once. More than one lets the announcer
/// answer the next batch's requests while the puller applies the last batch's replies.
pub const BATCHES_IN_FLIGHT: usize = 3;

/// One message between two sites.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Frame {
    /// The first frame each side sends: who it is, and where in the other's feed to start.
    Hello {
        /// [`PROTOCOL_VERSION`].
        protocol: u64,
        /// The sender's site name (informational; identity comes from the token).
        site: String,
        /// The sender has consumed the receiver's feed up to here; send rows after it.
        cursor: Seq,
    },
    /// A batch of the sender's feed: entities that changed, with the version each reached.
    Rows {
        /// The batch number, echoed by [`Frame::Sync`] and [`Frame::Done`].
        batch: u64,
        /// The rows, at most one per entity.
        rows: Vec<Row>,
        /// The last feed row this batch covers (rows that need not be sent included).
        through: Seq,
        /// The sender's last feed row when it sent this, for lag.
        head: Seq,
    },
    /// The receiver of [`Frame::Rows`] asks for the entities it lacks, one entry each.
    Sync {
        /// The batch being synced.
        batch: u64,
        /// One entry per entity still being synced.
        entries: Vec<SyncEntry>,
    },
    /// The answer to [`Frame::Sync`], or its last part: with the [`Frame::ReplyPart`]s before
    /// it, exactly one entry per requested entity, in order.
    Reply {
        /// The batch being synced.
        batch: u64,
        /// One entry per requested entity (not answered by the parts before).
        entries: Vec<ReplyEntry>,
    },
    /// A part of the answer to [`Frame::Sync`] that more parts follow, the last a
    /// [`Frame::Reply`].
    ReplyPart {
        /// The batch being synced.
        batch: u64,
        /// One entry for each of some of the requested entities, in order.
        entries: Vec<ReplyEntry>,
    },
    /// Every entity of the batch is up to date and the cursor is on disk.
    Done {
        /// The batch.
        batch: u64,
        /// The sender has consumed the receiver's feed up to here.
        cursor: Seq,
    },
}

/// One changed entity in [`Frame::Rows`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Row {
    /// The entity.
    pub key: EntityKey,
    /// Its version after the change (an opaque version string).
    pub version: String,
    /// Its feed row.
    pub seq: Seq,
}

/// How a [`SyncEntry`] asks for an entity.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Continue the entity's sync session (the first message of one starts it).
    Sync,
    /// Drop the entity's sync state and start a new session with this message.
    Reset,
    /// Send the whole document (after the sync sessions did not converge).
    Whole,
}

/// One entity in [`Frame::Sync`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SyncEntry {
    /// The entity.
    pub key: EntityKey,
    /// What to do.
    pub mode: Mode,
    /// The Automerge sync message, when the requester has something to say.
    pub message: Option<Vec<u8>>,
}

/// One entity in [`Frame::Reply`] or [`Frame::ReplyPart`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReplyEntry {
    /// The entity.
    pub key: EntityKey,
    /// An Automerge sync message, or (after [`Mode::Whole`]) the saved document.
    pub message: Option<Vec<u8>>,
}

impl ReplyEntry {
    /// The bytes it takes in a frame, near enough to size reply parts by.
    pub(crate) fn size(&self) -> usize {
        self.key.kind.as_str().len()
            + self.key.id.as_str().len()
            + self.message.as_ref().map_or(0, Vec::len)
    }
}

const HELLO: u8 = 1;
const ROWS: u8 = 2;
const SYNC: u8 = 3;
const REPLY: u8 = 4;
const DONE: u8 = 5;
const REPLY_PART: u8 = 6;

impl Frame {
    /// The frame's bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Writer::default();
        match self {
            Frame::Hello {
                protocol,
                site,
                cursor,
            } => {
                out.byte(HELLO);
                out.number(*protocol);
                out.text(site);
                out.number(cursor.0);
            }
            Frame::Rows {
                batch,
                rows,
                through,
                head,
            } => {
                out.byte(ROWS);
                out.number(*batch);
                out.number(through.0);
                out.number(head.0);
                out.number(rows.len() as u64);
                for row in rows {
                    out.key(&row.key);
                    out.text(&row.version);
                    out.number(row.seq.0);
                }
            }
            Frame::Sync { batch, entries } => {
                out.byte(SYNC);
                out.number(*batch);
                out.number(entries.len() as u64);
                for entry in entries {
                    out.key(&entry.key);
                    out.byte(match entry.mode {
                        Mode::Sync => 0,
                        Mode::Reset => 1,
                        Mode::Whole => 2,
                    });
                    out.optional_bytes(entry.message.as_deref());
                }
            }
            Frame::Reply { batch, entries } | Frame::ReplyPart { batch, entries } => {
                out.byte(if matches!(self, Frame::Reply { .. }) {
                    REPLY
                } else {
                    REPLY_PART
                });
                out.number(*batch);
                out.number(entries.len() as u64);
                for entry in entries {
                    out.key(&entry.key);
                    out.optional_bytes(entry.message.as_deref());
                }
            }
            Frame::Done { batch, cursor } => {
                out.byte(DONE);
                out.number(*batch);
                out.number(cursor.0);
            }
        }
        out.0
    }

    /// Parses a frame.
    ///
    /// # Errors
    /// [`Error::Malformed`] when the bytes are not exactly one valid frame.
    pub fn decode(bytes: &[u8]) -> Result<Frame> {
        let mut input = Reader(bytes);
        let frame = match input.byte()? {
            HELLO => Frame::Hello {
                protocol: input.number()?,
                site: input.text()?,
                cursor: Seq(input.number()?),
            },
            ROWS => {
                let batch = input.number()?;
                let through = Seq(input.number()?);
                let head = Seq(input.number()?);
                let count = input.items()?;
                let mut rows = Vec::with_capacity(count.min(MAX_PREALLOCATED));
                for _ in 0..count {
                    rows.push(Row {
                        key: input.key()?,
                        version: input.text()?,
                        seq: Seq(input.number()?),
                    });
                }
                Frame::Rows {
                    batch,
                    rows,
                    through,
                    head,
                }
            }
            SYNC => {
                let batch = input.number()?;
                let count = input.items()?;
                let mut entries = Vec::with_capacity(count.min(MAX_PREALLOCATED));
                for _ in 0..count {
                    let key = input.key()?;
                    let mode = match input.byte()? {
                        0 => Mode::Sync,
                        1 => Mode::Reset,
                        2 => Mode::Whole,
                        other => return Err(malformed(format!("unknown sync mode {other}"))),
                    };
                    entries.push(SyncEntry {
                        key,
                        mode,
                        message: input.optional_bytes()?,
                    });
                }
                Frame::Sync { batch, entries }
            }
            tag @ (REPLY | REPLY_PART) => {
                let batch = input.number()?;
                let count = input.items()?;
                let mut entries = Vec::with_capacity(count.min(MAX_PREALLOCATED));
                for _ in 0..count {
                    entries.push(ReplyEntry {
                        key: input.key()?,
                        message: input.optional_bytes()?,
                    });
                }
                if tag == REPLY {
                    Frame::Reply { batch, entries }
                } else {
                    Frame::ReplyPart { batch, entries }
                }
            }
            DONE => Frame::Done {
                batch: input.number()?,
                cursor: Seq(input.number()?),
            },
            other => return Err(malformed(format!("unknown frame tag {other}"))),
        };
        if !input.0.is_empty() {
            return Err(malformed(format!(
                "{} bytes after the end of the frame",
                input.0.len()
            )));
        }
        Ok(frame)
    }

    /// The frame's name, for logs and errors.
    pub fn name(&self) -> &'static str {
        match self {
            Frame::Hello { .. } => "hello",
            Frame::Rows { .. } => "rows",
            Frame::Sync { .. } => "sync",
            Frame::Reply { .. } => "reply",
            Frame::ReplyPart { .. } => "reply part",
            Frame::Done { .. } => "done",
        }
    }
}

fn malformed(detail: impl Into<String>) -> Error {
    Error::Malformed(detail.into())
}

#[derive(Default)]
struct Writer(Vec<u8>);

impl Writer {
    fn byte(&mut self, value: u8) {
        self.0.push(value);
    }

    fn number(&mut self, mut value: u64) {
        loop {
            let low = (value & 0x7f) as u8;
            value >>= 7;
            if value == 0 {
                self.0.push(low);
                return;
            }
            self.0.push(low | 0x80);
        }
    }

    fn bytes(&mut self, value: &[u8]) {
        self.number(value.len() as u64);
        self.0.extend_from_slice(value);
    }

    fn text(&mut self, value: &str) {
        self.bytes(value.as_bytes());
    }

    fn key(&mut self, key: &EntityKey) {
        self.text(key.kind.as_str());
        self.text(key.id.as_str());
    }

    fn optional_bytes(&mut self, value: Option<&[u8]>) {
        match value {
            Some(value) => {
                self.byte(1);
                self.bytes(value);
            }
            None => self.byte(0),
        }
    }
}

struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn byte(&mut self) -> Result<u8> {
        let (first, rest) = self
            .0
            .split_first()
            .ok_or_else(|| malformed("the frame ends early"))?;
        self.0 = rest;
        Ok(*first)
    }

    fn number(&mut self) -> Result<u64> {
        let mut value = 0u64;
        for shift in (0..64).step_by(7) {
            let byte = self.byte()?;
            let bits = u64::from(byte & 0x7f);
            if shift == 63 && bits > 1 {
                return Err(malformed("a number overflows 64 bits"));
            }
            value |= bits << shift;
            if byte & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err(malformed("a number overflows 64 bits"))
    }

    /// A length or count, which can never exceed the bytes left (each item takes at least one).
    fn count(&mut self) -> Result<usize> {
        let count = self.number()?;
        if count > self.0.len() as u64 {
            return Err(malformed(format!(
                "a count of {count} with {} bytes left",
                self.0.len()
            )));
        }
        Ok(count as usize)
    }

    /// The number of rows or entries that follow: at most [`MAX_BATCH_ENTITIES`], and never
    /// more than the bytes left.
    fn items(&mut self) -> Result<usize> {
        let count = self.count()?;
        if count > MAX_BATCH_ENTITIES {
            return Err(malformed(format!(
                "{count} items in one frame; a batch holds at most {MAX_BATCH_ENTITIES} entities"
            )));
        }
        Ok(count)
    }

    fn bytes(&mut self) -> Result<Vec<u8>> {
        let length = self.count()?;
        let (value, rest) = self.0.split_at(length);
        self.0 = rest;
        Ok(value.to_vec())
    }

    fn text(&mut self) -> Result<String> {
        String::from_utf8(self.bytes()?).map_err(|_| malformed("a string is not UTF-8"))
    }

    fn key(&mut self) -> Result<EntityKey> {
        let kind = self.text()?;
        let id = self.text()?;
        EntityKey::new(kind, id).map_err(|error| malformed(error.to_string()))
    }

    fn optional_bytes(&mut self) -> Result<Option<Vec<u8>>> {
        match self.byte()? {
            0 => Ok(None),
            1 => Ok(Some(self.bytes()?)),
            other => Err(malformed(format!("an option tag of {other}"))),
        }
    }
}

#[cfg(test)]
mod tests;
