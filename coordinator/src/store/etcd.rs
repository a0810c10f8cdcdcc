//! The etcd store.
//!
//! Leadership is an election on raw KV, not etcd's Election API (whose `Campaign` can report a
//! leadership whose lease has already died, etcd#19597):
//!
//! 1. grant a lease and start renewing it *before* campaigning, so a long wait cannot let it
//!    lapse (nothing on the server renews a waiting candidate's lease);
//! 2. create `election/<lease-hex>` bound to the lease; its create revision is the epoch;
//! 3. lead once no key under `election/` has a lower create revision, waiting on a watch of the
//!    key just ahead (only its deletion can change the answer);
//! 4. re-read the key linearizably and insist it is still ours before reporting leadership.
//!
//! Every leader write is a transaction guarded by `CreateRevision(election key) == epoch`, so a
//! deposed leader's writes are refused by etcd itself, whatever that leader believes.

use super::{Candidate, KeyValue, LeaderInfo, Leadership, StoreError, WriteOp};
use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, DeleteOptions, GetOptions, LeaseKeepAliveStream,
    LeaseKeeper, PutOptions, SortOrder, SortTarget, Txn, TxnOp, WatchFilterType, WatchOptions,
};
use rollgate_common::Epoch;
use serde::{Deserialize, Serialize};
use std::collections::VecDeque;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::{sleep, sleep_until, timeout_at, Instant};
use tokio_util::sync::CancellationToken;

/// Bound on every unary request, so a hung member cannot stall the leader forever.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Bound on opening a connection to one endpoint.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// etcd raises smaller TTLs to its minimum (2 s with default raft timings) anyway.
const MIN_TTL_SECS: i64 = 2;
/// A waiting candidate re-checks this often even without watch events, in case a watch stalls
/// silently (e.g. a member that lost its connection to the others without closing ours).
const POLL_FALLBACK: Duration = Duration::from_secs(2);
/// Pause after a failed check while waiting, so an unreachable etcd is not hammered.
const RETRY_PAUSE: Duration = Duration::from_millis(200);
/// The election keys, relative to the store prefix.
const ELECTION_PREFIX: &str = "election/";

/// What an election key holds: who leads and where to reach it.
#[derive(Debug, Serialize, Deserialize)]
struct ElectionValue {
    id: String,
    address: String,
}

/// Progress and leadership kept in etcd v3, under one key prefix. Cheap to clone.
#[derive(Clone)]
pub struct EtcdStore {
    /// For unary requests, each bounded by [`REQUEST_TIMEOUT`].
    client: Client,
    /// For long-lived streams (lease keepalive, watches). A channel-wide request timeout would
    /// cut these streams and with them leadership, so this connection has none.
    streams: Client,
    prefix: Arc<str>,
    endpoints: Arc<[String]>,
}

impl fmt::Debug for EtcdStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EtcdStore")
            .field("endpoints", &self.endpoints)
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

/// Sorts an etcd error: a refusal of credentials or permissions is not retryable, the rest
/// (connection, timeouts, a member without a leader) may pass.
fn unavailable(what: &str, e: etcd_client::Error) -> StoreError {
    if let etcd_client::Error::GRpcStatus(status) = &e {
        let message = status.message();
        let refused = match status.code() {
            tonic::Code::PermissionDenied => true,
            // etcd answers a wrong password ("authentication failed") and a request without
            // credentials to an etcd with auth enabled ("user name is empty") this way.
            tonic::Code::InvalidArgument => {
                message.contains("authentication failed") || message.contains("user name is empty")
            }
            _ => false,
        };
        if refused {
            return StoreError::Denied(format!("{what}: {message}"));
        }
        // etcd's own words (server/etcdserver/api/v3rpc/rpctypes): out of space once the
        // backend reaches --quota-backend-bytes (an alarm stays raised until an operator
        // compacts, defragments and disarms it); a request over --max-request-bytes; a
        // transaction over --max-txn-ops.
        if message.contains("database space exceeded") {
            return StoreError::Quota(format!(
                "{what}: {message} (etcd is out of space: compact, defragment and disarm the alarm, or raise --quota-backend-bytes)"
            ));
        }
        if message.contains("request is too large")
            || message.contains("too many operations in txn request")
        {
            return StoreError::TooLarge(format!(
                "{what}: {message} (raise etcd's --max-request-bytes or --max-txn-ops)"
            ));
        }
    }
    StoreError::Unavailable(format!("{what}: {}", chain(&e)))
}

