//! Selectors: which processes make up a principal. A PID, a process tree (the PID and all
//! its descendants, followed as it forks), a user, or a command-name regex.

use std::collections::{BTreeSet, HashMap, HashSet};

use regex::Regex;

use crate::error::ProcError;
use crate::procfs::{self, ProcessInfo};

/// How a principal's processes are found.
#[derive(Debug, Clone)]
pub enum Selector {
    /// Exactly this process.
    Pid(i32),
    /// This process and every descendant (a member's children stay members when
    /// reparented).
    Tree(i32),
    /// Every process of this user.
    User {
        /// The name as given.
        name: String,
        /// The resolved uid.
        uid: u32,
    },
    /// Every process whose command name matches.
    Comm(Regex),
}

impl std::fmt::Display for Selector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Selector::Pid(p) => write!(f, "pid:{p}"),
            Selector::Tree(p) => write!(f, "tree:{p}"),
            Selector::User { name, .. } => write!(f, "user:{name}"),
            Selector::Comm(r) => write!(f, "comm:{}", r.as_str()),
        }
    }
}

/// The kind of a selector flag.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SelectorKind {
    /// `--pid`
    Pid,
    /// `--tree`
    Tree,
    /// `--user`
    User,
    /// `--comm`
    Comm,
}

impl SelectorKind {
    /// The flag name.
    pub fn flag(self) -> &'static str {
        match self {
            SelectorKind::Pid => "--pid",
            SelectorKind::Tree => "--tree",
            SelectorKind::User => "--user",
            SelectorKind::Comm => "--comm",
        }
    }
}

/// Builds a selector from its value (`"1234"`, `"alice"`, `"^worker"`).
pub fn parse_selector(kind: SelectorKind, value: &str) -> Result<Selector, ProcError> {
    let flag = kind.flag();
    match kind {
        SelectorKind::Pid | SelectorKind::Tree => {
            let pid: i32 = value
                .trim()
                .parse()
                .ok()
                .filter(|p| *p > 0)
                .ok_or_else(|| {
                    ProcError::Selector(format!(
                        "{flag} {value:?}: expected a PID (a positive integer)"
                    ))
                })?;
            Ok(if kind == SelectorKind::Pid {
                Selector::Pid(pid)
            } else {
                Selector::Tree(pid)
            })
        }
        SelectorKind::User => {
            let uid = match value.parse::<u32>() {
                Ok(uid) => uid,
                Err(_) => match nix::unistd::User::from_name(value) {
                    Ok(Some(u)) => u.uid.as_raw(),
                    _ => {
                        return Err(ProcError::Selector(format!(
                            "{flag} {value:?}: no such user (give a user name or a numeric uid)"
                        )))
                    }
                },
            };
            Ok(Selector::User {
                name: value.to_string(),
                uid,
            })
        }
        SelectorKind::Comm => Regex::new(value)
            .map(Selector::Comm)
            .map_err(|e| ProcError::Selector(format!("{flag} {value:?}: not a valid regex: {e}"))),
    }
}

/// Splits `VALUE:SHARES` at the last colon (a regex may hold colons).
pub fn split_shares(kind: SelectorKind, arg: &str) -> Result<(String, u64), ProcError> {
    let flag = kind.flag();
    let (value, shares) = arg.rsplit_once(':').ok_or_else(|| {
        ProcError::Selector(format!(
            "{flag} {arg:?}: expected VALUE:SHARES, e.g. 1234:3"
        ))
    })?;
    let shares: u64 = shares
        .trim()
        .parse()
        .ok()
        .filter(|s| *s >= 1)
        .ok_or_else(|| {
            ProcError::Selector(format!(
                "{flag} {arg:?}: shares must be an integer >= 1, got {shares:?}"
            ))
        })?;
    Ok((value.to_string(), shares))
}

/// Processes no selector may ever pick: allot itself, its ancestors (stopping the shell
/// that runs allot would stop allot's user), init, and kernel threads.
pub fn protected_pids(processes: &[ProcessInfo]) -> HashSet<i32> {
    let me = std::process::id() as i32;
    let parent: HashMap<i32, i32> = processes.iter().map(|p| (p.pid, p.ppid)).collect();
    let mut out: HashSet<i32> = HashSet::from([1, 2]);
    let mut cur = me;
    while cur > 0 && out.insert(cur) {
        cur = parent.get(&cur).copied().unwrap_or(0);
    }
    for p in processes {
        if p.ppid == 2 {
            out.insert(p.pid);
        }
    }
    out
}

/// The processes these selectors need to see: only the named PIDs (and allot's
/// ancestors) when every selector is a PID, every process otherwise. Refreshing a
/// PID-only set this way costs a few reads a second instead of one per process.
pub fn snapshot_for<'a>(
    selectors: impl IntoIterator<Item = &'a Selector>,
) -> Result<Vec<ProcessInfo>, ProcError> {
    let mut pids = Vec::new();
    for sel in selectors {
        match sel {
            Selector::Pid(pid) => pids.push(*pid),
            _ => return procfs::snapshot(),
        }
    }
    Ok(procfs::snapshot_of(pids))
}

