use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use proptest::prelude::*;

use super::*;
use crate::agreements::tests::{agreement, principal, spec};
use crate::agreements::AgreementSet;
use crate::planner::Planner;

fn names(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("g{i:05}")).collect()
}

/// One back end of 400 units/s shared by A [0.25, 1] and B [0.75, 1]; 100 ms windows, so
/// 40 units per window.
fn two_tenants() -> Arc<Planner> {
    let s = spec(
        vec![
            principal("S", 400.0),
            principal("A", 0.0),
            principal("B", 0.0),
        ],
        vec![
            agreement("S", "A", 0.25, 1.0),
            agreement("S", "B", 0.75, 1.0),
        ],
    );
    Arc::new(Planner::per_window(
        &AgreementSet::from_spec(&s).expect("valid set"),
    ))
}

fn near(actual: f64, expected: f64) -> bool {
    (actual - expected).abs() <= 1e-6 * (1.0 + expected.abs())
}

fn check_shape(shape: &Shape, members: usize, fanout: usize) {
    assert_eq!(shape.len(), members);
    let mut seen = std::collections::HashSet::new();
    for p in shape.positions() {
        assert!(seen.insert(p.name.clone()), "{} placed twice", p.name);
        assert!(
            p.children.len() <= fanout,
            "{} has {} children",
            p.name,
            p.children.len()
        );
        assert!(p.level <= shape.depth());
        for c in &p.children {
            let child = shape.position(c).expect("a child is a member");
            assert_eq!(child.parent.as_deref(), Some(p.name.as_str()));
            assert_eq!(child.level, p.level + 1);
        }
        if let Some(parent) = &p.parent {
            let parent = shape.position(parent).expect("a parent is a member");
            assert!(parent.children.contains(&p.name));
        }
    }
}

#[test]
fn ten_thousand_gateways_at_fanout_32_give_a_root_of_ten_children_three_levels_down() {
    let members = names(10_000);
    let shape = Shape::new(&members, "g04711", 32).expect("valid");
    check_shape(&shape, 10_000, 32);
    assert_eq!(shape.depth(), 3);
    let root = shape.position("g04711").expect("root");
    assert!(root.is_root());
    assert_eq!(root.children.len(), 10);
}

#[test]
fn a_small_tree_hangs_every_member_from_the_root() {
    let members = names(3);
    let shape = Shape::new(&members, "g00001", 32).expect("valid");
    let root = shape.position("g00001").expect("root");
    assert_eq!(
        root.children,
        vec!["g00000".to_string(), "g00002".to_string()]
    );
    assert_eq!(shape.depth(), 1);
    let alone = Shape::new(&names(1), "g00000", 4).expect("valid");
    assert_eq!(alone.depth(), 0);
    assert!(alone.positions()[0].children.is_empty());
}

#[test]
fn a_shape_needs_a_fanout_of_two_and_a_root_that_is_a_member() {
    assert_eq!(
        Shape::new(&names(3), "g00000", 1).err(),
        Some(ShapeError::Fanout(1))
    );
    assert_eq!(
        Shape::new(&names(3), "x", 4).err(),
        Some(ShapeError::RootNotMember("x".into()))
    );
}

proptest! {
    #[test]
    fn every_member_has_one_place_within_the_fanout(n in 1usize..1500, k in 2usize..40, r in 0usize..1500) {
        let members = names(n);
        let root = members[r % n].clone();
        let shape = Shape::new(&members, &root, k).expect("valid");
        check_shape(&shape, n, k);
        // The depth is the least that fits: one level less could not hold everyone.
        if shape.depth() > 1 {
            let mut room = 1usize;
            for _ in 1..shape.depth() - 1 { room = room * k + 1; }
            prop_assert!(room * k < n - 1);
        }
    }
}

