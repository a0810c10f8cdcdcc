//! rollgate's wire contract: generated types and services, one module per versioned package.

/// `rollgate.agent.v1`: the per-server agent.
pub mod agent {
    #[allow(missing_docs, clippy::all)]
    pub mod v1 {
        tonic::include_proto!("rollgate.agent.v1");
    }
}

/// `rollgate.operator.v1`: the coordinator's operator API.
pub mod operator {
    #[allow(missing_docs, clippy::all)]
    pub mod v1 {
        tonic::include_proto!("rollgate.operator.v1");
    }
}