/// The PIDs a selector picks from a snapshot. `current` are the principal's members so
/// far (a tree keeps following reparented descendants of its members).
pub fn resolve(
    selector: &Selector,
    processes: &[ProcessInfo],
    protected: &HashSet<i32>,
    current: &BTreeSet<i32>,
) -> BTreeSet<i32> {
    let alive = |p: &ProcessInfo| !matches!(p.state, 'Z' | 'X') && !protected.contains(&p.pid);
    match selector {
        Selector::Pid(pid) => processes
            .iter()
            .filter(|p| p.pid == *pid && alive(p))
            .map(|p| p.pid)
            .collect(),
        Selector::Tree(root) => {
            let mut children: HashMap<i32, Vec<i32>> = HashMap::new();
            for p in processes {
                children.entry(p.ppid).or_default().push(p.pid);
            }
            let known: HashSet<i32> = processes.iter().map(|p| p.pid).collect();
            let mut out = BTreeSet::new();
            let mut stack: Vec<i32> = std::iter::once(*root)
                .chain(current.iter().copied())
                .filter(|p| known.contains(p))
                .collect();
            while let Some(pid) = stack.pop() {
                if !out.insert(pid) {
                    continue;
                }
                if let Some(kids) = children.get(&pid) {
                    stack.extend(kids);
                }
            }
            processes
                .iter()
                .filter(|p| out.contains(&p.pid) && alive(p))
                .map(|p| p.pid)
                .collect()
        }
        Selector::User { uid, .. } => processes
            .iter()
            .filter(|p| p.uid == *uid && alive(p))
            .map(|p| p.pid)
            .collect(),
        Selector::Comm(re) => processes
            .iter()
            .filter(|p| re.is_match(&p.comm) && alive(p))
            .map(|p| p.pid)
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(pid: i32, ppid: i32, uid: u32, comm: &str) -> ProcessInfo {
        ProcessInfo {
            pid,
            ppid,
            uid,
            comm: comm.into(),
            state: 'S',
            start_time_ticks: pid as u64,
        }
    }

    fn table() -> Vec<ProcessInfo> {
        vec![
            p(1, 0, 0, "init"),
            p(10, 1, 1000, "sh"),
            p(11, 10, 1000, "worker-a"),
            p(12, 11, 1000, "worker-b"),
            p(20, 1, 1001, "worker-c"),
            p(30, 2, 0, "kworker"),
        ]
    }

    #[test]
    fn selectors_pick_what_they_say() {
        let t = table();
        let none = HashSet::new();
        let empty = BTreeSet::new();
        let ids = |s: &Selector| {
            resolve(s, &t, &none, &empty)
                .into_iter()
                .collect::<Vec<_>>()
        };
        assert_eq!(ids(&Selector::Pid(11)), vec![11]);
        assert_eq!(ids(&Selector::Tree(10)), vec![10, 11, 12]);
        assert_eq!(
            ids(&Selector::User {
                name: "u".into(),
                uid: 1000
            }),
            vec![10, 11, 12]
        );
        assert_eq!(
            ids(&Selector::Comm(Regex::new("^worker").unwrap())),
            vec![11, 12, 20]
        );
        assert!(ids(&Selector::Pid(99)).is_empty());
    }

    #[test]
    fn tree_follows_reparented_members() {
        // 12's parent 11 exited; 12 was reparented to init but is still a member.
        let t: Vec<ProcessInfo> = vec![p(1, 0, 0, "init"), p(10, 1, 0, "sh"), p(12, 1, 0, "w")];
        let current = BTreeSet::from([10, 11, 12]);
        let got = resolve(&Selector::Tree(10), &t, &HashSet::new(), &current);
        assert_eq!(got.into_iter().collect::<Vec<_>>(), vec![10, 12]);
    }

    #[test]
    fn protected_processes_are_never_picked() {
        let t = table();
        let protected = protected_pids(&t);
        assert!(protected.contains(&1) && protected.contains(&30));
        let got = resolve(
            &Selector::User {
                name: "root".into(),
                uid: 0,
            },
            &t,
            &protected,
            &BTreeSet::new(),
        );
        assert!(got.is_empty());
    }

    #[test]
    fn parses_flags_with_clear_errors() {
        assert_eq!(
            split_shares(SelectorKind::Pid, "123:4").unwrap(),
            ("123".into(), 4)
        );
        assert_eq!(
            split_shares(SelectorKind::Comm, "a:b:2").unwrap(),
            ("a:b".into(), 2)
        );
        let e = split_shares(SelectorKind::Pid, "123:0")
            .unwrap_err()
            .to_string();
        assert!(e.contains("--pid") && e.contains(">= 1"), "{e}");
        let e = parse_selector(SelectorKind::Pid, "abc")
            .unwrap_err()
            .to_string();
        assert!(e.contains("--pid") && e.contains("PID"), "{e}");
        assert!(parse_selector(SelectorKind::Comm, "(").is_err());
        assert!(matches!(
            parse_selector(SelectorKind::User, "0"),
            Ok(Selector::User { uid: 0, .. })
        ));
        assert!(parse_selector(SelectorKind::User, "no-such-user-xyz").is_err());
    }
}
