//! Plans applied through the replication core: a lead change and a swap
//! spread to every node, the capacity layout does not undo them, data
//! follows the swap, and a plan made from an older layout is refused.

use gossipkv::replication::layout::LayoutMove;
use gossipkv::NodeId;
use simulations::sim::Sim;
use std::time::Duration;

#[test]
fn lead_changes_and_swaps_apply_once_spread_and_stay() {
    let mut sim = Sim::new(5, 4, 32, 3);
    sim.bootstrap(4);
    sim.run_until_condition(
        Duration::from_secs(1),
        Duration::from_secs(120),
        Sim::converged,
    )
    .expect("the cluster settles");
    let layout = sim.layout().expect("a layout").current().clone();
    let v = layout.version();
    let p0 = layout.replicas(0).to_vec();
    let lead = [LayoutMove::Lead {
        partition: 0,
        from: p0[0],
        to: p0[1],
    }];
    // Nothing moves to a node the applying node does not see up.
    let down = p0[1];
    let applier = (1..=4)
        .map(NodeId)
        .find(|n| *n != down)
        .expect("another node");
    sim.crash(down);
    sim.run_until_condition(Duration::from_secs(1), Duration::from_secs(120), |s| {
        s.replica(applier)
            .is_some_and(|r| !r.membership().alive().contains(&down))
    })
    .expect("the crash is noticed");
    let refused = sim.apply_layout_moves(applier, v, &lead);
    assert!(refused.unwrap_err().contains("not up"));
    sim.restart(down);
    sim.run_until_condition(Duration::from_secs(1), Duration::from_secs(300), |s| {
        s.converged()
            && s.up_nodes().iter().all(|&id| {
                s.replica(id)
                    .is_some_and(|r| r.membership().alive().len() == 3)
            })
    })
    .expect("the restarted node is back");
    let stale = sim.apply_layout_moves(NodeId(1), v.saturating_sub(1), &lead);
    assert!(stale.unwrap_err().contains("layout changed"));
    sim.apply_layout_moves(NodeId(1), v, &lead)
        .expect("applies");
    let again = sim.apply_layout_moves(NodeId(1), v, &lead);
    assert!(again.unwrap_err().contains("layout changed"));

    // A swap between two nodes, each taking one partition of the other.
    let now = sim.layout().expect("a layout").current().clone();
    let a = p0[1];
    let b = (1..=4)
        .map(NodeId)
        .find(|n| !now.holds(*n, 0))
        .expect("a node without partition 0");
    let q = (0..32)
        .find(|&q| now.holds(b, q) && !now.holds(a, q))
        .expect("a partition b holds and a does not");
    let swap = [
        LayoutMove::Replace {
            partition: 0,
            from: a,
            to: b,
        },
        LayoutMove::Replace {
            partition: q,
            from: b,
            to: a,
        },
    ];
    // Wait out the lead change's transition first: plans need a settled
    // layout.
    sim.run_until_condition(Duration::from_secs(1), Duration::from_secs(120), |s| {
        s.up_nodes().iter().all(|&id| {
            s.replica(id).is_some_and(|r| {
                r.layout().current().version() == v + 1 && !r.layout().in_transition()
            })
        })
    })
    .expect("every node has the lead change, complete");
    sim.apply_layout_moves(NodeId(2), now.version(), &swap)
        .expect("the swap applies");
    sim.run_until_condition(Duration::from_secs(1), Duration::from_secs(600), |s| {
        s.converged() && s.layout().is_some_and(|l| !l.in_transition())
    })
    .expect("the swap's data moves and the cluster settles");
    for id in sim.up_nodes() {
        let l = sim.replica(id).expect("up").layout().current();
        assert_eq!(l.version(), now.version() + 1, "node {id}");
        assert_eq!(
            l.replicas(0)[0],
            b,
            "node {id}: the swap keeps the lead's place"
        );
        assert!(l.holds(a, q) && !l.holds(b, q), "node {id}");
    }
    // Another minute of maintenance: the capacity layout leaves it alone.
    sim.run_for(Duration::from_secs(60));
    let last = sim.layout().expect("a layout").current();
    assert_eq!(last.version(), now.version() + 1);
}
