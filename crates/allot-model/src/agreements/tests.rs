use super::*;
use proptest::prelude::*;

pub(crate) fn principal(name: &str, capacity: f64) -> PrincipalSpec {
    PrincipalSpec {
        name: name.to_string(),
        capacity_units_per_s: capacity,
        price: 1.0,
        locality_limit_units_per_s: None,
    }
}

pub(crate) fn agreement(from: &str, to: &str, lower: f64, upper: f64) -> AgreementSpec {
    AgreementSpec {
        from: from.to_string(),
        to: to.to_string(),
        share: [lower, upper],
    }
}

pub(crate) fn spec(
    principals: Vec<PrincipalSpec>,
    agreements: Vec<AgreementSpec>,
) -> AgreementsSpec {
    AgreementsSpec {
        objective: Objective::Community,
        window_ms: 100,
        principals,
        agreements,
    }
}

fn figure3() -> AgreementSet {
    let s = spec(
        vec![
            principal("A", 1000.0),
            principal("B", 1500.0),
            principal("C", 0.0),
        ],
        vec![agreement("A", "B", 0.4, 0.6), agreement("B", "C", 0.6, 1.0)],
    );
    AgreementSet::from_spec(&s).expect("figure 3 is valid")
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-9 * (1.0 + a.abs().max(b.abs()))
}

#[test]
fn figure3_access_levels_match_the_paper() {
    let set = figure3();
    let access = set.access();
    let expected = [(600.0, 400.0), (760.0, 1340.0), (1140.0, 960.0)];
    for (i, (mc, oc)) in expected.iter().enumerate() {
        assert!(close(access.mandatory_units_per_s(i), *mc), "MC[{i}]");
        assert!(close(access.optional_units_per_s(i), *oc), "OC[{i}]");
    }
}

#[test]
fn figure3_pairwise_flows_split_by_owner() {
    let set = figure3();
    let a = set.access();
    // C's mandatory 1140 = 900 from B's capacity + 240 from A's through B.
    assert!(close(a.pair_mandatory_units_per_s(1, 2), 900.0));
    assert!(close(a.pair_mandatory_units_per_s(0, 2), 240.0));
    // C's optional 960 = 600 from B + 360 from A (200 via O-Ticket2, 160 via O-Ticket4).
    assert!(close(a.pair_optional_units_per_s(1, 2), 600.0));
    assert!(close(a.pair_optional_units_per_s(0, 2), 360.0));
    // B may use at most 60% of A: 160 mandatory + 440 optional.
    assert!(close(
        a.pair_mandatory_units_per_s(0, 1) + a.pair_optional_units_per_s(0, 1),
        600.0
    ));
}

#[test]
fn mandatory_of_an_acyclic_set_conserves_capacity() {
    let set = figure3();
    let a = set.access();
    for owner in 0..3 {
        let total: f64 = (0..3).map(|u| a.pair_mandatory_units_per_s(owner, u)).sum();
        let cap = set.principals()[owner].capacity_units_per_s;
        assert!(close(total, cap), "owner {owner}: {total} vs {cap}");
    }
}

fn refused(s: &AgreementsSpec) -> AgreementError {
    match AgreementSet::from_spec(s) {
        Ok(_) => panic!("expected the set to be refused"),
        Err(e) => e,
    }
}

#[test]
fn unknown_principal_is_refused_with_names() {
    let e = refused(&spec(
        vec![principal("A", 10.0)],
        vec![agreement("A", "Z", 0.1, 0.2)],
    ));
    assert!(matches!(
        e,
        AgreementError::UnknownPrincipal { field: "to", .. }
    ));
    let text = e.to_string();
    assert!(
        text.contains("`Z`") && text.contains("declared: A"),
        "{text}"
    );
    assert_eq!(e.key().to_string(), "agreement[0].to");
}

#[test]
fn lower_above_upper_is_refused() {
    let e = refused(&spec(
        vec![principal("A", 10.0), principal("B", 0.0)],
        vec![agreement("A", "B", 0.7, 0.2)],
    ));
    assert!(matches!(e, AgreementError::LowerAboveUpper { .. }));
    assert_eq!(e.key().to_string(), "agreement[0].share");
}

