//! Cross-process behaviour: crash safety under SIGKILL, and the lock
//! serialising processes.
//!
//! The child processes are this test binary run again with
//! `KLUIS_KEYSTORE_TEST_CHILD` set, running only `child_process_entry` (a
//! no-op test when the variable is not set).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::arithmetic_side_effects,
    clippy::indexing_slicing,
    clippy::cast_possible_truncation
)]

use std::collections::BTreeMap;
use std::env;
use std::io::Write as _;
use std::io::{BufRead as _, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use kluis_keystore::{RootSecret, Store};

const CHILD_ENV: &str = "KLUIS_KEYSTORE_TEST_CHILD";
const DIR_ENV: &str = "KLUIS_KEYSTORE_TEST_DIR";
const KEY_ENV: &str = "KLUIS_KEYSTORE_TEST_KEY";
const RUN_ENV: &str = "KLUIS_KEYSTORE_TEST_RUN";
const SEED_ENV: &str = "KLUIS_KEYSTORE_CRASH_SEED";

const KIND: &str = "crash";
/// Distinct ids the writer cycles through (so records are replaced often).
const IDS: u64 = 16;
/// Writer runs, each killed with SIGKILL at a random instant.
const RUNS: u64 = 50;
/// Largest extra delay before the kill, after the writer reported ready.
const MAX_KILL_DELAY_MS: u64 = 120;
/// Largest value the writer writes (bytes), so writes take a while.
const MAX_VALUE_LEN: u64 = 64 * 1024;

/// Entry point of the child processes.
#[test]
fn child_process_entry() {
    let Ok(role) = env::var(CHILD_ENV) else {
        return;
    };
    // End the harness's "test child_process_entry ... " line, so that every
    // line the child prints from here on is its own.
    println!();
    match role.as_str() {
        "writer" => writer(),
        "counter" => counter(),
        "holder" => holder(),
        other => panic!("unknown child role {other:?}"),
    }
}

fn open_from_env() -> Store {
    let dir = PathBuf::from(env::var(DIR_ENV).unwrap());
    let key = PathBuf::from(env::var(KEY_ENV).unwrap());
    Store::open(dir, RootSecret::from_key_file(&key).unwrap()).unwrap()
}

/// A child process, killed (SIGKILL) and reaped if the test fails before it
/// exits, so that no writer outlives its test.
struct ChildGuard(Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            let _ = self.0.kill();
        }
        let _ = self.0.wait();
    }
}

fn spawn_child(role: &str, dir: &Path, key: &Path, run: u64) -> ChildGuard {
    let child = Command::new(env::current_exe().unwrap())
        .args([
            "--exact",
            "child_process_entry",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, role)
        .env(DIR_ENV, dir)
        .env(KEY_ENV, key)
        .env(RUN_ENV, run.to_string())
        // Piped so that a test can tell a child when to go on (`holder`).
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    ChildGuard(child)
}

/// Forwards the child's stdout lines to a channel, from a thread.
fn lines_of(child: &mut ChildGuard) -> (mpsc::Receiver<String>, thread::JoinHandle<()>) {
    let stdout = child.0.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    let handle = thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    (rx, handle)
}

fn wait_for(rx: &mpsc::Receiver<String>, wanted: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) if line == wanted => return,
            Ok(_) => {}
            Err(err) => panic!("child never printed {wanted:?}: {err}"),
        }
    }
}

fn setup() -> (tempfile::TempDir, PathBuf, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let key = tmp.path().join("root.key");
    let secret = RootSecret::generate_key_file(&key).unwrap();
    let dir = tmp.path().join("store");
    Store::init(&dir, secret).unwrap();
    (tmp, dir, key)
}

fn open(dir: &Path, key: &Path) -> Store {
    Store::open(dir, RootSecret::from_key_file(key).unwrap()).unwrap()
}

// ---------------------------------------------------------------------------
// Crash safety

