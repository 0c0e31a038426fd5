use super::*;
use crate::agreements::tests::{agreement, principal, random_spec, spec};
use crate::agreements::{AgreementSet, AgreementsSpec, Objective};
use proptest::prelude::*;

fn planner(s: &AgreementsSpec) -> Planner {
    Planner::new(&AgreementSet::from_spec(s).expect("valid set"))
}

fn near(actual: f64, expected: f64) -> bool {
    (actual - expected).abs() <= 1e-6 * (1.0 + expected.abs())
}

/// One server of 320/s, A [0.2, 1], B [0.8, 1] (paper §5.1.1).
fn one_server() -> AgreementsSpec {
    spec(
        vec![
            principal("S", 320.0),
            principal("A", 0.0),
            principal("B", 0.0),
        ],
        vec![agreement("S", "A", 0.2, 1.0), agreement("S", "B", 0.8, 1.0)],
    )
}

#[test]
fn one_server_b_under_its_guarantee_gets_all_a_the_rest() {
    let p = planner(&one_server());
    let a = p.solve(&[0.0, 10_000.0, 130.0]).expect("solves");
    assert!(near(a.units[2], 130.0), "B {}", a.units[2]);
    assert!(near(a.units[1], 190.0), "A {}", a.units[1]);
    // B stops: A gets the whole server.
    let a = p.solve(&[0.0, 10_000.0, 0.0]).expect("solves");
    assert!(near(a.units[1], 320.0), "A alone {}", a.units[1]);
}

#[test]
fn one_server_both_flooding_get_their_guarantees() {
    let p = planner(&one_server());
    let a = p.solve(&[0.0, 5_000.0, 5_000.0]).expect("solves");
    assert!(near(a.units[1], 64.0), "A {}", a.units[1]);
    assert!(near(a.units[2], 256.0), "B {}", a.units[2]);
}

/// Two servers of 320, B → A [0.5, 0.5] (paper §5.2.1).
fn two_servers() -> AgreementsSpec {
    spec(
        vec![principal("A", 320.0), principal("B", 320.0)],
        vec![agreement("B", "A", 0.5, 0.5)],
    )
}

#[test]
fn two_servers_both_flooding() {
    let a = planner(&two_servers())
        .solve(&[5_000.0, 5_000.0])
        .expect("solves");
    assert!(near(a.units[0], 480.0), "A {}", a.units[0]);
    assert!(near(a.units[1], 160.0), "B {}", a.units[1]);
}

#[test]
fn two_servers_a_sending_400() {
    let a = planner(&two_servers())
        .solve(&[400.0, 5_000.0])
        .expect("solves");
    assert!(near(a.units[0], 400.0), "A {}", a.units[0]);
    assert!(near(a.units[1], 240.0), "B {}", a.units[1]);
    let on_b: f64 = a
        .placement
        .iter()
        .filter(|pl| pl.owner == 1)
        .map(|pl| pl.units)
        .sum();
    assert!(near(on_b, 320.0), "B's server carries {on_b}");
}

#[test]
fn community_serves_busier_principals_more() {
    // Paper §5.1.2: server 250, A and B both [0.2, 1]; A sends twice B's rate.
    let s = spec(
        vec![
            principal("S", 250.0),
            principal("A", 0.0),
            principal("B", 0.0),
        ],
        vec![agreement("S", "A", 0.2, 1.0), agreement("S", "B", 0.2, 1.0)],
    );
    let a = planner(&s).solve(&[0.0, 270.0, 135.0]).expect("solves");
    assert!(near(a.units[1], 2.0 * a.units[2]), "{:?}", a.units);
    assert!(near(a.units[1] + a.units[2], 250.0));
    assert!(near(a.theta.expect("community has θ"), 250.0 / 405.0));
}

fn provider_pool(price_a: f64, price_b: f64) -> AgreementsSpec {
    let mut s = spec(
        vec![
            principal("P", 640.0),
            principal("A", 0.0),
            principal("B", 0.0),
        ],
        vec![agreement("P", "A", 0.8, 1.0), agreement("P", "B", 0.2, 1.0)],
    );
    s.objective = Objective::Provider;
    s.principals[1].price = price_a;
    s.principals[2].price = price_b;
    s
}

