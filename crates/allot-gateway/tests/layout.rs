//! The crate's layout holds: its top-level modules import one another without a cycle,
//! `lib.rs` names each module's job, and only the L7 path's answer map builds responses
//! of the gateway's own.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

/// Every `.rs` file under `dir`.
fn files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).expect("read src") {
        let path = entry.expect("dir entry").path();
        if path.is_dir() {
            out.extend(files(&path));
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
    out
}

/// The top-level module a file belongs to (`http` for `src/http/body.rs`).
fn module_of(path: &Path) -> Option<String> {
    let rel = path.strip_prefix(src()).ok()?;
    let first = rel
        .components()
        .next()?
        .as_os_str()
        .to_string_lossy()
        .to_string();
    let name = first.trim_end_matches(".rs").to_string();
    (name != "lib").then_some(name)
}

/// Top-level modules and the ones each refers to through `crate::`.
fn imports() -> BTreeMap<String, BTreeSet<String>> {
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for path in files(&src()) {
        let Some(module) = module_of(&path) else {
            continue;
        };
        let text = std::fs::read_to_string(&path).expect("read source");
        let deps = graph.entry(module.clone()).or_default();
        for (i, _) in text.match_indices("crate::") {
            let rest = &text[i + "crate::".len()..];
            let name: String = rest
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            if !name.is_empty() && name != module {
                deps.insert(name);
            }
        }
    }
    graph
}

#[test]
fn top_level_modules_import_each_other_without_a_cycle() {
    let graph = imports();
    // Depth-first search for a back edge, reporting the cycle found.
    fn visit(
        m: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(at) = path.iter().position(|p| p == m) {
            let mut cycle = path[at..].to_vec();
            cycle.push(m.to_string());
            return Some(cycle);
        }
        if done.contains(m) {
            return None;
        }
        path.push(m.to_string());
        for d in graph.get(m).into_iter().flatten() {
            if let Some(c) = visit(d, graph, path, done) {
                return Some(c);
            }
        }
        path.pop();
        done.insert(m.to_string());
        None
    }
    let mut done = BTreeSet::new();
    for m in graph.keys() {
        if let Some(cycle) = visit(m, &graph, &mut Vec::new(), &mut done) {
            panic!("import cycle: {}", cycle.join(" -> "));
        }
    }
    // The configuration is the leaf.
    assert!(
        graph["config"].is_empty(),
        "config imports {:?}",
        graph["config"]
    );
}

#[test]
fn lib_names_the_job_of_every_module() {
    let lib = std::fs::read_to_string(src().join("lib.rs")).expect("lib.rs");
    for m in imports().keys() {
        assert!(
            lib.contains(&format!("//! - [`{m}`]: ")),
            "lib.rs does not say what `{m}` is for"
        );
    }
}

#[test]
fn only_the_answer_map_makes_the_gateways_own_responses() {
    for path in files(&src().join("http")) {
        if path.ends_with("error.rs") {
            continue;
        }
        let text = std::fs::read_to_string(&path).expect("read source");
        for needle in ["StatusCode::", "status_mut", "Response::new"] {
            assert!(
                !text.contains(needle),
                "{} builds a response itself ({needle}); return an `Answer` instead",
                path.display()
            );
        }
    }
}
