//! The combining tree's shape, from the membership list and the elected root.
//!
//! Every gateway computes the same shape from the same inputs (the members' names and the
//! root's), so no shape is ever sent. The layout keeps the tree shallow and the root
//! light: the fewest levels below the root that fit every member with at most `fanout`
//! children per node, then as few children of the root as fit at that depth (the root
//! pays for every child each window, so at 10 000 members and fan-out 32 it has 10
//! children, not 32). The other members, sorted by name, are cut into that many nearly
//! equal runs, each run a `fanout`-ary heap: run position `j` has parent `(j − 1) / fanout`
//! and children `fanout·j + 1 ..= fanout·j + fanout`.

use std::collections::HashMap;

/// Why a shape could not be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ShapeError {
    /// A fan-out of 0 or 1 makes no tree.
    #[error("fan-out {0}: expected an integer ≥ 2")]
    Fanout(usize),
    /// The root is not a member.
    #[error("the root `{0}` is not in the membership list")]
    RootNotMember(String),
}

/// One member's place in the tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Position {
    /// The member's name.
    pub name: String,
    /// Whom it reports to; `None` at the root.
    pub parent: Option<String>,
    /// Who reports to it, in name order.
    pub children: Vec<String>,
    /// Hops from the root (the root is 0).
    pub level: u32,
}

impl Position {
    /// True at the root.
    pub fn is_root(&self) -> bool {
        self.parent.is_none()
    }

    /// Hops between this node and the deepest level of the tree, used to stagger
    /// aggregators' deadlines: a node at height `h` waits for its children at most `h`
    /// hop budgets after the window's end.
    pub fn height(&self, depth: u32) -> u32 {
        depth.saturating_sub(self.level)
    }
}

/// The whole tree: every member's position.
#[derive(Debug, Clone)]
pub struct Shape {
    root: String,
    depth: u32,
    positions: Vec<Position>,
    index: HashMap<String, usize>,
}

impl Shape {
    /// The tree over `members` (duplicates ignored) under `root`, at most `fanout`
    /// children per node.
    pub fn new(members: &[String], root: &str, fanout: usize) -> Result<Shape, ShapeError> {
        if fanout < 2 {
            return Err(ShapeError::Fanout(fanout));
        }
        let mut others: Vec<&str> = members.iter().map(String::as_str).collect();
        others.sort_unstable();
        others.dedup();
        let Some(at) = others.iter().position(|m| *m == root) else {
            return Err(ShapeError::RootNotMember(root.to_string()));
        };
        others.remove(at);
        let m = others.len();
        // Fewest levels below the root: the root may have up to `fanout` runs, each a heap
        // of at most 1 + K + … + K^(depth−1) members.
        let mut depth = 0u32;
        let mut run_room = 0usize;
        if m > 0 {
            depth = 1;
            run_room = 1;
            while run_room.saturating_mul(fanout) < m {
                depth += 1;
                run_room = run_room.saturating_mul(fanout).saturating_add(1);
            }
        }
        let runs = if m == 0 { 0 } else { m.div_ceil(run_room) };
        let mut positions = Vec::with_capacity(m + 1);
        positions.push(Position {
            name: root.to_string(),
            parent: None,
            children: Vec::new(),
            level: 0,
        });
        let mut start = 0;
        for r in 0..runs {
            // Nearly equal runs: the first `m % runs` get one more.
            let len = m / runs + usize::from(r < m % runs);
            let run = &others[start..start + len];
            start += len;
            let base = positions.len();
            for (j, name) in run.iter().enumerate() {
                let (parent, level) = if j == 0 {
                    (root.to_string(), 1)
                } else {
                    let p = (j - 1) / fanout;
                    (run[p].to_string(), positions[base + p].level + 1)
                };
                let first = fanout * j + 1;
                let children = (first..(first + fanout).min(len))
                    .map(|c| run[c].to_string())
                    .collect();
                positions.push(Position {
                    name: name.to_string(),
                    parent: Some(parent),
                    children,
                    level,
                });
            }
            positions[0].children.push(run[0].to_string());
        }
        let index = positions
            .iter()
            .enumerate()
            .map(|(i, p)| (p.name.clone(), i))
            .collect();
        Ok(Shape {
            root: root.to_string(),
            depth,
            positions,
            index,
        })
    }

    /// The root's name.
    pub fn root(&self) -> &str {
        &self.root
    }

    /// Levels below the root (0 when the root is alone).
    pub fn depth(&self) -> u32 {
        self.depth
    }

    /// Number of members.
    pub fn len(&self) -> usize {
        self.positions.len()
    }

    /// Never true: a shape always has its root.
    pub fn is_empty(&self) -> bool {
        self.positions.is_empty()
    }

    /// The position of the member named `name`.
    pub fn position(&self, name: &str) -> Option<&Position> {
        self.index.get(name).map(|&i| &self.positions[i])
    }

    /// Every position, the root first.
    pub fn positions(&self) -> &[Position] {
        &self.positions
    }
}
