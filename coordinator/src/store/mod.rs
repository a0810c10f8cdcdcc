//! Where the coordinator keeps leadership and progress: etcd for several coordinators, or an
//! embedded store (a snapshot and an append-only log, locked so that two coordinators can never
//! share it) for a single one. Both sit
//! behind [`Store`], and the same conformance tests run against both.
//!
//! Every write of a leader goes through [`Store::fenced_write`]: a transaction guarded by
//! "my election key still exists with create revision == my epoch". A deposed leader's writes
//! fail with [`StoreError::Fenced`], wherever it is and whatever it believes.
//!
//! Keys given to and returned by the store are relative to the store's prefix (e.g. the etcd
//! prefix `/rollgate/<cluster>/`); the store adds and strips it.

mod embedded;
mod etcd;

pub use embedded::EmbeddedStore;
pub use etcd::{EtcdAccess, EtcdStore};

use rollgate_common::Epoch;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The write was refused because the caller is no longer the leader (its election key is
    /// gone or has another create revision). Not retryable: step down.
    #[error("fenced: epoch {epoch} no longer holds leadership; the write was rejected")]
    Fenced {
        /// The epoch the caller wrote with.
        epoch: Epoch,
    },
    /// etcd (or the file) could not be reached or answered an error; may succeed if retried.
    /// A write that fails this way may still have committed: re-read before retrying.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// The embedded store's file is locked by another coordinator process.
    #[error("embedded store {path} is locked by another coordinator (only one may use it)")]
    Locked {
        /// The store file.
        path: String,
    },
    /// Stored data could not be decoded.
    #[error("store data is corrupt: {0}")]
    Corrupt(String),
    /// The campaign was cancelled before leadership was won.
    #[error("campaign cancelled")]
    Cancelled,
    /// etcd refused this coordinator's credentials or the permission for a key. Not retryable:
    /// an operator must fix the user, password, role or certificate.
    #[error("etcd refused access: {0}")]
    Denied(String),
    /// etcd is out of space (its quota alarm is raised): every write fails until an operator
    /// frees space. Not retryable at once; a leader holds its upgrades, acting on nothing, and
    /// tries again slowly.
    #[error("store out of space: {0}")]
    Quota(String),
    /// etcd refused a request as too large (bytes or operations). Not retryable as is.
    #[error("store refused a request as too large: {0}")]
    TooLarge(String),
    /// The embedded store failed to append to its log (a full or failing disk): the log's tail
    /// is unknown, so it takes no writes until it is reopened, which cuts a torn tail. Not
    /// retryable in this process: a leader holds its upgrades and says why; restarting the
    /// coordinator (once the disk has room) reopens the store.
    #[error("the embedded store takes no writes until it is reopened (restart the coordinator once the disk is fixed): {0}")]
    Broken(String),
    /// The embedded store's directory lets other users replace its files.
    #[error("unsafe store location: {0}")]
    Unsafe(String),
}

impl StoreError {
    /// True when retrying the same call may succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(self, StoreError::Unavailable(_))
    }
}

/// One key and its value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyValue {
    /// The key, relative to the store prefix.
    pub key: String,
    /// The value.
    pub value: Vec<u8>,
    /// The revision at which this key was created.
    pub create_revision: i64,
    /// The revision at which it was last modified.
    pub mod_revision: i64,
}

/// A bounded read of the keys in `[start, end)`: at most `limit`, from the start (oldest
/// first) or from the end (newest first). Answers are always sorted by key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyPage {
    /// First key (inclusive), relative.
    pub start: String,
    /// Past the last key (exclusive), relative.
    pub end: String,
    /// At most this many keys.
    pub limit: usize,
    /// Take the keys nearest `end` rather than nearest `start`.
    pub from_end: bool,
}

/// One read of [`Store::read_all`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Read {
    /// One key (zero or one answer).
    Key(String),
    /// Every key under a prefix, sorted by key.
    Prefix(String),
    /// A bounded page of a key range (see [`KeyPage`]).
    Page(KeyPage),
}

