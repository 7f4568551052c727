//! The rewriting of hyper's own answers, on in-memory streams: what is rewritten, what is left
//! alone, and a rewritten answer going out whole through a narrow connection.

use serde_json::Value;
use std::io;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::*;

/// hyper's answer to a head larger than its buffer, as it writes it.
const HYPERS_431: &str =
    "HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-length: 0\r\ndate: Mon, 07 Dec 2026 23:00:00 GMT\r\n\r\n";

/// The status, headers and JSON body of a rewritten answer.
fn parse(answer: &[u8]) -> (String, Vec<String>, Value) {
    let text = std::str::from_utf8(answer).expect("UTF-8");
    let (head, body) = text.split_once("\r\n\r\n").expect("a head");
    let mut lines = head.split("\r\n").map(str::to_string);
    let status = lines.next().expect("a status line");
    let headers: Vec<String> = lines.collect();
    let length = headers
        .iter()
        .find_map(|line| line.strip_prefix("content-length: "))
        .expect("a length");
    assert_eq!(length.parse::<usize>().expect("a number"), body.len());
    (
        status,
        headers,
        serde_json::from_str(body).expect("a JSON body"),
    )
}

#[test]
fn hypers_own_answers_get_a_json_body() {
    for (head, code) in [
        (HYPERS_431.to_string(), "headers_too_large"),
        (
            "HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\ndate: x\r\n\r\n".to_string(),
            "malformed_request",
        ),
        (
            "HTTP/1.1 414 URI Too Long\r\nContent-Length: 0\r\n\r\n".to_string(),
            "uri_too_long",
        ),
    ] {
        let answer = rewrite(head.as_bytes()).expect("rewritten");
        let (status, headers, body) = parse(&answer);
        assert_eq!(status, head.split("\r\n").next().unwrap());
        assert!(headers.contains(&"content-type: application/json".to_string()));
        assert_eq!(body["code"], code);
        assert!(body["detail"]
            .as_str()
            .is_some_and(|detail| !detail.is_empty()));
        assert_eq!(body.as_object().map(|body| body.len()), Some(2));
    }
    // hyper's other headers stay.
    let (_, headers, _) = parse(&rewrite(HYPERS_431.as_bytes()).unwrap());
    assert!(headers.contains(&"date: Mon, 07 Dec 2026 23:00:00 GMT".to_string()));
}

#[test]
fn every_other_write_is_left_alone() {
    for written in [
        // Our own errors carry their type and body.
        "HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\ncontent-length: 0\r\n\r\n",
        "HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-length: 12\r\n\r\n",
        "HTTP/1.1 400 Bad Request\r\ntransfer-encoding: chunked\r\ncontent-length: 0\r\n\r\n",
        // Other statuses, a head with no length, a head with its body, not a head.
        "HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n",
        "HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n",
        "HTTP/1.1 400 Bad Request\r\ndate: x\r\n\r\n",
        "HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n{}",
        "HTTP/2 400\r\ncontent-length: 0\r\n\r\n",
        "{\"code\":\"x\"}",
        "",
    ] {
        assert_eq!(rewrite(written.as_bytes()), None, "{written:?}");
    }
    let long = format!(
        "HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\nx: {}\r\n\r\n",
        "a".repeat(MAX_ANSWER_HEAD)
    );
    assert_eq!(rewrite(long.as_bytes()), None);
}

#[tokio::test]
async fn a_rewritten_answer_goes_out_whole_through_a_narrow_connection() {
    // A connection that takes 7 bytes at a time: the answer is written on over several polls.
    let (near, mut far) = tokio::io::duplex(7);
    let reader = tokio::spawn(async move {
        let mut received = Vec::new();
        far.read_to_end(&mut received).await.map(|_| received)
    });
    let mut stream = JsonParseErrors::new(near);
    let taken = stream.write(HYPERS_431.as_bytes()).await.unwrap();
    assert_eq!(taken, HYPERS_431.len());
    stream.flush().await.unwrap();
    // Later writes (none follow hyper's answer, but a stream must stay whole) come after it.
    stream.write_all(b"after").await.unwrap();
    stream.shutdown().await.unwrap();
    drop(stream);
    let received = reader.await.unwrap().unwrap();
    let expected = rewrite(HYPERS_431.as_bytes()).unwrap();
    assert_eq!(&received[..expected.len()], &expected[..]);
    assert_eq!(&received[expected.len()..], b"after");
    // Any other write passes through as it is.
    let (near, mut far) = tokio::io::duplex(64);
    let mut stream = JsonParseErrors::new(near);
    stream
        .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
        .await
        .unwrap();
    stream.shutdown().await.unwrap();
    drop(stream);
    let mut received = Vec::new();
    far.read_to_end(&mut received).await.unwrap();
    assert_eq!(received, b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n");
}

#[tokio::test]
async fn nothing_is_rewritten_once_the_connection_switched_protocols() {
    let (near, mut far) = tokio::io::duplex(4096);
    let mut stream = JsonParseErrors::new(near);
    let switched = "HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\n\r\n";
    stream.write_all(switched.as_bytes()).await.unwrap();
    // Websocket bytes that happen to read as hyper's answer stay as they are.
    stream.write_all(HYPERS_431.as_bytes()).await.unwrap();
    stream.shutdown().await.unwrap();
    drop(stream);
    let mut received = Vec::new();
    far.read_to_end(&mut received).await.unwrap();
    assert_eq!(received, format!("{switched}{HYPERS_431}").into_bytes());
}

#[tokio::test]
async fn vectored_writes_are_rewritten_only_when_they_are_hypers_answer_alone() {
    /// Writes each write's pieces through a fresh wrapper, checking that each is taken whole,
    /// and returns what reached the connection.
    async fn through(writes: &[&[&[u8]]]) -> Vec<u8> {
        // tokio's writer into a `Vec` takes vectored writes whole, as a TCP stream does.
        let mut stream = JsonParseErrors::new(Vec::new());
        for pieces in writes {
            let slices: Vec<io::IoSlice<'_>> = pieces.iter().map(|p| io::IoSlice::new(p)).collect();
            let taken = stream.write_vectored(&slices).await.unwrap();
            assert_eq!(taken, pieces.iter().map(|p| p.len()).sum::<usize>());
        }
        stream.flush().await.unwrap();
        stream.inner
    }
    let hypers = HYPERS_431.as_bytes();
    // hyper's answer, with an empty piece before it.
    assert_eq!(through(&[&[b"", hypers]]).await, rewrite(hypers).unwrap());
    // A head and its body, in two pieces, pass as they are.
    let head = b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n";
    assert_eq!(
        through(&[&[head, b"{}"]]).await,
        [&head[..], b"{}"].concat()
    );
    // After a switch of protocols written with what follows it, nothing is looked at.
    let switched = b"HTTP/1.1 101 Switching Protocols\r\n\r\n";
    assert_eq!(
        through(&[&[switched, b"\x82\x00"], &[hypers]]).await,
        [&switched[..], b"\x82\x00", hypers].concat()
    );
}
