use super::headers::decode_header_block;
use super::*;
use flate2::{Compress, Compression};

fn hdrs(pairs: &[(&str, &str)]) -> Headers {
    pairs
        .iter()
        .map(|(n, v)| ((*n).to_owned(), (*v).to_owned()))
        .collect()
}

fn every_kind() -> Vec<Frame> {
    vec![
        Frame::SynStream {
            stream_id: 1,
            associated_id: 0,
            priority: 3,
            flags: 0,
            headers: hdrs(&[("streamtype", "error")]),
        },
        Frame::SynStream {
            stream_id: 3,
            associated_id: 0,
            priority: 0,
            flags: FLAG_FIN,
            headers: hdrs(&[("streamtype", "stdin"), ("multi", "a\0b")]),
        },
        Frame::SynReply {
            stream_id: 1,
            flags: 0,
            headers: Headers::new(),
        },
        Frame::Headers {
            stream_id: 3,
            flags: FLAG_FIN,
            headers: hdrs(&[("x", "y")]),
        },
        Frame::RstStream {
            stream_id: 5,
            status: RST_REFUSED_STREAM,
        },
        Frame::Settings {
            flags: 1,
            entries: vec![(0, 7, INITIAL_WINDOW), (1, 4, 100)],
        },
        Frame::Ping { id: 7 },
        Frame::GoAway {
            last_good_stream_id: 7,
            status: GOAWAY_PROTOCOL_ERROR,
        },
        Frame::WindowUpdate {
            stream_id: 0,
            delta: 32 * 1024,
        },
        Frame::Data {
            stream_id: 3,
            flags: 0,
            data: Bytes::from_static(b"hello"),
        },
        Frame::Data {
            stream_id: 3,
            flags: FLAG_FIN,
            data: Bytes::new(),
        },
    ]
}

fn encode_all(frames: &[Frame]) -> Vec<u8> {
    let mut enc = Encoder::new().unwrap();
    let mut out = Vec::new();
    for f in frames {
        enc.encode(f, &mut out).unwrap();
    }
    out
}

#[test]
fn dictionary_is_the_drafts() {
    // Length and Adler-32 of the dictionary in draft 3.1, section 2.6.10.1 (the
    // checksum is what a zlib stream primed with it carries in its header).
    assert_eq!(DICTIONARY.len(), 1423);
    let mut z = Compress::new(Compression::default(), true);
    assert_eq!(z.set_dictionary(&DICTIONARY).unwrap(), 0xe3c6_a7c2);
    assert!(DICTIONARY.starts_with(b"\0\0\0\x07options\0\0\0\x04head"));
    assert!(DICTIONARY.ends_with(b"utf-,*,enq=0."));
}

#[test]
fn every_frame_kind_round_trips_whole_and_split() {
    let frames = every_kind();
    let wire = encode_all(&frames);
    let mut dec = Decoder::default();
    let mut buf = BytesMut::from(&wire[..]);
    let mut got = Vec::new();
    while let Some(f) = dec.decode(&mut buf).unwrap() {
        got.push(f);
    }
    assert!(buf.is_empty());
    assert_eq!(got, frames);

    // The same bytes one at a time: nothing decodes early, nothing is lost.
    let mut dec = Decoder::default();
    let mut buf = BytesMut::new();
    let mut got = Vec::new();
    for b in &wire {
        buf.put_u8(*b);
        while let Some(f) = dec.decode(&mut buf).unwrap() {
            got.push(f);
        }
    }
    assert_eq!(got, frames);
}

#[test]
fn header_context_carries_across_blocks() {
    // The second identical block compresses to far fewer bytes: one zlib context per
    // direction, as the draft requires; a fresh decoder cannot read it alone.
    let frame = |id| Frame::SynStream {
        stream_id: id,
        associated_id: 0,
        priority: 0,
        flags: 0,
        headers: hdrs(&[("streamtype", "stdout"), ("x-long", &"v".repeat(200))]),
    };
    let mut enc = Encoder::new().unwrap();
    let (mut a, mut b) = (Vec::new(), Vec::new());
    enc.encode(&frame(1), &mut a).unwrap();
    enc.encode(&frame(3), &mut b).unwrap();
    assert!(b.len() < a.len(), "{} !< {}", b.len(), a.len());
    let mut dec = Decoder::default();
    assert_eq!(
        dec.decode(&mut BytesMut::from(&a[..])).unwrap(),
        Some(frame(1))
    );
    assert_eq!(
        dec.decode(&mut BytesMut::from(&b[..])).unwrap(),
        Some(frame(3))
    );
    assert!(
        Decoder::default()
            .decode(&mut BytesMut::from(&b[..]))
            .is_err()
    );
}

#[test]
fn oversized_lengths_fail_before_the_payload_arrives() {
    let mut dec = Decoder::default();
    let mut data = BytesMut::from(&[0, 0, 0, 1, 0, 0x10, 0, 1][..]);
    assert!(matches!(
        dec.decode(&mut data),
        Err(SpdyError::FrameTooLarge { len, limit: MAX_DATA_LEN }) if len == MAX_DATA_LEN + 1
    ));
    let mut control = BytesMut::from(&[0x80, 3, 0, 1, 0, 0xff, 0xff, 0xff][..]);
    assert!(matches!(
        dec.decode(&mut control),
        Err(SpdyError::FrameTooLarge { .. })
    ));
}