/// Delivers messages until none is left, dropping those `lose` says.
fn deliver(
    nodes: &mut HashMap<String, Node>,
    mut queue: VecDeque<Outgoing>,
    lose: &mut dyn FnMut() -> bool,
) {
    while let Some(out) = queue.pop_front() {
        match out {
            Outgoing::Report { to, report } => {
                if lose() {
                    continue;
                }
                if let Some(n) = nodes.get_mut(&to) {
                    if let Ok(more) = n.on_report(report) {
                        queue.extend(more);
                    }
                }
            }
            Outgoing::Quotas(q) => {
                for part in q.parts.clone() {
                    if lose() {
                        continue;
                    }
                    if let Some(n) = nodes.get_mut(&part.to) {
                        if let Ok(more) = n.on_quotas(&q) {
                            queue.extend(more);
                        }
                    }
                }
            }
        }
    }
}

/// Closes `window` everywhere with `demand`, then runs the deadlines deepest first.
fn run_window(
    nodes: &mut HashMap<String, Node>,
    shape: &Shape,
    window: u64,
    demand: &dyn Fn(&str) -> Vec<f64>,
    lose: &mut dyn FnMut() -> bool,
) {
    let mut queue = VecDeque::new();
    let mut order: Vec<&Position> = shape.positions().iter().collect();
    order.sort_by_key(|p| std::cmp::Reverse(p.level));
    for p in &order {
        if let Some(n) = nodes.get_mut(&p.name) {
            queue.extend(n.close_window(window, &demand(&p.name)));
        }
    }
    deliver(nodes, queue, lose);
    for p in &order {
        if let Some(n) = nodes.get_mut(&p.name) {
            let out = n.deadline(window).into_iter().collect();
            deliver(nodes, out, lose);
        }
    }
}

fn tree(
    members: &[String],
    root: &str,
    fanout: usize,
    planner: &Arc<Planner>,
) -> (Shape, HashMap<String, Node>) {
    let shape = Shape::new(members, root, fanout).expect("valid");
    let nodes = members
        .iter()
        .map(|m| {
            let mut n = Node::new(m.clone(), Arc::clone(planner));
            assert!(n.reshape(1, &shape));
            (m.clone(), n)
        })
        .collect();
    (shape, nodes)
}

#[test]
fn the_root_plans_global_demand_and_each_gateway_gets_its_part_two_windows_later() {
    let planner = two_tenants();
    let members = names(3);
    let (shape, mut nodes) = tree(&members, "g00000", 4, &planner);
    // Per window: g1 has A 30; g2 has A 10 and B 50; the root itself nothing.
    let demand = |name: &str| match name {
        "g00001" => vec![0.0, 30.0, 0.0],
        "g00002" => vec![0.0, 10.0, 50.0],
        _ => vec![0.0; 3],
    };
    run_window(&mut nodes, &shape, 7, &demand, &mut || false);
    // Global A 40, B 50 on 40 units: both at their floors, A 10, B 30; A's 10 split 3 : 1.
    let g1 = nodes.get_mut("g00001").expect("member").enforce(9);
    assert_eq!(g1.source, Source::Fresh);
    assert!(
        near(g1.units[1], 7.5) && near(g1.units[2], 0.0),
        "{:?}",
        g1.units
    );
    let g2 = nodes.get_mut("g00002").expect("member").enforce(9);
    assert!(
        near(g2.units[1], 2.5) && near(g2.units[2], 30.0),
        "{:?}",
        g2.units
    );
    // Every gateway learns the whole cluster's demand the plan was made from.
    for name in &members {
        let global = nodes.get(name).expect("member").global_demand().to_vec();
        assert_eq!(global, vec![0.0, 40.0, 50.0], "{name}");
    }
    // The next window without a new quota: the same, stale by one.
    let g2 = nodes.get_mut("g00002").expect("member").enforce(10);
    assert_eq!(g2.source, Source::Stale { age_windows: 1 });
    assert!(near(g2.units[2], 30.0));
    // Two silent windows: the share of the mandatory-only plan (A 10, B 30), by demand.
    let g2 = nodes.get_mut("g00002").expect("member").enforce(11);
    assert_eq!(g2.source, Source::Fallback { since_window: 11 });
    assert!(
        near(g2.units[1], 2.5) && near(g2.units[2], 30.0),
        "{:?}",
        g2.units
    );
    let g1 = nodes.get_mut("g00001").expect("member");
    g1.enforce(10);
    let g1 = g1.enforce(11);
    assert_eq!(g1.source, Source::Fallback { since_window: 11 });
    assert!(near(g1.units[1], 7.5), "{:?}", g1.units);
}