/// One change inside a fenced write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WriteOp {
    /// Set `key` to `value`.
    Put {
        /// Relative key.
        key: String,
        /// Value.
        value: Vec<u8>,
    },
    /// Remove `key` (no error if absent).
    Delete {
        /// Relative key.
        key: String,
    },
    /// Remove every key in `[start, end)` (none is no error): how old history is cut.
    DeleteRange {
        /// First key removed (inclusive), relative.
        start: String,
        /// Past the last key removed (exclusive), relative.
        end: String,
    },
}

/// Who is campaigning.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    /// The coordinator id.
    pub id: String,
    /// Where its gRPC API can be reached (told to followers' clients and to agents).
    pub address: String,
}

/// The current leader, as any coordinator can read it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaderInfo {
    /// The leader's coordinator id.
    pub id: String,
    /// Its gRPC address.
    pub address: String,
    /// Its epoch (create revision of its election key).
    pub epoch: Epoch,
}

/// Leadership won by [`Store::campaign`]. `lost` is cancelled the moment leadership is lost:
/// a renewal failed or was not acknowledged in time, the lease expired, the key vanished, or
/// [`Store::resign`] ran. All leader work must stop when it is.
#[derive(Debug, Clone)]
pub struct Leadership {
    /// The fencing epoch: the create revision of the election key.
    pub epoch: Epoch,
    /// The election key (relative).
    pub key: String,
    /// Cancelled when leadership is lost.
    pub lost: CancellationToken,
    /// The lease TTL the store granted (may be more than asked).
    pub ttl: Duration,
    /// Store-specific handle (etcd lease id; 0 for embedded).
    pub lease_id: i64,
}

/// A store implemented outside this module, with the same contract as [`Store`]'s methods:
/// the deterministic simulation's, which loses and delays answers on purpose.
#[tonic::async_trait]
pub trait Backend: Send + Sync + std::fmt::Debug {
    /// See [`Store::get`].
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError>;
    /// See [`Store::range`].
    async fn range(&self, prefix: &str) -> Result<Vec<KeyValue>, StoreError>;
    /// See [`Store::page`]. The default reads the whole prefix the range shares.
    async fn page(&self, page: &KeyPage) -> Result<Vec<KeyValue>, StoreError> {
        let common = common_prefix(&page.start, &page.end);
        Ok(cut_page(self.range(common).await?, page))
    }
    /// See [`Store::read_all`]. The default reads one after the other: a backend whose
    /// writes can land between two reads must override it.
    async fn read_all(&self, reads: &[Read]) -> Result<Vec<Vec<KeyValue>>, StoreError> {
        let mut out = Vec::with_capacity(reads.len());
        for r in reads {
            out.push(match r {
                Read::Key(k) => self.get(k).await?.into_iter().collect(),
                Read::Prefix(p) => self.range(p).await?,
                Read::Page(p) => self.page(p).await?,
            });
        }
        Ok(out)
    }
    /// See [`Store::campaign`].
    async fn campaign(
        &self,
        me: &Candidate,
        ttl: Duration,
        cancel: &CancellationToken,
    ) -> Result<Leadership, StoreError>;
    /// See [`Store::leader`].
    async fn leader(&self) -> Result<Option<LeaderInfo>, StoreError>;
    /// See [`Store::fenced_write`].
    async fn fenced_write(
        &self,
        leadership: &Leadership,
        ops: Vec<WriteOp>,
    ) -> Result<i64, StoreError>;
    /// See [`Store::resign`].
    async fn resign(&self, leadership: &Leadership) -> Result<(), StoreError>;
}

/// A store: etcd or embedded (or another [`Backend`]). Cheap to clone.
#[derive(Debug, Clone)]
#[allow(clippy::large_enum_variant)] // a handful per process; boxing buys nothing
pub enum Store {
    /// etcd v3.
    Etcd(EtcdStore),
    /// Local files (a snapshot and an append-only log), for a single coordinator.
    Embedded(EmbeddedStore),
    /// Any other backend (the deterministic simulation's).
    Dyn(std::sync::Arc<dyn Backend>),
}

