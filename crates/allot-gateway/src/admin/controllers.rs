//! The `/controllers` admin routes: `GET /controllers` (readouts), and with the token
//! `POST /controllers` (add: a controller table as JSON, `kind` included),
//! `PATCH /controllers/<name>` (retune: the keys to change), `DELETE /controllers/<name>`,
//! `POST /controllers/<name>/pause` and `…/resume`. Adding, retuning and removing are
//! configuration changes, validated like a file; pausing is run-time state.

use http::{Method, StatusCode};
use serde_json::Value;
use toml::Spanned;

use super::AdminError;
use crate::config::{ConfigError, ControllerConfig};
use crate::gateway::Gateway;

/// A reply: status and one line of text.
pub(crate) type Reply = Result<(StatusCode, String), AdminError>;

fn invalid(key: String, message: String) -> ConfigError {
    ConfigError::Invalid {
        path: "run-time change".into(),
        line: 0,
        key,
        message,
    }
}

fn bad(e: impl std::fmt::Display) -> AdminError {
    AdminError::BadRequest(format!("allot: {e}"))
}

fn not_found(name: &str) -> AdminError {
    AdminError::NotFound(format!("allot: no controller is named {name:?}"))
}

/// A write under `/controllers`; `rest` are the path segments after it.
pub(crate) fn write(gw: &Gateway, method: &Method, rest: &[&str], body: &[u8]) -> Reply {
    match (method, rest) {
        (&Method::POST, []) => {
            let c: ControllerConfig =
                serde_json::from_slice(body).map_err(|e| bad(format!("bad controller: {e}")))?;
            let name = c.name().to_string();
            gw.change(|config| {
                if config.controller.iter().any(|x| x.get_ref().name() == name) {
                    return Err(invalid(
                        format!("controller.{name}.name"),
                        "a controller with this name exists; PATCH it instead".into(),
                    ));
                }
                config.controller.push(Spanned::new(0..0, c));
                Ok(())
            })
            .map_err(bad)?;
            Ok((StatusCode::CREATED, format!("controller {name} added")))
        }
        (&Method::PATCH, [name]) => {
            let patch: Value =
                serde_json::from_slice(body).map_err(|e| bad(format!("bad JSON: {e}")))?;
            let mut found = false;
            gw.change(|config| {
                let Some(item) = config
                    .controller
                    .iter_mut()
                    .find(|x| x.get_ref().name() == *name)
                else {
                    return Ok(());
                };
                found = true;
                *item.get_mut() = merged(item.get_ref(), &patch, name)?;
                Ok(())
            })
            .map_err(bad)?;
            if !found {
                return Err(not_found(name));
            }
            Ok((StatusCode::OK, format!("controller {name} changed")))
        }
        (&Method::DELETE, [name]) => {
            let mut found = false;
            gw.change(|config| {
                let before = config.controller.len();
                config.controller.retain(|x| x.get_ref().name() != *name);
                found = config.controller.len() != before;
                Ok(())
            })
            .map_err(bad)?;
            if !found {
                return Err(not_found(name));
            }
            Ok((StatusCode::OK, format!("controller {name} removed")))
        }
        (&Method::POST, [name, action @ ("pause" | "resume")]) => {
            if gw.supervisor().set_paused(name, *action == "pause") {
                Ok((StatusCode::OK, format!("controller {name} {action}d")))
            } else {
                Err(not_found(name))
            }
        }
        _ => Err(super::no_such_endpoint()),
    }
}

/// `current` with the keys of `patch` replaced, re-read through serde so unknown keys,
/// wrong types and a changed name or kind are refused.
fn merged(
    current: &ControllerConfig,
    patch: &Value,
    name: &str,
) -> Result<ControllerConfig, ConfigError> {
    let key = format!("controller.{name}");
    let Value::Object(changes) = patch else {
        return Err(invalid(
            key,
            "expected a JSON object of keys to change".into(),
        ));
    };
    for fixed in ["name", "kind"] {
        if changes
            .get(fixed)
            .is_some_and(|v| v.as_str() != Some(fixed_value(current, fixed)))
        {
            return Err(invalid(
                format!("{key}.{fixed}"),
                format!("`{fixed}` cannot be changed at run time; remove the controller and add another"),
            ));
        }
    }
    let mut value =
        serde_json::to_value(current).map_err(|e| invalid(key.clone(), e.to_string()))?;
    if let Value::Object(target) = &mut value {
        for (k, v) in changes {
            target.insert(k.clone(), v.clone());
        }
    }
    serde_json::from_value(value).map_err(|e| invalid(key, e.to_string()))
}

fn fixed_value<'a>(c: &'a ControllerConfig, key: &str) -> &'a str {
    if key == "name" {
        c.name()
    } else {
        c.kind()
    }
}