#[test]
fn provider_both_flooding() {
    let a = planner(&provider_pool(2.0, 1.0))
        .solve(&[0.0, 5_000.0, 5_000.0])
        .expect("solves");
    assert_eq!(a.theta, None);
    assert!(near(a.units[1], 512.0), "A {}", a.units[1]);
    assert!(near(a.units[2], 128.0), "B {}", a.units[2]);
}

#[test]
fn provider_gives_spare_capacity_to_the_higher_price() {
    // A under its guarantee leaves 640 − 300 − 128 spare: it goes to B only if it pays.
    let p = planner(&provider_pool(2.0, 1.0));
    let a = p.solve(&[0.0, 300.0, 5_000.0]).expect("solves");
    assert!(
        near(a.units[1], 300.0) && near(a.units[2], 340.0),
        "{:?}",
        a.units
    );
    // B alone gets the whole pool, limited by its demand.
    let a = p.solve(&[0.0, 0.0, 400.0]).expect("solves");
    assert!(near(a.units[2], 400.0), "{:?}", a.units);
    // Price decides who gets the optional part when both want more than the pool.
    let s = {
        let mut s = provider_pool(1.0, 3.0);
        s.agreements[0].share = [0.5, 1.0];
        s.agreements[1].share = [0.2, 1.0];
        s
    };
    let a = planner(&s).solve(&[0.0, 5_000.0, 5_000.0]).expect("solves");
    assert!(
        near(a.units[1], 320.0) && near(a.units[2], 320.0),
        "{:?}",
        a.units
    );
}

#[test]
fn provider_zero_prices_still_serve_as_much_as_possible() {
    let a = planner(&provider_pool(0.0, 0.0))
        .solve(&[0.0, 5_000.0, 5_000.0])
        .expect("solves");
    assert!(near(a.units[1] + a.units[2], 640.0), "{:?}", a.units);
}

#[test]
fn zero_demand_and_zero_capacity_need_no_solver() {
    let p = planner(&one_server());
    let a = p.solve(&[0.0, 0.0, 0.0]).expect("solves");
    assert_eq!(a.units, vec![0.0; 3]);
    assert_eq!(a.theta, Some(1.0));
    let nothing = spec(vec![principal("A", 0.0), principal("B", 0.0)], vec![]);
    let a = planner(&nothing).solve(&[10.0, 0.0]).expect("solves");
    assert_eq!(a.units, vec![0.0; 2]);
    assert_eq!(a.theta, Some(0.0));
    let mut provider = nothing.clone();
    provider.objective = Objective::Provider;
    let a = planner(&provider).solve(&[10.0, 5.0]).expect("solves");
    assert_eq!(a.units, vec![0.0; 2]);
}

#[test]
fn bad_demand_is_refused() {
    let p = planner(&one_server());
    assert!(matches!(
        p.solve(&[1.0]),
        Err(PlanError::DemandLength {
            expected: 3,
            got: 1
        })
    ));
    assert!(matches!(
        p.solve(&[0.0, -1.0, 0.0]),
        Err(PlanError::BadDemand { principal: 1, .. })
    ));
    assert!(matches!(
        p.solve(&[0.0, f64::NAN, 0.0]),
        Err(PlanError::BadDemand { .. })
    ));
}

#[test]
fn locality_limit_caps_what_a_server_carries() {
    let mut s = two_servers();
    s.principals[1].locality_limit_units_per_s = Some(200.0);
    let a = planner(&s).solve(&[5_000.0, 5_000.0]).expect("solves");
    let on_b: f64 = a
        .placement
        .iter()
        .filter(|pl| pl.owner == 1)
        .map(|pl| pl.units)
        .sum();
    assert!(on_b <= 200.0 + 1e-6, "B's server carries {on_b}");
    // The guarantees on B's server (160 for A, 160 for B) are scaled to fit 200.
    assert!(near(a.units[1], 100.0), "{:?}", a.units);
    assert!(near(a.units[0], 420.0), "{:?}", a.units);
}

