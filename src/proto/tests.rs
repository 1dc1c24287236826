//! Codec tests: golden bytes per frame, decoding split at every byte
//! boundary, bad input, and proptest round-trips.

use super::codec::{self, DecodeError, Decoder, LEN_PREFIX};
use super::frame::*;
use proptest::prelude::*;

fn enc(frame: &Frame) -> Vec<u8> {
    let mut out = Vec::new();
    codec::encode(frame, MAX_FRAME_LEN, &mut out).unwrap();
    out
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn sample_head() -> RequestHead {
    RequestHead {
        method: "GET".into(),
        path: "/api".into(),
        headers: vec![Header::new("a", vec![0xff])],
        identity: Identity {
            user: "al".into(),
            groups: vec!["g".into()],
            uid: Some("u".into()),
            extra: vec![("k".into(), vec!["v".into()])],
        },
    }
}

/// One frame of every kind with its exact wire bytes. A change here is a
/// wire-format change: bump PROTOCOL_VERSION instead.
fn golden() -> Vec<(Frame, &'static str)> {
    vec![
        (
            Frame::Hello(Hello {
                protocol_version: 1,
                agent_version: "0.1".into(),
                arch: "arm".into(),
                kube_version: "v1".into(),
                node_count: 2,
                capabilities: 0,
                initial_window: 300,
                max_streams: 10,
                max_frame: 1024,
            }),
            "00000014 00 01 03302e31 0361726d 027631 02 00 ac02 0a 8008",
        ),
        (
            Frame::Welcome(Welcome {
                session_id: 7,
                keepalive_ms: 15000,
                initial_window: 65536,
                max_streams: 4096,
                max_frame: 1048576,
            }),
            "0000000c 01 07 9875 808004 8020 808040",
        ),
        (
            Frame::Open { id: StreamId(1), head: sample_head() },
            "0000001f 0201 03474554 042f617069 01 0161 01ff 02616c 010167 010175 01016b 010176",
        ),
        (
            Frame::Head { id: StreamId(2), head: ResponseHead { status: 200, headers: vec![Header::new("x", "y")] } },
            "00000009 0302 c801 01 0178 0179",
        ),
        (Frame::Data { id: StreamId(3), data: b"hi".to_vec() }, "00000005 0403 02 6869"),
        (Frame::Window { id: StreamId(3), increment: 65536 }, "00000005 0503 808004"),
        (Frame::End { id: StreamId(3) }, "00000002 0603"),
        (Frame::Reset { id: StreamId(5), code: ResetCode::Refused, message: "no".into() }, "00000006 0705 01 026e6f"),
        (Frame::Ping { nonce: 300 }, "00000003 08ac02"),
        (Frame::Pong { nonce: 1 }, "00000002 0901"),
        (
            Frame::GoAway { last_id: StreamId(9), code: GoAwayCode::Deregistered, message: "bye".into() },
            "00000007 0a09 00 03627965",
        ),
        (Frame::Deadline { dead_after_ms: 15000 }, "00000003 0b9875"),
        (
            Frame::ReplicaSet(ReplicaSet {
                this: "r1".into(),
                replicas: vec![ReplicaInfo { id: "r1".into(), url: "https://a:1".into() }],
            }),
            "00000014 0c 027231 01 027231 0b68747470733a2f2f613a31",
        ),
    ]
}

#[test]
fn golden_bytes_for_every_frame() {
    for (frame, want) in golden() {
        let want: String = want.chars().filter(|c| !c.is_whitespace()).collect();
        let got = enc(&frame);
        assert_eq!(hex(&got), want, "{frame:?}");
        let (back, used) = codec::decode(&got, MAX_FRAME_LEN).unwrap().unwrap();
        assert_eq!(back, frame);
        assert_eq!(used, got.len());
    }
}

#[test]
fn data_fast_path_matches_postcard() {
    for len in [0usize, 1, 127, 128, 16_383, 16_384, MAX_DATA_CHUNK] {
        let data: Vec<u8> = (0..len).map(|i| i as u8).collect();
        let id = StreamId(300_001);
        let mut fast = Vec::new();
        codec::encode_data(id, &data, MAX_FRAME_LEN, &mut fast).unwrap();
        let mut slow = vec![0; LEN_PREFIX];
        slow.extend(postcard::to_allocvec(&Frame::Data { id, data: data.clone() }).unwrap());
        let n = (slow.len() - LEN_PREFIX) as u32;
        slow[..4].copy_from_slice(&n.to_be_bytes());
        assert_eq!(fast, slow, "len {len}");
    }
}

#[test]
fn split_at_every_byte_boundary_yields_the_same_frames() {
    let frames: Vec<Frame> = golden().into_iter().map(|(f, _)| f).collect();
    let stream: Vec<u8> = frames.iter().flat_map(enc).collect();
    for cut in 0..=stream.len() {
        let mut dec = Decoder::new(MAX_FRAME_LEN);
        let mut got = Vec::new();
        for part in [&stream[..cut], &stream[cut..]] {
            dec.push(part);
            while let Some(f) = dec.next_frame().unwrap() {
                got.push(f);
            }
        }
        assert_eq!(got, frames, "cut at {cut}");
        assert_eq!(dec.buffered(), 0);
    }
    // And byte by byte.
    let mut dec = Decoder::new(MAX_FRAME_LEN);
    let mut got = Vec::new();
    for b in &stream {
        dec.push(std::slice::from_ref(b));
        while let Some(f) = dec.next_frame().unwrap() {
            got.push(f);
        }
    }
    assert_eq!(got, frames);
}

/// The driver's way in: reads straight into the lent buffer, of any size
/// up to the room given, with a frame larger than the buffer's home size
/// among the small ones. Same frames as pushing; the buffer goes back to
/// its home size once the big frame is decoded.
#[test]
fn reads_into_the_lent_buffer_yield_the_same_frames() {
    let big = Frame::Data { id: StreamId(3), data: vec![7; 200 * 1024] };
    let mut frames: Vec<Frame> = golden().into_iter().map(|(f, _)| f).collect();
    frames.insert(2, big);
    let stream: Vec<u8> = frames.iter().flat_map(enc).collect();
    for step in [1, 7, 4096, 16 * 1024 + 256, 64 * 1024] {
        let mut dec = Decoder::new(MAX_FRAME_LEN);
        let (mut got, mut at) = (Vec::new(), 0);
        while at < stream.len() {
            let mut lent = dec.lend();
            assert!(lent.room().len() >= codec::READ_ROOM);
            let n = lent.room().len().min(step).min(stream.len() - at);
            lent.room()[..n].copy_from_slice(&stream[at..at + n]);
            dec.filled(lent, n);
            at += n;
            while let Some(f) = dec.next_frame().unwrap() {
                got.push(f);
            }
            dec.shrink();
        }
        assert_eq!(got, frames, "reads of {step}");
        assert_eq!(dec.buffered(), 0);
        let lent = dec.lend();
        dec.filled(lent, 0);
        assert_eq!(dec.capacity(), codec::READ_HOME, "reads of {step}: back to the home size");
    }
}

#[test]
fn incomplete_input_is_none() {
    let bytes = enc(&Frame::Ping { nonce: 1 });
    for end in 0..bytes.len() {
        assert_eq!(codec::decode(&bytes[..end], MAX_FRAME_LEN), Ok(None));
    }
}

#[test]
fn oversized_length_is_refused_before_the_body_arrives() {
    let four_gib = [0xff, 0xff, 0xff, 0xff];
    assert_eq!(
        codec::decode(&four_gib, MAX_FRAME_LEN),
        Err(DecodeError::TooLarge { len: u32::MAX, max: MAX_FRAME_LEN })
    );
    let just_over = (MAX_FRAME_LEN + 1).to_be_bytes();
    assert!(matches!(codec::decode(&just_over, MAX_FRAME_LEN), Err(DecodeError::TooLarge { .. })));
    // A negotiated smaller maximum is enforced too.
    let mut dec = Decoder::new(1024);
    dec.push(&2000u32.to_be_bytes());
    assert_eq!(dec.next_frame(), Err(DecodeError::TooLarge { len: 2000, max: 1024 }));
    assert!(dec.capacity() < 64, "nothing allocated for the announced body");
}

#[test]
fn garbage_is_a_typed_error() {
    assert_eq!(codec::decode(&[0, 0, 0, 0], MAX_FRAME_LEN), Err(DecodeError::Empty));
    // Unknown variant tag 0x7f.
    assert!(matches!(codec::decode(&[0, 0, 0, 1, 0x7f], MAX_FRAME_LEN), Err(DecodeError::Malformed(_))));
    // Data announcing 5 payload bytes inside a 3-byte body.
    assert!(matches!(codec::decode(&[0, 0, 0, 3, 4, 1, 5], MAX_FRAME_LEN), Err(DecodeError::Malformed(_))));
    // A valid Ping followed by junk inside the same length.
    assert_eq!(codec::decode(&[0, 0, 0, 3, 8, 1, 0], MAX_FRAME_LEN), Err(DecodeError::TrailingBytes(1)));
    // Invalid UTF-8 in a string field (Reset message).
    assert!(matches!(codec::decode(&[0, 0, 0, 5, 7, 1, 0, 1, 0xff], MAX_FRAME_LEN), Err(DecodeError::Malformed(_))));
}

#[test]
fn encode_refuses_frames_over_the_peer_limit() {
    let big = Frame::Data { id: StreamId(1), data: vec![0; 2000] };
    let mut out = vec![1, 2, 3];
    assert!(codec::encode(&big, 1024, &mut out).is_err());
    assert_eq!(out, vec![1, 2, 3], "output untouched on error");
}

fn arb_bytes(max: usize) -> impl Strategy<Value = Vec<u8>> {
    proptest::collection::vec(any::<u8>(), 0..max)
}

fn arb_identity() -> impl Strategy<Value = Identity> {
    (
        ".{0,12}",
        proptest::collection::vec(".{0,8}", 0..4),
        proptest::option::of(".{0,8}"),
        proptest::collection::vec((".{0,6}", proptest::collection::vec(".{0,6}", 0..3)), 0..3),
    )
        .prop_map(|(user, groups, uid, extra)| Identity { user, groups, uid, extra })
}

fn arb_headers() -> impl Strategy<Value = Vec<Header>> {
    proptest::collection::vec((arb_bytes(12), arb_bytes(24)).prop_map(|(n, v)| Header { name: n, value: v }), 0..6)
}

fn arb_frame() -> impl Strategy<Value = Frame> {
    let id = any::<u32>().prop_map(StreamId);
    prop_oneof![
        (
            any::<u16>(),
            ".{0,8}",
            ".{0,8}",
            ".{0,8}",
            any::<u32>(),
            any::<u64>(),
            any::<u32>(),
            any::<u32>(),
            any::<u32>()
        )
            .prop_map(|(v, av, a, k, n, c, w, s, f)| Frame::Hello(Hello {
                protocol_version: v,
                agent_version: av,
                arch: a,
                kube_version: k,
                node_count: n,
                capabilities: c,
                initial_window: w,
                max_streams: s,
                max_frame: f
            })),
        (any::<u64>(), any::<u32>(), any::<u32>(), any::<u32>(), any::<u32>()).prop_map(|(i, k, w, s, f)| {
            Frame::Welcome(Welcome { session_id: i, keepalive_ms: k, initial_window: w, max_streams: s, max_frame: f })
        }),
        (id.clone(), "[A-Z]{0,7}", ".{0,20}", arb_headers(), arb_identity()).prop_map(|(id, m, p, h, i)| Frame::Open {
            id,
            head: RequestHead { method: m, path: p, headers: h, identity: i }
        }),
        (id.clone(), any::<u16>(), arb_headers())
            .prop_map(|(id, s, h)| Frame::Head { id, head: ResponseHead { status: s, headers: h } }),
        (id.clone(), arb_bytes(300)).prop_map(|(id, data)| Frame::Data { id, data }),
        (id.clone(), any::<u32>()).prop_map(|(id, increment)| Frame::Window { id, increment }),
        id.clone().prop_map(|id| Frame::End { id }),
        (id.clone(), 0..6u8, ".{0,16}").prop_map(|(id, c, message)| Frame::Reset {
            id,
            code: [
                ResetCode::Cancel,
                ResetCode::Refused,
                ResetCode::StreamProtocol,
                ResetCode::Forbidden,
                ResetCode::Upstream,
                ResetCode::Internal
            ][c as usize],
            message
        }),
        any::<u64>().prop_map(|nonce| Frame::Ping { nonce }),
        any::<u64>().prop_map(|nonce| Frame::Pong { nonce }),
        (id, 0..6u8, ".{0,16}").prop_map(|(last_id, c, message)| Frame::GoAway {
            last_id,
            code: [
                GoAwayCode::Deregistered,
                GoAwayCode::ShuttingDown,
                GoAwayCode::ProtocolError,
                GoAwayCode::UnsupportedVersion,
                GoAwayCode::Timeout,
                GoAwayCode::Unauthorized
            ][c as usize],
            message
        }),
        any::<u32>().prop_map(|dead_after_ms| Frame::Deadline { dead_after_ms }),
        (".{0,8}", proptest::collection::vec((".{0,8}", ".{0,24}"), 0..4)).prop_map(|(this, rs)| {
            Frame::ReplicaSet(ReplicaSet {
                this,
                replicas: rs.into_iter().map(|(id, url)| ReplicaInfo { id, url }).collect(),
            })
        }),
    ]
}

proptest! {
    #[test]
    fn round_trip(frames in proptest::collection::vec(arb_frame(), 1..8), cuts in proptest::collection::vec(any::<usize>(), 0..4)) {
        let stream: Vec<u8> = frames.iter().flat_map(enc).collect();
        let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c % (stream.len() + 1)).collect();
        cuts.push(stream.len());
        cuts.sort();
        let mut dec = Decoder::new(MAX_FRAME_LEN);
        let mut got = Vec::new();
        let mut at = 0;
        for cut in cuts {
            dec.push(&stream[at..cut]);
            at = cut;
            while let Some(f) = dec.next_frame().unwrap() {
                got.push(f);
            }
        }
        prop_assert_eq!(got, frames);
    }

    /// The hand-written encoders of `Head` and `End` (the agent's
    /// answers) write what postcard writes for the same frame.
    #[test]
    fn head_and_end_fast_paths_match_postcard(id in any::<u32>(), status in any::<u16>(), headers in arb_headers()) {
        let id = StreamId(id);
        let postcard_bytes = |frame: &Frame| {
            let mut out = vec![0; LEN_PREFIX];
            out.extend(postcard::to_allocvec(frame).unwrap());
            let n = (out.len() - LEN_PREFIX) as u32;
            out[..4].copy_from_slice(&n.to_be_bytes());
            out
        };
        let head = Frame::Head { id, head: ResponseHead { status, headers: headers.clone() } };
        let mut fast = Vec::new();
        let fields = headers.iter().map(|h| (h.name.as_slice(), h.value.as_slice()));
        codec::encode_head(id, status, fields, MAX_FRAME_LEN, &mut fast).unwrap();
        prop_assert_eq!(&fast, &postcard_bytes(&head));
        prop_assert_eq!(enc(&head), postcard_bytes(&head));
        let end = Frame::End { id };
        prop_assert_eq!(enc(&end), postcard_bytes(&end));
    }

    /// The borrowed `Open` encoder (the hub's proxied requests) writes
    /// what postcard writes for the same head, and so does it with a
    /// field added (a replica's cluster field).
    #[test]
    fn open_fast_path_matches_postcard(
        id in any::<u32>(),
        method in "[A-Z]{0,7}",
        path in ".{0,20}",
        headers in arb_headers(),
        identity in arb_identity(),
    ) {
        let id = StreamId(id);
        let head = RequestHead { method, path, headers, identity };
        let mut fast = Vec::new();
        codec::encode_open(id, &head.as_open(), head.headers.len(), MAX_FRAME_LEN, &mut fast).unwrap();
        prop_assert_eq!(&fast, &enc(&Frame::Open { id, head: head.clone() }));
        prop_assert_eq!(head.as_open().to_owned(), head.clone());
        let mut more = head.clone();
        more.headers.push(Header::new("uplink-peer-cluster", "c_1"));
        let mut fast = Vec::new();
        let with = head.as_open().with_field(b"uplink-peer-cluster", b"c_1");
        codec::encode_open(id, &with, more.headers.len(), MAX_FRAME_LEN, &mut fast).unwrap();
        prop_assert_eq!(&fast, &enc(&Frame::Open { id, head: more }));
    }

    /// The hand-written decoder takes every request and answer frame as
    /// postcard writes it, and nothing else.
    #[test]
    fn fast_decoder_reads_what_postcard_writes(frame in arb_frame()) {
        let bytes = enc(&frame);
        let fast = codec::decode_fast(&bytes[LEN_PREFIX..]);
        let handled = matches!(
            frame,
            Frame::Open { .. } | Frame::Head { .. } | Frame::Data { .. } | Frame::Window { .. } | Frame::End { .. }
        );
        prop_assert_eq!(fast, handled.then(|| (frame.clone(), 0)));
    }

    /// On damaged input it accepts only what postcard accepts, as postcard
    /// decodes it; everything else falls through to postcard.
    #[test]
    fn fast_decoder_agrees_with_postcard_on_damaged_frames(
        frame in arb_frame(),
        at in any::<usize>(),
        byte in any::<u8>(),
        how in 0..3u8,
    ) {
        let mut body = enc(&frame)[LEN_PREFIX..].to_vec();
        let i = at % body.len();
        match how {
            0 => body[i] = byte,
            1 => body.truncate(i),
            _ => body.insert(i, byte),
        }
        if let Some((fast, rest)) = codec::decode_fast(&body) {
            let (slow, slow_rest) = postcard::take_from_bytes::<Frame>(&body).expect("postcard accepts it too");
            prop_assert_eq!(fast, slow);
            prop_assert_eq!(rest, slow_rest.len());
        }
    }

    #[test]
    fn decoding_arbitrary_bytes_never_panics(bytes in arb_bytes(512)) {
        let mut dec = Decoder::new(MAX_FRAME_LEN);
        dec.push(&bytes);
        while let Ok(Some(_)) = dec.next_frame() {}
    }
}