#[test]
fn a_gateway_back_from_a_stop_admits_nothing_until_a_fresh_quota_takes_it_back() {
    let planner = two_tenants();
    let members = names(3);
    let (shape, mut nodes) = tree(&members, "g00000", 4, &planner);
    let demand = |name: &str| match name {
        "g00001" => vec![0.0, 30.0, 0.0],
        "g00002" => vec![0.0, 10.0, 50.0],
        _ => vec![0.0; 3],
    };
    let run = |nodes: &mut HashMap<String, Node>, w: u64| {
        run_window(nodes, &shape, w, &demand, &mut || false);
        nodes
            .iter_mut()
            .map(|(name, n)| (name.clone(), n.enforce(w + 1)))
            .collect::<HashMap<_, _>>()
    };
    for w in 1..5 {
        run(&mut nodes, w);
    }
    // g2 stops for windows 6 to 11: the root drops it and plans for the others alone.
    let g2 = nodes.remove("g00002").expect("member");
    let mut last = HashMap::new();
    for w in 5..11 {
        last = run(&mut nodes, w);
    }
    let (a, b) = last.values().fold((0.0, 0.0), |(a, b), e| {
        assert_eq!(e.source, Source::Fresh);
        (a + e.units[1], b + e.units[2])
    });
    assert!(near(a, 30.0) && near(b, 0.0), "A {a} B {b} without g2");
    // Back at window 12, its old fallback share (A 2.5, B 30 by its demand) on top of
    // theirs would make 62.5 units of 40: it admits nothing until the root, which has
    // its report of window 11, hands it its part of the plan for window 13.
    nodes.insert("g00002".into(), g2);
    let back = run(&mut nodes, 11).remove("g00002").expect("member");
    assert!(matches!(back.source, Source::Fallback { .. }), "{back:?}");
    assert!(back.units.iter().all(|u| *u == 0.0), "{back:?}");
    let e = run(&mut nodes, 12).remove("g00002").expect("member");
    assert_eq!(e.source, Source::Fresh);
    assert!(near(e.units[2], 30.0), "{e:?}");
    // Never taken back (the whole cluster went): the fallback share after REJOIN_WINDOWS.
    let mut alone = nodes.remove("g00002").expect("member");
    let from = 20;
    for w in from..from + REJOIN_WINDOWS {
        let e = alone.enforce(w);
        assert!(e.units.iter().all(|u| *u == 0.0), "window {w}: {e:?}");
    }
    let e = alone.enforce(from + REJOIN_WINDOWS);
    assert!(near(e.units[2], 30.0), "{e:?}");
}

#[test]
fn a_stale_quota_is_the_last_plan_even_right_after_a_step() {
    let planner = two_tenants();
    let (shape, mut nodes) = tree(&names(2), "g00000", 4, &planner);
    // g1's share of A: half of A's 10 in the first plan, all of it after the step.
    let first = |_: &str| vec![0.0, 20.0, 40.0];
    let second = |name: &str| match name {
        "g00001" => vec![0.0, 20.0, 40.0],
        _ => vec![0.0, 0.0, 40.0],
    };
    run_window(&mut nodes, &shape, 1, &first, &mut || false);
    run_window(&mut nodes, &shape, 2, &second, &mut || false);
    let g1 = nodes.get_mut("g00001").expect("member");
    assert!(near(g1.enforce(3).units[1], 5.0));
    assert!(near(g1.enforce(4).units[1], 10.0));
    // The quota for window 5 is lost: the plan after the step stands in, not the lesser
    // of it and the plan before (that would undo the step for a window). A plan that
    // moved was sent twice, so a stand-in is off by more than the repeat threshold only
    // when both copies were lost.
    let stale = g1.enforce(5);
    assert_eq!(stale.source, Source::Stale { age_windows: 1 });
    assert!(
        near(stale.units[1], 10.0) && near(stale.units[2], 15.0),
        "{:?}",
        stale.units
    );
}