#[test]
fn bound_outside_unit_interval_is_refused() {
    for (lo, hi) in [(-0.1, 0.5), (0.2, 1.5), (f64::NAN, 0.5)] {
        let e = refused(&spec(
            vec![principal("A", 10.0), principal("B", 0.0)],
            vec![agreement("A", "B", lo, hi)],
        ));
        assert!(
            matches!(e, AgreementError::BoundOutOfRange { .. }),
            "{lo} {hi}"
        );
    }
}

#[test]
fn lower_bounds_over_one_are_refused() {
    let e = refused(&spec(
        vec![
            principal("A", 10.0),
            principal("B", 0.0),
            principal("C", 0.0),
        ],
        vec![agreement("A", "B", 0.6, 1.0), agreement("A", "C", 0.5, 1.0)],
    ));
    match &e {
        AgreementError::LowerBoundsOverOne { name, sum, .. } => {
            assert_eq!(name, "A");
            assert!(close(*sum, 1.1));
        }
        other => panic!("unexpected {other:?}"),
    }
    // Decimal fractions that sum to 1 in exact arithmetic are accepted.
    let ok = spec(
        vec![
            principal("A", 10.0),
            principal("B", 0.0),
            principal("C", 0.0),
            principal("D", 0.0),
        ],
        vec![
            agreement("A", "B", 0.1, 1.0),
            agreement("A", "C", 0.2, 1.0),
            agreement("A", "D", 0.7, 1.0),
        ],
    );
    assert!(AgreementSet::from_spec(&ok).is_ok());
}

#[test]
fn negative_capacity_is_refused() {
    let e = refused(&spec(vec![principal("A", -5.0)], vec![]));
    assert!(matches!(e, AgreementError::BadCapacity { .. }));
    assert_eq!(e.key().to_string(), "principal[0].capacity");
    assert!(e.to_string().contains("`A`"));
}

#[test]
fn duplicates_and_self_agreements_are_refused() {
    let e = refused(&spec(
        vec![principal("A", 1.0), principal("A", 2.0)],
        vec![],
    ));
    assert!(matches!(
        e,
        AgreementError::DuplicatePrincipal { index: 1, .. }
    ));
    let e = refused(&spec(
        vec![principal("A", 1.0)],
        vec![agreement("A", "A", 0.1, 0.2)],
    ));
    assert!(matches!(e, AgreementError::SelfAgreement { .. }));
    let e = refused(&spec(
        vec![principal("A", 1.0), principal("B", 1.0)],
        vec![agreement("A", "B", 0.1, 0.2), agreement("A", "B", 0.1, 0.3)],
    ));
    assert!(matches!(
        e,
        AgreementError::DuplicateAgreement { index: 1, .. }
    ));
}

#[test]
fn zero_window_is_refused() {
    let mut s = spec(vec![principal("A", 1.0)], vec![]);
    s.window_ms = 0;
    assert_eq!(refused(&s), AgreementError::ZeroWindow);
}

#[test]
fn spec_parses_from_toml() {
    let text = r#"
        objective = "provider"
        window_ms = 50
        [[principal]]
        name = "A"
        capacity = 1000
        price = 2.5
        locality_limit = 800
        [[principal]]
        name = "B"
        capacity = 0
        [[agreement]]
        from = "A"
        to = "B"
        share = [0.4, 0.6]
    "#;
    let s: AgreementsSpec = toml::from_str(text).expect("valid TOML");
    assert_eq!(s.objective, Objective::Provider);
    assert_eq!(s.window_ms, 50);
    assert_eq!(s.principals[0].locality_limit_units_per_s, Some(800.0));
    assert_eq!(s.principals[1].price, 1.0);
    assert_eq!(s.agreements[0].share, [0.4, 0.6]);
}

