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
}

#[derive(Debug, clap::Subcommand)]
enum ControllersCmd {
    /// Print every controller's input, set point, outputs and state (JSON).
    List,
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
    /// Print the rule chains.
    List,
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

/// Sends the change and prints the answer; exit 1 when the gateway refused it.
pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let (method, path, body) = match args.what {
        What::Rules(RulesCmd::List) => (Method::GET, "/rules".to_string(), None),
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
            ControllersCmd::List => (Method::GET, "/controllers".to_string(), None),
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
    print!("{text}");
    Ok(if status.is_success() {
        ExitCode::SUCCESS
    } else {
        eprintln!("allot ctl: the gateway answered {status}");
        ExitCode::from(1)
    })
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
}