#[test]
fn while_the_engine_fails_a_stale_quota_is_the_lesser_of_the_last_two_plans() {
    let planner = two_tenants();
    let (shape, mut nodes) = tree(&names(2), "g00000", 4, &planner);
    // g1's share of A: all of A's 10 in the first plan (the root's report was lost with
    // the engine), half of it in the second.
    let first = |name: &str| match name {
        "g00001" => vec![0.0, 20.0, 40.0],
        _ => vec![0.0, 0.0, 40.0],
    };
    let second = |_: &str| vec![0.0, 20.0, 40.0];
    run_window(&mut nodes, &shape, 1, &first, &mut || false);
    run_window(&mut nodes, &shape, 2, &second, &mut || false);
    let mut g1 = nodes.get("g00001").expect("member").clone();
    assert!(near(g1.enforce(3).units[1], 10.0));
    assert!(near(g1.enforce(4).units[1], 5.0));
    // Without an engine failure the last plan stands in (independent losses).
    let mut calm = g1.clone();
    assert!(near(calm.enforce(5).units[1], 5.0));
    // The engine failed in window 4: the quota for window 5 went missing with it, and
    // the stand-in is the lesser of the last two plans, per principal.
    g1.engine_failed(4);
    let stale = g1.enforce(5);
    assert_eq!(stale.source, Source::Stale { age_windows: 1 });
    assert!(
        near(stale.units[1], 5.0) && near(stale.units[2], 15.0),
        "{:?}",
        stale.units
    );
    // The other way round: the outlier is the last plan (A all to g1 after the drop).
    let (shape, mut nodes) = tree(&names(2), "g00000", 4, &planner);
    run_window(&mut nodes, &shape, 1, &second, &mut || false);
    run_window(&mut nodes, &shape, 2, &first, &mut || false);
    let g1 = nodes.get_mut("g00001").expect("member");
    assert!(near(g1.enforce(3).units[1], 5.0));
    assert!(near(g1.enforce(4).units[1], 10.0));
    // A failure more than ENGINE_FAILED_WINDOWS before: the last plan stands in.
    let mut old = g1.clone();
    old.engine_failed(5 - ENGINE_FAILED_WINDOWS - 1);
    assert!(
        near(old.enforce(5).units[1], 10.0),
        "the failure is too old"
    );
    g1.engine_failed(3);
    assert!(
        near(g1.enforce(5).units[1], 5.0),
        "the lesser, not the outlier"
    );
}

#[test]
fn a_report_or_quotas_that_moved_are_sent_twice_and_steady_ones_once() {
    let planner = two_tenants();
    let shape = Shape::new(&names(2), "g00000", 4).expect("valid");
    let mut leaf = Node::new("g00001", Arc::clone(&planner));
    let mut root = Node::new("g00000", Arc::clone(&planner));
    assert!(leaf.reshape(1, &shape) && root.reshape(1, &shape));
    // Per window: the leaf's demand of A (B asks 20), how many copies of its report go
    // up, how many of the root's quotas come down, and A's quota in them.
    for (window, a, report_copies, quota_copies, quota_a) in [
        (1, 20.0, 2, 2, 20.0), // the first: no stand-in yet
        (2, 20.0, 1, 1, 20.0), // steady
        (3, 21.0, 1, 1, 20.0), // moved by 1/21 < REPEAT_CHANGE
        (4, 30.0, 2, 1, 20.0), // the demand moved by 9/30, the plan did not
        (5, 30.0, 1, 1, 20.0),
        (6, 0.0, 2, 2, 0.0), // stopped: both moved
        (7, 10.0, 2, 2, 10.0),
    ] {
        let out = leaf.close_window(window, &[0.0, a, 20.0]);
        let (to, report, n) = one_report(&out);
        assert_eq!(
            (to.as_str(), report.window, n),
            ("g00000", window, report_copies)
        );
        // Every copy arrives: the second is nothing new.
        for i in 0..n {
            assert_eq!(root.on_report(report.clone()), Ok(vec![]), "copy {i}");
        }
        let (q, n) = one_quotas(&root.close_window(window, &[0.0; 3]));
        assert_eq!(q.target_window, window + LEAD_WINDOWS);
        assert_eq!(n, quota_copies, "window {window}: {q:?}");
        // The leaf takes the first copy and counts the second as nothing new.
        for _ in 0..n {
            assert_eq!(leaf.on_quotas(&q), Ok(vec![]));
        }
        let e = leaf.enforce(q.target_window);
        assert_eq!(e.source, Source::Fresh);
        assert!(near(e.units[1], quota_a), "window {window}: {:?}", e.units);
    }
}

