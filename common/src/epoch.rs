//! The leader epoch: the etcd revision at which the leader's election key was created.
//!
//! Revisions only grow, so a later leader always has a larger epoch. Agents keep the highest
//! epoch they have accepted and refuse anything older: a deposed leader can then do no harm.

use serde::{Deserialize, Serialize};
use std::fmt;

/// A leader epoch. Zero is never a valid epoch for a state-changing call.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct Epoch(pub u64);

impl Epoch {
    /// The epoch no leader has: what an agent that has never been fenced holds.
    pub const NONE: Epoch = Epoch(0);

    /// The raw revision.
    pub fn get(self) -> u64 {
        self.0
    }
}

impl fmt::Display for Epoch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}