#[test]
fn per_window_planner_works_in_credits() {
    let set = AgreementSet::from_spec(&one_server()).expect("valid");
    let p = Planner::per_window(&set);
    // 100 ms windows: 32 units of capacity per window; B sends 13 per window.
    let a = p.solve(&[0.0, 1_000.0, 13.0]).expect("solves");
    assert!(
        near(a.units[2], 13.0) && near(a.units[1], 19.0),
        "{:?}",
        a.units
    );
    assert!(near(p.mandatory()[2], 25.6));
}

#[test]
fn local_part_splits_by_demand() {
    assert!(near(local_part(300.0, 25.0, 100.0), 75.0));
    assert_eq!(local_part(300.0, 0.0, 0.0), 0.0);
}

fn arb_case(objective: Objective) -> impl Strategy<Value = (AgreementsSpec, Vec<f64>)> {
    (2usize..=6).prop_flat_map(move |n| {
        let caps = prop::collection::vec(prop_oneof![Just(0.0), 1.0..2000.0f64], n);
        let edges = prop::collection::vec(
            (0..n, 0..n, 0.0..1.0f64, 0.0..1.0f64),
            0..(n * (n - 1)).min(12),
        );
        let demand = prop::collection::vec(prop_oneof![Just(0.0), 0.0..3000.0f64], n);
        let prices = prop::collection::vec(0.0..5.0f64, n);
        (caps, edges, demand, prices).prop_map(move |(caps, edges, demand, prices)| {
            let mut s = random_spec(&caps, &edges);
            s.objective = objective;
            for (p, price) in s.principals.iter_mut().zip(prices) {
                p.price = price;
            }
            (s, demand)
        })
    })
}

const TOL: f64 = 1e-6;

