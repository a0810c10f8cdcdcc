//! The embedded store's write cost, for `rollgate-bench embedded`: with a fleet-sized keyspace
//! already stored, the latency of one small fenced write and the bytes the process hands to
//! `write(2)` per write (`wchar` in `/proc/self/io`, so whatever the store's file layout), and
//! the worst lateness of a 1 ms timer on the same runtime while the writes run: a store that
//! blocks worker threads shows up there.
//!
//! Only the `Store` API is used, so the same code measures any version of the store.

use anyhow::{anyhow, Context};
use rollgate_coordinator::store::{Candidate, EmbeddedStore, Store, WriteOp};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// What one run stores and writes.
#[derive(Debug, Clone, Copy)]
pub struct Params {
    /// Pools in the keyspace.
    pub pools: usize,
    /// Keys per pool.
    pub keys_per_pool: usize,
    /// Bytes per value.
    pub value_bytes: usize,
    /// Measured writes (one put each), after the keyspace is filled.
    pub writes: usize,
    /// Writers at once (each a task on the runtime).
    pub concurrency: usize,
}

/// What one run measured.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// Latency of each measured write, in microseconds.
    pub latencies_us: Vec<f64>,
    /// Bytes passed to `write(2)` by the whole process during the measured writes, per write.
    pub bytes_per_write: f64,
    /// Measured writes per second of wall time.
    pub writes_per_sec: f64,
    /// The worst lateness of a 1 ms timer during the measured writes, in milliseconds.
    pub worst_timer_lag_ms: f64,
    /// Bytes of every file in the store's directory afterwards.
    pub disk_bytes: u64,
}

/// Bytes this process has passed to write-like system calls so far.
fn written_bytes() -> anyhow::Result<u64> {
    let io = std::fs::read_to_string("/proc/self/io").context("read /proc/self/io")?;
    io.lines()
        .find_map(|l| l.strip_prefix("wchar:"))
        .ok_or_else(|| anyhow!("no wchar in /proc/self/io"))?
        .trim()
        .parse()
        .context("parse wchar")
}

fn key(pool: usize, k: usize) -> String {
    format!("pools/p{pool:04}/state/k{k:04}")
}

fn value(p: &Params, seed: usize) -> Vec<u8> {
    (0..p.value_bytes)
        .map(|i| b'a' + ((i + seed) % 26) as u8)
        .collect()
}

/// One run in a fresh store under `dir`.
pub async fn run(dir: &Path, p: Params) -> anyhow::Result<Outcome> {
    let store = Store::Embedded(EmbeddedStore::open(&dir.join("store.json"))?);
    let me = Candidate {
        id: "bench".into(),
        address: "127.0.0.1:1".into(),
    };
    let lead = store
        .campaign(&me, Duration::from_secs(5), &CancellationToken::new())
        .await?;
    // One transaction per pool, as a fleet's first plans would arrive.
    for pool in 0..p.pools {
        let ops = (0..p.keys_per_pool)
            .map(|k| WriteOp::Put {
                key: key(pool, k),
                value: value(&p, k),
            })
            .collect();
        store.fenced_write(&lead, ops).await?;
    }

    let stop = Arc::new(AtomicBool::new(false));
    let ticker = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut worst = Duration::ZERO;
            while !stop.load(Ordering::Relaxed) {
                let t = Instant::now();
                tokio::time::sleep(Duration::from_millis(1)).await;
                worst = worst.max(t.elapsed().saturating_sub(Duration::from_millis(1)));
            }
            worst
        })
    };
    let per_writer = p.writes.div_ceil(p.concurrency.max(1));
    let before = written_bytes()?;
    let t0 = Instant::now();
    let mut writers = Vec::new();
    for w in 0..p.concurrency.max(1) {
        let (store, lead) = (store.clone(), lead.clone());
        writers.push(tokio::spawn(async move {
            let mut lat = Vec::with_capacity(per_writer);
            for i in 0..per_writer {
                let n = w * per_writer + i;
                let op = WriteOp::Put {
                    key: key(n % p.pools, (n / p.pools) % p.keys_per_pool),
                    value: value(&p, n + 1),
                };
                let t = Instant::now();
                store.fenced_write(&lead, vec![op]).await?;
                lat.push(t.elapsed().as_secs_f64() * 1e6);
            }
            Ok::<_, anyhow::Error>(lat)
        }));
    }
    let mut latencies_us = Vec::with_capacity(p.writes);
    for w in writers {
        latencies_us.extend(w.await??);
    }
    let wall = t0.elapsed();
    let after = written_bytes()?;
    stop.store(true, Ordering::Relaxed);
    let lag = ticker.await?;
    store.resign(&lead).await?;
    drop(store);
    let mut disk_bytes = 0;
    for e in std::fs::read_dir(dir)? {
        disk_bytes += e?.metadata()?.len();
    }
    let n = latencies_us.len().max(1) as f64;
    Ok(Outcome {
        bytes_per_write: after.saturating_sub(before) as f64 / n,
        writes_per_sec: n / wall.as_secs_f64(),
        worst_timer_lag_ms: lag.as_secs_f64() * 1e3,
        latencies_us,
        disk_bytes,
    })
}
