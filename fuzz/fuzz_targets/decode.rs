//! Any bytes into the decoder: never a panic, never an allocation beyond
//! the announced-and-accepted frame, and whatever decodes re-encodes to
//! the same bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use uplink::proto::{Decoder, MAX_FRAME_LEN, codec};

fuzz_target!(|data: &[u8]| {
    let mut dec = Decoder::new(MAX_FRAME_LEN);
    // Feed in two parts to exercise partial frames.
    let cut = data.first().map_or(0, |&b| b as usize % (data.len() + 1));
    let mut consumed = Vec::new();
    for part in [&data[..cut], &data[cut..]] {
        dec.push(part);
        loop {
            match dec.next_frame() {
                Ok(Some(frame)) => {
                    let mut out = Vec::new();
                    codec::encode(&frame, u32::MAX, &mut out).expect("a decoded frame re-encodes");
                    let (again, used) = codec::decode(&out, MAX_FRAME_LEN).unwrap().unwrap();
                    assert_eq!(again, frame);
                    assert_eq!(used, out.len());
                    consumed.push(frame);
                }
                Ok(None) => break,
                Err(_) => return,
            }
        }
    }
});
