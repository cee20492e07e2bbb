//! Tests of the double itself, no cloud needed: the byte-level examples of
//! `docs/kubeedge-compat.md`, gorilla's fragmentation and masking, the
//! reader on split and truncated input, the metrics scanner, and the
//! request heads the edge writes.

use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, ReadBuf};

use super::session::{check_upgrade_response, upgrade_request};
use super::wire::{self, FrameReader, Incoming, MessageType, WireError, opcode};
use super::*;

fn hex(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(" ")
}

fn uvarint(v: u64) -> Vec<u8> {
    let mut out = Vec::new();
    wire::put_uvarint(&mut out, v);
    out
}

#[test]
fn uvarint_examples_from_the_spec() {
    for (value, bytes) in [
        (0u64, "00"),
        (7, "07"),
        (127, "7f"),
        (128, "80 01"),
        (300, "ac 02"),
        (16384, "80 80 01"),
    ] {
        assert_eq!(hex(&uvarint(value)), bytes, "{value}");
        let encoded = uvarint(value);
        assert_eq!(wire::read_uvarint(&encoded), Ok((value, encoded.len())));
    }
    let max = uvarint(u64::MAX);
    assert_eq!(max.len(), 10);
    assert_eq!(max[9], 0x01);
    assert_eq!(wire::read_uvarint(&max), Ok((u64::MAX, 10)));
}

#[test]
fn bad_uvarints_are_errors_like_go() {
    assert_eq!(wire::read_uvarint(&[]), Err(WireError::TruncatedUvarint));
    assert_eq!(
        wire::read_uvarint(&[0x80]),
        Err(WireError::TruncatedUvarint)
    );
    assert_eq!(
        wire::read_uvarint(&[0xff, 0xff]),
        Err(WireError::TruncatedUvarint)
    );
    // Ten bytes whose last is above 1 overflow 64 bits.
    let mut ten = vec![0xff; 9];
    ten.push(0x02);
    assert_eq!(wire::read_uvarint(&ten), Err(WireError::UvarintOverflow));
    assert_eq!(
        wire::read_uvarint(&[0xff; 11]),
        Err(WireError::UvarintOverflow)
    );
    // A message that is only a ConnectID has no type: an error, which ends
    // the session on a real edge.
    assert_eq!(wire::decode(&[0x05]), Err(WireError::TruncatedUvarint));
    assert_eq!(wire::decode(&[]), Err(WireError::TruncatedUvarint));
}

#[test]
fn message_examples_from_the_spec() {
    let data = wire::encode(300, MessageType::Data, b"hello\n");
    assert_eq!(hex(&data), "ac 02 03 68 65 6c 6c 6f 0a");
    let remove = wire::encode(300, MessageType::RemoveConnect, &[]);
    assert_eq!(hex(&remove), "ac 02 04");
    let close = wire::encode(0, MessageType::CloseConnect, b"node not admitted");
    assert_eq!(close.len(), 19);
    assert_eq!(&close[..2], &[0x00, 0x05]);

    let decoded = wire::decode(&data).expect("decode");
    assert_eq!(
        decoded,
        wire::Message {
            id: 300,
            kind: 3,
            data: b"hello\n".to_vec()
        }
    );
}

#[test]
fn data_frame_from_the_edge_is_masked_text() {
    let message = wire::encode(300, MessageType::Data, b"hello\n");
    let mask = [0x12, 0x34, 0x56, 0x78];
    let mut frame = Vec::new();
    wire::put_message(&mut frame, opcode::TEXT, &message, || mask);
    assert_eq!(&frame[..2], &[0x81, 0x89], "FIN+TEXT, MASK + length 9");
    assert_eq!(&frame[2..6], &mask);
    let unmasked: Vec<u8> = frame[6..]
        .iter()
        .enumerate()
        .map(|(i, b)| b ^ mask[i % 4])
        .collect();
    assert_eq!(unmasked, message);
}

/// Splits client frames back into (fin, opcode, unmasked payload).
fn parse_client_frames(mut bytes: &[u8]) -> Vec<(bool, u8, Vec<u8>)> {
    let mut frames = Vec::new();
    while !bytes.is_empty() {
        let fin = bytes[0] & 0x80 != 0;
        let op = bytes[0] & 0x0f;
        assert_eq!(bytes[1] & 0x80, 0x80, "client frames are masked");
        let (len, mut at) = match bytes[1] & 0x7f {
            126 => (usize::from(u16::from_be_bytes([bytes[2], bytes[3]])), 4),
            127 => (
                u64::from_be_bytes(bytes[2..10].try_into().expect("8 bytes")) as usize,
                10,
            ),
            n => (usize::from(n), 2),
        };
        let mask: [u8; 4] = bytes[at..at + 4].try_into().expect("4 bytes");
        at += 4;
        let payload = bytes[at..at + len]
            .iter()
            .enumerate()
            .map(|(i, b)| b ^ mask[i % 4])
            .collect();
        frames.push((fin, op, payload));
        bytes = &bytes[at + len..];
    }
    frames
}

