//! The inflation bound: real documents pass with their deflated columns counted, and
//! compressed chunks or columns that inflate too far are refused before Automerge sees them.

use std::io::Write;

use automerge::transaction::Transactable;
use automerge::{AutoCommit, ROOT};

use super::*;

fn deflate(data: &[u8]) -> Vec<u8> {
    let mut encoder = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::fast());
    encoder.write_all(data).unwrap();
    encoder.finish().unwrap()
}

/// Appends `value` as unsigned LEB128, as Automerge's formats write lengths and counts.
pub(crate) fn uleb(mut value: u64, out: &mut Vec<u8>) {
    loop {
        let byte = (value & 0x7f) as u8;
        value >>= 7;
        if value == 0 {
            out.push(byte);
            return;
        }
        out.push(byte | 0x80);
    }
}

/// A chunk of `kind` around `body`, with a checksum nobody here checks.
fn chunk(kind: u8, body: &[u8]) -> Vec<u8> {
    let mut out = MAGIC.to_vec();
    out.extend([0, 0, 0, 0, kind]);
    uleb(body.len() as u64, &mut out);
    out.extend(body);
    out
}

#[test]
fn a_saved_document_passes_with_its_deflated_columns_counted() {
    let mut doc = AutoCommit::new();
    for n in 0..200 {
        doc.put(
            ROOT,
            format!("field{n}"),
            format!("a value that repeats {n}"),
        )
        .unwrap();
    }
    let saved = doc.save();
    let inflated = check([saved.as_slice()]).unwrap();
    // The document is large enough for `save()` to deflate columns, and the check found them.
    assert!(inflated > 0, "no deflated column was found");
    // Concatenated with incremental changes, as `save_incremental` appends them.
    doc.put(ROOT, "more", 1).unwrap();
    let mut both = saved.clone();
    both.extend(doc.save_incremental());
    assert!(check([both.as_slice()]).unwrap() >= inflated);
}

#[test]
fn a_compressed_change_that_inflates_too_far_is_refused() {
    let bomb = chunk(COMPRESSED_CHANGE, &deflate(&vec![0; 2 << 20]));
    assert!(bomb.len() < 64 << 10, "{} bytes", bomb.len());
    assert!(matches!(
        check_within([bomb.as_slice()], 1 << 20),
        Err(Error::Decode(_))
    ));
    // Within the bound, it is left to Automerge.
    assert_eq!(check_within([bomb.as_slice()], 4 << 20).unwrap(), 2 << 20);
    // Parts share one bound.
    let half = chunk(COMPRESSED_CHANGE, &deflate(&vec![0; 600 << 10]));
    assert!(check_within([half.as_slice()], 1 << 20).is_ok());
    assert!(matches!(
        check_within([half.as_slice(), half.as_slice()], 1 << 20),
        Err(Error::Decode(_))
    ));
}

#[test]
fn a_document_column_that_inflates_too_far_is_refused() {
    let column = deflate(&vec![0; 2 << 20]);
    let mut body = Vec::new();
    uleb(0, &mut body); // actors
    uleb(0, &mut body); // heads
    uleb(1, &mut body); // one change column, deflated
    uleb(DEFLATED | 0x10, &mut body);
    uleb(column.len() as u64, &mut body);
    uleb(0, &mut body); // no op columns
    body.extend(&column);
    let document = chunk(DOCUMENT, &body);
    assert!(matches!(
        check_within([document.as_slice()], 1 << 20),
        Err(Error::Decode(_))
    ));
    assert_eq!(
        check_within([document.as_slice()], 4 << 20).unwrap(),
        2 << 20
    );
}

#[test]
fn bundles_and_data_that_does_not_inflate_are_refused_and_garbage_is_left_alone() {
    assert!(matches!(
        check([chunk(BUNDLE, b"anything").as_slice()]),
        Err(Error::Decode(_))
    ));
    assert!(matches!(
        check([chunk(COMPRESSED_CHANGE, &[0xff; 16]).as_slice()]),
        Err(Error::Decode(_))
    ));
    for garbage in [
        &b""[..],
        b"\x85",
        b"not a chunk at all",
        &[0x85, 0x6f, 0x4a, 0x83, 0, 0],
    ] {
        assert_eq!(check([garbage]).unwrap(), 0);
    }
}
