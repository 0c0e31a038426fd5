//! How two configurations differ, key by key: what a reload replaces of the run-time
//! changes, and what `allot ctl diff` shows between a running gateway and a file. Tables
//! in arrays (classes, back ends, chains, controllers, listeners) are matched by their
//! `name`, so a change reads `class.basic.max_running: 8 → 4`. Secrets are compared and
//! shown as they serialise: `<redacted>`.

use serde_json::Value;

use super::Config;

/// One key whose value differs.
#[derive(Debug, Clone, PartialEq)]
pub struct Change {
    /// The dotted key, tables named by their `name`.
    pub key: String,
    /// Its value in the first configuration (`None`: absent).
    pub from: Option<Value>,
    /// Its value in the second.
    pub to: Option<Value>,
}

impl std::fmt::Display for Change {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let show = |v: &Option<Value>| match v {
            None => "(absent)".to_string(),
            Some(Value::String(s)) => format!("{s:?}"),
            Some(v) => v.to_string(),
        };
        write!(f, "{}: {} → {}", self.key, show(&self.from), show(&self.to))
    }
}

/// Every key whose value differs between `a` and `b`, in a stable order.
pub fn diff(a: &Config, b: &Config) -> Vec<Change> {
    let (va, vb) = (
        serde_json::to_value(a).unwrap_or(Value::Null),
        serde_json::to_value(b).unwrap_or(Value::Null),
    );
    let mut out = Vec::new();
    walk("", Some(&va), Some(&vb), &mut out);
    out
}

fn join(prefix: &str, key: &str) -> String {
    if prefix.is_empty() {
        key.to_string()
    } else {
        format!("{prefix}.{key}")
    }
}

/// An array of tables that all have a `name`, as a list of (name, table).
fn named(items: &[Value]) -> Option<Vec<(String, &Value)>> {
    items
        .iter()
        .map(|v| {
            v.get("name")
                .and_then(Value::as_str)
                .map(|n| (n.to_string(), v))
        })
        .collect()
}

fn find<'v>(list: &[(String, &'v Value)], name: &str) -> Option<&'v Value> {
    list.iter().find(|(m, _)| m == name).map(|(_, v)| *v)
}

fn walk(key: &str, a: Option<&Value>, b: Option<&Value>, out: &mut Vec<Change>) {
    match (a, b) {
        (Some(Value::Object(x)), Some(Value::Object(y))) => {
            let mut keys: Vec<&String> = x.keys().chain(y.keys()).collect();
            keys.sort();
            keys.dedup();
            for k in keys {
                walk(&join(key, k), x.get(k), y.get(k), out);
            }
        }
        (Some(Value::Array(x)), Some(Value::Array(y))) => match (named(x), named(y)) {
            (Some(nx), Some(ny)) => {
                let mut names: Vec<&String> = nx.iter().chain(ny.iter()).map(|(n, _)| n).collect();
                names.sort();
                names.dedup();
                for n in names {
                    walk(&join(key, n), find(&nx, n), find(&ny, n), out);
                }
            }
            _ if x != y => out.push(Change {
                key: key.to_string(),
                from: a.cloned(),
                to: b.cloned(),
            }),
            _ => {}
        },
        (x, y) if x != y => {
            // Absent and null read the same: an unset optional key.
            let none = |v: Option<&Value>| v.is_none_or(Value::is_null);
            if !(none(x) && none(y)) {
                out.push(Change {
                    key: key.to_string(),
                    from: x.cloned(),
                    to: y.cloned(),
                });
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = r#"
[admin]
token = "s3cret"
[[backend]]
name = "app"
addresses = ["127.0.0.1:9000"]
[[class]]
name = "basic"
backend = "app"
max_running = 8
[[class]]
name = "premium"
backend = "app"
[[chain]]
name = "main"
default = { class = "basic" }
"#;

    #[test]
    fn changes_are_named_by_table_and_key_and_secrets_stay_hidden() {
        let a = Config::parse(BASE, "a").unwrap();
        let b = Config::parse(
            &BASE
                .replace("max_running = 8", "max_running = 4")
                .replace("s3cret", "other"),
            "b",
        )
        .unwrap();
        let d = diff(&a, &b);
        assert_eq!(d.len(), 1, "{d:?}");
        assert_eq!(d[0].to_string(), "class.basic.max_running: 8 → 4");
        assert!(diff(&a, &a).is_empty());
        let c = Config::parse(
            &BASE.replace("[[class]]\nname = \"premium\"\nbackend = \"app\"\n", ""),
            "c",
        )
        .unwrap();
        let d = diff(&a, &c);
        assert!(
            d.iter().any(|x| x.key == "class.premium" && x.to.is_none()),
            "{d:?}"
        );
    }
}
