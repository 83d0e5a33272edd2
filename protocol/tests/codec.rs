//! Codec properties: every message round-trips; random bytes never panic.

use imago_protocol::codec::{self, CodecError};
use imago_protocol::messages::*;
use imago_protocol::{Decision, Duty, Epoch, NodeName, Position, UpgradeId};
use proptest::prelude::*;

fn node_request() -> impl Strategy<Value = NodeRequest> {
    let name = "[a-z]{1,8}-[0-9]{1,3}".prop_map(NodeName);
    prop_oneof![
        (name.clone(), any::<bool>()).prop_map(|(node, deployed)| NodeRequest::Register {
            node,
            duties: vec![Duty::Route, Duty::Validate],
            deployed,
            upgrade: UpgradeId(u64::from(deployed) + 1)
        }),
        (name.clone(), any::<u64>(), any::<u64>(), any::<bool>(), any::<u64>(), any::<u64>()).prop_map(
            |(node, c, a, bulk_done, samples, mismatches)| NodeRequest::Report {
                node,
                report: NodeReport {
                    captured: Position(c),
                    applied: Position(a),
                    bulk_done,
                    samples,
                    mismatches,
                    copied_rows: samples ^ c,
                    copy_rows_total: mismatches ^ a,
                    pace: Pace {
                        lag_ms: c.rotate_left(7),
                        changes_per_s: a.rotate_left(3),
                        copy_rows_per_s: samples.rotate_left(5),
                        copy_eta_ms: bulk_done.then_some(mismatches),
                    },
                    ranges: RangeCheck {
                        by_range: !bulk_done,
                        ranges: c.rotate_left(11),
                        attempted: a.rotate_left(13),
                        clean: samples.rotate_left(17),
                        differed: mismatches.rotate_left(19),
                        rows: c ^ samples,
                        tables: vec![TableRows { table: format!("t{a}"), expected: c, actual: samples }],
                    },
                },
                upgrade: UpgradeId(c ^ a)
            }
        ),
        (name.clone(), any::<u64>(), any::<u64>(), any::<bool>()).prop_map(|(node, e, p, m)| NodeRequest::Ack {
            node,
            epoch: Epoch(e),
            ack: Ack::Drained { final_position: Position(p), checksum_match: m }
        }),
        (name, any::<u64>(), any::<bool>(), any::<u32>()).prop_map(|(node, known_version, linearizable, wait_ms)| {
            NodeRequest::Watch { node, known_version, known_digest: known_version ^ 7, linearizable, wait_ms }
        }),
    ]
}

fn view() -> impl Strategy<Value = DecisionView> {
    (any::<u64>(), any::<u64>(), 0u8..4, any::<[bool; 6]>()).prop_map(|(version, e, d, flags)| DecisionView {
        version,
        upgrade: Some(UpgradeId(e / 2)),
        phase: Some(Phase::Freezing),
        decision: match d {
            0 => Decision::Initial,
            1 => Decision::Freeze(Epoch(e)),
            2 => Decision::Commit(Epoch(e)),
            _ => Decision::Abort(Epoch(e)),
        },
        generation: imago_protocol::Generation(version % 7 + 1),
        upgrade_from: (e % 3 != 0).then_some(imago_protocol::Generation(e % 5 + 1)),
        known: flags[0],
        registered: flags[1],
        all_routers_frozen: flags[2],
        acked_frozen: flags[3],
        acked_drained: flags[4],
        acked_switched: flags[5],
        roster: RosterStatus::Active,
        routers: Vec::new(),
        universes: (e % 2 == 0)
            .then(|| (imago_protocol::Generation(e % 5 + 2), vec![format!("http://10.0.0.{}:80", e % 250)]))
            .into_iter()
            .collect(),
        rules: None,
        recovering: false,
        disk_recorded: false,
    })
}

proptest! {
    #[test]
    fn requests_round_trip(request in node_request()) {
        let wrapped = Request::Node(request);
        let frame = codec::encode_frame(&wrapped).unwrap();
        let (back, used): (Request, usize) = codec::decode_frame(&frame).unwrap().unwrap();
        prop_assert_eq!(used, frame.len());
        prop_assert_eq!(back, wrapped);
    }

    #[test]
    fn views_round_trip(view in view()) {
        let wrapped = Response::Node(NodeResponse::View(view));
        let bytes = codec::encode(&wrapped).unwrap();
        prop_assert_eq!(codec::decode::<Response>(&bytes).unwrap(), wrapped);
    }

    #[test]
    fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = codec::decode::<Request>(&bytes);
        let _ = codec::decode::<Response>(&bytes);
        let _ = codec::decode_frame::<Request>(&bytes);
    }

    #[test]
    fn valid_header_with_random_payload_never_panics(payload in proptest::collection::vec(any::<u8>(), 0..256)) {
        let mut frame = codec::MAGIC.to_vec();
        frame.extend_from_slice(&codec::PROTOCOL_VERSION.to_be_bytes());
        frame.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        frame.extend_from_slice(&payload);
        let _ = codec::decode_frame::<Request>(&frame);
    }

    #[test]
    fn truncated_frames_ask_for_more(request in node_request(), cut in 0usize..10_000) {
        let frame = codec::encode_frame(&Request::Node(request)).unwrap();
        let cut = cut % frame.len();
        prop_assert!(codec::decode_frame::<Request>(&frame[..cut]).unwrap().is_none());
    }
}

#[test]
fn bad_magic_version_and_size_are_errors() {
    let frame = codec::encode_frame(&Request::Cli(CliRequest::Status)).unwrap();
    let mut bad = frame.clone();
    bad[0] = b'X';
    assert!(matches!(codec::decode_frame::<Request>(&bad), Err(CodecError::BadMagic(_))));
    let mut bad = frame.clone();
    bad[5] = 99;
    assert!(matches!(codec::decode_frame::<Request>(&bad), Err(CodecError::UnsupportedVersion(_))));
    let mut bad = frame.clone();
    bad[6..10].copy_from_slice(&u32::MAX.to_be_bytes());
    assert!(matches!(codec::decode_frame::<Request>(&bad), Err(CodecError::TooLarge(_))));
    let mut trailing = codec::encode(&Request::Cli(CliRequest::Status)).unwrap();
    trailing.push(0);
    assert!(matches!(codec::decode::<Request>(&trailing), Err(CodecError::Trailing(1))));
}