/// The data scheduler on its own: turns of one quantum in ring order,
/// trailers right after a stream's last data, discards leave no trace.
mod sched {
    use super::super::codec;
    use super::super::frame::*;
    use super::super::sched::{QUANTUM, SendQueue};

    fn turns(q: &mut SendQueue) -> Vec<Frame> {
        let mut out = Vec::new();
        while q.poll(&mut out, QUANTUM) {}
        codec::decode_all(&out)
    }

    fn data(id: u32, len: usize) -> Frame {
        Frame::Data { id: StreamId(id), data: vec![id as u8; len] }
    }

    #[test]
    fn streams_take_turns_of_one_quantum_and_trailers_follow_their_data() {
        let mut q = SendQueue::default();
        q.push(StreamId(1), &vec![1; 2 * QUANTUM + 10]);
        q.push(StreamId(3), &[3; 100]);
        assert!(q.then(StreamId(3), &Frame::End { id: StreamId(3) }));
        q.push(StreamId(5), &vec![5; QUANTUM]);
        assert!(!q.then(StreamId(7), &Frame::End { id: StreamId(7) }), "nothing queued: the caller sends it");
        assert_eq!(q.bytes(), 3 * QUANTUM + 110);
        assert_eq!(
            turns(&mut q),
            vec![
                data(1, QUANTUM),
                data(3, 100),
                Frame::End { id: StreamId(3) },
                data(5, QUANTUM),
                data(1, QUANTUM),
                data(1, 10),
            ]
        );
        assert!(q.is_empty() && q.bytes() == 0);
    }

