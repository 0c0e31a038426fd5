use super::*;
use proptest::prelude::*;
use std::cell::RefCell;

fn classes() -> Vec<String> {
    ["premium", "basic", "api", "bot", "a", "b"]
        .iter()
        .map(|s| s.to_string())
        .collect()
}

fn class(name: &str) -> Target {
    Target::Class(name.to_string())
}

fn chain_to(name: &str) -> Target {
    Target::Chain(name.to_string())
}

fn rule(id: &str, conditions: Vec<Condition>, target: Target) -> Rule {
    Rule {
        id: id.to_string(),
        conditions,
        target,
    }
}

fn net(s: &str) -> IpNet {
    s.parse()
        .unwrap_or_else(|e| panic!("test network {s}: {e}"))
}

fn addr(s: &str) -> IpAddr {
    s.parse()
        .unwrap_or_else(|e| panic!("test address {s}: {e}"))
}

fn header(name: &str, value: &str) -> Condition {
    Condition::HeaderContains {
        name: name.to_string(),
        value: value.to_string(),
    }
}

fn set(chains: Vec<Chain>) -> RuleSet {
    RuleSet::new(chains, "main", classes()).unwrap_or_else(|e| panic!("test rule set: {e}"))
}

fn main_chain(rules: Vec<Rule>) -> Chain {
    Chain {
        name: "main".into(),
        rules,
        default: class("basic"),
    }
}

/// Classify with the given facts; draws come from `draws` in order (0.5 when exhausted).
fn run(
    rs: &RuleSet,
    client: &str,
    host: Option<&str>,
    path: &str,
    headers: &[(&str, &str)],
    draws: &[f64],
) -> String {
    let mut it = draws.iter().copied();
    let req = RequestFacts {
        client: addr(client),
        host,
        path,
        headers: &HeaderList(headers),
        listener: None,
        first_bytes: b"",
    };
    let i = rs.classify(&req, &mut || it.next().unwrap_or(0.5));
    rs.classes()[i].clone()
}

fn simple(rs: &RuleSet, client: &str) -> String {
    run(rs, client, None, "/", &[], &[])
}

#[test]
fn source_rules_match_v4_v6_and_v4_mapped() {
    let rs = set(vec![main_chain(vec![rule(
        "premium-net",
        vec![Condition::Source(vec![
            net("10.0.0.0/8"),
            net("2001:db8::/32"),
        ])],
        class("premium"),
    )])]);
    assert_eq!(simple(&rs, "10.1.2.3"), "premium");
    assert_eq!(simple(&rs, "::ffff:10.1.2.3"), "premium");
    assert_eq!(simple(&rs, "2001:db8::7"), "premium");
    assert_eq!(simple(&rs, "11.1.2.3"), "basic");
    assert_eq!(simple(&rs, "2001:db9::7"), "basic");
    assert_eq!(simple(&rs, "::1"), "basic");
}

#[test]
fn host_rules_ignore_case_and_port_and_wildcards_match_subdomains() {
    let rs = set(vec![main_chain(vec![
        rule(
            "api",
            vec![Condition::Host("API.example.com".into())],
            class("api"),
        ),
        rule(
            "sub",
            vec![Condition::Host("*.example.org".into())],
            class("premium"),
        ),
        rule(
            "v6",
            vec![Condition::Host("[2001:DB8::1]".into())],
            class("bot"),
        ),
    ])]);
    let h = |host: Option<&str>| run(&rs, "192.0.2.1", host, "/", &[], &[]);
    assert_eq!(h(Some("api.example.com")), "api");
    assert_eq!(h(Some("Api.Example.Com:8443")), "api");
    assert_eq!(h(Some("api.example.com.")), "api");
    assert_eq!(h(Some("www.example.com")), "basic");
    assert_eq!(h(Some("xapi.example.com")), "basic");
    assert_eq!(h(Some("www.example.org")), "premium");
    assert_eq!(h(Some("a.b.EXAMPLE.org:80")), "premium");
    assert_eq!(h(Some("example.org")), "basic");
    assert_eq!(h(Some("badexample.org")), "basic");
    assert_eq!(h(Some("[2001:db8::1]:8080")), "bot");
    assert_eq!(h(None), "basic");
}

#[test]
fn path_prefix_rules() {
    let rs = set(vec![main_chain(vec![rule(
        "api",
        vec![Condition::PathPrefix("/api/".into())],
        class("api"),
    )])]);
    let p = |path: &str| run(&rs, "192.0.2.1", None, path, &[], &[]);
    assert_eq!(p("/api/v1/users"), "api");
    assert_eq!(p("/api/"), "api");
    assert_eq!(p("/api"), "basic");
    assert_eq!(p("/static/api/"), "basic");
}

