//! rollgate's wire contract: generated types and services, one module per versioned package.

pub mod codec;
pub mod line;

/// `rollgate.agent.v1`: the per-server agent.
pub mod agent {
    #[allow(missing_docs, clippy::all)]
    pub mod v1 {
        tonic::include_proto!("rollgate.agent.v1");
    }

    impl v1::AgentErrorDetail {
        /// A status with `code` and `message` carrying this detail (prost-encoded) in its
        /// details, so that callers act on the typed reason rather than on the text.
        pub fn to_status(&self, code: tonic::Code, message: impl Into<String>) -> tonic::Status {
            use prost::Message;
            tonic::Status::with_details(code, message, self.encode_to_vec().into())
        }

        /// The detail carried by `status`, if it has one this crate can read.
        pub fn from_status(status: &tonic::Status) -> Option<v1::AgentErrorDetail> {
            use prost::Message;
            let bytes = status.details();
            if bytes.is_empty() {
                return None;
            }
            v1::AgentErrorDetail::decode(bytes).ok()
        }

        /// The reason, `Unspecified` when unknown to this version.
        pub fn reason_or_unspecified(&self) -> v1::AgentErrorReason {
            v1::AgentErrorReason::try_from(self.reason).unwrap_or(v1::AgentErrorReason::Unspecified)
        }
    }
}

/// `rollgate.operator.v1`: the coordinator's operator API.
pub mod operator {
    #[allow(missing_docs, clippy::all)]
    pub mod v1 {
        tonic::include_proto!("rollgate.operator.v1");
    }

    /// Lower-case names of the wire enums, as the CLI prints them (e.g. `running`, `in_flight`).
    pub mod names {
        use super::v1 as pb;

        fn short(full: &str, prefix: &str) -> String {
            full.strip_prefix(prefix)
                .unwrap_or(full)
                .to_ascii_lowercase()
        }

        pub fn upgrade_state(v: i32) -> String {
            pb::UpgradeState::try_from(v).map_or("unknown".into(), |e| {
                short(e.as_str_name(), "UPGRADE_STATE_")
            })
        }
        pub fn server_phase(v: i32) -> String {
            pb::ServerPhase::try_from(v).map_or("unknown".into(), |e| {
                short(e.as_str_name(), "SERVER_PHASE_")
            })
        }
        pub fn step(v: i32) -> String {
            match pb::Step::try_from(v) {
                Ok(pb::Step::Unspecified) => String::new(),
                Ok(e) => short(e.as_str_name(), "STEP_"),
                Err(_) => "unknown".into(),
            }
        }
        pub fn direction(v: i32) -> String {
            pb::Direction::try_from(v)
                .map_or("unknown".into(), |e| short(e.as_str_name(), "DIRECTION_"))
        }
        pub fn domain_phase(v: i32) -> String {
            pb::DomainPhase::try_from(v).map_or("unknown".into(), |e| {
                short(e.as_str_name(), "DOMAIN_PHASE_")
            })
        }
        pub fn server_state(v: i32) -> String {
            pb::ServerState::try_from(v).map_or("unknown".into(), |e| {
                short(e.as_str_name(), "SERVER_STATE_")
            })
        }
        /// The procedure's own words: Ready, Busy, InsufficientActiveFrontEnds.
        pub fn readiness_state(v: i32) -> &'static str {
            match pb::ReadinessState::try_from(v) {
                Ok(pb::ReadinessState::Ready) => "Ready",
                Ok(pb::ReadinessState::Busy) => "Busy",
                Ok(pb::ReadinessState::InsufficientActiveFrontEnds) => {
                    "InsufficientActiveFrontEnds"
                }
                _ => "Unknown",
            }
        }
    }

    /// Response metadata: the leader's address, set by a follower refusing a leader-only call.
    pub const LEADER_HEADER: &str = "rollgate-leader";
    /// Response metadata: how long to wait before retrying an UNAVAILABLE call (milliseconds),
    /// set while a coordinator is taking over leadership.
    pub const RETRY_AFTER_HEADER: &str = "rollgate-retry-after-ms";

    /// The wait `status` asks for before a retry (its `rollgate-retry-after-ms`), if any.
    pub fn retry_after(status: &tonic::Status) -> Option<std::time::Duration> {
        status
            .metadata()
            .get(RETRY_AFTER_HEADER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok())
            .map(std::time::Duration::from_millis)
    }
}