    #[test]
    fn a_discarded_stream_leaves_the_ring() {
        let mut q = SendQueue::default();
        q.push(StreamId(1), &[1; 10]);
        q.push(StreamId(3), &[3; 10]);
        q.then(StreamId(1), &Frame::End { id: StreamId(1) });
        q.discard(StreamId(1));
        assert_eq!(q.bytes(), 10);
        assert_eq!(turns(&mut q), vec![data(3, 10)]);
        // Topping a stream up while it drains keeps one place in the ring.
        q.push(StreamId(5), &vec![5; QUANTUM + 1]);
        let mut out = Vec::new();
        assert!(q.poll(&mut out, QUANTUM));
        q.push(StreamId(5), &[5; 9]);
        q.push(StreamId(7), &[7; 1]);
        // (A turn may stop at the ring's wrap point: count bytes, not frames.)
        let rest = turns(&mut q);
        let fives: usize = rest
            .iter()
            .map(|f| match f {
                Frame::Data { id: StreamId(5), data } => data.len(),
                _ => 0,
            })
            .sum();
        assert_eq!(fives, 10);
        assert!(rest.contains(&data(7, 1)));
    }
}

/// What a `ReplicaSet` must be before the agent acts on it.
mod replica_set {
    use super::super::frame::*;

    fn set(this: &str, rs: &[(&str, &str)]) -> ReplicaSet {
        ReplicaSet {
            this: this.into(),
            replicas: rs.iter().map(|(id, url)| ReplicaInfo { id: id.to_string(), url: url.to_string() }).collect(),
        }
    }