/// The error with its causes: a TLS failure sits a few sources down ("transport error" alone
/// says nothing).
fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let more = s.to_string();
        if !text.contains(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        source = s.source();
    }
    text
}

/// How to reach a secured etcd: TLS (CA, and client identity when etcd checks client
/// certificates) and user/password authentication.
#[derive(Clone, Default)]
pub struct EtcdAccess {
    /// TLS settings for `https://` endpoints.
    pub tls: Option<etcd_client::TlsOptions>,
    /// User and password.
    pub user: Option<(String, String)>,
}

impl std::fmt::Debug for EtcdAccess {
    // Never prints the password.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdAccess")
            .field("tls", &self.tls.is_some())
            .field("user", &self.user.as_ref().map(|(u, _)| u))
            .finish()
    }
}

/// The epoch as etcd sees it (a revision).
fn revision_of(epoch: Epoch) -> Result<i64, StoreError> {
    i64::try_from(epoch.get()).map_err(|_| StoreError::Fenced { epoch })
}

impl EtcdStore {
    /// Connects to etcd at `endpoints` (e.g. `http://127.0.0.1:2379`) and checks that it
    /// answers a linearizable read. Every key is kept under `prefix` (e.g. `/rollgate/default/`).
    pub async fn connect(endpoints: &[String], prefix: &str) -> Result<EtcdStore, StoreError> {
        Self::connect_with(endpoints, prefix, EtcdAccess::default()).await
    }

    /// [`EtcdStore::connect`] with TLS and authentication.
    pub async fn connect_with(
        endpoints: &[String],
        prefix: &str,
        access: EtcdAccess,
    ) -> Result<EtcdStore, StoreError> {
        if endpoints.is_empty() {
            return Err(StoreError::Unavailable(
                "no etcd endpoints configured".into(),
            ));
        }
        // require_leader: a member cut off from the quorum refuses requests and closes our
        // streams instead of leaving a keepalive or a watch hanging silently (etcd#7275).
        let mut base = ConnectOptions::new()
            .with_require_leader(true)
            .with_connect_timeout(CONNECT_TIMEOUT);
        if let Some(tls) = access.tls {
            base = base.with_tls(tls);
        }
        if let Some((user, password)) = access.user {
            // etcd's tokens expire (5 min idle by default): fetch a new one rather than fail.
            base = base.with_user(user, password).with_auto_token_refresh(true);
        }
        let client = Client::connect(endpoints, Some(base.clone().with_timeout(REQUEST_TIMEOUT)))
            .await
            .map_err(|e| unavailable("cannot connect to etcd", e))?;
        let streams = Client::connect(endpoints, Some(base))
            .await
            .map_err(|e| unavailable("cannot connect to etcd", e))?;
        let store = EtcdStore {
            client,
            streams,
            prefix: Arc::from(prefix),
            endpoints: Arc::from(endpoints.to_vec()),
        };
        // Fail now, with a clear error, on a wrong address rather than at the first campaign.
        store
            .client
            .kv_client()
            .get(prefix, Some(GetOptions::new().with_count_only()))
            .await
            .map_err(|e| {
                unavailable(
                    &format!("etcd at {} does not answer", endpoints.join(",")),
                    e,
                )
            })?;
        Ok(store)
    }

