//! Any bytes from the parent, decoded as a framed request the verifier would
//! read: a value or an error, never a panic or an unbounded allocation; and a
//! request that decodes always has a well-defined hash.
#![no_main]

use kluis_proto::{request_hash, Message, Request};

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let mut reader = data;
    if let Ok(Request::KeyRelease { request, .. }) =
        kluis_proto::read_message_sync::<Request, _>(&mut reader, 128 * 1024)
    {
        let _ = request_hash(&request);
    }
    let _ = Request::decode(data);
});