#[test]
fn header_rules_share_one_scan_per_header() {
    let rs = set(vec![main_chain(vec![
        rule("curl", vec![header("User-Agent", "curl")], class("bot")),
        rule("wget", vec![header("user-agent", "Wget")], class("bot")),
        rule(
            "gold",
            vec![header("Cookie", "tier=gold")],
            class("premium"),
        ),
        rule("mobile", vec![header("USER-AGENT", "Mobile")], class("a")),
    ])]);
    assert_eq!(
        run(
            &rs,
            "192.0.2.1",
            None,
            "/",
            &[("user-agent", "curl/8.5")],
            &[]
        ),
        "bot"
    );
    assert_eq!(
        run(
            &rs,
            "192.0.2.1",
            None,
            "/",
            &[("User-Agent", "Wget/1.2")],
            &[]
        ),
        "bot"
    );
    // Case-sensitive value.
    assert_eq!(
        run(&rs, "192.0.2.1", None, "/", &[("User-Agent", "CURL")], &[]),
        "basic"
    );
    // Any value of a repeated header; a string in another header does not count.
    let hs = [
        ("cookie", "a=1"),
        ("User-Agent", "tier=gold"),
        ("Cookie", "x; tier=gold"),
    ];
    assert_eq!(run(&rs, "192.0.2.1", None, "/", &hs, &[]), "premium");
    let hs = [("User-Agent", "tier=gold Mobile")];
    assert_eq!(run(&rs, "192.0.2.1", None, "/", &hs, &[]), "a");

    /// Counts how often each header is read.
    struct Counting<'a>(&'a [(&'a str, &'a str)], RefCell<Vec<String>>);
    impl Headers for Counting<'_> {
        fn for_each_value(&self, name: &str, f: &mut dyn FnMut(&[u8])) {
            self.1.borrow_mut().push(name.to_string());
            HeaderList(self.0).for_each_value(name, f);
        }
    }
    let hs = Counting(
        &[("User-Agent", "Mozilla Mobile")],
        RefCell::new(Vec::new()),
    );
    let req = RequestFacts {
        client: addr("192.0.2.1"),
        host: None,
        path: "/",
        headers: &hs,
        listener: None,
        first_bytes: b"",
    };
    assert_eq!(rs.classify(&req, &mut || 0.5), 4);
    // Three rules test user-agent, one cookie: each header read once.
    assert_eq!(
        *hs.1.borrow(),
        vec!["user-agent".to_string(), "cookie".to_string()]
    );
}

#[test]
fn headers_are_not_read_unless_a_header_rule_is_reached() {
    struct Never;
    impl Headers for Never {
        fn for_each_value(&self, name: &str, _: &mut dyn FnMut(&[u8])) {
            panic!("header {name} read although no header rule was reached");
        }
    }
    let rs = set(vec![main_chain(vec![
        rule(
            "net",
            vec![Condition::Source(vec![net("10.0.0.0/8")])],
            class("premium"),
        ),
        rule(
            "ua",
            vec![
                Condition::PathPrefix("/x".into()),
                header("User-Agent", "curl"),
            ],
            class("bot"),
        ),
    ])]);
    let req = RequestFacts {
        client: addr("10.0.0.1"),
        host: None,
        path: "/",
        headers: &Never,
        listener: None,
        first_bytes: b"",
    };
    assert_eq!(rs.classes()[rs.classify(&req, &mut || 0.5)], "premium");
    let req = RequestFacts {
        client: addr("11.0.0.1"),
        ..req
    };
    assert_eq!(rs.classes()[rs.classify(&req, &mut || 0.5)], "basic");
}

