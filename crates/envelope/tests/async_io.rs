//! The tokio adapters: round trips through pipes small enough to force
//! `Pending`, interoperability with the blocking adapters, and the same
//! tampering verdicts.
#![cfg(feature = "tokio")]
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::arithmetic_side_effects,
    clippy::indexing_slicing,
    clippy::cast_possible_truncation
)]

mod common;
use common::*;
use kluis_envelope::{
    AsyncEnvelopeReader, AsyncEnvelopeWriter, DecryptError, EnvelopeHeader, EnvelopeWriter,
};
use std::io::Write;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn async_seal(plaintext: &[u8]) -> Vec<u8> {
    let mut writer =
        AsyncEnvelopeWriter::with_segment_size(Vec::new(), &key(), wrapped(), S32).unwrap();
    writer.write_all(plaintext).await.unwrap();
    writer.finish().await.unwrap()
}

async fn async_open(envelope: &[u8]) -> Result<Vec<u8>, DecryptError> {
    let mut reader = AsyncEnvelopeReader::new(envelope, &key()).await?;
    let mut out = Vec::new();
    match reader.read_to_end(&mut out).await {
        Ok(_) => {
            assert!(reader.is_complete());
            Ok(out)
        }
        Err(e) => Err(*e.into_inner().unwrap().downcast::<DecryptError>().unwrap()),
    }
}

#[tokio::test]
async fn round_trips_and_interoperates_with_the_blocking_adapters() {
    for len in [0, 1, S - 1, S, S + 1, 7 * S + 3] {
        let plaintext = data(len);
        let from_async = async_seal(&plaintext).await;
        assert_eq!(
            open(&from_async).unwrap(),
            plaintext,
            "async -> sync, {len}"
        );
        assert_eq!(
            async_open(&from_async).await.unwrap(),
            plaintext,
            "async -> async, {len}"
        );
        let from_sync = seal(&plaintext, S32);
        assert_eq!(
            async_open(&from_sync).await.unwrap(),
            plaintext,
            "sync -> async, {len}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn through_a_small_pipe() {
    // A 100-byte duplex pipe makes both sides return Pending constantly.
    let plaintext = data(20 * S + 11);
    let (client, server) = tokio::io::duplex(100);
    let expected = plaintext.clone();
    let producer = tokio::spawn(async move {
        let mut writer =
            AsyncEnvelopeWriter::with_segment_size(client, &key(), wrapped(), S32).unwrap();
        for chunk in expected.chunks(333) {
            writer.write_all(chunk).await.unwrap();
        }
        writer.shutdown().await.unwrap();
    });
    let mut reader = AsyncEnvelopeReader::new(server, &key()).await.unwrap();
    assert_eq!(reader.header().cmk_id(), "agency-a/app-x/prod");
    let mut out = Vec::new();
    reader.read_to_end(&mut out).await.unwrap();
    producer.await.unwrap();
    assert_eq!(out, plaintext);
}

#[tokio::test]
async fn copy_with_tokio_io_copy() {
    let plaintext = data(300_000);
    let mut writer = AsyncEnvelopeWriter::new(Vec::new(), &key(), wrapped()).unwrap();
    tokio::io::copy(&mut plaintext.as_slice(), &mut writer)
        .await
        .unwrap();
    let envelope = writer.finish().await.unwrap();
    let mut reader = AsyncEnvelopeReader::new(envelope.as_slice(), &key())
        .await
        .unwrap();
    let mut out = Vec::new();
    tokio::io::copy(&mut reader, &mut out).await.unwrap();
    assert_eq!(out, plaintext);
}

#[tokio::test]
async fn header_first_then_key() {
    let envelope = seal(&data(5000), S32);
    let mut input = envelope.as_slice();
    let header = EnvelopeHeader::read_from_async(&mut input).await.unwrap();
    assert_eq!(header.cmk_version(), 7);
    let mut reader = AsyncEnvelopeReader::with_header(input, header, &key()).unwrap();
    let mut out = Vec::new();
    reader.read_to_end(&mut out).await.unwrap();
    assert_eq!(out, data(5000));
}

#[tokio::test]
async fn tampering_gives_the_same_errors() {
    let envelope = seal(&data(4 * S + 100), S32);
    let (h, segs) = layout(&envelope);

    assert!(matches!(
        AsyncEnvelopeReader::new(envelope.as_slice(), &other_key()).await,
        Err(DecryptError::WrongKey)
    ));
    assert!(matches!(
        async_open(&envelope[..segs[2].end]).await,
        Err(DecryptError::Truncated {
            complete_segments: 3
        })
    ));
    let mut t = envelope.clone();
    t.push(0);
    assert!(matches!(
        async_open(&t).await,
        Err(DecryptError::TrailingData { final_index: 4 })
    ));
    let s: Vec<&[u8]> = segs.iter().map(|r| &envelope[r.clone()]).collect();
    assert!(matches!(
        async_open(&assemble(&envelope[..h], &[s[0], s[2], s[1], s[3], s[4]])).await,
        Err(DecryptError::Reordered { index: 1, found: 2 })
    ));
    assert!(matches!(
        async_open(&assemble(
            &envelope[..h],
            &[s[0], s[0], s[1], s[2], s[3], s[4]]
        ))
        .await,
        Err(DecryptError::Duplicated {
            index: 1,
            copy_of: 0
        })
    ));
    let mut t = envelope.clone();
    t[segs[3].start + 30] ^= 1;
    assert!(matches!(
        async_open(&t).await,
        Err(DecryptError::Forged { index: 3 })
    ));
}

#[tokio::test]
async fn dropped_writer_leaves_a_truncated_envelope() {
    let mut buffer = Vec::new();
    {
        let mut writer =
            AsyncEnvelopeWriter::with_segment_size(&mut buffer, &key(), wrapped(), S32).unwrap();
        writer.write_all(&data(3 * S + 5)).await.unwrap();
        writer.flush().await.unwrap();
        // dropped without shutdown/finish
    }
    assert!(matches!(
        async_open(&buffer).await,
        Err(DecryptError::Truncated {
            complete_segments: 3
        })
    ));

    // The same with the blocking writer.
    let mut buffer = Vec::new();
    {
        let mut writer =
            EnvelopeWriter::with_segment_size(&mut buffer, &key(), wrapped(), S32).unwrap();
        writer.write_all(&data(2 * S)).unwrap();
        writer.flush().unwrap();
    }
    assert!(matches!(
        open(&buffer),
        Err((
            DecryptError::Truncated {
                complete_segments: 1
            },
            _
        ))
    ));
}