#[test]
fn an_aggregator_passes_its_parents_quotas_down_once_per_copy_taken() {
    let planner = two_tenants();
    // Fan-out 2: g00000 is the root, g00001 an aggregator over g00002 and g00003.
    let shape = Shape::new(&names(4), "g00000", 2).expect("valid");
    let mut agg = Node::new("g00001", Arc::clone(&planner));
    assert!(agg.reshape(1, &shape));
    let report = |from: &str| Report {
        epoch: 1,
        window: 1,
        from: from.into(),
        demand: vec![0.0, 10.0, 10.0],
    };
    agg.close_window(1, &[0.0; 3]);
    assert_eq!(agg.on_report(report("g00002")), Ok(vec![]));
    let up = agg.on_report(report("g00003")).expect("a child's report");
    assert_eq!(one_report(&up).2, 2);
    let q = Quotas {
        epoch: 1,
        window: 1,
        target_window: 3,
        from: "g00000".into(),
        parts: vec![QuotaPart {
            to: "g00001".into(),
            units: vec![0.0, 8.0, 12.0],
            fallback_units: vec![0.0, 4.0, 12.0],
        }],
        demand: vec![],
    };
    // The first copy is split for the children (twice: the first quotas they get); the
    // second copy changes nothing and sends nothing.
    let (down, copies) = one_quotas(&agg.on_quotas(&q).expect("from the parent"));
    assert_eq!(copies, 2);
    assert_eq!(down.parts.len(), 2);
    assert!(near(down.parts[0].units[1], 4.0) && near(down.parts[1].units[2], 6.0));
    assert_eq!(agg.on_quotas(&q), Ok(vec![]));
}

#[test]
fn with_one_copy_of_each_message_lost_the_plan_still_sees_the_step() {
    let planner = two_tenants();
    let members = names(2);
    let (shape, mut nodes) = tree(&members, "g00000", 2, &planner);
    let before = |_: &str| vec![0.0, 2.0, 8.0];
    let after = |_: &str| vec![0.0, 8.0, 0.0];
    for w in 1..4 {
        run_window(&mut nodes, &shape, w, &before, &mut || false);
    }
    // The step: every other delivery is lost, so of the leaf's report and of the root's
    // quotas (each sent twice, since they moved) exactly one copy arrives. Sent once,
    // the report would have been lost and stood in for by the one before (A 2, B 8),
    // and the leaf would get A 2, not 8.
    let mut flip = false;
    let mut lose = || {
        flip = !flip;
        flip
    };
    run_window(&mut nodes, &shape, 4, &after, &mut lose);
    // A alone asks 8 per gateway: each gateway gets its 8.
    for name in &members {
        let e = nodes
            .get_mut(name)
            .expect("member")
            .enforce(4 + LEAD_WINDOWS);
        assert_eq!(e.source, Source::Fresh, "{name}");
        assert!(near(e.units[1], 8.0), "{name}: {:?}", e.units);
    }
}

#[test]
fn a_gateway_never_told_its_share_falls_back_to_an_equal_part_of_the_guarantees() {
    let planner = two_tenants();
    let (_, mut nodes) = tree(&names(4), "g00000", 4, &planner);
    let e = nodes.get_mut("g00003").expect("member").enforce(0);
    assert_eq!(e.source, Source::Fallback { since_window: 0 });
    assert!(
        near(e.units[1], 10.0 / 4.0) && near(e.units[2], 30.0 / 4.0),
        "{:?}",
        e.units
    );
}

