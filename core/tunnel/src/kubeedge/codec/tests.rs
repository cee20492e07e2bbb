use super::*;

/// A masked client frame, as an edge sends it.
fn client_frame(fin: bool, op: u8, payload: &[u8], mask: [u8; 4]) -> Vec<u8> {
    let mut out = vec![if fin { 0x80 } else { 0 } | op];
    match payload.len() {
        n if n < 126 => out.push(0x80 | n as u8),
        n if n <= 0xffff => {
            out.push(0x80 | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(0x80 | 127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    out.extend_from_slice(&mask);
    out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i & 3]));
    out
}

#[test]
fn uvarint_examples_from_the_spec() {
    for (v, wire) in [
        (0u64, &[0x00][..]),
        (7, &[0x07]),
        (127, &[0x7f]),
        (128, &[0x80, 0x01]),
        (300, &[0xac, 0x02]),
        (16384, &[0x80, 0x80, 0x01]),
    ] {
        let mut out = BytesMut::new();
        put_uvarint(&mut out, v);
        assert_eq!(&out[..], wire, "encode {v}");
        assert_eq!(uvarint(wire).unwrap(), (v, wire.len()), "decode {v}");
    }
    let mut out = BytesMut::new();
    put_uvarint(&mut out, u64::MAX);
    assert_eq!(out.len(), 10);
    assert_eq!(uvarint(&out).unwrap(), (u64::MAX, 10));
}

#[test]
fn uvarint_overflow_and_truncation_are_errors() {
    // 10th byte above 1 overflows 64 bits.
    let mut b = vec![0xff; 9];
    b.push(0x02);
    assert!(matches!(uvarint(&b), Err(CodecError::VarintOverflow)));
    // 11 bytes.
    assert!(matches!(
        uvarint(&[0x80; 11]),
        Err(CodecError::VarintOverflow)
    ));
    assert!(matches!(
        uvarint(&[0x80, 0x80]),
        Err(CodecError::VarintTruncated)
    ));
    assert!(matches!(uvarint(&[]), Err(CodecError::VarintTruncated)));
    assert!(matches!(
        TunnelMessage::decode(Bytes::from_static(&[0xac, 0x02])),
        Err(CodecError::VarintTruncated)
    ));
}

#[test]
fn messages_from_the_spec() {
    assert_eq!(
        &encode_message(300, MessageType::Data, b"hello\n")[..],
        &[0xac, 0x02, 0x03, 0x68, 0x65, 0x6c, 0x6c, 0x6f, 0x0a]
    );
    assert_eq!(
        &encode_message(300, MessageType::RemoveConnect, b"")[..],
        &[0xac, 0x02, 0x04]
    );
    let close = encode_message(0, MessageType::CloseConnect, b"node not admitted");
    assert_eq!(close.len(), 19);
    assert_eq!(&close[..2], &[0x00, 0x05]);
    let mut frame = BytesMut::new();
    encode_frame(&mut frame, opcode::TEXT, &close);
    assert_eq!(&frame[..2], &[0x81, 0x13]);
    let mut frame = BytesMut::new();
    encode_frame(
        &mut frame,
        opcode::TEXT,
        &encode_message(300, MessageType::RemoveConnect, b""),
    );
    assert_eq!(&frame[..], &[0x81, 0x03, 0xac, 0x02, 0x04]);
    let mut frame = BytesMut::new();
    encode_frame(&mut frame, opcode::TEXT, &[0u8; 195]);
    assert_eq!(&frame[..4], &[0x81, 0x7e, 0x00, 0xc3]);
    let mut frame = BytesMut::new();
    encode_frame(&mut frame, opcode::TEXT, &[0u8; 70_000]);
    assert_eq!(&frame[..2], &[0x81, 0x7f]);
    assert_eq!(frame.len(), 70_010);

    let m = TunnelMessage::decode(Bytes::from_static(&[
        0xac, 0x02, 0x03, 0x68, 0x65, 0x6c, 0x6c, 0x6f, 0x0a,
    ]))
    .unwrap();
    assert_eq!((m.id, m.kind, &m.data[..]), (300, 3, &b"hello\n"[..]));
    // An unknown type decodes; the session decides what to do with it.
    let m = TunnelMessage::decode(Bytes::from_static(&[0x01, 0x63])).unwrap();
    assert_eq!((m.id, m.kind, m.data.len()), (1, 0x63, 0));
    assert_eq!(MessageType::from_wire(7), None);
    assert_eq!(MessageType::from_wire(6), Some(MessageType::AttachConnect));
}

#[test]
fn edge_data_frame_from_the_spec_decodes() {
    let msg = [0xac, 0x02, 0x03, 0x68, 0x65, 0x6c, 0x6c, 0x6f, 0x0a];
    let wire = client_frame(true, opcode::TEXT, &msg, [0x12, 0x34, 0x56, 0x78]);
    assert_eq!(&wire[..2], &[0x81, 0x89]);
    let mut r = FrameReader::new(&wire, MAX_MESSAGE);
    assert_eq!(
        r.decode().unwrap(),
        Some(WsEvent::Message(Bytes::copy_from_slice(&msg)))
    );
    assert_eq!(r.decode().unwrap(), None);
}

#[test]
fn fragments_reassemble_around_control_frames_and_any_split() {
    // Invalid UTF-8 in TEXT is fine; a ping arrives between fragments.
    let payload: Vec<u8> = (0..10_000u32).map(|i| (i * 7 + 0xc0) as u8).collect();
    let mut wire = client_frame(false, opcode::TEXT, &payload[..4096], [1, 2, 3, 4]);
    wire.extend(client_frame(true, opcode::PING, b"ping you", [5, 6, 7, 8]));
    wire.extend(client_frame(
        false,
        opcode::CONTINUATION,
        &payload[4096..8192],
        [9, 9, 9, 9],
    ));
    wire.extend(client_frame(
        true,
        opcode::CONTINUATION,
        &payload[8192..],
        [0, 0, 0, 1],
    ));
    wire.extend(client_frame(true, opcode::BINARY, b"b", [3, 3, 3, 3]));
    wire.extend(client_frame(true, opcode::CLOSE, b"", [1, 1, 1, 1]));
    let want = vec![
        WsEvent::Ping(Bytes::from_static(b"ping you")),
        WsEvent::Message(Bytes::from(payload.clone())),
        WsEvent::Message(Bytes::from_static(b"b")),
        WsEvent::Close,
    ];
    // Feed in every chunk size from 1 byte up: same events.
    for step in [1usize, 2, 3, 7, 100, 4099, wire.len()] {
        let mut r = FrameReader::new(&[], MAX_MESSAGE);
        let mut got = Vec::new();
        for chunk in wire.chunks(step) {
            r.buf.extend_from_slice(chunk);
            while let Some(ev) = r.decode().unwrap() {
                got.push(ev);
            }
        }
        assert_eq!(got, want, "step {step}");
    }
}

#[tokio::test]
async fn reader_over_a_socket_sees_eof_and_truncation() {
    let wire = client_frame(true, opcode::TEXT, b"\x01\x03x", [1, 2, 3, 4]);
    let mut r = FrameReader::new(&[], MAX_MESSAGE);
    let mut io = &wire[..];
    assert!(matches!(
        r.next(&mut io).await.unwrap(),
        Some(WsEvent::Message(_))
    ));
    assert_eq!(r.next(&mut io).await.unwrap(), None);
    // EOF inside a frame is an error, not a clean end.
    let mut r = FrameReader::new(&[], MAX_MESSAGE);
    let mut io = &wire[..wire.len() - 1];
    assert!(matches!(r.next(&mut io).await, Err(CodecError::Io(_))));
}

#[test]
fn violations_and_oversize_are_errors() {
    let bad = |wire: Vec<u8>, max: usize| FrameReader::new(&wire, max).decode();
    // Unmasked.
    assert!(matches!(
        bad(vec![0x81, 0x01, b'x'], MAX_MESSAGE),
        Err(CodecError::Protocol(_))
    ));
    // Reserved bits.
    assert!(matches!(
        bad(client_frame(true, 0x40 | opcode::TEXT, b"x", [0; 4]), 99),
        Err(CodecError::Protocol(_))
    ));
    // Reserved opcode.
    assert!(matches!(
        bad(client_frame(true, 0x3, b"x", [0; 4]), 99),
        Err(CodecError::Protocol(_))
    ));
    // Continuation with nothing open, new message inside a fragmented one.
    assert!(matches!(
        bad(client_frame(true, opcode::CONTINUATION, b"x", [0; 4]), 99),
        Err(CodecError::Protocol(_))
    ));
    let mut w = client_frame(false, opcode::TEXT, b"x", [0; 4]);
    w.extend(client_frame(true, opcode::TEXT, b"y", [0; 4]));
    assert!(matches!(bad(w, 99), Err(CodecError::Protocol(_))));
    // Fragmented ping.
    assert!(matches!(
        bad(client_frame(false, opcode::PING, b"x", [0; 4]), 99),
        Err(CodecError::Protocol(_))
    ));
    // Refused from the header alone, before the payload is buffered.
    let mut head = vec![0x81, 0x80 | 127];
    head.extend_from_slice(&(u64::MAX).to_be_bytes());
    assert!(matches!(
        bad(head, MAX_MESSAGE),
        Err(CodecError::Oversized { .. })
    ));
    // Over the bound across fragments.
    let mut w = client_frame(false, opcode::TEXT, &[0; 60], [0; 4]);
    w.extend(client_frame(true, opcode::CONTINUATION, &[0; 60], [0; 4]));
    assert!(matches!(bad(w, 100), Err(CodecError::Oversized { .. })));
    // The tunnel-message bound itself.
    assert!(matches!(
        TunnelMessage::decode(Bytes::from(vec![1u8; MAX_MESSAGE + 1])),
        Err(CodecError::Oversized { .. })
    ));
}
