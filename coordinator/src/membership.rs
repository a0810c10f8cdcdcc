//! Servers that joined their pool by themselves: the only store records about membership.
//!
//! An agent with a `[join]` table calls `Membership.Join` on a coordinator; the leader checks
//! the pool is configured and stores `members/<pool>/<server>` (the agent's address and upgrade
//! domain) together with a bump of `membership/version`, in one fenced write. Every coordinator
//! (followers too, so they can take over with connections ready) reads the version key every
//! [`REFRESH`] and, when it moved, the members, and adds or drops agent connections. Health is
//! never written: it stays in memory.
//!
//! Servers listed in a coordinator's config keep working as before and win over a member of
//! the same id. A plan fixes its servers when it starts (see `PoolSpec::for_plan`): a server
//! that joins or leaves during an upgrade does not change it.

use crate::config::{PoolConfig, ServerConfig};
use crate::store::{Store, StoreError, WriteOp};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::time::Duration;

/// How often every coordinator looks for membership changes (one small read).
pub const REFRESH: Duration = Duration::from_secs(1);

/// The key whose revision moves with every membership change.
pub const VERSION_KEY: &str = "membership/version";

/// The store prefix of every member.
pub const MEMBERS_PREFIX: &str = "members/";

/// The store key of `server`'s membership of `pool`.
pub fn member_key(pool: &str, server: &str) -> String {
    format!("{MEMBERS_PREFIX}{pool}/{server}")
}

/// What a joined server stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberRecord {
    /// Where coordinators reach its agent (host:port).
    pub address: String,
    /// Its upgrade domain; `None`: assigned like an unlisted configured server.
    #[serde(default)]
    pub upgrade_domain: Option<String>,
    /// When it joined or last changed (unix ms).
    pub joined_ms: u64,
}

/// Every joined server, by pool then server.
pub type Members = BTreeMap<String, BTreeMap<String, MemberRecord>>;

/// Reads the version key's revision (0: never written).
pub async fn version(store: &Store) -> Result<i64, StoreError> {
    Ok(store
        .get(VERSION_KEY)
        .await?
        .map_or(0, |kv| kv.mod_revision))
}

/// Reads every member. An unreadable record is skipped with a warning: one bad key must not
/// take the others' agents away.
pub async fn load(store: &Store) -> Result<Members, StoreError> {
    let mut members = Members::new();
    for kv in store.range(MEMBERS_PREFIX).await? {
        let Some((pool, server)) = kv
            .key
            .strip_prefix(MEMBERS_PREFIX)
            .and_then(|rest| rest.split_once('/'))
        else {
            continue;
        };
        match serde_json::from_slice::<MemberRecord>(&kv.value) {
            Ok(r) => {
                members
                    .entry(pool.to_owned())
                    .or_default()
                    .insert(server.to_owned(), r);
            }
            Err(e) => tracing::warn!(key = %kv.key, error = %e, "unreadable member record skipped"),
        }
    }
    Ok(members)
}

/// The writes that store `record` as `server`'s membership of `pool` (moving it out of any
/// other pool it was in).
pub fn join_writes(
    pool: &str,
    server: &str,
    record: &MemberRecord,
    other_pools: &[String],
) -> Vec<WriteOp> {
    let mut ops: Vec<WriteOp> = other_pools
        .iter()
        .map(|p| WriteOp::Delete {
            key: member_key(p, server),
        })
        .collect();
    ops.push(WriteOp::Put {
        key: member_key(pool, server),
        // A struct of strings and a number: serde_json cannot fail on it.
        value: serde_json::to_vec(record).unwrap_or_default(),
    });
    ops.push(bump(record.joined_ms));
    ops
}

/// The writes that remove `server` from `pool`.
pub fn leave_writes(pool: &str, server: &str, now_ms: u64) -> Vec<WriteOp> {
    vec![
        WriteOp::Delete {
            key: member_key(pool, server),
        },
        bump(now_ms),
    ]
}

fn bump(now_ms: u64) -> WriteOp {
    WriteOp::Put {
        key: VERSION_KEY.to_owned(),
        value: now_ms.to_string().into_bytes(),
    }
}

/// `cfg` with the servers that joined it. A server listed in the config (of any pool, in
/// `configured`) stays where the config puts it.
pub fn with_members(
    cfg: &PoolConfig,
    members: &Members,
    configured: &std::collections::HashSet<String>,
) -> PoolConfig {
    let mut pool = cfg.clone();
    if let Some(joined) = members.get(&cfg.name) {
        for (id, m) in joined {
            if configured.contains(id) {
                continue;
            }
            pool.servers.push(ServerConfig {
                id: id.clone(),
                agent: m.address.clone(),
                upgrade_domain: m.upgrade_domain.clone(),
            });
        }
    }
    pool
}
