//! What the server keeps per connection: no HPACK table for nodes' headers (its HTTP/2
//! SETTINGS say so) and no `date` header in its answers, the two things that made a fleet
//! server's memory grow with its history; DATA frames of up to 64 KiB, so that the frames a
//! busy server queues per connection are few; and no cap on a connection's concurrent calls,
//! as nodes sharing one connection need.

use crate::support;

use support::*;

use ferry_proto::v1::EnrolRequest;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// HTTP/2's SETTINGS_HEADER_TABLE_SIZE identifier (RFC 9113, section 6.5.2).
const HEADER_TABLE_SIZE: u16 = 0x1;
/// SETTINGS_MAX_CONCURRENT_STREAMS.
const MAX_CONCURRENT_STREAMS: u16 = 0x3;
/// SETTINGS_MAX_FRAME_SIZE.
const MAX_FRAME_SIZE: u16 = 0x5;
/// The SETTINGS frame type.
const SETTINGS: u8 = 0x4;

/// The server's first SETTINGS frame on a fresh connection, as (identifier, value) pairs.
async fn server_settings(addr: &str) -> Vec<(u16, u32)> {
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let mut hello = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    // An empty SETTINGS frame: length 0, type 4, no flags, stream 0.
    hello.extend_from_slice(&[0, 0, 0, SETTINGS, 0, 0, 0, 0, 0]);
    stream.write_all(&hello).await.expect("preface");
    let mut header = [0u8; 9];
    stream.read_exact(&mut header).await.expect("frame header");
    assert_eq!(header[3], SETTINGS, "the server's first frame is SETTINGS");
    let length = u32::from_be_bytes([0, header[0], header[1], header[2]]) as usize;
    let mut payload = vec![0u8; length];
    stream.read_exact(&mut payload).await.expect("settings");
    payload
        .chunks_exact(6)
        .map(|s| {
            (
                u16::from_be_bytes([s[0], s[1]]),
                u32::from_be_bytes([s[2], s[3], s[4], s[5]]),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headers_are_not_indexed_frames_are_large_and_answers_carry_no_date() {
    let dir = tempfile::tempdir().expect("tempdir");
    let token = add_token(dir.path(), "site-a").await;
    let running = start(dir.path(), 1, 1).await;

    let settings = server_settings(running.url.trim_start_matches("http://")).await;
    assert!(
        settings.contains(&(HEADER_TABLE_SIZE, 0)),
        "the server must announce an empty header table, got {settings:?}"
    );
    assert!(
        settings.contains(&(MAX_FRAME_SIZE, 64 * 1024)),
        "nodes may send 64 KiB DATA frames, got {settings:?}"
    );
    assert!(
        !settings.iter().any(|&(id, _)| id == MAX_CONCURRENT_STREAMS),
        "nodes sharing a connection may hold any number of calls, got {settings:?}"
    );

    let mut c = client(&running.url).await;
    let enrolled = c
        .enrol(EnrolRequest {
            token,
            ..Default::default()
        })
        .await
        .expect("enrol");
    assert!(
        enrolled.metadata().get("date").is_none(),
        "answers carry no date header: {:?}",
        enrolled.metadata()
    );
    let refused = c
        .enrol(EnrolRequest {
            token: "ferry-bogus".into(),
            ..Default::default()
        })
        .await
        .expect_err("bogus token");
    assert!(refused.metadata().get("date").is_none());
    running.stop().await;
}