#[test]
fn a_ring_with_full_bounds_terminates_within_capacity() {
    // A → B → C → A, each [1, 1]: everything is passed on around the ring.
    let s = spec(
        vec![
            principal("A", 300.0),
            principal("B", 0.0),
            principal("C", 0.0),
        ],
        vec![
            agreement("A", "B", 1.0, 1.0),
            agreement("B", "C", 1.0, 1.0),
            agreement("C", "A", 1.0, 1.0),
        ],
    );
    let set = AgreementSet::from_spec(&s).expect("a cycle is valid");
    let a = set.access();
    // The path A → B → C ends at C, which passes everything on (out = 1): C's mandatory
    // is 0 and A's capacity reaches C only as reclaim.
    for i in 0..3 {
        let total = a.pair_mandatory_units_per_s(0, i) + a.pair_optional_units_per_s(0, i);
        assert!(total <= 300.0 + 1e-9, "{i}: {total}");
    }
}

fn arb_set(max_n: usize) -> impl Strategy<Value = AgreementsSpec> {
    (2..=max_n).prop_flat_map(|n| {
        let caps = prop::collection::vec(prop_oneof![Just(0.0), 1.0..2000.0f64], n);
        let edges = prop::collection::vec(
            (0..n, 0..n, 0.0..1.0f64, 0.0..1.0f64),
            0..(n * (n - 1)).min(12),
        );
        (caps, edges).prop_map(move |(caps, edges)| random_spec(&caps, &edges))
    })
}

/// Builds a valid spec: drops self and repeated pairs, orders bounds, and scales each
/// owner's lower bounds so they sum to at most 1.
pub(crate) fn random_spec(caps: &[f64], edges: &[(usize, usize, f64, f64)]) -> AgreementsSpec {
    let n = caps.len();
    let names: Vec<String> = (0..n).map(|i| format!("P{i}")).collect();
    let mut seen = std::collections::HashSet::new();
    let mut kept = Vec::new();
    for &(from, to, a, b) in edges {
        if from != to && seen.insert((from, to)) {
            kept.push((from, to, a.min(b), a.max(b)));
        }
    }
    let mut lower_sum = vec![0.0; n];
    for k in &kept {
        lower_sum[k.0] += k.2;
    }
    let agreements = kept
        .iter()
        .map(|&(from, to, lo, hi)| {
            let scale = if lower_sum[from] > 1.0 {
                1.0 / lower_sum[from]
            } else {
                1.0
            };
            agreement(&names[from], &names[to], (lo * scale).min(1.0), hi)
        })
        .collect();
    spec(
        names
            .iter()
            .zip(caps)
            .map(|(n, c)| principal(n, *c))
            .collect(),
        agreements,
    )
}

proptest! {
    #[test]
    fn access_levels_never_exceed_capacity(s in arb_set(6)) {
        let set = AgreementSet::from_spec(&s).expect("generated sets are valid");
        let a = set.access();
        let n = set.principals().len();
        for owner in 0..n {
            let cap = set.principals()[owner].capacity_units_per_s;
            let mandatory: f64 = (0..n).map(|u| a.pair_mandatory_units_per_s(owner, u)).sum();
            prop_assert!(mandatory <= cap * (1.0 + 1e-9) + 1e-9);
            for user in 0..n {
                let mi = a.pair_mandatory_units_per_s(owner, user);
                let oi = a.pair_optional_units_per_s(owner, user);
                prop_assert!(mi >= 0.0 && oi >= 0.0);
                prop_assert!(mi + oi <= cap * (1.0 + 1e-9) + 1e-9);
            }
        }
    }

    #[test]
    fn a_complete_graph_with_cycles_terminates(n in 2usize..7, lo in 0.0..0.15f64, extra in 0.0..0.8f64) {
        // Every principal has an agreement with every other: the densest cycles there are.
        let names: Vec<String> = (0..n).map(|i| format!("P{i}")).collect();
        let mut agreements = Vec::new();
        for from in &names {
            for to in &names {
                if from != to {
                    agreements.push(agreement(from, to, lo, lo + extra));
                }
            }
        }
        let s = spec(names.iter().map(|n| principal(n, 100.0)).collect(), agreements);
        let set = AgreementSet::from_spec(&s).expect("complete graphs are valid");
        let total_mc: f64 = (0..n).map(|i| set.access().mandatory_units_per_s(i)).sum();
        prop_assert!(total_mc <= 100.0 * n as f64 + 1e-6);
    }
}
