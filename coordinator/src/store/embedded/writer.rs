//! The embedded store's writer thread: decides queued changes in order, makes each batch
//! durable with one fsync, then applies and answers it.

use super::files::*;
use super::*;

/// A change, decided in order on the writer thread.
pub(super) enum Request {
    Write {
        key: String,
        epoch: Epoch,
        lost: CancellationToken,
        ops: Vec<WriteOp>,
    },
    Campaign {
        value: Vec<u8>,
        lost: CancellationToken,
    },
    Resign {
        key: String,
        epoch: Epoch,
    },
}

pub(super) enum Answer {
    /// The revision of the change (the current one when it changed nothing).
    Revision(i64),
    /// A campaign found a live leadership: this is its `lost` token.
    Busy(CancellationToken),
}

pub(super) struct Job {
    pub(super) request: Request,
    pub(super) reply: oneshot::Sender<Result<Answer, StoreError>>,
}

/// The changes of one batch, decided against the committed state and not yet durable.
pub(super) struct Txn<'a> {
    pub(super) keys: Overlay<'a>,
    pub(super) revision: i64,
    pub(super) leader: Option<Live>,
    pub(super) released: bool,
    pub(super) lines: Vec<u8>,
}

impl Txn<'_> {
    /// Records `ops` at the next revision if they change anything; returns that revision.
    fn record(&mut self, ops: Vec<LogOp>) -> Result<Option<i64>, StoreError> {
        let rev = self.revision + 1;
        let (record, line) = encode_record(rev, ops)?;
        if !apply(&mut self.keys, rev, &record.ops) {
            return Ok(None);
        }
        self.revision = rev;
        self.lines.extend_from_slice(&line);
        Ok(Some(rev))
    }

    fn holds(&self, key: &str, epoch: Epoch) -> bool {
        self.keys
            .entry(key)
            .is_some_and(|e| u64::try_from(e.create_revision).ok() == Some(epoch.get()))
    }

    fn decide(&mut self, request: Request) -> Result<Answer, StoreError> {
        match request {
            Request::Write {
                key,
                epoch,
                lost,
                ops,
            } => {
                if lost.is_cancelled() || !self.holds(&key, epoch) {
                    lost.cancel();
                    return Err(StoreError::Fenced { epoch });
                }
                let ops = ops.into_iter().map(LogOp::from).collect();
                let rev = self.record(ops)?.unwrap_or(self.revision);
                Ok(Answer::Revision(rev))
            }
            Request::Campaign { value, lost } => {
                if let Some(live) = &self.leader {
                    if !live.lost.is_cancelled() {
                        return Ok(Answer::Busy(live.lost.clone()));
                    }
                    // Given up (its `lost` cancelled, as an etcd lease stops being renewed):
                    // its key goes now.
                    let key = live.key.clone();
                    self.record(vec![LogOp::Delete { key }])?;
                    self.leader = None;
                }
                let rev = self.revision + 1;
                let key = format!("{ELECTION_PREFIX}{rev:016x}");
                let put = LogOp::Put {
                    key: key.clone(),
                    value: hex::encode(value),
                };
                self.record(vec![put])?;
                self.leader = Some(Live { key, lost });
                Ok(Answer::Revision(rev))
            }
            Request::Resign { key, epoch } => {
                if self.holds(&key, epoch) {
                    self.record(vec![LogOp::Delete { key: key.clone() }])?;
                }
                if self.leader.as_ref().is_some_and(|l| l.key == key) {
                    self.leader = None;
                }
                self.released = true;
                Ok(Answer::Revision(self.revision))
            }
        }
    }
}

/// The writer thread's own state.
pub(super) struct Writer {
    pub(super) inner: Arc<Inner>,
    pub(super) log: Log,
    pub(super) snapshot_len: u64,
    pub(super) compaction: Compaction,
    /// After a failed compaction, the log length at which to try again.
    pub(super) retry_compaction_at: u64,
    /// Why writes are refused: an append failed, so the log's tail is unknown.
    pub(super) broken: Option<String>,
}