    #[test]
    fn good_sets_pass() {
        let ok = set(
            "r_a",
            &[
                ("r_a", "https://10.0.0.1:8443"),
                ("r_b", "https://hub-b.internal"),
                ("r_c", "https://[fd00::3]:8443/base"),
            ],
        );
        assert_eq!(ok.validate(), Ok(()));
        assert_eq!(ok.this_replica().unwrap().url, "https://10.0.0.1:8443");
    }

    #[test]
    fn each_fault_is_named() {
        let e = |s: ReplicaSet| s.validate().unwrap_err().to_string();
        assert_eq!(e(set("a", &[("a", "https://x:1"), ("a", "https://y:1")])), "replica id \"a\" appears twice");
        assert_eq!(
            e(set("a", &[("a", "https://x:1"), ("b", "https://x:1/")])),
            "advertise URL \"https://x:1/\" appears twice"
        );
        assert_eq!(
            e(set("a", &[("a", "http://x:1")])),
            "replica \"a\" has advertise URL \"http://x:1\": not an https:// URL"
        );
        assert_eq!(
            e(set("a", &[("a", "https://:8443")])),
            "replica \"a\" has advertise URL \"https://:8443\": no host"
        );
        assert_eq!(
            e(set("a", &[("a", "https://x:99999")])),
            "replica \"a\" has advertise URL \"https://x:99999\": the port is not a number from 1 to 65535"
        );
        assert!(e(set("a", &[("a", "https://u:p@x")])).contains("user info"));
        assert!(e(set("a", &[("a", "https://x y")])).contains("a space"));
        assert!(e(set("a", &[("", "https://x")])).contains("replica id \"\" is empty"));
        assert!(e(set("a", &[("a\nb", "https://x")])).contains("control character"));
        assert_eq!(e(set("z", &[("a", "https://x")])), "the sending replica \"z\" is not in the set it sent");
        let many: Vec<(String, String)> =
            (0..=MAX_REPLICAS).map(|i| (format!("r{i}"), format!("https://h{i}:8443"))).collect();
        let many: Vec<(&str, &str)> = many.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect();
        assert_eq!(e(set("r0", &many)), format!("{} replicas, over the limit of {MAX_REPLICAS}", MAX_REPLICAS + 1));
        let long = format!("https://{}", "h".repeat(MAX_REPLICA_URL));
        assert!(e(set("a", &[("a", &long)])).contains("longer than the limit"));
    }
}