    /// The key prefix this store works under.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    fn full(&self, key: &str) -> String {
        format!("{}{key}", self.prefix)
    }

    fn relative(&self, kv: &etcd_client::KeyValue) -> Result<KeyValue, StoreError> {
        let key = kv
            .key_str()
            .map_err(|_| StoreError::Corrupt(format!("etcd key is not utf-8: {:?}", kv.key())))?;
        let key = key.strip_prefix(&*self.prefix).ok_or_else(|| {
            StoreError::Corrupt(format!(
                "etcd returned key {key} outside prefix {}",
                self.prefix
            ))
        })?;
        Ok(KeyValue {
            key: key.to_owned(),
            value: kv.value().to_vec(),
            create_revision: kv.create_revision(),
            mod_revision: kv.mod_revision(),
        })
    }

    /// Linearizable read of one full key.
    async fn get_raw(&self, full: &str) -> Result<Option<etcd_client::KeyValue>, StoreError> {
        let mut resp = self
            .client
            .kv_client()
            .get(full, None)
            .await
            .map_err(|e| unavailable("etcd get failed", e))?;
        Ok(resp.take_kvs().into_iter().next())
    }

    /// Reads one key.
    pub async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        self.get_raw(&self.full(key))
            .await?
            .map(|kv| self.relative(&kv))
            .transpose()
    }

    /// Reads every key under `prefix` (relative), sorted by key.
    pub async fn range(&self, prefix: &str) -> Result<Vec<KeyValue>, StoreError> {
        let resp = self
            .client
            .kv_client()
            .get(self.full(prefix), Some(GetOptions::new().with_prefix()))
            .await
            .map_err(|e| unavailable("etcd range failed", e))?;
        self.sorted(resp.kvs())
    }

    /// See [`super::Store::page`].
    pub async fn page(&self, page: &super::KeyPage) -> Result<Vec<KeyValue>, StoreError> {
        let Some((start, opts)) = self.page_request(page) else {
            return Ok(Vec::new());
        };
        let resp = self
            .client
            .kv_client()
            .get(start, Some(opts))
            .await
            .map_err(|e| unavailable("etcd range failed", e))?;
        self.sorted(resp.kvs())
    }

    /// The start key and options of `page`'s range request; `None` for an empty page.
    fn page_request(&self, page: &super::KeyPage) -> Option<(String, GetOptions)> {
        if page.start >= page.end || page.limit == 0 {
            return None;
        }
        let order = if page.from_end {
            SortOrder::Descend
        } else {
            SortOrder::Ascend
        };
        let opts = GetOptions::new()
            .with_range(self.full(&page.end))
            .with_limit(i64::try_from(page.limit).unwrap_or(i64::MAX))
            .with_sort(SortTarget::Key, order);
        Some((self.full(&page.start), opts))
    }

    /// A range answer's keys, relative and sorted by key.
    fn sorted(&self, kvs: &[etcd_client::KeyValue]) -> Result<Vec<KeyValue>, StoreError> {
        let mut out = kvs
            .iter()
            .map(|kv| self.relative(kv))
            .collect::<Result<Vec<_>, _>>()?;
        out.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(out)
    }

    /// See [`super::Store::read_all`]: one transaction of range requests, which etcd serves
    /// at a single revision.
    pub async fn read_all(&self, reads: &[super::Read]) -> Result<Vec<Vec<KeyValue>>, StoreError> {
        // An empty page needs no request: `asked` maps each read to its request, if any.
        let mut ops = Vec::with_capacity(reads.len());
        let mut asked = Vec::with_capacity(reads.len());
        for r in reads {
            let op = match r {
                super::Read::Key(k) => Some(TxnOp::get(self.full(k), None)),
                super::Read::Prefix(p) => Some(TxnOp::get(
                    self.full(p),
                    Some(GetOptions::new().with_prefix()),
                )),
                super::Read::Page(page) => self
                    .page_request(page)
                    .map(|(start, opts)| TxnOp::get(start, Some(opts))),
            };
            asked.push(op.is_some());
            ops.extend(op);
        }
        let resp = self
            .client
            .kv_client()
            .txn(Txn::new().and_then(ops))
            .await
            .map_err(|e| unavailable("etcd read transaction failed", e))?;
        let mut answers = resp.op_responses().into_iter();
        let mut out = Vec::with_capacity(reads.len());
        for was_asked in asked {
            if !was_asked {
                out.push(Vec::new());
                continue;
            }
            let Some(etcd_client::TxnOpResponse::Get(got)) = answers.next() else {
                return Err(StoreError::Unavailable(
                    "etcd read transaction: an answer is missing or is not a read".into(),
                ));
            };
            out.push(self.sorted(got.kvs())?);
        }
        Ok(out)
    }

    /// The current leader: the election key with the lowest create revision.
    pub async fn leader(&self) -> Result<Option<LeaderInfo>, StoreError> {
        let opts = GetOptions::new()
            .with_prefix()
            .with_sort(SortTarget::Create, SortOrder::Ascend)
            .with_limit(1);
        let mut resp = self
            .client
            .kv_client()
            .get(self.full(ELECTION_PREFIX), Some(opts))
            .await
            .map_err(|e| unavailable("etcd leader read failed", e))?;
        let Some(kv) = resp.take_kvs().into_iter().next() else {
            return Ok(None);
        };
        let v: ElectionValue = serde_json::from_slice(kv.value()).map_err(|e| {
            StoreError::Corrupt(format!(
                "election key {:?} holds no candidate: {e}",
                String::from_utf8_lossy(kv.key())
            ))
        })?;
        let epoch = u64::try_from(kv.create_revision()).map_err(|_| {
            StoreError::Corrupt(format!("negative create revision {}", kv.create_revision()))
        })?;
        Ok(Some(LeaderInfo {
            id: v.id,
            address: v.address,
            epoch: Epoch(epoch),
        }))
    }

    /// Campaigns until `me` leads, `cancel` fires (→ [`StoreError::Cancelled`]) or the
    /// campaign's own lease dies (→ [`StoreError::Unavailable`]). The lease is renewed every
    /// ttl/3 from before the campaign until leadership is lost or resigned. The renewal task
    /// ends only with `lost`: a holder that drops its [`Leadership`] without [`resign`] must
    /// cancel `lost` itself, or the lease (and leadership) stays renewed.
    ///
    /// [`resign`]: EtcdStore::resign
    pub async fn campaign(
        &self,
        me: &Candidate,
        ttl: Duration,
        cancel: &CancellationToken,
    ) -> Result<Leadership, StoreError> {
        // Whole seconds only (etcd#11746); round up so the caller gets at least what it asked.
        let asked = i64::try_from(ttl.as_millis().div_ceil(1000))
            .unwrap_or(i64::MAX)
            .max(MIN_TTL_SECS);
        let mut leases = self.client.lease_client();
        let grant = tokio::select! {
            _ = cancel.cancelled() => return Err(StoreError::Cancelled),
            r = leases.grant(asked, None) => r.map_err(|e| unavailable("etcd lease grant failed", e))?,
        };
        let lease_id = grant.id();
        let granted = u64::try_from(grant.ttl())
            .ok()
            .filter(|t| *t > 0)
            .ok_or_else(|| {
                StoreError::Unavailable(format!(
                    "etcd granted lease {lease_id:x} with ttl {}",
                    grant.ttl()
                ))
            })?;
        let ttl = Duration::from_secs(granted);
        let lost = CancellationToken::new();
        // Until leadership is handed over, a failure or a dropped future must not leave the
        // lease renewed forever nor the candidate key in the queue.
        let mut guard = CampaignGuard {
            client: self.client.clone(),
            lease_id,
            lost: lost.clone(),
            armed: true,
        };

        tokio::select! {
            _ = cancel.cancelled() => return Err(StoreError::Cancelled),
            r = self.start_keepalive(lease_id, ttl, lost.clone()) => r?,
        }
        let key = format!("{ELECTION_PREFIX}{lease_id:016x}");
        let epoch = tokio::select! {
            _ = cancel.cancelled() => return Err(StoreError::Cancelled),
            _ = lost.cancelled() => {
                return Err(StoreError::Unavailable(format!("the campaign's lease {lease_id:x} was lost while waiting to lead")));
            }
            r = self.win(me, &key, lease_id) => r?,
        };
        if lost.is_cancelled() {
            return Err(StoreError::Unavailable(format!(
                "the campaign's lease {lease_id:x} was lost while waiting to lead"
            )));
        }
        guard.armed = false;
        tracing::info!(id = %me.id, epoch, lease = %format!("{lease_id:x}"), ttl = ?ttl, "won the etcd election");
        Ok(Leadership {
            epoch: Epoch(epoch.unsigned_abs()),
            key,
            lost,
            ttl,
            lease_id,
        })
    }

    /// Puts our election key and waits until it is the oldest. Returns the epoch.
    async fn win(&self, me: &Candidate, key: &str, lease_id: i64) -> Result<i64, StoreError> {
        let full = self.full(key);
        let value = serde_json::to_vec(&ElectionValue {
            id: me.id.clone(),
            address: me.address.clone(),
        })
        .map_err(|e| StoreError::Corrupt(format!("cannot encode candidate: {e}")))?;
        // The lease is fresh, so the key cannot exist yet; the compare keeps a retried request
        // from moving its create revision (and so the epoch).
        let txn = Txn::new()
            .when([Compare::create_revision(full.clone(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(
                full.clone(),
                value,
                Some(PutOptions::new().with_lease(lease_id)),
            )]);
        self.client
            .kv_client()
            .txn(txn)
            .await
            .map_err(|e| unavailable("etcd campaign put failed", e))?;
        let epoch = self.check_mine(&full, lease_id, None).await?;

        loop {
            match self.key_ahead(epoch).await {
                Ok(None) => break,
                Ok(Some((ahead, rev))) => {
                    tracing::debug!(ahead = %String::from_utf8_lossy(&ahead), epoch, "waiting for the candidate ahead to go");
                    if let Err(e) = self.wait_gone(&ahead, rev).await {
                        tracing::warn!(error = %e, "election watch failed; re-checking");
                        sleep(RETRY_PAUSE).await;
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "election check failed; retrying");
                    sleep(RETRY_PAUSE).await;
                }
            }
        }
        // Phantom-leadership guard: the queue says we lead, but only if our key is still the
        // one we created, on our lease.
        self.check_mine(&full, lease_id, Some(epoch)).await
    }

    /// Linearizable read of our election key: it must exist on our lease (and, when given,
    /// with create revision `epoch`). Returns its create revision.
    async fn check_mine(
        &self,
        full: &str,
        lease_id: i64,
        epoch: Option<i64>,
    ) -> Result<i64, StoreError> {
        match self.get_raw(full).await? {
            Some(kv)
                if kv.lease() == lease_id && epoch.is_none_or(|e| e == kv.create_revision()) =>
            {
                Ok(kv.create_revision())
            }
            Some(kv) => Err(StoreError::Unavailable(format!(
                "election key {full} changed under us (lease {:x}, create revision {})",
                kv.lease(),
                kv.create_revision()
            ))),
            None => Err(StoreError::Unavailable(format!(
                "election key {full} vanished: lease {lease_id:x} expired"
            ))),
        }
    }

    /// The candidate just ahead of `epoch` (highest create revision below it) and the revision
    /// the answer was read at; `None` when nobody is ahead.
    async fn key_ahead(&self, epoch: i64) -> Result<Option<(Vec<u8>, i64)>, StoreError> {
        if epoch <= 1 {
            return Ok(None);
        }
        let opts = GetOptions::new()
            .with_prefix()
            .with_max_create_revision(epoch - 1)
            .with_sort(SortTarget::Create, SortOrder::Descend)
            .with_limit(1);
        let mut resp = self
            .client
            .kv_client()
            .get(self.full(ELECTION_PREFIX), Some(opts))
            .await
            .map_err(|e| unavailable("etcd election read failed", e))?;
        let rev = resp.header().map(|h| h.revision()).unwrap_or(0);
        Ok(resp
            .take_kvs()
            .into_iter()
            .next()
            .map(|kv| (kv.key().to_vec(), rev)))
    }

    /// Returns once `key` may have been deleted after revision `rev` (a delete event, a
    /// cancelled or closed watch) or after [`POLL_FALLBACK`]; the caller re-checks.
    async fn wait_gone(&self, key: &[u8], rev: i64) -> Result<(), StoreError> {
        let opts = WatchOptions::new()
            .with_start_revision(rev + 1)
            .with_filters([WatchFilterType::NoPut]);
        let deadline = Instant::now() + POLL_FALLBACK;
        let mut watches = self.streams.watch_client();
        let mut stream = tokio::select! {
            _ = sleep_until(deadline) => return Ok(()),
            r = watches.watch(key.to_vec(), Some(opts)) => r.map_err(|e| unavailable("etcd watch failed", e))?,
        };
        loop {
            tokio::select! {
                _ = sleep_until(deadline) => return Ok(()),
                m = stream.message() => match m {
                    Ok(Some(resp)) if resp.canceled() || !resp.events().is_empty() => return Ok(()),
                    Ok(Some(_)) => {} // the watch was created; keep waiting
                    Ok(None) => return Ok(()),
                    Err(e) => return Err(unavailable("etcd watch broke", e)),
                },
            }
        }
    }

    /// Opens the keepalive stream (its first renewal acknowledged) and spawns the loop that
    /// renews every ttl/3 until `lost` is cancelled.
    async fn start_keepalive(
        &self,
        lease_id: i64,
        ttl: Duration,
        lost: CancellationToken,
    ) -> Result<(), StoreError> {
        let sent = Instant::now();
        let opened = tokio::time::timeout(
            renew_budget(ttl),
            self.streams.lease_client().keep_alive(lease_id),
        )
        .await;
        let (keeper, stream) = match opened {
            Ok(Ok(pair)) => pair,
            Ok(Err(e)) => return Err(unavailable("etcd lease keepalive failed", e)),
            Err(_) => {
                return Err(StoreError::Unavailable(format!(
                    "etcd did not acknowledge keepalive of lease {lease_id:x}"
                )))
            }
        };
        tokio::spawn(keep_alive_loop(keeper, stream, lease_id, ttl, sent, lost));
        Ok(())
    }

    /// Applies `ops` in one transaction if and only if the election key still has create
    /// revision `leadership.epoch`. On refusal, cancels `leadership.lost` and returns
    /// [`StoreError::Fenced`]. Returns the revision of the write.
    pub async fn fenced_write(
        &self,
        leadership: &Leadership,
        ops: Vec<WriteOp>,
    ) -> Result<i64, StoreError> {
        let epoch = leadership.epoch;
        // Leadership already given up here: the server might still accept the write (the lease
        // can outlive our own deadline), but leader work must stop the moment `lost` fires.
        if leadership.lost.is_cancelled() {
            return Err(StoreError::Fenced { epoch });
        }
        let guard = Compare::create_revision(
            self.full(&leadership.key),
            CompareOp::Equal,
            revision_of(epoch)?,
        );
        let ops: Vec<TxnOp> = ops
            .into_iter()
            .map(|op| match op {
                WriteOp::Put { key, value } => TxnOp::put(self.full(&key), value, None),
                WriteOp::Delete { key } => TxnOp::delete(self.full(&key), None),
                WriteOp::DeleteRange { start, end } => TxnOp::delete(
                    self.full(&start),
                    Some(DeleteOptions::new().with_range(self.full(&end))),
                ),
            })
            .collect();
        let resp = self
            .client
            .kv_client()
            .txn(Txn::new().when([guard]).and_then(ops))
            .await
            .map_err(|e| unavailable("etcd fenced write failed", e))?;
        if !resp.succeeded() {
            tracing::warn!(epoch = %epoch, key = %leadership.key, "fenced write refused: leadership is gone");
            leadership.lost.cancel();
            return Err(StoreError::Fenced { epoch });
        }
        resp.header()
            .map(|h| h.revision())
            .ok_or_else(|| StoreError::Corrupt("etcd txn response without header".into()))
    }

    /// Gives leadership up: stops renewing, deletes the election key (fenced, so a successor's
    /// key is never touched) and revokes the lease, so a follower takes over at once.
    pub async fn resign(&self, leadership: &Leadership) -> Result<(), StoreError> {
        leadership.lost.cancel();
        let full = self.full(&leadership.key);
        let txn = Txn::new()
            .when([Compare::create_revision(
                full.clone(),
                CompareOp::Equal,
                revision_of(leadership.epoch)?,
            )])
            .and_then([TxnOp::delete(full, None)]);
        let deleted = self
            .client
            .kv_client()
            .txn(txn)
            .await
            .map_err(|e| unavailable("etcd resign failed", e));
        if leadership.lease_id != 0 {
            // The key is already gone when the delete worked; a failed revoke only means the
            // lease lives out its TTL, so it is logged, not returned.
            if let Err(e) = self.client.lease_client().revoke(leadership.lease_id).await {
                if !is_not_found(&e) {
                    tracing::warn!(lease = %format!("{:x}", leadership.lease_id), error = %e, "lease revoke failed on resign");
                }
            }
        }
        deleted?;
        tracing::info!(epoch = %leadership.epoch, "resigned leadership");
        Ok(())
    }
}

fn is_not_found(e: &etcd_client::Error) -> bool {
    matches!(e, etcd_client::Error::GRpcStatus(s) if s.code() == tonic::Code::NotFound)
}

/// How long after the send of the last acknowledged renewal we still trust the lease. The
/// server expires it no earlier than TTL after it *received* that renewal, so stopping a
/// quarter TTL earlier leaves room for clock drift and a slow scheduler.
fn renew_budget(ttl: Duration) -> Duration {
    ttl - ttl / 4
}

/// Renews `lease_id` every ttl/3 and cancels `lost` as soon as the lease cannot be trusted: a
/// response with ttl <= 0 (expired or revoked), a broken stream, or no acknowledgement within
/// [`renew_budget`] of the last acknowledged send. Ends when `lost` is cancelled.
async fn keep_alive_loop(
    mut keeper: LeaseKeeper,
    mut stream: LeaseKeepAliveStream,
    lease_id: i64,
    ttl: Duration,
    first_sent: Instant,
    lost: CancellationToken,
) {
    let every = ttl / 3;
    let budget = renew_budget(ttl);
    let mut acked_sent = first_sent;
    // Send instants of renewals not yet answered; etcd answers one stream in order.
    let mut in_flight: VecDeque<Instant> = VecDeque::new();
    let mut next = first_sent + every;
    let why = loop {
        tokio::select! {
            biased;
            _ = lost.cancelled() => return, // resigned, fenced or dropped by the campaign
            _ = sleep_until(acked_sent + budget) => break format!("no renewal acknowledged within {budget:?}"),
            m = stream.message() => match m {
                Ok(Some(resp)) if resp.ttl() > 0 => {
                    if let Some(sent) = in_flight.pop_front() {
                        acked_sent = sent;
                    }
                }
                Ok(Some(_)) => break "the lease has expired or was revoked".to_owned(),
                Ok(None) => break "the keepalive stream was closed".to_owned(),
                Err(e) => break format!("the keepalive stream broke: {e}"),
            },
            _ = sleep_until(next) => {
                let now = Instant::now();
                match timeout_at(acked_sent + budget, keeper.keep_alive()).await {
                    Ok(Ok(())) => in_flight.push_back(now),
                    Ok(Err(e)) => break format!("cannot send a renewal: {e}"),
                    Err(_) => break format!("no renewal acknowledged within {budget:?}"),
                }
                next = (next + every).max(now + every / 2);
            }
        }
    };
    tracing::warn!(lease = %format!("{lease_id:x}"), reason = %why, "etcd lease lost: leadership is gone");
    lost.cancel();
}

/// Undoes a campaign that did not hand over leadership: stops the keepalive and revokes the
/// lease (which deletes the candidate key, so those behind it re-check at once).
struct CampaignGuard {
    client: Client,
    lease_id: i64,
    lost: CancellationToken,
    armed: bool,
}

impl Drop for CampaignGuard {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        self.lost.cancel();
        // Best effort: without a runtime (or if the revoke fails) the lease expires by TTL.
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            let mut client = self.client.clone();
            let id = self.lease_id;
            rt.spawn(async move {
                if let Err(e) = client.lease_revoke(id).await {
                    tracing::debug!(lease = %format!("{id:x}"), error = %e, "revoke of an abandoned campaign's lease failed");
                }
            });
        }
    }
}