/// The one report in `out`, sent `copies` times (every copy the same).
fn one_report(out: &[Outgoing]) -> (String, Report, usize) {
    let reports: Vec<(&String, &Report)> = out
        .iter()
        .filter_map(|o| match o {
            Outgoing::Report { to, report } => Some((to, report)),
            Outgoing::Quotas(_) => None,
        })
        .collect();
    assert_eq!(reports.len(), out.len(), "only reports: {out:?}");
    let Some(&(to, first)) = reports.first() else {
        panic!("no report: {out:?}");
    };
    assert!(
        reports.iter().all(|(t, r)| *t == to && *r == first),
        "copies differ: {out:?}"
    );
    (to.clone(), first.clone(), reports.len())
}

/// The one quotas message in `out`, sent `copies` times (every copy the same).
fn one_quotas(out: &[Outgoing]) -> (Quotas, usize) {
    let all: Vec<&Quotas> = out
        .iter()
        .filter_map(|o| match o {
            Outgoing::Quotas(q) => Some(q),
            Outgoing::Report { .. } => None,
        })
        .collect();
    assert_eq!(all.len(), out.len(), "only quotas: {out:?}");
    let Some(&first) = all.first() else {
        panic!("no quotas: {out:?}");
    };
    assert!(all.iter().all(|q| *q == first), "copies differ: {out:?}");
    (first.clone(), all.len())
}

#[test]
fn an_aggregator_waits_for_its_children_then_reports_their_sum() {
    let planner = two_tenants();
    // Fan-out 2: g00000 is the root, g00001 an aggregator over g00002 and g00003.
    let shape = Shape::new(&names(4), "g00000", 2).expect("valid");
    let agg = shape.position("g00001").expect("member").clone();
    assert_eq!(
        agg.children,
        vec!["g00002".to_string(), "g00003".to_string()]
    );
    let mut node = Node::new("g00001", Arc::clone(&planner));
    node.reshape(1, &shape);
    let report = |from: &str, window: u64, a: f64| Report {
        epoch: 1,
        window,
        from: from.into(),
        demand: vec![0.0, a, 0.0],
    };
    assert!(
        node.close_window(3, &[0.0, 1.0, 2.0]).is_empty(),
        "waits for its children"
    );
    assert_eq!(node.on_report(report("g00002", 3, 4.0)), Ok(vec![]));
    let out = node
        .on_report(report("g00003", 3, 8.0))
        .expect("a child's report");
    // The first report has no stand-in at the parent: it is sent twice.
    let (to, up, copies) = one_report(&out);
    assert_eq!((to.as_str(), copies), ("g00000", 2));
    assert_eq!(up.demand, vec![0.0, 13.0, 2.0]);
    // Next window g00003 is silent: at the deadline its last report stands in.
    assert!(node.close_window(4, &[0.0, 1.0, 0.0]).is_empty());
    assert_eq!(node.on_report(report("g00002", 4, 4.0)), Ok(vec![]));
    let out = node.deadline(4);
    let (_, up, copies) = one_report(&out);
    assert_eq!(up.demand, vec![0.0, 13.0, 0.0]);
    assert_eq!(copies, 2, "B went from 2 to 0: moved");
    // Silent a second window: its demand is dropped.
    node.close_window(5, &[0.0, 1.0, 0.0]);
    assert_eq!(node.on_report(report("g00002", 5, 4.0)), Ok(vec![]));
    let out = node.deadline(5);
    let (_, up, _) = one_report(&out);
    assert_eq!(up.demand, vec![0.0, 5.0, 0.0]);
    assert!(node.deadline(5).is_empty(), "one report per window");
}

