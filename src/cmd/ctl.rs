//! `allot ctl`: change a running gateway through its admin API.

use std::process::ExitCode;

use anyhow::Context;
use http::Method;
use serde_json::{json, Map, Value};

use super::admin_client::{call_blocking, AdminTarget};

/// Flags of `allot ctl`.
#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    target: AdminTarget,
    #[command(subcommand)]
    what: What,
}

#[derive(Debug, clap::Subcommand)]
enum What {
    /// List, add or remove classification rules.
    #[command(subcommand)]
    Rules(RulesCmd),
    /// Change a class: `allot ctl class basic max_running=4 accept_rate='{"rate_per_sec":50,"burst":5}'`.
    Class {
        /// The class.
        name: String,
        /// `key=value` pairs, keys as in the configuration file; values in JSON (bare
        /// words are strings; `accept_rate=null` removes the actuator).
        #[arg(required = true)]
        set: Vec<String>,
    },
    /// Change a bandwidth group: `allot ctl bandwidth g1 bytes_per_sec=500000`.
    Bandwidth {
        /// The group.
        name: String,
        /// `key=value` pairs, as for `class`.
        #[arg(required = true)]
        set: Vec<String>,
    },
    /// Change gateway-wide settings: `allot ctl gateway max_running=64`.
    Gateway {
        /// `key=value` pairs, as for `class`.
        #[arg(required = true)]
        set: Vec<String>,
    },
    /// The QoS manager's feedback loops: list, pause, resume, retune, add, remove.
    #[command(subcommand)]
    Controllers(ControllersCmd),
    /// Change one back-end address at run time: `allot ctl backend app drain 10.0.0.5:8080`.
    /// `drain` sends it no new requests and lets those in flight finish; `disable` takes
    /// it out at once; `enable` puts it back; `add` and `remove` change the address list.
    Backend {
        /// The back end.
        name: String,
        /// What to do with the address.
        #[arg(value_enum)]
        action: BackendAction,
        /// The address, `ip:port`.
        address: std::net::SocketAddr,
    },
    /// Show how the configuration in force differs from a file (`-` lines: running,
    /// `+` lines: the file); exit 0 when they agree, 1 when they differ.
    Diff {
        /// The configuration file to compare with.
        #[arg(long, value_name = "FILE")]
        config: std::path::PathBuf,
    },
}

/// What `allot ctl backend` does to an address.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum BackendAction {
    /// No new requests or connections; those in flight finish.
    Drain,
    /// Out of use at once.
    Disable,
    /// Back in use (after a drain or disable).
    Enable,
    /// Add the address to the back end.
    Add,
    /// Remove the address from the back end.
    Remove,
}

#[derive(Debug, clap::Subcommand)]
enum ControllersCmd {
    /// Print every controller's input, set point, outputs and state as a table.
    List {
        /// Print the admin API's JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Freeze a controller's outputs where they are.
    Pause {
        /// The controller.
        name: String,
    },
    /// Let a paused controller move its outputs again.
    Resume {
        /// The controller.
        name: String,
    },
    /// Retune a controller: `allot ctl controllers set premium-delay setpoint_ms=40 ki=0.8`.
    Set {
        /// The controller.
        name: String,
        /// `key=value` pairs, keys as in its `[[controller]]` table.
        #[arg(required = true)]
        set: Vec<String>,
    },
    /// Add a controller: `key=value` pairs of a `[[controller]]` table, `kind` and `name`
    /// included (`allot ctl controllers add kind=adaptive name=a backend=app`).
    Add {
        /// `key=value` pairs.
        #[arg(required = true)]
        set: Vec<String>,
    },
    /// Remove a controller; its actuators go back to their configured values.
    Remove {
        /// The controller.
        name: String,
    },
}

#[derive(Debug, clap::Subcommand)]
enum RulesCmd {
    /// Print the rule chains as a table.
    List {
        /// Print the admin API's JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Add a rule to a chain (at the end, before the default, unless --position).
    Add {
        /// The chain.
        chain: String,
        /// The rule's id, unique in its chain.
        #[arg(long)]
        id: String,
        /// Client address or CIDR (repeatable: any of them).
        #[arg(long)]
        source: Vec<String>,
        /// Host, `*.example.com` for subdomains.
        #[arg(long)]
        host: Option<String>,
        /// Path prefix.
        #[arg(long)]
        path_prefix: Option<String>,
        /// `Header-Name:substring`.
        #[arg(long)]
        header: Option<String>,
        /// Probability of matching, in [0, 1].
        #[arg(long)]
        probability: Option<f64>,
        /// Target class.
        #[arg(
            long,
            conflicts_with = "to_chain",
            required_unless_present = "to_chain"
        )]
        class: Option<String>,
        /// Target chain.
        #[arg(long = "chain")]
        to_chain: Option<String>,
        /// Position in the chain, 0 first.
        #[arg(long)]
        position: Option<usize>,
    },
    /// Remove a rule by id.
    Remove {
        /// The chain.
        chain: String,
        /// The rule's id.
        id: String,
    },
}