/// SplitMix64: the writer's deterministic schedule, which the parent replays.
fn mix(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Op {
    id: String,
    /// `Some(generation)` writes that generation's value; `None` deletes.
    put: Option<u64>,
}

/// The `index`-th operation of writer run `run`.
fn op(run: u64, index: u64) -> Op {
    let r = mix((run << 32) | index);
    let id = format!("rec-{:02}", r % IDS);
    let put = if (r >> 8).is_multiple_of(8) {
        None
    } else {
        Some((run << 32) | index)
    };
    Op { id, put }
}

/// The value of a generation: its number, then bytes derived from it. Its
/// length (8..=8+MAX_VALUE_LEN) follows from the generation too.
fn value(generation: u64) -> Vec<u8> {
    let seed = mix(generation ^ 0xDEAD_BEEF);
    let len = 8 + (seed % MAX_VALUE_LEN) as usize;
    let mut out = Vec::with_capacity(len);
    out.extend_from_slice(&generation.to_be_bytes());
    let pattern = seed.to_le_bytes();
    out.extend((0..len - 8).map(|j| pattern[j % 8] ^ (j as u8)));
    out
}

/// What the store holds for an id: absent, or a generation whose value is
/// intact (anything else fails the test).
fn observe(store: &Store, id: &str) -> Option<u64> {
    let found = store
        .get(KIND, id)
        .unwrap_or_else(|err| panic!("record {id} unreadable after a crash: {err}"))?;
    assert!(found.len() >= 8, "record {id} too short");
    let generation = u64::from_be_bytes(found[..8].try_into().unwrap());
    assert!(
        found.as_slice() == value(generation).as_slice(),
        "record {id}: generation {generation} has the wrong contents"
    );
    Some(generation)
}

fn writer() {
    let store = open_from_env();
    let run: u64 = env::var(RUN_ENV).unwrap().parse().unwrap();
    // Warm up (the first use of the random generator takes tens of ms) on a
    // record of its own, so the kills land in the steady write loop.
    let guard = store.lock().unwrap();
    store.put(&guard, "warm-up", "w", b"w").unwrap();
    drop(guard);
    println!("READY");
    for index in 0.. {
        let op = op(run, index);
        let guard = store.lock().unwrap();
        match op.put {
            Some(generation) => store.put(&guard, KIND, &op.id, &value(generation)).unwrap(),
            None => {
                store.delete(&guard, KIND, &op.id).unwrap();
            }
        }
        drop(guard);
        // Printed only once the operation returned.
        println!("DONE {index}");
    }
}

fn leftovers(dir: &Path) -> usize {
    let kind_dir = dir.join("records").join(KIND);
    let Ok(entries) = std::fs::read_dir(kind_dir) else {
        return 0;
    };
    entries
        .filter(|entry| {
            let name = entry.as_ref().unwrap().file_name();
            let name = name.to_str().unwrap();
            name.starts_with('.')
        })
        .count()
}

#[test]
fn sigkill_at_random_instants_never_loses_or_tears_a_record() {
    let started = Instant::now();
    let seed = env::var(SEED_ENV)
        .ok()
        .and_then(|seed| seed.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    eprintln!("crash test seed {seed} (set {SEED_ENV} to repeat the kill delays)");
    let (_tmp, dir, key) = setup();

    // The state every confirmed operation implies: id -> generation.
    let mut model: BTreeMap<String, Option<u64>> =
        (0..IDS).map(|i| (format!("rec-{i:02}"), None)).collect();
    let mut confirmed_ops = 0u64;
    let mut killed_mid_write = 0u64;
    let mut in_flight_landed = 0u64;
    let mut runs_with_ops = 0u64;

    for run in 0..RUNS {
        let mut child = spawn_child("writer", &dir, &key, run);
        let (rx, reader) = lines_of(&mut child);
        wait_for(&rx, "READY");
        let delay = mix(seed ^ run) % (MAX_KILL_DELAY_MS + 1);
        thread::sleep(Duration::from_millis(delay));
        child.0.kill().unwrap(); // SIGKILL
        let status = child.0.wait().unwrap();
        assert!(!status.success(), "the writer was not killed: {status}");
        reader.join().unwrap();

        // Operations 0..done returned in the child.
        let mut done = 0u64;
        for line in rx.try_iter() {
            if let Some(index) = line.strip_prefix("DONE ") {
                assert_eq!(index.parse::<u64>().unwrap(), done, "out of order");
                done += 1;
            }
        }
        for index in 0..done {
            let op = op(run, index);
            model.insert(op.id, op.put);
        }
        confirmed_ops += done;
        if done > 0 {
            runs_with_ops += 1;
        }
        // The one operation that may have been under way when the kill came.
        let in_flight = op(run, done);
        if leftovers(&dir) > 0 {
            killed_mid_write += 1;
        }

        // Open cleans up; every record is either the confirmed state or the
        // in-flight operation's result, and intact.
        let store = open(&dir, &key);
        assert_eq!(leftovers(&dir), 0, "leftovers not cleaned on open");
        for (id, expected) in &mut model {
            let found = observe(&store, id);
            if found != *expected {
                assert!(
                    *id == in_flight.id && found == in_flight.put,
                    "run {run}: record {id} is {found:?}, expected {expected:?} \
                     (in flight: {in_flight:?})"
                );
                in_flight_landed += 1;
                *expected = found;
            }
        }
        let present: Vec<&String> = model
            .iter()
            .filter(|(_, generation)| generation.is_some())
            .map(|(id, _)| id)
            .collect();
        let listed = store.list(KIND).unwrap();
        assert_eq!(listed.iter().collect::<Vec<_>>(), present, "run {run}");
    }

    let elapsed = started.elapsed();
    eprintln!(
        "crash test: {RUNS} writer processes SIGKILLed after 0..={MAX_KILL_DELAY_MS} ms, \
         {confirmed_ops} confirmed operations checked, {runs_with_ops} runs with at least one, \
         {killed_mid_write} kills left a half-written or half-deleted file, \
         {in_flight_landed} unconfirmed in-flight operations had landed, {elapsed:.1?}"
    );
    assert!(runs_with_ops >= RUNS / 2, "the writers hardly wrote");
    assert!(
        killed_mid_write > 0,
        "no kill landed in the middle of a write"
    );
}

// ---------------------------------------------------------------------------
// Locking

const COUNTER_ITERATIONS: u64 = 25;

fn counter() {
    let store = open_from_env();
    println!("READY");
    for _ in 0..COUNTER_ITERATIONS {
        let guard = store.lock().unwrap();
        let current = store
            .get(KIND, "counter")
            .unwrap()
            .map(|bytes| u64::from_be_bytes(bytes.as_slice().try_into().unwrap()))
            .unwrap_or(0);
        // Widen the window between read and write: without the lock, the
        // two processes would lose updates.
        thread::sleep(Duration::from_millis(2));
        store
            .put(&guard, KIND, "counter", &(current + 1).to_be_bytes())
            .unwrap();
        drop(guard);
    }
    println!("FINISHED");
}

#[test]
fn the_lock_serialises_read_modify_write_across_processes() {
    let (_tmp, dir, key) = setup();
    let mut children: Vec<ChildGuard> = (0..2)
        .map(|run| spawn_child("counter", &dir, &key, run))
        .collect();
    for child in &mut children {
        let status = child.0.wait().unwrap();
        assert!(status.success(), "counter child failed: {status}");
    }
    let store = open(&dir, &key);
    let total = u64::from_be_bytes(
        store
            .get(KIND, "counter")
            .unwrap()
            .unwrap()
            .as_slice()
            .try_into()
            .unwrap(),
    );
    assert_eq!(total, 2 * COUNTER_ITERATIONS, "lost updates");
}

fn holder() {
    let store = open_from_env();
    let guard = store.lock().unwrap();
    println!("LOCKED");
    // Hold the lock until the test says so (a line on stdin).
    let mut line = String::new();
    std::io::stdin().read_line(&mut line).unwrap();
    store
        .put(&guard, KIND, "held", b"written under the lock")
        .unwrap();
    drop(guard);
    println!("RELEASED");
}

/// The holder writes "held" only after the test has a waiter inside (or
/// about to enter) `lock()` and tells the holder to go on; a waiter whose
/// `lock()` returned without waiting would read before that write.
#[test]
fn a_lock_held_by_another_process_blocks_and_try_lock_reports_it() {
    let (_tmp, dir, key) = setup();
    let store = open(&dir, &key);
    let mut child = spawn_child("holder", &dir, &key, 0);
    let (rx, reader) = lines_of(&mut child);
    wait_for(&rx, "LOCKED");
    let err = store.try_lock().unwrap_err();
    assert!(
        matches!(err, kluis_keystore::StoreError::Locked { .. }),
        "{err}"
    );
    let (trying_tx, trying_rx) = mpsc::channel();
    let waiter = thread::spawn(move || {
        trying_tx.send(()).unwrap();
        let guard = store.lock().unwrap();
        let held = store.get(KIND, "held").unwrap();
        drop(guard);
        held
    });
    trying_rx.recv_timeout(Duration::from_secs(30)).unwrap();
    let mut stdin = child.0.stdin.take().unwrap();
    writeln!(stdin, "go on").unwrap();
    drop(stdin);
    let held = waiter.join().unwrap();
    // Everything the holder wrote under the lock is there.
    assert_eq!(
        held.expect("lock() returned before the holder released it")
            .as_slice(),
        b"written under the lock"
    );
    assert!(child.0.wait().unwrap().success());
    reader.join().unwrap();
}
