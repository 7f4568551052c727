//! A bound on what bytes from elsewhere may inflate to, checked before Automerge reads them.
//!
//! Automerge 0.12 inflates a compressed change chunk, and each deflated column of a document
//! chunk, in full and without a limit: a megabyte from a peer can ask for gigabytes, and running
//! out of memory is not a panic that `catch_unwind` can turn into an error. Documents from
//! `save()` deflate their larger columns, and sync messages may carry such documents, so
//! compressed data cannot simply be refused; it is inflated here first, into nothing, and
//! refused when the parts of one input together inflate to more than [`MAX_INFLATED_BYTES`].
//!
//! Only the chunk framing and a document's column table are read (see the Automerge binary
//! format: magic bytes, checksum, chunk type, LEB128 length; a document's actors, heads and two
//! column tables). Input that does not parse as far as that is left to Automerge, which refuses
//! it without inflating anything. Bundle chunks, which nothing in Lockstep sends, are refused.

use std::io::Read;

use crate::error::{Error, Result};

/// The most the compressed parts of one input (a document, or a sync message's changes) may
/// inflate to; far more than an entity's document needs.
pub const MAX_INFLATED_BYTES: u64 = 64 * 1024 * 1024;

const MAGIC: [u8; 4] = [0x85, 0x6f, 0x4a, 0x83];
const DOCUMENT: u8 = 0;
const COMPRESSED_CHANGE: u8 = 2;
const BUNDLE: u8 = 3;
/// The bit of a column specification that marks its data as deflated.
const DEFLATED: u64 = 0b1000;

/// Checks each of `parts` (concatenated chunks each) against one shared bound; returns how many
/// bytes their compressed parts inflate to.
///
/// # Errors
/// [`Error::Decode`] when they inflate to more than [`MAX_INFLATED_BYTES`] together, when a
/// compressed part does not inflate, or for a bundle chunk.
pub(crate) fn check<'a>(parts: impl IntoIterator<Item = &'a [u8]>) -> Result<u64> {
    check_within(parts, MAX_INFLATED_BYTES)
}

fn check_within<'a>(parts: impl IntoIterator<Item = &'a [u8]>, limit: u64) -> Result<u64> {
    let mut budget = Budget { limit, used: 0 };
    for part in parts {
        let mut rest = Cursor(part);
        while !rest.0.is_empty() {
            let Some((kind, body)) = chunk(&mut rest) else {
                break;
            };
            match kind {
                DOCUMENT => document(body, &mut budget)?,
                COMPRESSED_CHANGE => budget.inflate(body)?,
                BUNDLE => {
                    return Err(Error::Decode(
                        "bundle chunks are not accepted from elsewhere".into(),
                    ))
                }
                _ => {}
            }
        }
    }
    Ok(budget.used)
}

/// The next chunk's type and body, or `None` when the framing does not parse.
fn chunk<'a>(rest: &mut Cursor<'a>) -> Option<(u8, &'a [u8])> {
    if rest.take(4)? != MAGIC {
        return None;
    }
    rest.take(4)?; // checksum
    let kind = rest.take(1)?[0];
    let length = usize::try_from(rest.uleb()?).ok()?;
    Some((kind, rest.take(length)?))
}

/// Inflates the deflated columns of a document chunk's body.
fn document(body: &[u8], budget: &mut Budget) -> Result<()> {
    let mut input = Cursor(body);
    let Some(columns) = column_table(&mut input) else {
        return Ok(());
    };
    for (spec, length) in columns {
        let Some(data) = usize::try_from(length).ok().and_then(|n| input.take(n)) else {
            return Ok(());
        };
        if spec & DEFLATED != 0 {
            budget.inflate(data)?;
        }
    }
    Ok(())
}

/// Skips a document's actors and heads and reads its change and op column tables, in the order
/// their data follows; `None` when they do not parse.
fn column_table(input: &mut Cursor<'_>) -> Option<Vec<(u64, u64)>> {
    for _ in 0..input.count()? {
        let length = usize::try_from(input.uleb()?).ok()?;
        input.take(length)?;
    }
    let heads = input.count()?;
    input.take(heads.checked_mul(32)?)?;
    let mut columns = Vec::new();
    for _ in 0..2 {
        for _ in 0..input.count()? {
            columns.push((input.uleb()?, input.uleb()?));
        }
    }
    Some(columns)
}

struct Budget {
    limit: u64,
    used: u64,
}

impl Budget {
    /// Inflates raw DEFLATE `data` into nothing, counting it against the limit.
    fn inflate(&mut self, data: &[u8]) -> Result<()> {
        let left = self.limit - self.used;
        let mut inflater = flate2::read::DeflateDecoder::new(data).take(left + 1);
        let inflated = std::io::copy(&mut inflater, &mut std::io::sink()).map_err(|error| {
            Error::Decode(format!("a compressed part does not inflate: {error}"))
        })?;
        if inflated > left {
            return Err(Error::Decode(format!(
                "its compressed parts inflate to more than {} bytes",
                self.limit
            )));
        }
        self.used += inflated;
        Ok(())
    }
}

struct Cursor<'a>(&'a [u8]);

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if n > self.0.len() {
            return None;
        }
        let (taken, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(taken)
    }

    fn uleb(&mut self) -> Option<u64> {
        let mut value = 0u64;
        for shift in (0..64).step_by(7) {
            let byte = self.take(1)?[0];
            value |= u64::from(byte & 0x7f).checked_shl(shift)?;
            if byte & 0x80 == 0 {
                return Some(value);
            }
        }
        None
    }

    /// A count of items that each take at least a byte: never more than the bytes left.
    fn count(&mut self) -> Option<usize> {
        let count = usize::try_from(self.uleb()?).ok()?;
        (count <= self.0.len()).then_some(count)
    }
}

#[cfg(test)]
pub(crate) mod tests;