/// How the answer is printed.
#[derive(Debug, Clone, Copy)]
enum Show {
    /// As the gateway sent it.
    Raw,
    /// `/rules` as a table.
    Rules,
    /// `/controllers` as a table.
    Controllers,
}

/// Sends the change and prints the answer; exit 1 when the gateway refused it.
pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let mut show = Show::Raw;
    let (method, path, body) = match args.what {
        What::Rules(RulesCmd::List { json }) => {
            if !json {
                show = Show::Rules;
            }
            (Method::GET, "/rules".to_string(), None)
        }
        What::Diff { config } => return diff(&args.target, &config),
        What::Backend {
            name,
            action,
            address,
        } => match action {
            BackendAction::Drain | BackendAction::Disable | BackendAction::Enable => {
                let verb = format!("{action:?}").to_lowercase();
                (
                    Method::POST,
                    format!("/backends/{name}/addresses/{address}/{verb}"),
                    None,
                )
            }
            BackendAction::Add => (
                Method::POST,
                format!("/backends/{name}/addresses"),
                Some(json!({ "address": address }).to_string()),
            ),
            BackendAction::Remove => (
                Method::DELETE,
                format!("/backends/{name}/addresses/{address}"),
                None,
            ),
        },
        What::Rules(RulesCmd::Add {
            chain,
            id,
            source,
            host,
            path_prefix,
            header,
            probability,
            class,
            to_chain,
            position,
        }) => {
            let mut rule = Map::new();
            rule.insert("id".into(), json!(id));
            if !source.is_empty() {
                rule.insert("source".into(), json!(source));
            }
            if let Some(h) = host {
                rule.insert("host".into(), json!(h));
            }
            if let Some(p) = path_prefix {
                rule.insert("path_prefix".into(), json!(p));
            }
            if let Some(h) = header {
                let (name, contains) = h
                    .split_once(':')
                    .context("--header: expected `Header-Name:substring`")?;
                rule.insert(
                    "header".into(),
                    json!({"name": name.trim(), "contains": contains}),
                );
            }
            if let Some(p) = probability {
                rule.insert("probability".into(), json!(p));
            }
            let target = match (class, to_chain) {
                (Some(c), _) => json!({ "class": c }),
                (None, Some(c)) => json!({ "chain": c }),
                (None, None) => anyhow::bail!("give --class or --chain"),
            };
            rule.insert("target".into(), target);
            let body = json!({ "chain": chain, "position": position, "rule": rule });
            (Method::POST, "/rules".to_string(), Some(body.to_string()))
        }
        What::Rules(RulesCmd::Remove { chain, id }) => {
            (Method::DELETE, format!("/rules/{chain}/{id}"), None)
        }
        What::Class { name, set } => (
            Method::PATCH,
            format!("/classes/{name}"),
            Some(pairs(&set)?),
        ),
        What::Bandwidth { name, set } => (
            Method::PATCH,
            format!("/bandwidth_groups/{name}"),
            Some(pairs(&set)?),
        ),
        What::Gateway { set } => (Method::PATCH, "/gateway".to_string(), Some(pairs(&set)?)),
        What::Controllers(c) => match c {
            ControllersCmd::List { json } => {
                if !json {
                    show = Show::Controllers;
                }
                (Method::GET, "/controllers".to_string(), None)
            }
            ControllersCmd::Pause { name } => {
                (Method::POST, format!("/controllers/{name}/pause"), None)
            }
            ControllersCmd::Resume { name } => {
                (Method::POST, format!("/controllers/{name}/resume"), None)
            }
            ControllersCmd::Set { name, set } => (
                Method::PATCH,
                format!("/controllers/{name}"),
                Some(pairs(&set)?),
            ),
            ControllersCmd::Add { set } => {
                (Method::POST, "/controllers".to_string(), Some(pairs(&set)?))
            }
            ControllersCmd::Remove { name } => {
                (Method::DELETE, format!("/controllers/{name}"), None)
            }
        },
    };
    let (status, text) = call_blocking(&args.target, method, &path, body)?;
    if !status.is_success() {
        show = Show::Raw;
    }
    match show {
        Show::Raw => print!("{text}"),
        Show::Rules => print!("{}", rules_table(&parse_answer(&text, "/rules")?)),
        Show::Controllers => print!(
            "{}",
            controllers_table(&parse_answer(&text, "/controllers")?)
        ),
    }
    Ok(if status.is_success() {
        ExitCode::SUCCESS
    } else {
        eprintln!("allot ctl: the gateway answered {status}");
        ExitCode::from(1)
    })
}