#[test]
fn long_messages_are_cut_at_4096_like_gorilla() {
    let mut seq = 0u8;
    let mut masks = || {
        seq = seq.wrapping_add(1);
        [seq, 0xa5, seq, 0x5a]
    };
    // Exactly 4096: one frame. The empty message: one empty frame.
    for len in [0usize, 1, 125, 126, 4096] {
        let payload = vec![7u8; len];
        let mut out = Vec::new();
        wire::put_message(&mut out, opcode::TEXT, &payload, &mut masks);
        assert_eq!(
            parse_client_frames(&out),
            vec![(true, opcode::TEXT, payload)],
            "{len}"
        );
    }
    // 10000 bytes: 4096 (TEXT, FIN=0), 4096 (CONTINUATION, FIN=0), 1808 (FIN=1).
    let payload: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
    let mut out = Vec::new();
    wire::put_message(&mut out, opcode::TEXT, &payload, &mut masks);
    assert_eq!(&out[..4], &[0x01, 0xfe, 0x10, 0x00]);
    let frames = parse_client_frames(&out);
    let shape: Vec<(bool, u8, usize)> = frames.iter().map(|(f, o, p)| (*f, *o, p.len())).collect();
    assert_eq!(
        shape,
        vec![
            (false, opcode::TEXT, 4096),
            (false, opcode::CONTINUATION, 4096),
            (true, opcode::CONTINUATION, 1808),
        ]
    );
    let joined: Vec<u8> = frames.into_iter().flat_map(|(_, _, p)| p).collect();
    assert_eq!(joined, payload);
    // 4097: the last frame holds one byte.
    let mut out = Vec::new();
    wire::put_message(&mut out, opcode::TEXT, &[1u8; 4097], &mut masks);
    let shape: Vec<(bool, u8, usize)> = parse_client_frames(&out)
        .iter()
        .map(|(f, o, p)| (*f, *o, p.len()))
        .collect();
    assert_eq!(
        shape,
        vec![(false, opcode::TEXT, 4096), (true, opcode::CONTINUATION, 1)]
    );
}

/// Hands out its bytes one at a time, to test the reader on split input.
struct Trickle(Vec<u8>, usize);

impl AsyncRead for Trickle {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if self.1 < self.0.len() && buf.remaining() > 0 {
            let b = self.0[self.1];
            buf.put_slice(&[b]);
            self.1 += 1;
        }
        Poll::Ready(Ok(()))
    }
}