#[test]
fn probability_splits_thirty_seventy_and_draws_only_when_evaluated() {
    let rs = set(vec![main_chain(vec![
        rule(
            "net",
            vec![Condition::Source(vec![net("10.0.0.0/8")])],
            class("premium"),
        ),
        rule("split", vec![Condition::Probability(0.3)], class("a")),
    ])]);
    let mut counts = [0usize; 6];
    let mut drawn = 0;
    for k in 0..10_000 {
        // Evenly spread draws in [0, 1).
        let d = (k as f64 + 0.5) / 10_000.0;
        let req = RequestFacts {
            client: addr("192.0.2.1"),
            host: None,
            path: "/",
            headers: &HeaderList(&[]),
            listener: None,
            first_bytes: b"",
        };
        counts[rs.classify(&req, &mut || {
            drawn += 1;
            d
        })] += 1;
    }
    assert_eq!(drawn, 10_000);
    assert_eq!(counts[4], 3000);
    assert_eq!(counts[1], 7000);
    // A request decided before the probability rule takes no draw.
    let req = RequestFacts {
        client: addr("10.0.0.1"),
        host: None,
        path: "/",
        headers: &HeaderList(&[]),
        listener: None,
        first_bytes: b"",
    };
    rs.classify(&req, &mut || panic!("no probability condition was reached"));
    // Each evaluated probability condition takes a fresh draw.
    let rs = set(vec![main_chain(vec![
        rule("p1", vec![Condition::Probability(0.5)], class("a")),
        rule("p2", vec![Condition::Probability(0.5)], class("b")),
    ])]);
    assert_eq!(run(&rs, "192.0.2.1", None, "/", &[], &[0.7, 0.2]), "b");
    assert_eq!(run(&rs, "192.0.2.1", None, "/", &[], &[0.7, 0.9]), "basic");
    // Edges: p = 1 always, p = 0 never.
    let rs = set(vec![main_chain(vec![
        rule("never", vec![Condition::Probability(0.0)], class("a")),
        rule("always", vec![Condition::Probability(1.0)], class("b")),
    ])]);
    assert_eq!(
        run(&rs, "192.0.2.1", None, "/", &[], &[0.0, 0.999_999]),
        "b"
    );
}

#[test]
fn chains_two_deep_and_all_conditions_must_hold() {
    let rs = set(vec![
        Chain {
            name: "main".into(),
            rules: vec![
                rule(
                    "internal",
                    vec![Condition::Source(vec![net("10.0.0.0/8")])],
                    chain_to("internal"),
                ),
                rule(
                    "web",
                    vec![Condition::Host("*.example.com".into())],
                    chain_to("web"),
                ),
            ],
            default: class("basic"),
        },
        Chain {
            name: "internal".into(),
            rules: vec![rule(
                "ops",
                vec![
                    Condition::Source(vec![net("10.9.0.0/16")]),
                    Condition::PathPrefix("/admin".into()),
                ],
                class("premium"),
            )],
            default: chain_to("web"),
        },
        Chain {
            name: "web".into(),
            rules: vec![rule(
                "api",
                vec![Condition::PathPrefix("/api/".into())],
                class("api"),
            )],
            default: class("b"),
        },
    ]);
    assert_eq!(run(&rs, "10.9.1.1", None, "/admin/x", &[], &[]), "premium");
    assert_eq!(run(&rs, "10.9.1.1", None, "/api/x", &[], &[]), "api");
    assert_eq!(run(&rs, "10.8.1.1", None, "/admin/x", &[], &[]), "b");
    assert_eq!(
        run(
            &rs,
            "192.0.2.1",
            Some("www.example.com"),
            "/api/1",
            &[],
            &[]
        ),
        "api"
    );
    assert_eq!(
        run(&rs, "192.0.2.1", Some("www.example.com"), "/", &[], &[]),
        "b"
    );
    assert_eq!(
        run(&rs, "192.0.2.1", Some("example.net"), "/api/1", &[], &[]),
        "basic"
    );
    assert_eq!(rs.entry(), "main");
    assert_eq!(rs.chains().len(), 3);
}