fn parse_answer(text: &str, what: &str) -> anyhow::Result<Value> {
    serde_json::from_str(text).with_context(|| format!("reading the answer to GET {what}"))
}

/// `allot ctl diff`: the running configuration (as TOML) against the file's, key by key.
fn diff(target: &AdminTarget, file: &std::path::Path) -> anyhow::Result<ExitCode> {
    let wanted = allot_gateway::Config::load(file)?;
    let (status, text) = call_blocking(target, Method::GET, "/config?format=toml", None)?;
    if !status.is_success() {
        anyhow::bail!(
            "GET /config?format=toml: the gateway answered {status}: {}",
            text.trim()
        );
    }
    // Already validated by the gateway; read as is (its token_env may not be set here).
    let running: allot_gateway::Config =
        toml::from_str(&text).context("reading the configuration in force (GET /config)")?;
    let changes = allot_gateway::config::diff::diff(&running, &wanted);
    if changes.is_empty() {
        println!("the configuration in force is the file's");
        return Ok(ExitCode::SUCCESS);
    }
    let show = |v: &Option<Value>| match v {
        None => "(absent)".to_string(),
        Some(Value::String(s)) => format!("{s:?}"),
        Some(v) => v.to_string(),
    };
    println!("--- running (GET /config)\n+++ {}", file.display());
    for c in &changes {
        println!("- {} = {}", c.key, show(&c.from));
        println!("+ {} = {}", c.key, show(&c.to));
    }
    println!(
        "{} key{} differ{}",
        changes.len(),
        if changes.len() == 1 { "" } else { "s" },
        if changes.len() == 1 { "s" } else { "" }
    );
    Ok(ExitCode::from(1))
}