#[test]
fn messages_from_outside_the_tree_or_lower_epochs_or_malformed_are_ignored() {
    let planner = two_tenants();
    let (shape, mut nodes) = tree(&names(3), "g00000", 4, &planner);
    let root = nodes.get_mut("g00000").expect("root");
    let report = |from: &str, epoch: u64, demand: Vec<f64>| Report {
        epoch,
        window: 1,
        from: from.into(),
        demand,
    };
    assert_eq!(
        root.on_report(report("x", 1, vec![0.0; 3])),
        Err(Ignored::NotInTree)
    );
    assert_eq!(
        root.on_report(report("g00001", 0, vec![0.0; 3])),
        Err(Ignored::LowerEpoch)
    );
    assert_eq!(
        root.on_report(report("g00001", 2, vec![0.0; 3])),
        Err(Ignored::HigherEpoch)
    );
    assert_eq!(
        root.on_report(report("g00001", 1, vec![0.0; 2])),
        Err(Ignored::Malformed)
    );
    assert_eq!(
        root.on_report(report("g00001", 1, vec![0.0, f64::NAN, 0.0])),
        Err(Ignored::Malformed)
    );
    assert_eq!(
        root.on_report(report("g00001", 1, vec![0.0, -1.0, 0.0])),
        Err(Ignored::Malformed)
    );
    assert!(root.on_report(report("g00001", 1, vec![0.0; 3])).is_ok());
    // The second copy of the same report is taken as nothing new; another report of
    // the same window is old.
    assert_eq!(
        root.on_report(report("g00001", 1, vec![0.0; 3])),
        Ok(vec![])
    );
    assert_eq!(
        root.on_report(report("g00001", 1, vec![0.0, 1.0, 0.0])),
        Err(Ignored::Old)
    );
    // A quota from a root of a lower epoch is never obeyed.
    let leaf = nodes.get_mut("g00001").expect("leaf");
    leaf.observe_epoch(5);
    let q = Quotas {
        epoch: 1,
        window: 1,
        target_window: 3,
        from: "g00000".into(),
        parts: vec![QuotaPart {
            to: "g00001".into(),
            units: vec![0.0, 40.0, 0.0],
            fallback_units: vec![0.0; 3],
        }],
        demand: vec![],
    };
    assert_eq!(leaf.on_quotas(&q), Err(Ignored::LowerEpoch));
    assert!(!leaf.reshape(4, &shape), "a lower epoch's tree is refused");
}

#[test]
fn a_new_epoch_drops_the_quotas_of_the_old_root() {
    let planner = two_tenants();
    let (shape, mut nodes) = tree(&names(3), "g00000", 4, &planner);
    let demand = |_: &str| vec![0.0, 20.0, 20.0];
    run_window(&mut nodes, &shape, 1, &demand, &mut || false);
    let leaf = nodes.get_mut("g00002").expect("leaf");
    assert_eq!(leaf.enforce(3).source, Source::Fresh);
    // Paused, it comes back to a tree of epoch 9: the quota of epoch 1 is never enforced.
    let new_shape = Shape::new(&names(3), "g00001", 4).expect("valid");
    assert!(leaf.reshape(9, &new_shape));
    assert!(matches!(leaf.enforce(3).source, Source::Fallback { .. }));
}