fn err(chains: Vec<Chain>, entry: &str) -> String {
    match RuleSet::new(chains, entry, classes()) {
        Ok(_) => panic!("rule set should have been refused"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn validation_names_the_place_and_what_is_allowed() {
    let one = |c: Condition| vec![main_chain(vec![rule("r1", vec![c], class("a"))])];
    let e = err(
        vec![main_chain(vec![rule("r1", vec![], class("gold"))])],
        "main",
    );
    assert!(
        e.contains("chain `main`, rule `r1`") && e.contains("`gold`") && e.contains("`premium`"),
        "{e}"
    );
    let e = err(
        vec![main_chain(vec![rule("r1", vec![], chain_to("nowhere"))])],
        "main",
    );
    assert!(e.contains("target chain `nowhere`"), "{e}");
    let e = err(vec![main_chain(vec![])], "start");
    assert!(
        e.contains("entry chain `start`") && e.contains("`main`"),
        "{e}"
    );
    let e = err(vec![main_chain(vec![]), main_chain(vec![])], "main");
    assert!(e.contains("chain `main` is defined twice"), "{e}");
    let e = err(
        vec![main_chain(vec![
            rule("x", vec![], class("a")),
            rule("x", vec![], class("b")),
        ])],
        "main",
    );
    assert!(e.contains("rule id `x` is used twice"), "{e}");
    let e = err(vec![main_chain(vec![rule("", vec![], class("a"))])], "main");
    assert!(e.contains("empty `id`"), "{e}");
    for p in [-0.1, 1.5, f64::NAN] {
        let e = err(one(Condition::Probability(p)), "main");
        assert!(e.contains("rule `r1`") && e.contains("from 0 to 1"), "{e}");
    }
    let e = err(one(header("User-Agent", "")), "main");
    assert!(e.contains("`header.contains` must not be empty"), "{e}");
    let e = err(one(header("User Agent", "x")), "main");
    assert!(e.contains("not a header name"), "{e}");
    for bad in [
        "",
        "*",
        "*.",
        "a.*.com",
        "exa mple.com",
        "example.com:80",
        "a..b",
        "[::1",
        "[nope]",
        "*example.com",
    ] {
        let e = err(one(Condition::Host(bad.into())), "main");
        assert!(e.contains("not a host pattern"), "{bad}: {e}");
    }
    let e = err(one(Condition::Source(vec![])), "main");
    assert!(e.contains("at least one"), "{e}");
    let e = err(one(Condition::PathPrefix("api/".into())), "main");
    assert!(e.contains("must start with `/`"), "{e}");
    // The default is checked too.
    let e = err(
        vec![Chain {
            name: "main".into(),
            rules: vec![],
            default: class("nope"),
        }],
        "main",
    );
    assert!(e.contains("chain `main`, default"), "{e}");
}

#[test]
fn cycles_are_refused_and_named() {
    let c = |name: &str, to: &str| Chain {
        name: name.into(),
        rules: vec![rule(
            "r",
            vec![Condition::PathPrefix("/x".into())],
            chain_to(to),
        )],
        default: class("a"),
    };
    let e = err(vec![c("main", "b"), c("b", "c"), c("c", "b")], "main");
    assert!(e.contains("cycle: b -> c -> b"), "{e}");
    let e = err(vec![c("main", "main")], "main");
    assert!(e.contains("main -> main"), "{e}");
    // A cycle through a default, away from the entry, is refused too.
    let d = |name: &str, to: &str| Chain {
        name: name.into(),
        rules: vec![],
        default: chain_to(to),
    };
    let e = err(vec![main_chain(vec![]), d("x", "y"), d("y", "x")], "main");
    assert!(e.contains("x -> y -> x"), "{e}");
    // A diamond is fine.
    let diamond = vec![
        Chain {
            name: "main".into(),
            rules: vec![rule(
                "l",
                vec![Condition::PathPrefix("/l".into())],
                chain_to("l"),
            )],
            default: chain_to("r"),
        },
        c("l", "end"),
        c("r", "end"),
        d("end", "tail"),
        Chain {
            name: "tail".into(),
            rules: vec![],
            default: class("b"),
        },
    ];
    let rs = set(diamond);
    assert_eq!(run(&rs, "192.0.2.1", None, "/x", &[], &[]), "b");
}

#[test]
fn rules_are_added_and_removed_at_run_time() {
    let rs = set(vec![main_chain(vec![rule(
        "api",
        vec![Condition::PathPrefix("/api/".into())],
        class("api"),
    )])]);
    let rs2 = rs
        .with_rule_added(
            "main",
            Some(0),
            rule(
                "net",
                vec![Condition::Source(vec![net("10.0.0.0/8")])],
                class("premium"),
            ),
        )
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(run(&rs2, "10.0.0.1", None, "/api/", &[], &[]), "premium");
    // The old set is unchanged.
    assert_eq!(run(&rs, "10.0.0.1", None, "/api/", &[], &[]), "api");
    let rs3 = rs2
        .with_rule_added(
            "main",
            None,
            rule("bot", vec![header("User-Agent", "bot")], class("bot")),
        )
        .unwrap_or_else(|e| panic!("{e}"));
    let ids: Vec<&str> = rs3.chains()[0]
        .rules
        .iter()
        .map(|r| r.id.as_str())
        .collect();
    assert_eq!(ids, vec!["net", "api", "bot"]);
    assert_eq!(
        run(
            &rs3,
            "192.0.2.1",
            None,
            "/",
            &[("user-agent", "googlebot")],
            &[]
        ),
        "bot"
    );
    let rs4 = rs3
        .with_rule_removed("main", "net")
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(run(&rs4, "10.0.0.1", None, "/api/", &[], &[]), "api");

    let e = |r: Result<RuleSet, RuleError>| r.err().map(|e| e.to_string()).unwrap_or_default();
    assert!(
        e(rs.with_rule_added("nope", None, rule("x", vec![], class("a"))))
            .contains("no chain named `nope`")
    );
    assert!(
        e(rs.with_rule_added("main", Some(2), rule("x", vec![], class("a"))))
            .contains("positions 0 to 1")
    );
    assert!(
        e(rs.with_rule_added("main", None, rule("api", vec![], class("a")))).contains("used twice")
    );
    assert!(e(rs.with_rule_added("main", None, rule("x", vec![], class("zzz")))).contains("`zzz`"));
    assert!(e(rs.with_rule_removed("main", "nope")).contains("has no rule `nope`"));
    assert!(e(rs.with_rule_removed("nope", "api")).contains("no chain named"));
}

#[test]
fn rule_set_is_send_sync_and_cheap_to_share() {
    fn shareable<T: Send + Sync + 'static>() {}
    shareable::<RuleSet>();
}

const EXAMPLE_TOML: &str = r#"
[[chain]]
name = "main"
default = { class = "basic" }
[[chain.rule]]
id = "premium-net"
source = ["10.0.0.0/8", "::1/128", "192.0.2.7"]
host = "api.example.com"
path_prefix = "/api/"
header = { name = "User-Agent", contains = "curl" }
probability = 0.3
target = { class = "premium" }
[[chain.rule]]
id = "to-sub"
header = [{ name = "Cookie", contains = "a" }, { name = "Cookie", contains = "b" }]
target = { chain = "sub" }

[[chain]]
name = "sub"
default = { class = "a" }
"#;

#[derive(Debug, Deserialize)]
struct Config {
    chain: Vec<ChainSpec>,
}

#[test]
fn toml_config_shape_parses_and_classifies() {
    let cfg: Config = toml::from_str(EXAMPLE_TOML).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(cfg.chain[0].rules[0].header.len(), 1);
    assert_eq!(cfg.chain[0].rules[1].header.len(), 2);
    let rs = RuleSet::from_specs(cfg.chain, "main", classes()).unwrap_or_else(|e| panic!("{e}"));
    let curl = [("User-Agent", "curl/8")];
    assert_eq!(
        run(
            &rs,
            "10.1.1.1",
            Some("api.example.com"),
            "/api/x",
            &curl,
            &[0.29]
        ),
        "premium"
    );
    assert_eq!(
        run(
            &rs,
            "192.0.2.7",
            Some("api.example.com"),
            "/api/x",
            &curl,
            &[0.29]
        ),
        "premium"
    );
    assert_eq!(
        run(
            &rs,
            "10.1.1.1",
            Some("api.example.com"),
            "/api/x",
            &curl,
            &[0.31]
        ),
        "basic"
    );
    assert_eq!(
        run(
            &rs,
            "10.1.1.1",
            Some("api.example.com"),
            "/x",
            &curl,
            &[0.0]
        ),
        "basic"
    );
    assert_eq!(
        run(&rs, "192.0.2.1", None, "/", &[("cookie", "ab")], &[]),
        "a"
    );
    assert_eq!(
        run(&rs, "192.0.2.1", None, "/", &[("cookie", "a")], &[]),
        "basic"
    );
}

#[test]
fn unknown_keys_and_bad_values_are_refused_by_name() {
    let bad_key = EXAMPLE_TOML.replace("path_prefix", "path_prefx");
    let e = toml::from_str::<Config>(&bad_key)
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(e.contains("path_prefx"), "{e}");
    let bad_header = EXAMPLE_TOML.replace("contains = \"curl\"", "contain = \"curl\"");
    let e = toml::from_str::<Config>(&bad_header)
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(e.contains("contain"), "{e}");
    let bad_target = EXAMPLE_TOML.replace("{ class = \"premium\" }", "{ klass = \"premium\" }");
    let e = toml::from_str::<Config>(&bad_target)
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(e.contains("klass"), "{e}");
    let bad_source = EXAMPLE_TOML.replace("\"::1/128\"", "\"10.0.0.300\"");
    let cfg: Config = toml::from_str(&bad_source).unwrap_or_else(|e| panic!("{e}"));
    let e = RuleSet::from_specs(cfg.chain, "main", classes())
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(
        e.contains("chain `main`, rule `premium-net`") && e.contains("10.0.0.300"),
        "{e}"
    );
    let bad_p = EXAMPLE_TOML.replace("0.3", "30");
    let cfg: Config = toml::from_str(&bad_p).unwrap_or_else(|e| panic!("{e}"));
    let e = RuleSet::from_specs(cfg.chain, "main", classes())
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(
        e.contains("chain `main`, rule `premium-net`: `probability`"),
        "{e}"
    );
}

#[test]
fn json_round_trip_is_the_same_shape() {
    let cfg: Config = toml::from_str(EXAMPLE_TOML).unwrap_or_else(|e| panic!("{e}"));
    let rs =
        RuleSet::from_specs(cfg.chain.clone(), "main", classes()).unwrap_or_else(|e| panic!("{e}"));
    let listed = rs.to_specs();
    let json = serde_json::to_string(&listed).unwrap_or_else(|e| panic!("{e}"));
    assert!(
        json.contains(r#""header":{"name":"User-Agent","contains":"curl"}"#),
        "{json}"
    );
    assert!(json.contains(r#""target":{"chain":"sub"}"#), "{json}");
    assert!(json.contains(r#""192.0.2.7/32""#), "{json}");
    let back: Vec<ChainSpec> = serde_json::from_str(&json).unwrap_or_else(|e| panic!("{e}"));
    let rs2 = RuleSet::from_specs(back, "main", classes()).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(rs.chains(), rs2.chains());
    // A rule for the admin API, on its own.
    let r: RuleSpec =
        serde_json::from_str(r#"{"id":"x","path_prefix":"/x","target":{"class":"a"}}"#)
            .unwrap_or_else(|e| panic!("{e}"));
    let r = Rule::try_from(r).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(r.conditions, vec![Condition::PathPrefix("/x".into())]);
    let e = Rule::try_from(RuleSpec {
        id: "y".into(),
        source: None,
        host: Some("*bad".into()),
        path_prefix: None,
        listener: Vec::new(),
        first_bytes: None,
        header: vec![],
        probability: None,
        target: class("a"),
    })
    .err()
    .map(|e| e.to_string())
    .unwrap_or_default();
    assert!(e.starts_with("rule `y`: `host`"), "{e}");
}

#[test]
fn repeated_conditions_become_one_equivalent_spec() {
    let r = rule(
        "r",
        vec![
            Condition::Source(vec![net("10.0.0.0/8"), net("192.0.2.0/24")]),
            Condition::Source(vec![net("10.1.0.0/16"), net("2001:db8::/32")]),
            Condition::Host("*.example.com".into()),
            Condition::Host("api.example.com".into()),
            Condition::PathPrefix("/a".into()),
            Condition::PathPrefix("/a/b".into()),
            Condition::Probability(0.5),
            Condition::Probability(0.5),
            header("A", "x"),
            header("B", "y"),
        ],
        class("a"),
    );
    let s = RuleSpec::from(r);
    assert_eq!(s.source, Some(vec!["10.1.0.0/16".to_string()]));
    assert_eq!(s.host.as_deref(), Some("api.example.com"));
    assert_eq!(s.path_prefix.as_deref(), Some("/a/b"));
    assert_eq!(s.probability, Some(0.25));
    assert_eq!(s.header.len(), 2);
    let never = RuleSpec::from(rule(
        "n",
        vec![
            Condition::PathPrefix("/a".into()),
            Condition::PathPrefix("/b".into()),
        ],
        class("a"),
    ));
    assert_eq!(never.probability, Some(0.0));
    let never = RuleSpec::from(rule(
        "n",
        vec![
            Condition::Host("a.com".into()),
            Condition::Host("*.b.com".into()),
        ],
        class("a"),
    ));
    assert_eq!(never.probability, Some(0.0));
}

// ---------------------------------------------------------------------------------------
// The compiled classifier against a direct reading of the rules.

const NETS: [&str; 4] = ["10.0.0.0/8", "10.1.0.0/16", "2001:db8::/32", "192.0.2.0/24"];
const CLIENTS: [&str; 5] = [
    "10.1.2.3",
    "10.2.0.1",
    "2001:db8::5",
    "192.0.2.9",
    "::ffff:10.1.0.1",
];
const HOST_PATTERNS: [&str; 3] = ["a.example.com", "*.example.com", "b.test"];
const HOSTS: [Option<&str>; 5] = [
    Some("a.example.com:80"),
    Some("X.Example.com"),
    Some("b.test"),
    Some("example.com"),
    None,
];
const PREFIXES: [&str; 3] = ["/", "/api", "/api/v2"];
const PATHS: [&str; 4] = ["/", "/api", "/api/v2/x", "/static"];
const HEADER_NAMES: [&str; 2] = ["User-Agent", "Cookie"];
const NEEDLES: [&str; 4] = ["curl", "url", "gold", "tier=gold"];
const VALUES: [&str; 5] = ["curl/8", "tier=gold", "x", "silver", "gold curl"];

fn reference_holds(
    c: &Condition,
    client: IpAddr,
    host: Option<&str>,
    path: &str,
    headers: &[(&str, &str)],
    draw: &mut dyn FnMut() -> f64,
) -> bool {
    match c {
        Condition::Source(nets) => nets.iter().any(|n| n.contains(&client.to_canonical())),
        Condition::Host(p) => host.is_some_and(|h| {
            let h = h.to_lowercase();
            let h = h.split(':').next().unwrap_or("");
            let p = p.to_lowercase();
            match p.strip_prefix("*.") {
                Some(s) => h.ends_with(&format!(".{s}")),
                None => h == p,
            }
        }),
        Condition::PathPrefix(p) => path.starts_with(p.as_str()),
        Condition::HeaderContains { name, value } => headers.iter().any(|(n, v)| {
            n.eq_ignore_ascii_case(name)
                && v.as_bytes()
                    .windows(value.len())
                    .any(|w| w == value.as_bytes())
        }),
        Condition::Probability(p) => draw() < *p,
        // The generated requests come in on no listener and carry no first bytes.
        Condition::Listener(_) | Condition::FirstBytes(_) => false,
    }
}

fn reference(
    chains: &[Chain],
    client: IpAddr,
    host: Option<&str>,
    path: &str,
    headers: &[(&str, &str)],
    draw: &mut dyn FnMut() -> f64,
) -> String {
    let mut chain = &chains[0];
    loop {
        let hit = chain.rules.iter().find(|r| {
            r.conditions
                .iter()
                .all(|c| reference_holds(c, client, host, path, headers, draw))
        });
        match hit.map_or(&chain.default, |r| &r.target) {
            Target::Class(c) => return c.clone(),
            Target::Chain(n) => {
                chain = chains
                    .iter()
                    .find(|c| &c.name == n)
                    .unwrap_or_else(|| unreachable!("validated"));
            }
        }
    }
}

fn condition() -> impl Strategy<Value = Condition> {
    prop_oneof![
        proptest::sample::subsequence(NETS.to_vec(), 1..3)
            .prop_map(|v| Condition::Source(v.iter().map(|s| net(s)).collect())),
        proptest::sample::select(HOST_PATTERNS.to_vec())
            .prop_map(|h| Condition::Host(h.to_string())),
        proptest::sample::select(PREFIXES.to_vec())
            .prop_map(|p| Condition::PathPrefix(p.to_string())),
        (
            proptest::sample::select(HEADER_NAMES.to_vec()),
            proptest::sample::select(NEEDLES.to_vec())
        )
            .prop_map(|(n, v)| header(n, v)),
        (0u8..=4).prop_map(|k| Condition::Probability(k as f64 / 4.0)),
    ]
}

/// Up to 3 chains; chain `c{i}` may only jump to chains after it, so all are acyclic.
fn chains() -> impl Strategy<Value = Vec<Chain>> {
    (1usize..4).prop_flat_map(|n| {
        let target = move |i: usize| {
            let classes = proptest::sample::select(vec!["a", "b", "premium"])
                .prop_map(class)
                .boxed();
            if i + 1 < n {
                prop_oneof![
                    classes,
                    ((i + 1)..n).prop_map(|j| chain_to(&format!("c{j}")))
                ]
                .boxed()
            } else {
                classes
            }
        };
        let chain = move |i: usize| {
            (
                proptest::collection::vec(
                    (proptest::collection::vec(condition(), 0..3), target(i)),
                    0..5,
                ),
                target(i),
            )
                .prop_map(move |(rules, default)| Chain {
                    name: format!("c{i}"),
                    rules: rules
                        .into_iter()
                        .enumerate()
                        .map(|(k, (conditions, target))| rule(&format!("r{k}"), conditions, target))
                        .collect(),
                    default,
                })
        };
        (0..n).map(chain).collect::<Vec<_>>()
    })
}

proptest! {
    #[test]
    fn compiled_classifier_agrees_with_the_rules_read_directly(
        chains in chains(),
        requests in proptest::collection::vec(
            (0..CLIENTS.len(), 0..HOSTS.len(), 0..PATHS.len(),
             proptest::collection::vec((0..HEADER_NAMES.len(), 0..VALUES.len()), 0..3),
             proptest::collection::vec(0.0f64..1.0, 8)),
            1..20),
    ) {
        let rs = RuleSet::new(chains.clone(), "c0", classes()).map_err(|e| TestCaseError::fail(e.to_string()))?;
        for (c, h, p, hdrs, draws) in requests {
            let headers: Vec<(&str, &str)> = hdrs.iter().map(|&(n, v)| (HEADER_NAMES[n], VALUES[v])).collect();
            let client = addr(CLIENTS[c]);
            let (mut i, mut j) = (0, 0);
            let got = rs.classify(
                &RequestFacts { client, host: HOSTS[h], path: PATHS[p], headers: &HeaderList(&headers), listener: None, first_bytes: b"" },
                &mut || { i += 1; draws.get(i - 1).copied().unwrap_or(0.5) },
            );
            let want = reference(&chains, client, HOSTS[h], PATHS[p], &headers, &mut || { j += 1; draws.get(j - 1).copied().unwrap_or(0.5) });
            prop_assert_eq!(&rs.classes()[got], &want);
            prop_assert_eq!(i, j, "draws taken differ");
        }
        // The configuration shape of any valid set is itself valid.
        let specs: Vec<ChainSpec> = chains.iter().cloned().map(ChainSpec::from).collect();
        let again = RuleSet::from_specs(specs, "c0", classes()).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(again.chains().len(), chains.len());
    }
}

#[test]
fn connections_are_classified_by_listener_first_bytes_and_server_name() {
    let spec = |toml_text: &str| -> ChainSpec {
        toml::from_str(toml_text).unwrap_or_else(|e| panic!("{e}"))
    };
    let chains = vec![
        spec(
            r#"
name = "tcp"
default = { class = "other" }
[[rule]]
id = "ssh"
first_bytes = "SSH-"
target = { class = "ssh" }
[[rule]]
id = "db"
listener = ["db", "db2"]
target = { class = "db" }
[[rule]]
id = "tls"
host = "*.example.com"
listener = "tls"
target = { class = "tls" }
"#,
        ),
        spec("name = \"http\"\ndefault = { class = \"web\" }\n"),
    ];
    let classes: Vec<String> = ["other", "ssh", "db", "tls", "web"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let rs = RuleSet::from_specs(chains, "http", classes).unwrap_or_else(|e| panic!("{e}"));
    let tcp = rs.chain_index("tcp").expect("the tcp chain");
    let conn =
        |listener: &'static str, host: Option<&'static str>, first: &'static [u8]| RequestFacts {
            client: addr("192.0.2.1"),
            host,
            path: "",
            headers: &NoHeaders,
            listener: Some(listener),
            first_bytes: first,
        };
    let class = |f: &RequestFacts<'_>| rs.classes()[rs.classify_from(tcp, f, &mut || 0.5)].clone();
    assert_eq!(class(&conn("any", None, b"SSH-2.0-OpenSSH")), "ssh");
    assert_eq!(class(&conn("db2", None, b"")), "db");
    assert_eq!(
        class(&conn("tls", Some("api.example.com"), b"\x16\x03")),
        "tls"
    );
    assert_eq!(
        class(&conn("tls", Some("example.org"), b"\x16\x03")),
        "other"
    );
    assert_eq!(class(&conn("any", None, b"")), "other");
    // The entry chain is still the default start.
    assert_eq!(
        rs.classes()[rs.classify(&conn("db", None, b""), &mut || 0.5)],
        "web"
    );
    // Listed back in the file's shape, the rules are the same rules.
    let again = RuleSet::from_specs(rs.to_specs(), "http", rs.classes().to_vec())
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(again.chains(), rs.chains());
    // Empty conditions are refused, naming the place.
    let bad = spec("name = \"c\"\ndefault = { class = \"web\" }\n[[rule]]\nid = \"x\"\nfirst_bytes = \"\"\ntarget = { class = \"web\" }\n");
    let e = RuleSet::from_specs(vec![bad], "c", vec!["web".into()]).unwrap_err();
    assert!(
        e.to_string().contains("`first_bytes` must not be empty"),
        "{e}"
    );
}