/// The stream-id hash spreads one side's ids (all odd, or all even) over
/// the table's low bits, where hashbrown picks the bucket.
#[test]
fn stream_id_hash_spreads_one_sides_ids() {
    use std::hash::BuildHasher as _;
    for side in [1u32, 2] {
        let state = StreamIdHash::default();
        let mut buckets: Vec<u64> = (0..1024u32).map(|i| state.hash_one(StreamId(side + 2 * i)) & 2047).collect();
        buckets.sort_unstable();
        buckets.dedup();
        // Random hashing leaves about 806 distinct buckets; a plain
        // multiplication leaves as few as 2048 / 2^k for a multiplier with
        // k trailing zero bits in the part that picks the bucket.
        assert!(buckets.len() > 700, "{} distinct buckets of 2048 for 1024 ids", buckets.len());
        let odd = buckets.iter().filter(|b| *b % 2 == 1).count();
        assert!(odd > 200 && odd < buckets.len() - 200, "{odd} odd buckets of {}", buckets.len());
    }
    let mut map: StreamMap<u32> = StreamMap::default();
    for i in 0..5000 {
        map.insert(StreamId(2 * i + 1), i);
    }
    assert!((0..5000).all(|i| map[&StreamId(2 * i + 1)] == i) && !map.contains_key(&StreamId(2)));
}
