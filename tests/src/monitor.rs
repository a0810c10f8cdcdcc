//! A client load that watches a pool from outside, as its users would: it keeps opening and
//! holding connections to every front end, and samples which ones accept new connections. The
//! report is checked afterwards against the invariants an operator cares about.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// What the load saw.
#[derive(Debug, Default)]
pub struct Report {
    /// Per sample, which front ends accepted a new connection.
    pub samples: Vec<Vec<bool>>,
    /// Connections that completed all their requests.
    pub served: u64,
    /// Connection attempts refused (a server out of service).
    pub refused: u64,
    /// Open connections that were cut before they finished: must stay 0 under graceful drains.
    pub cut: u64,
}

impl Report {
    /// Checks: at every sample at least `min_active` front ends accepted, and those that did not
    /// all belong to one upgrade domain (`domain_of[i]` is front end i's domain).
    pub fn check(&self, domain_of: &[String], min_active: usize) -> Result<(), String> {
        if self.samples.is_empty() {
            return Err("no samples taken".into());
        }
        for (n, s) in self.samples.iter().enumerate() {
            let up = s.iter().filter(|a| **a).count();
            if up < min_active {
                return Err(format!("sample {n}: only {up} front ends accepted connections, min_active is {min_active}: {s:?}"));
            }
            let mut down: Vec<&str> = s
                .iter()
                .zip(domain_of)
                .filter(|(a, _)| !**a)
                .map(|(_, d)| d.as_str())
                .collect();
            down.sort_unstable();
            down.dedup();
            if down.len() > 1 {
                return Err(format!(
                    "sample {n}: front ends of several domains out of service at once: {down:?}"
                ));
            }
        }
        if self.cut > 0 {
            return Err(format!("{} open connection(s) were cut", self.cut));
        }
        Ok(())
    }

    /// How many samples saw some front end out of service.
    pub fn samples_with_outage(&self) -> usize {
        self.samples.iter().filter(|s| s.iter().any(|a| !a)).count()
    }
}

/// A running load; stop it to get the report.
pub struct Monitor {
    stop: CancellationToken,
    tasks: JoinSet<()>,
    sampler: tokio::task::JoinHandle<Vec<Vec<bool>>>,
    counters: Arc<[AtomicU64; 3]>,
}

impl Monitor {
    /// Starts sampling `ports` every 25 ms and one holding client per port. Bounded: it stops
    /// by itself after `limit` even if nobody stops it.
    pub fn start(ports: Vec<u16>, limit: Duration) -> Monitor {
        let stop = CancellationToken::new();
        let counters: Arc<[AtomicU64; 3]> =
            Arc::new([AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0)]);
        let mut tasks = JoinSet::new();
        for &port in &ports {
            let (stop, counters) = (stop.clone(), Arc::clone(&counters));
            tasks.spawn(async move { hold(port, &counters, &stop).await });
        }
        let s = stop.clone();
        let sampler = tokio::spawn(async move {
            let deadline = tokio::time::Instant::now() + limit;
            let mut samples = Vec::new();
            while !s.is_cancelled() && tokio::time::Instant::now() < deadline {
                let mut probes = JoinSet::new();
                for (i, &port) in ports.iter().enumerate() {
                    probes.spawn(async move {
                        let ok = matches!(
                            tokio::time::timeout(
                                Duration::from_millis(500),
                                tokio::net::TcpStream::connect(("127.0.0.1", port))
                            )
                            .await,
                            Ok(Ok(_))
                        );
                        (i, ok)
                    });
                }
                let mut row = vec![false; ports.len()];
                while let Some(Ok((i, ok))) = probes.join_next().await {
                    row[i] = ok;
                }
                samples.push(row);
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
            samples
        });
        Monitor {
            stop,
            tasks,
            sampler,
            counters,
        }
    }

    /// Stops the load and returns what it saw.
    pub async fn stop(mut self) -> Report {
        self.stop.cancel();
        while self.tasks.join_next().await.is_some() {}
        let samples = self.sampler.await.unwrap_or_default();
        Report {
            samples,
            served: self.counters[0].load(Ordering::Relaxed),
            refused: self.counters[1].load(Ordering::Relaxed),
            cut: self.counters[2].load(Ordering::Relaxed),
        }
    }
}

async fn hold(port: u16, counters: &[AtomicU64; 3], stop: &CancellationToken) {
    while !stop.is_cancelled() {
        let Ok(s) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await else {
            counters[1].fetch_add(1, Ordering::Relaxed);
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        };
        let (r, mut w) = s.into_split();
        let mut r = BufReader::new(r);
        let mut ok = true;
        // Hold the connection across several requests: a graceful drain must let it finish.
        for n in 0..4 {
            let mut line = String::new();
            let sent = w.write_all(format!("req {n}\n").as_bytes()).await.is_ok();
            if !sent || !matches!(r.read_line(&mut line).await, Ok(k) if k > 0) {
                ok = false;
                break;
            }
            tokio::time::sleep(Duration::from_millis(40)).await;
        }
        counters[if ok { 0 } else { 2 }].fetch_add(1, Ordering::Relaxed);
    }
}
