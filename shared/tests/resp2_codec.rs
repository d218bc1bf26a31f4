//! Every command fleet sends and every reply it reads goes through fred's RESP2 codec:
//! `extend_encode` and `decode_range` of the patched `redis-protocol` in `vendor/` (written by
//! hand instead of with `cookie-factory` and `nom`; vendor/README.md). These tests hold them to
//! what the crate's own encoder and parser answer.

use bytes::{Bytes, BytesMut};
use proptest::prelude::*;
use redis_protocol::resp2::decode::{decode_range, decode_range_nom};
use redis_protocol::resp2::encode::{encode_bytes, extend_encode};
use redis_protocol::resp2::types::{BytesFrame, Resp2Frame};

/// What the crate's reference encoder writes for `frame`.
fn reference(frame: &BytesFrame, int_as_bulkstring: bool) -> Vec<u8> {
    let mut buf = vec![0; frame.encode_len(int_as_bulkstring)];
    let len = encode_bytes(&mut buf, frame, int_as_bulkstring).expect("the buffer fits");
    buf.truncate(len);
    buf
}

fn leaf() -> impl Strategy<Value = BytesFrame> {
    prop_oneof![
        Just(BytesFrame::Null),
        prop::collection::vec(any::<u8>(), 0..40).prop_map(|b| BytesFrame::BulkString(b.into())),
        // Lengths across digit boundaries (9/10, 99/100, ...).
        (0usize..1_200).prop_map(|n| BytesFrame::BulkString(vec![b'x'; n].into())),
        "[a-zA-Z ]{0,12}".prop_map(|s| BytesFrame::SimpleString(Bytes::from(s))),
        "ERR [a-z ]{0,20}".prop_map(|s| BytesFrame::Error(s.as_str().into())),
        any::<i64>().prop_map(BytesFrame::Integer),
        (-1_000i64..1_000).prop_map(BytesFrame::Integer),
    ]
}

fn frame() -> impl Strategy<Value = BytesFrame> {
    leaf().prop_recursive(3, 300, 120, |inner| {
        prop::collection::vec(inner, 0..120).prop_map(BytesFrame::Array)
    })
}

proptest! {
    #[test]
    fn the_patched_encoder_writes_what_the_reference_encoder_writes(
        frame in frame(),
        int_as_bulkstring in any::<bool>(),
        before in prop::collection::vec(any::<u8>(), 0..16),
    ) {
        let mut buf = BytesMut::from(&before[..]);
        let end = extend_encode(&mut buf, &frame, int_as_bulkstring).expect("encodes");
        // It appends after what the buffer held and returns where the frame ends.
        prop_assert_eq!(&buf[..before.len()], &before[..]);
        prop_assert_eq!(&buf[before.len()..], &reference(&frame, int_as_bulkstring)[..]);
        prop_assert_eq!(end, buf.len());
        prop_assert_eq!(end - before.len(), frame.encode_len(int_as_bulkstring));
    }
}

#[test]
fn a_command_is_an_array_of_bulk_strings_and_integers_become_bulk_strings() {
    let xadd = BytesFrame::Array(vec![
        BytesFrame::BulkString("XADD".into()),
        BytesFrame::BulkString("fleet:tasks".into()),
        BytesFrame::BulkString("*".into()),
        BytesFrame::Integer(-1_763_800_000_000),
        BytesFrame::BulkString(Bytes::new()),
    ]);
    let mut buf = BytesMut::new();
    extend_encode(&mut buf, &xadd, true).expect("encodes");
    assert_eq!(
        &buf[..],
        &b"*5\r\n$4\r\nXADD\r\n$11\r\nfleet:tasks\r\n$1\r\n*\r\n$14\r\n-1763800000000\r\n$0\r\n\r\n"[..]
    );
}

/// The parser and the reference answer the same for `buf`: the same frame and length, both
/// "incomplete", or both an error.
fn same_answer(buf: &[u8]) -> Result<(), TestCaseError> {
    match (decode_range(buf), decode_range_nom(buf)) {
        (Ok(new), Ok(reference)) => {
            prop_assert_eq!(new, reference, "{:?}", Bytes::copy_from_slice(buf))
        }
        (Err(_), Err(_)) => {}
        (new, reference) => prop_assert!(
            false,
            "{:?}: {:?} but the reference answers {:?}",
            Bytes::copy_from_slice(buf),
            new.map(|f| f.map(|(_, n)| n)),
            reference.map(|f| f.map(|(_, n)| n))
        ),
    }
    Ok(())
}

fn encoded(frame: &BytesFrame) -> Vec<u8> {
    let mut buf = BytesMut::new();
    extend_encode(&mut buf, frame, false).expect("encodes");
    buf.to_vec()
}

proptest! {
    // Every prefix of a frame is parsed twice: fewer cases than the default 256.
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn the_parser_reads_every_frame_and_every_prefix_of_it_as_the_reference_does(
        frame in frame(),
        after in prop::collection::vec(any::<u8>(), 0..8),
    ) {
        let mut buf = encoded(&frame);
        let len = buf.len();
        buf.extend_from_slice(&after);
        let (_, amt) = decode_range(&buf).expect("decodes").expect("complete");
        prop_assert_eq!(amt, len);
        for end in 0..buf.len() {
            same_answer(&buf[..end])?;
        }
        same_answer(&buf)?;
    }

    #[test]
    fn the_parser_rejects_or_waits_on_damaged_input_as_the_reference_does(
        frame in frame(),
        damage in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4),
    ) {
        let mut buf = encoded(&frame);
        for (at, byte) in damage {
            let at = at.index(buf.len());
            buf[at] = byte;
        }
        same_answer(&buf)?;
    }

    #[test]
    fn the_parser_answers_arbitrary_bytes_as_the_reference_does(
        buf in prop::collection::vec(
            prop_oneof![
                Just(b'\r'), Just(b'\n'), Just(b'$'), Just(b'*'), Just(b':'), Just(b'+'),
                Just(b'-'), b'0'..=b'9', any::<u8>()
            ],
            0..40,
        ),
    ) {
        same_answer(&buf)?;
    }
}

#[test]
fn lengths_and_integers_at_their_limits_decode_as_the_reference_does() {
    for input in [
        &b"$-1\r\n"[..],
        b"*-1\r\n",
        b"$-2\r\n",
        b"*0\r\n",
        b"$0\r\n\r\n",
        b":+5\r\n",
        b":-0\r\n",
        b":\r\n",
        b":9223372036854775807\r\n",
        b":9223372036854775808\r\n",
        b":-9223372036854775808\r\n",
        b"$9223372036854775807\r\nab",
        b"$18446744073709551615\r\n",
        b"*2\r\n:1\r\n",
        b"*2\r\n:x\r\n",
        b"+OK\r",
        b"?\r\n",
        b"$3\r\nabcXY",
    ] {
        same_answer(input).unwrap_or_else(|e| panic!("{e}"));
    }
}