#[test]
fn a_child_left_out_by_its_parent_gets_zero_and_passes_zero_down() {
    let planner = two_tenants();
    // Fan-out 2: g00001 is an aggregator over g00002 and g00003.
    let shape = Shape::new(&names(4), "g00000", 2).expect("valid");
    let mut node = Node::new("g00001", Arc::clone(&planner));
    node.reshape(1, &shape);
    for child in ["g00002", "g00003"] {
        let report = Report {
            epoch: 1,
            window: 1,
            from: child.into(),
            demand: vec![0.0, 5.0, 5.0],
        };
        assert_eq!(node.on_report(report), Ok(vec![]));
    }
    assert_eq!(one_report(&node.close_window(1, &[0.0, 5.0, 5.0])).2, 2);
    let out = node
        .on_quotas(&Quotas {
            epoch: 1,
            window: 1,
            target_window: 3,
            from: "g00000".into(),
            parts: vec![],
            demand: vec![],
        })
        .expect("from the parent");
    assert_eq!(node.enforce(3).units, vec![0.0; 3]);
    let (q, _) = one_quotas(&out);
    assert_eq!(q.parts.len(), 2);
    assert!(q.parts.iter().all(|p| p.units.iter().all(|u| *u == 0.0)));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]
    /// Whatever is lost, the fresh quotas enforced in a window (all from one plan) never
    /// sum above capacity, and with nothing lost they are the single-gateway plan of the global
    /// demand, split by local demand.
    #[test]
    fn quotas_never_sum_above_the_plan(
        n in 1usize..120,
        fanout in 2usize..9,
        seed in any::<u64>(),
        loss_percent in 0u64..30,
    ) {
        let planner = two_tenants();
        let members = names(n);
        let (shape, mut nodes) = tree(&members, &members[(seed % n as u64) as usize], fanout, &planner);
        let mut rng = seed | 1;
        let mut next = move || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        let demands: Vec<HashMap<String, Vec<f64>>> = (0..6)
            .map(|_| {
                members
                    .iter()
                    .map(|m| {
                        let a = (next() % 100) as f64 / 10.0;
                        let b = (next() % 100) as f64 / 10.0;
                        (m.clone(), vec![0.0, a, b])
                    })
                    .collect()
            })
            .collect();
        let capacity = 40.0;
        for (w, d) in demands.iter().enumerate() {
            let lossy = w % 2 == 1 && loss_percent > 0;
            let mut lose = || lossy && next() % 100 < loss_percent;
            run_window(&mut nodes, &shape, w as u64, &|name| d[name].clone(), &mut lose);
            let target = w as u64 + LEAD_WINDOWS;
            let mut fresh = [0.0f64; 3];
            let mut all_fresh = true;
            for node in nodes.values_mut() {
                let e = node.enforce(target);
                match e.source {
                    Source::Fallback { .. } => all_fresh = false,
                    Source::Stale { .. } => all_fresh = false,
                    Source::Fresh => {}
                }
                if e.source == Source::Fresh {
                    for (f, u) in fresh.iter_mut().zip(&e.units) { *f += u; }
                }
            }
            let total: f64 = fresh.iter().sum();
            prop_assert!(total <= capacity * (1.0 + 1e-9), "window {w}: {total}");
            if !lossy && all_fresh {
                let mut global = vec![0.0; 3];
                for v in d.values() { for (g, x) in global.iter_mut().zip(v) { *g += x; } }
                let plan = planner.solve(&global).expect("solves");
                for (i, (got, want)) in fresh.iter().zip(&plan.units).enumerate() {
                    prop_assert!(near(*got, *want) || (got - want).abs() < 1e-6,
                        "window {w} principal {i}: {got} vs {want}");
                }
                for (name, node) in nodes.iter_mut() {
                    let e = node.enforce(target);
                    for i in 1..3 {
                        let want = crate::planner::local_part(plan.units[i], d[name][i], global[i]);
                        prop_assert!((e.units[i] - want).abs() < 1e-6, "{name} {i}: {} vs {want}", e.units[i]);
                    }
                }
            }
        }
    }
}

#[test]
fn the_tree_below_is_alive_while_every_child_reports_within_two_windows() {
    let planner = two_tenants();
    let shape = Shape::new(&names(4), "g00000", 2).expect("valid");
    let mut agg = Node::new("g00001", Arc::clone(&planner));
    assert!(!agg.children_reporting(3), "in no tree yet");
    agg.reshape(1, &shape);
    let report = |from: &str, window: u64| Report {
        epoch: 1,
        window,
        from: from.into(),
        demand: vec![0.0, 1.0, 0.0],
    };
    assert!(!agg.children_reporting(3), "no child has reported");
    agg.on_report(report("g00002", 3))
        .expect("a child's report");
    assert!(!agg.children_reporting(3), "one child has not reported");
    agg.on_report(report("g00003", 2))
        .expect("a child's report");
    assert!(
        agg.children_reporting(3),
        "the last report of each counts in window 3"
    );
    assert!(
        !agg.children_reporting(4),
        "g00003's report of window 2 is too old for 4"
    );
    // A leaf has no children: nothing below it can be silent.
    let mut leaf = Node::new("g00002", Arc::clone(&planner));
    leaf.reshape(1, &shape);
    assert!(leaf.children_reporting(100));
}