fn check_common(
    s: &AgreementsSpec,
    demand: &[f64],
) -> Result<(AgreementSet, Allocation), TestCaseError> {
    let set = AgreementSet::from_spec(s).expect("generated sets are valid");
    let a = Planner::new(&set).solve(demand).expect("always solvable");
    let access = set.access();
    let total_capacity: f64 = set
        .principals()
        .iter()
        .map(|p| p.capacity_units_per_s)
        .sum();
    let total: f64 = a.units.iter().sum();
    prop_assert!(total <= total_capacity * (1.0 + TOL) + TOL);
    for (i, &x) in a.units.iter().enumerate() {
        let (mc, oc) = (
            access.mandatory_units_per_s(i),
            access.optional_units_per_s(i),
        );
        prop_assert!(x >= 0.0);
        prop_assert!(
            x <= demand[i] + TOL,
            "principal {i}: {x} > demand {}",
            demand[i]
        );
        prop_assert!(
            x <= (mc + oc) * (1.0 + TOL) + TOL,
            "principal {i}: {x} > MC+OC {}",
            mc + oc
        );
        if demand[i] <= mc {
            prop_assert!(
                x >= demand[i] * (1.0 - TOL) - TOL,
                "principal {i}: {x} < demand {} ≤ MC {mc}",
                demand[i]
            );
        }
    }
    Ok((set, a))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    #[allow(clippy::needless_range_loop)] // user × owner pairs read clearer by index
    fn community_bounds_hold_and_work_is_conserved((s, demand) in arb_case(Objective::Community)) {
        let (set, a) = check_common(&s, &demand)?;
        let n = demand.len();
        let mut load = vec![0.0; n];
        for pl in &a.placement {
            load[pl.owner] += pl.units;
            let access = set.access();
            let bound = access.pair_mandatory_units_per_s(pl.owner, pl.user)
                + access.pair_optional_units_per_s(pl.owner, pl.user);
            prop_assert!(pl.units <= bound * (1.0 + TOL) + TOL);
        }
        for (k, l) in load.iter().enumerate() {
            prop_assert!(*l <= set.principals()[k].capacity_units_per_s * (1.0 + TOL) + TOL);
        }
        // Work conserving: a principal left short has no pair with room on both sides.
        let access = set.access();
        for user in 0..n {
            if a.units[user] >= demand[user] - 1e-4 {
                continue;
            }
            for owner in 0..n {
                let cap = set.principals()[owner].capacity_units_per_s;
                let bound = (access.pair_mandatory_units_per_s(owner, user)
                    + access.pair_optional_units_per_s(owner, user)).min(cap);
                let used: f64 = a.placement.iter()
                    .filter(|pl| pl.user == user && pl.owner == owner)
                    .map(|pl| pl.units).sum();
                let pair_room = bound - used;
                let owner_room = cap - load[owner];
                prop_assert!(pair_room <= 1e-4 || owner_room <= 1e-4,
                    "user {user} short by {} while owner {owner} has room {owner_room} and pair room {pair_room}",
                    demand[user] - a.units[user]);
            }
        }
    }

    #[test]
    fn provider_bounds_hold((s, demand) in arb_case(Objective::Provider)) {
        let (_, a) = check_common(&s, &demand)?;
        prop_assert_eq!(a.theta, None);
    }

    #[test]
    fn adding_capacity_never_lowers_theta(
        (s, demand) in arb_case(Objective::Community),
        who in 0usize..6,
        extra in 1.0..1000.0f64,
    ) {
        let before = planner(&s).solve(&demand).expect("solves").theta.expect("θ");
        let mut bigger = s.clone();
        let who = who % bigger.principals.len();
        bigger.principals[who].capacity_units_per_s += extra;
        let after = planner(&bigger).solve(&demand).expect("solves").theta.expect("θ");
        prop_assert!(after >= before - 1e-6, "θ fell from {before} to {after}");
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn merging_owners_is_exact((s, demand) in arb_case(Objective::Community)) {
        let merged = planner(&s);
        let mut full = merged.clone();
        full.merge_owners = false;
        let a = merged.solve(&demand).expect("solves");
        let b = full.solve(&demand).expect("solves");
        let (ta, tb) = (a.theta.unwrap_or(0.0), b.theta.unwrap_or(0.0));
        prop_assert!((ta - tb).abs() <= 1e-6, "θ {ta} merged vs {tb} full");
        let (sa, sb): (f64, f64) = (a.units.iter().sum(), b.units.iter().sum());
        prop_assert!((sa - sb).abs() <= 1e-6 * (1.0 + sb), "total {sa} merged vs {sb} full");
    }

    #[test]
    fn merging_owners_is_exact_on_shared_pools(
        caps in prop::collection::vec(prop_oneof![Just(0.0), 1.0..500.0f64], 2..8),
        pledge in prop::collection::vec((0.0..0.6f64, 0.0..0.4f64), 8),
        demand in prop::collection::vec(prop_oneof![Just(0.0), 0.0..800.0f64], 9),
    ) {
        // Owners pledge to a pool that shares with everyone: the case merging is for,
        // with upper bounds below 1 so that some pairs bind and some owners cannot merge.
        let n = caps.len();
        let mut principals: Vec<_> = caps.iter().enumerate()
            .map(|(i, c)| principal(&format!("P{i}"), *c)).collect();
        principals.push(principal("pool", 0.0));
        let mut agreements = Vec::new();
        for (i, &(lo, extra)) in pledge.iter().enumerate().take(n) {
            agreements.push(agreement(&format!("P{i}"), "pool", lo, (lo + extra).min(1.0)));
            agreements.push(agreement("pool", &format!("P{i}"), 1.0 / n as f64, 1.0));
        }
        let s = spec(principals, agreements);
        let merged = planner(&s);
        let mut full = merged.clone();
        full.merge_owners = false;
        let d = &demand[..=n];
        let a = merged.solve(d).expect("solves");
        let b = full.solve(d).expect("solves");
        let (ta, tb) = (a.theta.unwrap_or(0.0), b.theta.unwrap_or(0.0));
        prop_assert!((ta - tb).abs() <= 1e-6, "θ {ta} merged vs {tb} full");
        let (sa, sb): (f64, f64) = (a.units.iter().sum(), b.units.iter().sum());
        prop_assert!((sa - sb).abs() <= 1e-6 * (1.0 + sb), "total {sa} merged vs {sb} full");
        for pl in &a.placement {
            let access = AgreementSet::from_spec(&s).expect("valid");
            let bound = access.access().pair_mandatory_units_per_s(pl.owner, pl.user)
                + access.access().pair_optional_units_per_s(pl.owner, pl.user);
            prop_assert!(pl.units <= bound + 1e-6, "placement over its pair bound");
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn flow_stage_two_matches_the_lp((s, demand) in arb_case(Objective::Community)) {
        let flow = planner(&s);
        let mut lp = flow.clone();
        lp.flow_stage2 = false;
        let a = flow.solve(&demand).expect("solves");
        let b = lp.solve(&demand).expect("solves");
        let (ta, tb) = (a.theta.unwrap_or(0.0), b.theta.unwrap_or(0.0));
        prop_assert!((ta - tb).abs() <= 1e-6, "θ {ta} flow vs {tb} LP");
        let (sa, sb): (f64, f64) = (a.units.iter().sum(), b.units.iter().sum());
        prop_assert!((sa - sb).abs() <= 1e-6 * (1.0 + sb), "total {sa} flow vs {sb} LP");
    }
}

/// Compares stage 1 by parametric maximum flow with stage 1 by the LP.
fn flow_matches_lp(s: &AgreementsSpec, demand: &[f64]) -> Result<(), TestCaseError> {
    let mut flow = planner(s);
    flow.lp_column_limit = 0;
    let mut lp = flow.clone();
    lp.lp_column_limit = usize::MAX;
    let a = flow.solve(demand).expect("solves");
    let b = lp.solve(demand).expect("solves");
    let (ta, tb) = (a.theta.unwrap_or(0.0), b.theta.unwrap_or(0.0));
    prop_assert!((ta - tb).abs() <= 1e-6, "θ {ta} by flow vs {tb} by LP");
    let (sa, sb): (f64, f64) = (a.units.iter().sum(), b.units.iter().sum());
    prop_assert!(
        (sa - sb).abs() <= 1e-6 * (1.0 + sb),
        "total {sa} by flow vs {sb} by LP"
    );
    for (i, (&x, &n)) in a.units.iter().zip(demand).enumerate() {
        prop_assert!(x <= n + 1e-6, "principal {i} over demand");
        let mc = planner(s).mandatory()[i];
        if n <= mc {
            prop_assert!(
                x >= n - 1e-6,
                "principal {i} under its guarantee not served in full"
            );
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]

    #[test]
    fn flow_stage_one_matches_the_lp((s, demand) in arb_case(Objective::Community)) {
        flow_matches_lp(&s, &demand)?;
    }

    #[test]
    fn flow_stage_one_matches_the_lp_when_pairs_bind(
        owners in 1usize..6,
        users in 1usize..6,
        caps in prop::collection::vec(1.0..500.0f64, 6),
        shares in prop::collection::vec((0.0..0.2f64, 0.0..0.5f64), 36),
        demand in prop::collection::vec(prop_oneof![Just(0.0), 0.0..600.0f64], 6),
    ) {
        let mut principals = Vec::new();
        for (o, cap) in caps.iter().enumerate().take(owners) {
            principals.push(principal(&format!("O{o}"), *cap));
        }
        for u in 0..users {
            principals.push(principal(&format!("U{u}"), 0.0));
        }
        let mut agreements = Vec::new();
        for o in 0..owners {
            for u in 0..users {
                let (lo, extra) = shares[o * 6 + u];
                agreements.push(agreement(&format!("O{o}"), &format!("U{u}"), lo, lo + extra));
            }
        }
        let s = spec(principals, agreements);
        let mut d = vec![0.0; owners];
        d.extend_from_slice(&demand[..users]);
        flow_matches_lp(&s, &d)?;
    }
}
