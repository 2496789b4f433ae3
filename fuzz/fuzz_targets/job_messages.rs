//! Any bytes from the parent (or, for the parent, from the enclave), decoded
//! as job messages: a value or an error, never a panic or an unbounded
//! allocation; and the direct data-frame reader agrees with the general
//! decoder on every frame it accepts.
#![no_main]

use kluis_proto::job::{data_payload, JobEvent, JobRequest, JOB_MAX_FRAME_LEN};
use kluis_proto::Message;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = JobRequest::decode(data);
    let _ = JobEvent::decode(data);
    let mut reader = data;
    let _ = kluis_proto::read_message_sync::<JobRequest, _>(&mut reader, JOB_MAX_FRAME_LEN);
    if let Some(payload) = data_payload(data) {
        let body = &data[5..];
        match JobEvent::decode(body) {
            Ok(JobEvent::Data(bytes)) => assert_eq!(bytes, payload),
            other => panic!("data_payload accepted what the decoder reads as {other:?}"),
        }
    }
});