fn server_frame(fin: bool, op: u8, payload: &[u8]) -> Vec<u8> {
    let mut out = vec![if fin { 0x80 } else { 0 } | op];
    match payload.len() {
        n @ 0..=125 => out.push(n as u8),
        n @ 126..=0xffff => {
            out.push(126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    out.extend_from_slice(payload);
    out
}

const LOGS_JSON: &str = r#"{"MessID":300,"url":{"Scheme":"http","Host":"127.0.0.1:10350","Path":"/containerLogs/default/web-0/nginx","RawQuery":"follow=true\u0026tailLines=10"},"header":{"Accept-Encoding":["identity"]}}"#;

#[tokio::test]
async fn logs_connect_example_reads_byte_by_byte() {
    assert_eq!(LOGS_JSON.len(), 192);
    let message = wire::encode(300, MessageType::LogsConnect, LOGS_JSON.as_bytes());
    assert_eq!(message.len(), 195);
    let frame = server_frame(true, opcode::TEXT, &message);
    assert_eq!(&frame[..4], &[0x81, 0x7e, 0x00, 0xc3]);

    let mut reader = FrameReader::new(Trickle(frame, 0));
    let Incoming::Message(payload) = reader.next().await.expect("frame") else {
        panic!("not a message");
    };
    let msg = wire::decode(&payload).expect("decode");
    assert_eq!((msg.id, msg.kind), (300, 0));
    let record = ConnectRecord::parse(msg.id, MessageType::LogsConnect, &msg.data).expect("json");
    assert_eq!(record.mess_id, 300);
    assert_eq!(record.host, KUBEEDGE_KUBELET_HOST);
    assert_eq!(
        record.request_uri(),
        "/containerLogs/default/web-0/nginx?follow=true&tailLines=10"
    );
    assert_eq!(record.headers["Accept-Encoding"], vec!["identity"]);
    // The stream ends here: EOF is an I/O error, not a message.
    assert!(matches!(reader.next().await, Err(WireError::Io(_))));
}

#[tokio::test]
async fn reader_reassembles_fragments_around_a_ping_and_accepts_binary() {
    let mut input = server_frame(false, opcode::TEXT, b"\xac\x02\x03ab");
    input.extend(server_frame(true, opcode::PING, b"p"));
    input.extend(server_frame(false, opcode::CONTINUATION, b"cd"));
    input.extend(server_frame(true, opcode::CONTINUATION, &[0xff, 0xfe]));
    input.extend(server_frame(true, opcode::BINARY, b"\x01\x04"));
    input.extend(server_frame(true, opcode::CLOSE, &1000u16.to_be_bytes()));
    let mut reader = FrameReader::new(Trickle(input, 0));
    assert_eq!(reader.next().await, Ok(Incoming::Ping(b"p".to_vec())));
    assert_eq!(
        reader.next().await,
        Ok(Incoming::Message(b"\xac\x02\x03abcd\xff\xfe".to_vec())),
        "invalid UTF-8 in TEXT is fine"
    );
    assert_eq!(
        reader.next().await,
        Ok(Incoming::Message(b"\x01\x04".to_vec()))
    );
    assert_eq!(reader.next().await, Ok(Incoming::Close(vec![0x03, 0xe8])));
}

#[tokio::test]
async fn reader_refuses_what_gorilla_refuses() {
    let cases: [(&str, Vec<u8>); 5] = [
        ("masked", vec![0x81, 0x81, 1, 2, 3, 4, 5]),
        ("rsv", vec![0xc1, 0x00]),
        ("opcode", vec![0x83, 0x00]),
        ("continuation first", vec![0x80, 0x00]),
        ("long ping", server_frame(true, opcode::PING, &[0; 126])),
    ];
    for (name, input) in cases {
        let mut reader = FrameReader::new(Trickle(input, 0));
        assert!(
            matches!(reader.next().await, Err(WireError::Frame(_))),
            "{name}"
        );
    }
    // Truncated in the middle of a payload.
    let mut cut = server_frame(true, opcode::TEXT, b"\x01\x03hello");
    cut.truncate(5);
    let mut reader = FrameReader::new(Trickle(cut, 0));
    assert!(matches!(reader.next().await, Err(WireError::Io(_))));
}

#[tokio::test]
async fn data_beyond_one_mib_is_dropped_silently() {
    let data = vec![b'z'; wire::MAX_DATA + 1000];
    let message = wire::encode(300, MessageType::Data, &data);
    let mut input = server_frame(false, opcode::TEXT, &message[..70_000]);
    input.extend(server_frame(true, opcode::CONTINUATION, &message[70_000..]));
    // And the next message still reads correctly.
    input.extend(server_frame(true, opcode::TEXT, b"\xac\x02\x04"));
    let mut reader = FrameReader::new(std::io::Cursor::new(input));
    let Ok(Incoming::Message(payload)) = reader.next().await else {
        panic!("no message");
    };
    let msg = wire::decode(&payload).expect("decode");
    assert_eq!(msg.data.len(), wire::MAX_DATA);
    let Ok(Incoming::Message(next)) = reader.next().await else {
        panic!("no second message");
    };
    assert_eq!(hex(&next), "ac 02 04");
}

fn scan(pieces: &[&[u8]]) -> Result<Vec<Vec<u8>>, LineTooLong> {
    let mut scanner = LineScanner::default();
    let mut lines = Vec::new();
    for piece in pieces {
        scanner.push(piece, &mut lines)?;
    }
    lines.extend(scanner.finish());
    Ok(lines)
}

#[test]
fn metrics_lines_follow_bufio_scanner() {
    let lines = |v: &[&str]| v.iter().map(|s| s.as_bytes().to_vec()).collect::<Vec<_>>();
    // CRLF becomes LF (the edge appends `\n` to each line it sends).
    assert_eq!(scan(&[b"a 1\r\nb 2\n"]), Ok(lines(&["a 1", "b 2"])));
    // A last line without newline still counts; an empty rest does not.
    assert_eq!(scan(&[b"a\nlast"]), Ok(lines(&["a", "last"])));
    assert_eq!(scan(&[b"a\n"]), Ok(lines(&["a"])));
    assert_eq!(scan(&[b""]), Ok(lines(&[])));
    // Empty lines are lines.
    assert_eq!(scan(&[b"\n\n"]), Ok(lines(&["", ""])));
    // Lines split across reads, and a CR alone in the middle stays.
    assert_eq!(
        scan(&[b"fir", b"st\r", b"\nsec\rond", b"\n"]),
        Ok(lines(&["first", "sec\rond"]))
    );
}

#[test]
fn metrics_line_limit_is_the_64k_scanner_buffer() {
    let max = MAX_LINE_BUFFER - 1;
    let mut ok = vec![b'a'; max];
    ok.push(b'\n');
    assert_eq!(scan(&[&ok]).map(|l| l[0].len()), Ok(max));
    // Fed in small pieces, the same.
    let pieces: Vec<&[u8]> = ok.chunks(1000).collect();
    assert_eq!(scan(&pieces).map(|l| l[0].len()), Ok(max));
    // One byte more (a CR counts too) and the stream ends, even if lines
    // came before it.
    let mut long = b"first\n".to_vec();
    long.extend(vec![b'a'; max]);
    long.extend(b"\r\nnext\n");
    let mut scanner = LineScanner::default();
    let mut lines = Vec::new();
    assert_eq!(scanner.push(&long, &mut lines), Err(LineTooLong));
    assert_eq!(
        lines,
        vec![b"first".to_vec()],
        "lines before it still go out"
    );
    // An unterminated last line has the same limit.
    assert_eq!(scan(&[&vec![b'b'; max]]).map(|l| l.len()), Ok(1));
    assert_eq!(scan(&[&vec![b'b'; max + 1]]), Err(LineTooLong));
}

fn exec_record(method: &str, headers: &str) -> ConnectRecord {
    let json = format!(
        r#"{{"MessID":7,"url":{{"Scheme":"http","Host":"127.0.0.1:10350","Path":"/exec/default/web-0/nginx","RawQuery":"command=sh\u0026input=1\u0026tty=1"}},"header":{headers},"method":"{method}"}}"#
    );
    ConnectRecord::parse(7, MessageType::ExecConnect, json.as_bytes()).expect("json")
}

#[test]
fn exec_request_head_is_what_go_request_write_sends() {
    let record = exec_record(
        "POST",
        r#"{"X-Stream-Protocol-Version":["v4.channel.k8s.io","v3.channel.k8s.io"],"Upgrade":["SPDY/3.1"],"Connection":["Upgrade"],"Content-Length":["5"],"Host":["elsewhere"],"Transfer-Encoding":["chunked"]}"#,
    );
    let head = String::from_utf8(record.request_head("POST")).expect("utf8");
    assert_eq!(
        head,
        "POST /exec/default/web-0/nginx?command=sh&input=1&tty=1 HTTP/1.1\r\n\
         Host: 127.0.0.1:10350\r\n\
         User-Agent: Go-http-client/1.1\r\n\
         Content-Length: 0\r\n\
         Connection: Upgrade\r\n\
         Upgrade: SPDY/3.1\r\n\
         X-Stream-Protocol-Version: v4.channel.k8s.io\r\n\
         X-Stream-Protocol-Version: v3.channel.k8s.io\r\n\r\n"
    );
    // GET declares no length; a User-Agent from the cloud replaces Go's.
    let record = exec_record(
        "GET",
        r#"{"User-Agent":["kubectl/v1.33"],"Upgrade":["websocket"]}"#,
    );
    let head = String::from_utf8(record.request_head("GET")).expect("utf8");
    assert_eq!(
        head,
        "GET /exec/default/web-0/nginx?command=sh&input=1&tty=1 HTTP/1.1\r\n\
         Host: 127.0.0.1:10350\r\n\
         User-Agent: kubectl/v1.33\r\n\
         Upgrade: websocket\r\n\r\n"
    );
}

#[test]
fn connect_json_is_decoded_like_go() {
    // Keys match case-insensitively, unknown keys are ignored, escapes in
    // the path come from RawPath only when it encodes Path.
    let json = br#"{"messid":9,"URL":{"scheme":"http","host":"127.0.0.1:10350","path":"/a b","RawPath":"/a%20b","Extra":1},"Header":null,"Method":"GET","x":[]}"#;
    let record = ConnectRecord::parse(9, MessageType::AttachConnect, json).expect("json");
    assert_eq!((record.mess_id, record.method.as_str()), (9, "GET"));
    assert_eq!(record.request_uri(), "/a%20b");
    assert!(record.headers.is_empty());
    let json =
        br#"{"MessID":9,"url":{"Scheme":"http","Host":"h","Path":"/x y(1)","RawPath":"/other"}}"#;
    let record = ConnectRecord::parse(9, MessageType::LogsConnect, json).expect("json");
    assert_eq!(record.request_uri(), "/x%20y%281%29");
    assert!(ConnectRecord::parse(9, MessageType::LogsConnect, b"{").is_err());
    assert!(ConnectRecord::parse(9, MessageType::LogsConnect, br#"{"MessID":"9"}"#).is_err());
}

fn spec() -> KubeEdgeSpec {
    // Only the fields the upgrade request uses matter here.
    let ca = KubeEdgeCa::generate().expect("ca");
    let cert = ca.issue_edge("edge-1", &[]).expect("cert");
    let tls = edge_client_tls(&cert, CloudTrust::SkipVerify).expect("tls");
    let mut spec = KubeEdgeSpec::new(
        "edge-1",
        "127.0.0.1:10004".parse().expect("addr"),
        tls,
        "127.0.0.1:1".parse().expect("addr"),
    );
    spec.internal_ip = "192.0.2.7".into();
    spec
}

#[test]
fn upgrade_request_is_gorillas() {
    let request =
        String::from_utf8(upgrade_request(&spec(), "dGhlIHNhbXBsZSBub25jZQ==")).expect("utf8");
    assert_eq!(
        request,
        "GET /v1/kubeedge/connect HTTP/1.1\r\n\
         Host: 127.0.0.1:10004\r\n\
         User-Agent: Go-http-client/1.1\r\n\
         Connection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
         Sec-WebSocket-Version: 13\r\n\
         Sessionhostnameoverride: edge-1\r\n\
         Sessioninternalip: 192.0.2.7\r\n\
         Upgrade: websocket\r\n\r\n"
    );
}

#[test]
fn upgrade_response_checks() {
    let key = "dGhlIHNhbXBsZSBub25jZQ==";
    let good = "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n";
    assert_eq!(check_upgrade_response(good.as_bytes(), key), Ok(()));
    let refused = "HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n";
    assert_eq!(
        check_upgrade_response(refused.as_bytes(), key),
        Err(SessionEnd::Refused(403))
    );
    let wrong_key = good.replace("s3pPLMBiTxaQ9kYGzzhZRbK+xOo=", "AAAA");
    assert!(matches!(
        check_upgrade_response(wrong_key.as_bytes(), key),
        Err(SessionEnd::DialFailed(_))
    ));
    let subprotocol = good.replace("\r\n\r\n", "\r\nSec-WebSocket-Protocol: tether.v1\r\n\r\n");
    assert!(matches!(
        check_upgrade_response(subprotocol.as_bytes(), key),
        Err(SessionEnd::DialFailed(_))
    ));
}

#[test]
fn kubeedge_certificates_have_the_edge_subjects() {
    let ca = KubeEdgeCa::generate().expect("ca");
    let edge = ca.issue_edge("edge-7", &[]).expect("edge");
    let der = edge.cert_chain().expect("der").remove(0);
    let (_, cert) = x509_parser::parse_x509_certificate(&der).expect("parse");
    let subject = cert.subject().to_string();
    assert!(subject.contains("CN=system:node:edge-7"), "{subject}");
    assert!(subject.contains("O=system:nodes"), "{subject}");
    assert!(cert.subject_alternative_name().expect("san").is_none());
    let identity = tether_pki::Identity::from_der(&der).expect("identity");
    assert_eq!(identity.require_node().expect("node"), "edge-7");

    let with_ip = ca
        .issue_edge("edge-7", &["10.0.0.7".parse().expect("ip")])
        .expect("edge");
    let der = with_ip.cert_chain().expect("der").remove(0);
    let (_, cert) = x509_parser::parse_x509_certificate(&der).expect("parse");
    assert!(cert.subject_alternative_name().expect("san").is_some());

    let legacy = ca.issue_legacy().expect("legacy");
    let der = legacy.cert_chain().expect("der").remove(0);
    let (_, cert) = x509_parser::parse_x509_certificate(&der).expect("parse");
    assert_eq!(cert.subject().to_string(), "O=KubeEdge, CN=kubeedge.io");
    assert!(
        tether_pki::Identity::from_der(&der)
            .expect("identity")
            .require_node()
            .is_err()
    );
}