impl Store {
    /// Reads one key.
    pub async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        match self {
            Store::Etcd(s) => s.get(key).await,
            Store::Embedded(s) => s.get(key),
            Store::Dyn(s) => s.get(key).await,
        }
    }

    /// Reads every key under `prefix`, sorted by key.
    pub async fn range(&self, prefix: &str) -> Result<Vec<KeyValue>, StoreError> {
        match self {
            Store::Etcd(s) => s.range(prefix).await,
            Store::Embedded(s) => s.range(prefix),
            Store::Dyn(s) => s.range(prefix).await,
        }
    }

    /// Reads at most `page.limit` keys of a key range, so that a long history is never read
    /// whole.
    pub async fn page(&self, page: &KeyPage) -> Result<Vec<KeyValue>, StoreError> {
        match self {
            Store::Etcd(s) => s.page(page).await,
            Store::Embedded(s) => s.page(page),
            Store::Dyn(s) => s.page(page).await,
        }
    }

    /// Several reads that see one state of the store (no write lands between them), in one
    /// round trip: one answer per read, in order. A record kept under several keys (a pool's
    /// cursor, plan and runs) is read with it, so a follower reading while the leader writes
    /// never pairs one write's cursor with another's plan.
    pub async fn read_all(&self, reads: &[Read]) -> Result<Vec<Vec<KeyValue>>, StoreError> {
        match self {
            Store::Etcd(s) => s.read_all(reads).await,
            Store::Embedded(s) => s.read_all(reads),
            Store::Dyn(s) => s.read_all(reads).await,
        }
    }

    /// Campaigns until this candidate leads (or `cancel` fires). The lease is kept alive in
    /// the background every ttl/3 until leadership is lost or resigned.
    pub async fn campaign(
        &self,
        me: &Candidate,
        ttl: Duration,
        cancel: &CancellationToken,
    ) -> Result<Leadership, StoreError> {
        match self {
            Store::Etcd(s) => s.campaign(me, ttl, cancel).await,
            Store::Embedded(s) => s.campaign(me, ttl, cancel).await,
            Store::Dyn(s) => s.campaign(me, ttl, cancel).await,
        }
    }

    /// The current leader, if any.
    pub async fn leader(&self) -> Result<Option<LeaderInfo>, StoreError> {
        match self {
            Store::Etcd(s) => s.leader().await,
            Store::Embedded(s) => s.leader(),
            Store::Dyn(s) => s.leader().await,
        }
    }

    /// Applies `ops` atomically if and only if `leadership` still holds. Returns the revision
    /// of the write.
    pub async fn fenced_write(
        &self,
        leadership: &Leadership,
        ops: Vec<WriteOp>,
    ) -> Result<i64, StoreError> {
        match self {
            Store::Etcd(s) => s.fenced_write(leadership, ops).await,
            Store::Embedded(s) => s.fenced_write(leadership, ops).await,
            Store::Dyn(s) => s.fenced_write(leadership, ops).await,
        }
    }

    /// Gives leadership up at once (deletes the election key, revokes the lease) so that a
    /// follower takes over without waiting for the TTL. Cancels `leadership.lost`.
    pub async fn resign(&self, leadership: &Leadership) -> Result<(), StoreError> {
        match self {
            Store::Etcd(s) => s.resign(leadership).await,
            Store::Embedded(s) => s.resign(leadership).await,
            Store::Dyn(s) => s.resign(leadership).await,
        }
    }
}

fn common_prefix<'a>(a: &'a str, b: &str) -> &'a str {
    let n = a
        .char_indices()
        .zip(b.chars())
        .find(|((_, x), y)| x != y)
        .map_or(a.len().min(b.len()), |((i, _), _)| i);
    &a[..n]
}

/// The keys of `kvs` (sorted) that `page` selects.
fn cut_page(kvs: Vec<KeyValue>, page: &KeyPage) -> Vec<KeyValue> {
    let inside: Vec<KeyValue> = kvs
        .into_iter()
        .filter(|kv| kv.key >= page.start && kv.key < page.end)
        .collect();
    let skip = if page.from_end {
        inside.len().saturating_sub(page.limit)
    } else {
        0
    };
    inside.into_iter().skip(skip).take(page.limit).collect()
}