/// Pads every column of `rows` (the first is the header) to its widest cell.
fn columns(rows: &[Vec<String>]) -> String {
    let n = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..n)
        .map(|i| {
            rows.iter()
                .filter_map(|r| r.get(i))
                .map(|c| c.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for r in rows {
        let line: Vec<String> = r
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<w$}", w = widths[i]))
            .collect();
        out += line.join("  ").trim_end();
        out.push('\n');
    }
    out
}

/// A rule target (`{"class": …}` or `{"chain": …}`) as `class X` / `chain Y`.
fn target(v: &Value) -> String {
    match (v.get("class"), v.get("chain")) {
        (Some(Value::String(c)), _) => format!("class {c}"),
        (_, Some(Value::String(c))) => format!("chain {c}"),
        _ => v.to_string(),
    }
}

/// A rule's conditions, `key=value` each (all must hold).
fn conditions(rule: &Value) -> String {
    let Some(obj) = rule.as_object() else {
        return rule.to_string();
    };
    let mut parts = Vec::new();
    for (k, v) in obj {
        if k == "id" || k == "target" {
            continue;
        }
        let text = match (k.as_str(), v) {
            (_, Value::String(s)) => s.clone(),
            (_, Value::Array(items)) => items
                .iter()
                .map(|i| match i {
                    Value::String(s) => s.clone(),
                    other => header(other),
                })
                .collect::<Vec<_>>()
                .join(","),
            ("header", h) => header(h),
            (_, other) => other.to_string(),
        };
        parts.push(format!("{k}={text}"));
    }
    if parts.is_empty() {
        "(always)".into()
    } else {
        parts.join(" ")
    }
}

/// A header condition as `Name~substring`.
fn header(h: &Value) -> String {
    match (h.get("name"), h.get("contains")) {
        (Some(Value::String(n)), Some(Value::String(c))) => format!("{n}~{c}"),
        _ => h.to_string(),
    }
}

/// `GET /rules` as a table: one row per rule in order, then each chain's default.
fn rules_table(v: &Value) -> String {
    let mut rows = vec![vec![
        "chain".to_string(),
        "#".into(),
        "rule".into(),
        "matches".into(),
        "target".into(),
    ]];
    let entry = v.get("entry").and_then(Value::as_str).unwrap_or("");
    for chain in v["chains"].as_array().into_iter().flatten() {
        let mut name = chain["name"].as_str().unwrap_or("?").to_string();
        if name == entry {
            name += " (entry)";
        }
        for (i, rule) in chain["rule"].as_array().into_iter().flatten().enumerate() {
            rows.push(vec![
                name.clone(),
                i.to_string(),
                rule["id"].as_str().unwrap_or("?").to_string(),
                conditions(rule),
                target(&rule["target"]),
            ]);
        }
        rows.push(vec![
            name,
            "-".into(),
            "(default)".into(),
            "(no rule matched)".into(),
            target(&chain["default"]),
        ]);
    }
    columns(&rows)
}

/// `(knob, value)` pairs as `knob=value`, caps too large to be real shown as `unlimited`.
fn knobs(v: &Value) -> String {
    v.as_array()
        .into_iter()
        .flatten()
        .filter_map(|kv| {
            let k = kv.get(0)?.as_str()?;
            let value = kv
                .get(1)
                .and_then(Value::as_f64)
                .map_or_else(|| "unlimited".to_string(), super::stat::cap_f64);
            Some(format!("{k}={value}"))
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// `GET /controllers` as a table, one row per loop.
fn controllers_table(v: &Value) -> String {
    let mut rows = vec![vec![
        "controller".to_string(),
        "kind".into(),
        "signal".into(),
        "input".into(),
        "set point".into(),
        "outputs".into(),
        "state".into(),
        "ticks".into(),
        "saturated".into(),
        "period ms".into(),
        "".into(),
    ]];
    for r in v.as_array().into_iter().flatten() {
        let num = |k: &str| {
            r.get(k)
                .and_then(Value::as_f64)
                .map_or_else(|| "-".to_string(), |x| format!("{x:.3}"))
        };
        rows.push(vec![
            r["name"].as_str().unwrap_or("?").to_string(),
            r["kind"].as_str().unwrap_or("").to_string(),
            r["signal"].as_str().unwrap_or("").to_string(),
            num("input"),
            num("setpoint"),
            knobs(&r["outputs"]),
            knobs(&r["state"]),
            r["ticks"].as_u64().unwrap_or(0).to_string(),
            r["saturations"].as_u64().unwrap_or(0).to_string(),
            r["period_ms"].as_u64().unwrap_or(0).to_string(),
            if r["paused"] == true {
                "paused".into()
            } else {
                String::new()
            },
        ]);
    }
    columns(&rows)
}

/// `key=value` pairs as a JSON object; values parse as JSON, else as strings.
fn pairs(set: &[String]) -> anyhow::Result<String> {
    let mut obj = Map::new();
    for kv in set {
        let (k, v) = kv
            .split_once('=')
            .with_context(|| format!("{kv:?}: expected key=value"))?;
        let value = serde_json::from_str(v).unwrap_or_else(|_| Value::String(v.to_string()));
        obj.insert(k.trim().to_string(), value);
    }
    Ok(Value::Object(obj).to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pairs_parse_json_values_and_bare_words() {
        let s = pairs(&[
            "max_running=4".into(),
            "policy=fifo".into(),
            "accept_rate=null".into(),
        ])
        .unwrap();
        let v: Value = serde_json::from_str(&s).unwrap();
        assert_eq!(v["max_running"], 4);
        assert_eq!(v["policy"], "fifo");
        assert!(v["accept_rate"].is_null());
        assert!(pairs(&["nokey".into()]).is_err());
    }

    #[test]
    fn rules_print_one_row_per_rule_then_the_default() {
        let v = json!({"entry": "main", "chains": [{"name": "main", "default": {"class": "basic"},
            "rule": [{"id": "api", "path_prefix": "/api/", "header": {"name": "X-Tier", "contains": "gold"},
                      "target": {"class": "premium"}}]}]});
        let t = rules_table(&v);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 3, "{t}");
        assert!(lines[1].starts_with("main (entry)  0  api"), "{t}");
        assert!(
            lines[1].contains("header=X-Tier~gold path_prefix=/api/"),
            "{t}"
        );
        assert!(lines[1].ends_with("class premium"), "{t}");
        assert!(
            lines[2].contains("(default)") && lines[2].ends_with("class basic"),
            "{t}"
        );
    }

    #[test]
    fn controller_outputs_too_large_to_be_caps_read_unlimited() {
        let v = json!([{"name": "a", "kind": "adaptive", "signal": "latency_ms", "input": 12.5,
            "setpoint": 1.0, "outputs": [["limit", 18446744073709551615.0_f64]], "state": [],
            "ticks": 3, "saturations": 0, "period_ms": 100, "paused": true}]);
        let t = controllers_table(&v);
        assert!(t.contains("limit=unlimited"), "{t}");
        assert!(!t.contains("18446744073709551615"), "{t}");
        assert!(t.lines().nth(1).unwrap().ends_with("paused"), "{t}");
    }
}