#[test]
fn malformed_control_frames_are_errors_not_panics() {
    let cases: &[&[u8]] = &[
        // version 2
        &[0x80, 2, 0, 6, 0, 0, 0, 4, 0, 0, 0, 1],
        // PING of 3 bytes
        &[0x80, 3, 0, 6, 0, 0, 0, 3, 0, 0, 1],
        // SYN_STREAM shorter than its fixed part
        &[0x80, 3, 0, 1, 0, 0, 0, 4, 0, 0, 0, 1],
        // SYN_STREAM on stream 0 with an empty block
        &[0x80, 3, 0, 1, 0, 0, 0, 10, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        // SYN_STREAM whose header block is not zlib
        &[
            0x80, 3, 0, 1, 0, 0, 0, 14, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 1, 2, 3, 4,
        ],
        // SETTINGS whose count disagrees with its length
        &[
            0x80, 3, 0, 4, 0, 0, 0, 12, 0, 0, 0, 2, 0, 0, 0, 1, 0, 0, 0, 1,
        ],
        // WINDOW_UPDATE of 0
        &[0x80, 3, 0, 9, 0, 0, 0, 8, 0, 0, 0, 1, 0, 0, 0, 0],
        // data on stream 0
        &[0, 0, 0, 0, 0, 0, 0, 1, 9],
    ];
    for case in cases {
        let mut dec = Decoder::default();
        assert!(
            dec.decode(&mut BytesMut::from(*case)).is_err(),
            "accepted {case:?}"
        );
    }
    // An unknown control type is skipped, as the draft says.
    let mut dec = Decoder::default();
    let mut buf = BytesMut::from(&[0x80, 3, 0, 42, 0, 0, 0, 2, 1, 2][..]);
    assert_eq!(
        dec.decode(&mut buf).unwrap(),
        Some(Frame::Unknown { kind: 42 })
    );
}

#[test]
fn malformed_header_blocks_are_errors() {
    let block = |plain: &[u8]| decode_header_block(plain);
    assert!(block(&[0, 0]).is_err());
    assert!(block(&[0xff, 0xff, 0xff, 0xff]).is_err());
    assert!(block(&[0, 0, 0, 1, 0, 0, 0, 9, b'a']).is_err());
    assert!(block(&[0, 0, 0, 1, 0, 0, 0, 1, b'A', 0, 0, 0, 0]).is_err());
    assert!(block(&[0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0]).is_err());
    let dup = [
        0, 0, 0, 2, 0, 0, 0, 1, b'a', 0, 0, 0, 0, 0, 0, 0, 1, b'a', 0, 0, 0, 0,
    ];
    assert!(block(&dup).is_err());
    assert!(block(&[0, 0, 0, 0, 7]).is_err());
    assert_eq!(block(&[0, 0, 0, 0]).unwrap(), Headers::new());

    // A block that inflates past the limit stops at the limit.
    let big = hdrs(&[("a", &"x".repeat(MAX_HEADER_BLOCK))]);
    assert!(
        HeaderDeflater::new()
            .unwrap()
            .deflate(&big, &mut Vec::new())
            .is_err()
    );
}

#[tokio::test]
async fn reader_reports_truncation_and_clean_end() {
    let wire = encode_all(&every_kind()[..3]);
    let mut reader = FrameReader::new(&wire[..wire.len() - 1]);
    assert!(reader.read_frame().await.unwrap().is_some());
    assert!(reader.read_frame().await.unwrap().is_some());
    assert!(matches!(
        reader.read_frame().await,
        Err(SpdyError::Truncated { .. })
    ));
    let mut reader = FrameReader::new(&wire[..]);
    for _ in 0..3 {
        assert!(reader.read_frame().await.unwrap().is_some());
    }
    assert!(reader.read_frame().await.unwrap().is_none());
}

#[test]
fn window_credit_announces_after_half_a_window() {
    let mut credit = WindowCredit::default();
    assert_eq!(credit.consume(16 * 1024), None);
    assert_eq!(credit.consume(16 * 1024), Some(32 * 1024));
    assert_eq!(credit.consume(1), None);
}

#[test]
fn a_block_that_inflates_past_the_limit_is_refused() {
    // 1 MiB of zeros compresses to about a kilobyte: a small frame, a big block.
    let plain = vec![0u8; 1 << 20];
    let mut z = Compress::new(Compression::default(), true);
    z.set_dictionary(&DICTIONARY).unwrap();
    let mut block = Vec::with_capacity(64 * 1024);
    z.compress_vec(&plain, &mut block, flate2::FlushCompress::Sync)
        .unwrap();
    assert!(z.total_in() as usize == plain.len() && block.len() < MAX_CONTROL_LEN);
    assert!(matches!(
        HeaderInflater::default().inflate(&block),
        Err(SpdyError::HeaderBlock(_))
    ));
}
