//! The fault suite on a fixed set of seeds (see `rollgate-chaos` for a longer soak with random
//! seeds). Each run: 3-member etcd, 3 coordinators, 9 agents, a client load, an upgrade, and
//! faults at seeded random moments; the invariants are checked from the recorded history.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fixed_seeds_survive_injected_faults() -> anyhow::Result<()> {
    let _cluster = rollgate_tests::cluster_lock().await?;
    if rollgate_tests::etcd::etcd_binary().is_none() {
        anyhow::ensure!(
            !rollgate_tests::ci(),
            "etcd is missing and CI=true: install etcd-server"
        );
        return Ok(());
    }
    for seed in [7_u64, 1_000_003] {
        let r = rollgate_tests::chaos::run(seed, 3).await?;
        println!(
            "seed {seed}: ok in {:.1}s, faults: {}",
            r.took.as_secs_f64(),
            r.faults.join("; ")
        );
        assert_eq!(r.faults.len(), 3);
        assert!(r.served > 0);
    }
    Ok(())
}
