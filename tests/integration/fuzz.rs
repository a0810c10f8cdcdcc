//! Bad input never panics and never passes silently: the config and plan parsers under
//! proptest-generated input, and the gRPC surface of both daemons, each a real process reused
//! across cases (`agent_api`, `operator_api`; what they share is in `wire`).

mod agent_api;
mod operator_api;
mod wire;

use proptest::prelude::*;
use rollgate_agent::config::AgentConfig;
use rollgate_common::config::parse_toml;
use rollgate_coordinator::config::CoordinatorConfig;
use rollgate_coordinator::engine::Plan;
use std::path::Path;

const AGENT: &str = include_str!("../../deploy/agent.example.toml");
const COORDINATOR: &str = include_str!("../../deploy/coordinator.example.toml");

/// Mutates a valid document: cut it, duplicate a line, or replace a slice with noise.
fn mutate(doc: &str, how: u8, at: usize, noise: &str) -> String {
    let at = doc
        .char_indices()
        .map(|(i, _)| i)
        .nth(at % doc.chars().count().max(1))
        .unwrap_or(0);
    match how % 3 {
        0 => doc[..at].to_owned(),
        1 => format!("{}{}{}", &doc[..at], noise, &doc[at..]),
        _ => {
            let end = doc[at..].find('\n').map_or(doc.len(), |n| at + n);
            format!("{}{}{}", &doc[..at], noise, &doc[end..])
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 400, ..ProptestConfig::default() })]

    #[test]
    fn agent_config_never_panics(how in any::<u8>(), at in any::<usize>(), noise in "[ -~\n]{0,40}") {
        let text = mutate(AGENT, how, at, &noise);
        if let Ok(mut cfg) = parse_toml::<AgentConfig>(Path::new("fuzz.toml"), &text) {
            cfg.resolve_defaults();
            let _ = cfg.validate();
        }
    }

    #[test]
    fn coordinator_config_never_panics(how in any::<u8>(), at in any::<usize>(), noise in "[ -~\n]{0,40}") {
        let text = mutate(COORDINATOR, how, at, &noise);
        if let Ok(cfg) = parse_toml::<CoordinatorConfig>(Path::new("fuzz.toml"), &text) {
            let _ = cfg.validate();
            for p in &cfg.pools {
                let spec = p.spec();
                prop_assert_eq!(spec.servers().count(), p.servers.len());
            }
        }
    }

    #[test]
    fn plan_json_never_panics(noise in "[ -~]{0,200}") {
        if let Ok(plan) = serde_json::from_str::<Plan>(&noise) {
            let _ = plan.validate();
        }
    }
}