impl Writer {
    pub(super) fn run(mut self, jobs: mpsc::Receiver<Job>) {
        while let Ok(first) = jobs.recv() {
            let mut batch = vec![first];
            while batch.len() < MAX_BATCH {
                match jobs.try_recv() {
                    Ok(job) => batch.push(job),
                    Err(_) => break,
                }
            }
            self.commit(batch);
        }
    }

    /// Decides every job in order, makes the batch durable with one fsync, then applies it in
    /// memory and answers.
    fn commit(&mut self, batch: Vec<Job>) {
        if let Some(why) = &self.broken {
            for job in batch {
                let _ = job.reply.send(Err(StoreError::Broken(why.clone())));
            }
            return;
        }
        let mut answers = Vec::with_capacity(batch.len());
        let (over, revision, leader, released, lines) = {
            let st = read_state(&self.inner.state);
            let mut txn = Txn {
                keys: Overlay {
                    base: &st.data.keys,
                    over: BTreeMap::new(),
                },
                revision: st.data.revision,
                leader: st.leader.clone(),
                released: false,
                lines: Vec::new(),
            };
            for job in batch {
                let answer = txn.decide(job.request);
                answers.push((job.reply, answer));
            }
            (
                txn.keys.over,
                txn.revision,
                txn.leader,
                txn.released,
                txn.lines,
            )
        };
        if !lines.is_empty() {
            if let Err(e) = self.log.append(&lines) {
                let why = format!("{e}; the log's tail is unknown");
                tracing::error!(path = %self.inner.path.display(), error = %e, "the embedded store failed to append; refusing further writes until it is reopened");
                for (reply, answer) in answers {
                    let _ = reply.send(answer.and(Err(StoreError::Broken(why.clone()))));
                }
                self.broken = Some(why);
                return;
            }
        }
        {
            let mut st = write_state(&self.inner.state);
            for (k, e) in over {
                st.data.keys.set(k, e);
            }
            st.data.revision = revision;
            st.leader = leader;
        }
        if released {
            self.inner.released.notify_waiters();
        }
        for (reply, answer) in answers {
            let _ = reply.send(answer);
        }
        if self.compaction.due(self.log.len, self.snapshot_len)
            && self.log.len >= self.retry_compaction_at
        {
            if let Err(e) = self.compact() {
                // Every step of a compaction leaves a store that opens whole: carry on with the
                // log, and try again once it has grown by as much again.
                tracing::warn!(path = %self.inner.path.display(), error = %e, "cannot compact the embedded store; keeping the log");
                self.retry_compaction_at = self.log.len + self.compaction.min_log_bytes;
            }
        }
    }

    /// Folds the log into a new snapshot, then empties it (see the module doc for why each
    /// step is crash-safe).
    fn compact(&mut self) -> Result<(), StoreError> {
        let bytes = {
            let st = read_state(&self.inner.state);
            serde_json::to_vec(&st.data)
                .map_err(|e| StoreError::Corrupt(format!("cannot encode the store: {e}")))?
        };
        write_snapshot(&self.inner.path, &bytes)?;
        self.snapshot_len = bytes.len() as u64;
        self.retry_compaction_at = 0;
        self.log
            .file
            .set_len(0)
            .and_then(|()| self.log.file.sync_data())
            .map_err(|e| io_error("cannot empty", &self.log.path, e))?;
        self.log.len = 0;
        tracing::debug!(path = %self.inner.path.display(), snapshot_bytes = bytes.len(), "compacted the embedded store");
        Ok(())
    }
}

pub(super) fn revision(answer: Answer) -> Result<i64, StoreError> {
    match answer {
        Answer::Revision(rev) => Ok(rev),
        Answer::Busy(_) => Err(StoreError::Unavailable(
            "the embedded store answered a write as a campaign".into(),
        )),
    }
}
