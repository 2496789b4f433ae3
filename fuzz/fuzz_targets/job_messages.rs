//! Any bytes from the parent (or, for the parent, from the enclave), read
//! as job frames: a value or an error, never a panic or an unbounded
//! allocation; the zero-copy data-frame view agrees with the frame decoder
//! on every frame it accepts; and whatever decodes re-encodes to the same
//! frame (one encoding per message on the wire).
#![no_main]

use kluis_proto::job::{
    data_payload, decode_job_frame, encode_job_frame, JobEvent, JobRequest, JOB_MAX_FRAME_LEN,
};
use kluis_proto::Message;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = JobRequest::decode(data);
    let _ = JobEvent::decode(data);
    let mut reader = data;
    if let Ok(frame) = kluis_proto::read_raw_frame_sync(&mut reader, JOB_MAX_FRAME_LEN) {
        assert_eq!(&frame[..], &data[..frame.len()]);
        let request = decode_job_frame::<JobRequest>(&frame);
        let event = decode_job_frame::<JobEvent>(&frame);
        if let Some(payload) = data_payload(&frame) {
            assert_eq!(request.as_ref().ok(), Some(&JobRequest::Data(payload.to_vec())));
            assert_eq!(event.as_ref().ok(), Some(&JobEvent::Data(payload.to_vec())));
        }
        if let Ok(request) = request {
            if let Ok(again) = encode_job_frame(&request) {
                // CBOR maps may order or size their items otherwise; data
                // frames have exactly one encoding.
                if matches!(request, JobRequest::Data(_)) {
                    assert_eq!(again, frame);
                }
                assert_eq!(decode_job_frame::<JobRequest>(&again).ok(), Some(request));
            }
        }
    }
});
