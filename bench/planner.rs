//! One window planner solve (`Planner::solve`) at 10, 30 and 100 principals with dense
//! agreements: every principal may be served on every principal's capacity, so the
//! community LP has n² allocation variables (its worst case). The goal is
//! under 1 ms median at 30 principals, so a 100 ms window is never spent solving.
//!
//! Run: `cargo bench --bench planner`.

use std::hint::black_box;

use allot_model::agreements::{
    AgreementSet, AgreementSpec, AgreementsSpec, Objective, PrincipalSpec,
};
use allot_model::planner::Planner;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};

/// n principals owning 100–290 units/s each. Each pledges half of its resources to a
/// shared pool (and lets the pool use all of it); the pool guarantees each principal an
/// equal part and lets each use all of it. So every principal reaches every capacity,
/// with both a mandatory and an optional part, through a transitive chain.
fn dense(n: usize, objective: Objective) -> AgreementSet {
    let mut principals: Vec<PrincipalSpec> = (0..n)
        .map(|i| PrincipalSpec {
            name: format!("P{i}"),
            capacity_units_per_s: 100.0 + (i % 20) as f64 * 10.0,
            price: 1.0 + (i % 3) as f64,
            locality_limit_units_per_s: None,
        })
        .collect();
    principals.push(PrincipalSpec {
        name: "pool".to_string(),
        capacity_units_per_s: 0.0,
        price: 0.0,
        locality_limit_units_per_s: None,
    });
    let mut agreements = Vec::new();
    for i in 0..n {
        agreements.push(AgreementSpec {
            from: format!("P{i}"),
            to: "pool".to_string(),
            share: [0.5, 1.0],
        });
        agreements.push(AgreementSpec {
            from: "pool".to_string(),
            to: format!("P{i}"),
            share: [1.0 / n as f64, 1.0],
        });
    }
    let spec = AgreementsSpec {
        objective,
        window_ms: 100,
        principals,
        agreements,
    };
    match AgreementSet::from_spec(&spec) {
        Ok(set) => set,
        Err(e) => panic!("the benchmark's agreement set is valid: {e}"),
    }
}

/// The case merging cannot help: n/2 owners each lend every one of n/2 users a slice
/// with an upper bound small enough to bind, so the LP keeps one variable per pair.
fn direct(n: usize) -> AgreementSet {
    let half = n / 2;
    let mut principals = Vec::new();
    for i in 0..n {
        principals.push(PrincipalSpec {
            name: format!("P{i}"),
            capacity_units_per_s: if i < half {
                100.0 + (i % 20) as f64 * 10.0
            } else {
                0.0
            },
            price: 1.0,
            locality_limit_units_per_s: None,
        });
    }
    let mut agreements = Vec::new();
    let lower = 0.8 / half as f64;
    for owner in 0..half {
        for user in half..n {
            agreements.push(AgreementSpec {
                from: format!("P{owner}"),
                to: format!("P{user}"),
                share: [lower, (3.0 * lower).min(1.0)],
            });
        }
    }
    let spec = AgreementsSpec {
        objective: Objective::Community,
        window_ms: 100,
        principals,
        agreements,
    };
    match AgreementSet::from_spec(&spec) {
        Ok(set) => set,
        Err(e) => panic!("the benchmark's agreement set is valid: {e}"),
    }
}

/// Demand from 0.2× to 3× each principal's capacity: some under their guarantee, some
/// flooding, more than the total capacity, so both LP stages run.
fn demand(set: &AgreementSet) -> Vec<f64> {
    set.principals()
        .iter()
        .enumerate()
        .map(|(i, p)| p.capacity_units_per_s * (0.2 + 0.4 * (i % 8) as f64))
        .collect()
}

fn bench(c: &mut Criterion) {
    for objective in [Objective::Community, Objective::Provider] {
        let mut group = c.benchmark_group(format!("planner_{}", objective.as_str()));
        for n in [10, 30, 100] {
            let set = dense(n, objective);
            let planner = Planner::per_window(&set);
            let d: Vec<f64> = demand(&set).iter().map(|x| x / 10.0).collect();
            // The benchmark is only meaningful if the plan is not trivial.
            if let Ok(a) = planner.solve(&d) {
                if let Some(theta) = a.theta {
                    assert!(theta < 1.0, "demand should exceed capacity");
                }
            }
            group.bench_with_input(BenchmarkId::from_parameter(n), &d, |b, d| {
                b.iter(|| planner.solve(black_box(d)))
            });
        }
        group.finish();
    }
    let mut group = c.benchmark_group("planner_community_pairs_bind");
    for n in [10, 30, 100] {
        let set = direct(n);
        let planner = Planner::per_window(&set);
        let half = n / 2;
        // Users ask for 0.5× to 2× an equal share of the owners' total, in units per window.
        let total: f64 = set
            .principals()
            .iter()
            .map(|p| p.capacity_units_per_s)
            .sum();
        let d: Vec<f64> = (0..n)
            .map(|i| {
                if i < half {
                    0.0
                } else {
                    total / half as f64 * (0.5 + 0.25 * (i % 7) as f64) / 10.0
                }
            })
            .collect();
        group.bench_with_input(BenchmarkId::from_parameter(n), &d, |b, d| {
            b.iter(|| planner.solve(black_box(d)))
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
