//! The HTTP/2 relay against clients that break the protocol: raw frames on a TCP connection.
//! Each gets RFC 9113's answer (GOAWAY with the error's code, or the frame it asked for), only
//! its own connection ends, and the proxy goes on serving everyone else.

use std::time::Duration;

use bytes::{Buf, BufMut, BytesMut};
use etcd_squeeze::server::relay::frame::{self, code, kind, Head};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::harness::{Etcd, Proxy};

/// A raw HTTP/2 connection: the preface and an empty SETTINGS sent.
async fn connect(url: &str) -> TcpStream {
    let mut tcp = TcpStream::connect(url.trim_start_matches("http://")).await.unwrap();
    let mut out = BytesMut::new();
    out.put_slice(frame::PREFACE);
    frame::put_settings(&mut out, &[]);
    tcp.write_all(&out).await.unwrap();
    tcp
}

/// Frames read until the connection ends, a GOAWAY comes, or 5 s pass.
async fn frames_until_goaway(tcp: &mut TcpStream) -> Vec<(Head, Vec<u8>)> {
    let mut buf = BytesMut::new();
    let mut out = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        while let Some(head) = Head::parse(&buf) {
            if buf.len() < 9 + head.len {
                break;
            }
            buf.advance(9);
            let payload = buf.split_to(head.len).to_vec();
            let goaway = head.kind == kind::GOAWAY;
            out.push((head, payload));
            if goaway {
                return out;
            }
        }
        let mut chunk = [0u8; 16384];
        match tokio::time::timeout_at(deadline, tcp.read(&mut chunk)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => return out,
            Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

/// The GOAWAY's error code, if one came.
fn goaway_code(frames: &[(Head, Vec<u8>)]) -> Option<u32> {
    frames.iter().find(|(h, _)| h.kind == kind::GOAWAY).map(|(_, p)| u32::from_be_bytes([p[4], p[5], p[6], p[7]]))
}

/// Writes the frames of one case.
type WriteFrames<'a> = Box<dyn Fn(&mut BytesMut) + 'a>;

/// A request header block for a unary KV Range (literal fields, as the relay writes them).
fn range_headers() -> BytesMut {
    let mut block = BytesMut::new();
    for (n, v) in [(":method", "POST"), (":scheme", "http"), (":path", "/etcdserverpb.KV/Range"), (":authority", "localhost"), ("content-type", "application/grpc"), ("te", "trailers")] {
        frame::encode_field(&mut block, n.as_bytes(), v.as_bytes());
    }
    block
}

/// PING is answered; a HEADERS on an even stream, a WINDOW_UPDATE of 0, a frame over the
/// maximum size, a header block that expands without bound: each ends its connection with
/// GOAWAY and the matching code; a client on another connection is served throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_frames_end_only_their_connection_with_the_rfcs_code() {
    let etcd = Etcd::start().await;
    let proxy = Proxy::start(&etcd.url, &[]).await;
    let mut good = proxy.client().await;
    good.put("/registry/pods/a", "1", None).await.unwrap();

    // PING: the same payload back, with ACK.
    let mut tcp = connect(&proxy.url).await;
    let mut out = BytesMut::new();
    frame::put_ping(&mut out, *b"12345678", false);
    frame::put_goaway(&mut out, 0, code::NO_ERROR, "done");
    tcp.write_all(&out).await.unwrap();
    let frames = frames_until_goaway(&mut tcp).await;
    assert!(frames.iter().any(|(h, p)| h.kind == kind::PING && h.has(frame::flag::ACK) && p == b"12345678"), "{frames:?}");

    // Each broken frame, on a connection of its own.
    let block = range_headers();
    let mut bomb = vec![0x40, 0x01, b'a', 0x7f, 0xa1, 0x1e]; // literal with indexing: "a" = 4,000 bytes
    bomb.extend(std::iter::repeat_n(b'x', 4000));
    bomb.extend(std::iter::repeat_n(0xbe, 16_000)); // 16,000 references to it: 64 MB decoded
    let cases: Vec<(&str, WriteFrames<'_>, u32)> = vec![
        ("HEADERS on an even stream", Box::new(|o: &mut BytesMut| frame::put_headers(o, 2, &block, true, 16_384)), code::PROTOCOL_ERROR),
        ("WINDOW_UPDATE of 0", Box::new(|o: &mut BytesMut| frame::put_window_update(o, 0, 0)), code::PROTOCOL_ERROR),
        ("a 20,000-byte frame", Box::new(|o: &mut BytesMut| frame::put_data(o, 1, &[0u8; 20_000], true)), code::FRAME_SIZE_ERROR),
        ("an expanding header block", Box::new(|o: &mut BytesMut| frame::put_headers(o, 1, &bomb, true, 16_384)), code::COMPRESSION_ERROR),
        ("CONTINUATION without HEADERS", Box::new(|o: &mut BytesMut| {
            frame::put_head(o, 1, kind::CONTINUATION, frame::flag::END_HEADERS, 1);
            o.put_u8(0x82);
        }), code::PROTOCOL_ERROR),
    ];
    for (what, write, want) in cases {
        let mut tcp = connect(&proxy.url).await;
        let mut out = BytesMut::new();
        write(&mut out);
        tcp.write_all(&out).await.unwrap();
        let frames = frames_until_goaway(&mut tcp).await;
        assert_eq!(goaway_code(&frames), Some(want), "{what}: {frames:?}");
        let got = good.get("/registry/pods/a", None).await.unwrap();
        assert_eq!(got.kvs()[0].value(), b"1", "{what}: the other client");
    }
}

/// Streams opened and reset at once, over and over (the "rapid reset" attack): the connection
/// ends with ENHANCE_YOUR_CALM; others are served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rapid_reset_ends_the_connection_with_enhance_your_calm() {
    let etcd = Etcd::start().await;
    let proxy = Proxy::start(&etcd.url, &[]).await;
    let mut tcp = connect(&proxy.url).await;
    let block = range_headers();
    let mut out = BytesMut::new();
    for i in 0..1500u32 {
        let id = 1 + 2 * i;
        frame::put_headers(&mut out, id, &block, false, 16_384);
        frame::put_rst(&mut out, id, code::CANCEL);
    }
    tcp.write_all(&out).await.unwrap();
    let frames = frames_until_goaway(&mut tcp).await;
    assert_eq!(goaway_code(&frames), Some(code::ENHANCE_YOUR_CALM), "{:?}", frames.last());
    let mut good = proxy.client().await;
    good.put("/registry/pods/b", "2", None).await.unwrap();
}
