//! Key-release clients for the benches: each does full round trips on its
//! own connection (challenge, attestation by the simulated NSM, key
//! release, signature check and HPKE open).

/// The bench's process allocates as the verifier and the enclave programs
/// do: every freed block wiped (their `main.rs`).
#[global_allocator]
static ALLOCATOR: secmem_alloc::zeroizing_alloc::ZeroizeAlloc<std::alloc::System> =
    secmem_alloc::zeroizing_alloc::ZeroizeAlloc::new(std::alloc::System);

use kluis_nsm::sim::SimulatedNsm;
use kluis_proto::{request_hash, EphemeralKeyPair, KeyOperation, KeyRequest};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Latencies of every release: the whole round trip, and the same without
/// the simulated NSM's signing (a real NSM signs in hardware).
#[derive(Debug, Default)]
pub struct Latencies {
    pub total: Vec<Duration>,
    pub without_nsm: Vec<Duration>,
}

/// `clients` concurrent clients, spread over `addresses` in turn, each
/// doing `per_client` releases of a data key of `key`.
pub async fn run(
    addresses: &[SocketAddr],
    nsm: Arc<SimulatedNsm>,
    pinned: [u8; 97],
    key: &str,
    clients: usize,
    per_client: usize,
) -> Latencies {
    let mut handles = Vec::new();
    for c in 0..clients {
        let nsm = Arc::clone(&nsm);
        let addr = addresses[c % addresses.len()];
        let key = key.to_owned();
        handles.push(tokio::spawn(async move {
            let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
            stream.set_nodelay(true).unwrap();
            let max = 128 * 1024;
            let mut mine = Latencies::default();
            for _ in 0..per_client {
                let t0 = Instant::now();
                let challenge = kluis_proto::client::request_challenge(&mut stream, max)
                    .await
                    .unwrap();
                let request = KeyRequest::new(vec![KeyOperation::GenerateDataKey {
                    key_id: key.clone(),
                }])
                .unwrap();
                let ephemeral = EphemeralKeyPair::generate().unwrap();
                let hash = request_hash(&request);
                let pk = ephemeral.public_key_sec1();
                let nsm2 = Arc::clone(&nsm);
                let nonce = challenge.nonce;
                let t_nsm = Instant::now();
                let doc = tokio::task::spawn_blocking(move || {
                    kluis_nsm::attest(nsm2.as_ref(), Some(&hash), Some(&nonce), Some(&pk)).unwrap()
                })
                .await
                .unwrap();
                let nsm_time = t_nsm.elapsed();
                let keys = kluis_proto::client::request_keys(
                    &mut stream,
                    max,
                    &doc,
                    &request,
                    &ephemeral,
                    &pinned,
                )
                .await
                .unwrap();
                assert_eq!(keys.len(), 1);
                let elapsed = t0.elapsed();
                mine.total.push(elapsed);
                mine.without_nsm.push(elapsed.saturating_sub(nsm_time));
            }
            mine
        }));
    }
    let mut all = Latencies::default();
    for h in handles {
        let mine = h.await.unwrap();
        all.total.extend(mine.total);
        all.without_nsm.extend(mine.without_nsm);
    }
    all.total.sort();
    all.without_nsm.sort();
    all
}
