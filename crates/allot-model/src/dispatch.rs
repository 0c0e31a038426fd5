//! Which class's queue is served next when a service slot frees up.
//!
//! Strict priority between levels; inside a level, stride scheduling (Waldspurger and
//! Weihl) by each class's `ratio`. This is the paper's *accept ratio* socket group
//! (kernel-support-open-qos, section 2.2: "the relative connection accept rate of several
//! listening ports") applied at the moment a queued request is sent to service.
//!
//! Each class has a *pass*; picking a class advances its pass by its *stride*
//! (`STRIDE_ONE / ratio`), and the class with the smallest pass among the ready ones of the
//! top level goes next, ties to the lowest index. Each level keeps a virtual time (the pass
//! of its last pick); a class whose pass fell behind it while idle is moved up to it, so it
//! does not come back with banked credit and a burst.

/// The stride of a class with ratio 1. Passes are integers so that rational ratios split
/// picks exactly over whole periods.
const STRIDE_ONE: f64 = (1u64 << 32) as f64;

/// Ratios are clamped into this range: a ratio must be positive and finite.
const RATIO_MIN: f64 = 1e-6;
/// See [`RATIO_MIN`].
const RATIO_MAX: f64 = 1e6;

/// How a class competes for service slots.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ClassWeights {
    /// Higher goes first; a ready class of a higher priority always beats a lower one.
    pub priority: i32,
    /// Relative share of picks among ready classes of the same priority; must be > 0.
    /// Values outside `[1e-6, 1e6]` (and NaN) are clamped into it (NaN counts as 1).
    pub ratio: f64,
}

impl Default for ClassWeights {
    fn default() -> Self {
        ClassWeights {
            priority: 0,
            ratio: 1.0,
        }
    }
}

/// One class's scheduling state.
#[derive(Debug, Clone)]
struct Slot {
    weights: ClassWeights,
    stride: u128,
    pass: u128,
}

fn stride_of(ratio: f64) -> u128 {
    let ratio = if ratio.is_nan() {
        1.0
    } else {
        ratio.clamp(RATIO_MIN, RATIO_MAX)
    };
    ((STRIDE_ONE / ratio).round() as u128).max(1)
}

/// Picks the class to serve next: strict priority, then stride scheduling by ratio.
#[derive(Debug, Clone, Default)]
pub struct Dispatcher {
    slots: Vec<Slot>,
    /// Virtual time of each priority level that has picked at least once.
    level_vtime: Vec<(i32, u128)>,
}

impl Dispatcher {
    /// A dispatcher over classes `0..classes.len()`, in that order.
    pub fn new(classes: Vec<ClassWeights>) -> Self {
        Dispatcher {
            slots: classes
                .into_iter()
                .map(|weights| Slot {
                    stride: stride_of(weights.ratio),
                    weights,
                    pass: 0,
                })
                .collect(),
            level_vtime: Vec::new(),
        }
    }

    /// The number of classes.
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    /// Whether there are no classes.
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// The weights of `class`, if it exists.
    pub fn weights(&self, class: usize) -> Option<ClassWeights> {
        self.slots.get(class).map(|s| s.weights)
    }

    /// Change a class's weights at run time. A new ratio applies from the class's next
    /// pick; a new priority moves the class into that level at its current virtual time.
    /// A `class` past the end adds classes (the ones in between get the default weights).
    pub fn set(&mut self, class: usize, weights: ClassWeights) {
        while self.slots.len() <= class {
            let weights = ClassWeights::default();
            let pass = self.vtime(weights.priority);
            self.slots.push(Slot {
                stride: stride_of(weights.ratio),
                weights,
                pass,
            });
        }
        let moved = self.slots[class].weights.priority != weights.priority;
        let pass = if moved {
            self.vtime(weights.priority)
        } else {
            self.slots[class].pass
        };
        let slot = &mut self.slots[class];
        slot.weights = weights;
        slot.stride = stride_of(weights.ratio);
        slot.pass = pass;
    }

    /// Among classes for which `ready(class)` is true, the highest priority; among equals,
    /// stride scheduling by `ratio` (the paper's accept-ratio group: relative admission
    /// rates). A class that was idle does not bank credit (its pass jumps to the current
    /// virtual time). Records the pick.
    ///
    /// `ready` is called at most once per class per pick, in class order, and should have
    /// no side effects (a class it approves may still not be picked).
    pub fn pick(&mut self, ready: &mut dyn FnMut(usize) -> bool) -> Option<usize> {
        // (priority, effective pass, index) of the best ready class so far.
        let mut best: Option<(i32, u128, usize)> = None;
        for (i, slot) in self.slots.iter().enumerate() {
            let prio = slot.weights.priority;
            if best.is_some_and(|(p, _, _)| prio < p) {
                continue;
            }
            if !ready(i) {
                continue;
            }
            // An idle class's pass may lag its level's virtual time: it competes from now.
            let pass = slot.pass.max(self.vtime(prio));
            let better = match best {
                None => true,
                Some((p, bp, _)) => prio > p || pass < bp,
            };
            if better {
                best = Some((prio, pass, i));
            }
        }
        let (prio, pass, i) = best?;
        // The pick: the level's virtual time moves to the winner's pass, the winner pays
        // its stride.
        self.set_vtime(prio, pass);
        let slot = &mut self.slots[i];
        slot.pass = pass + slot.stride;
        Some(i)
    }

    fn vtime(&self, priority: i32) -> u128 {
        self.level_vtime
            .iter()
            .find(|(p, _)| *p == priority)
            .map_or(0, |&(_, v)| v)
    }

    fn set_vtime(&mut self, priority: i32, vtime: u128) {
        match self.level_vtime.iter_mut().find(|(p, _)| *p == priority) {
            Some(entry) => entry.1 = entry.1.max(vtime),
            None => self.level_vtime.push((priority, vtime)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn w(priority: i32, ratio: f64) -> ClassWeights {
        ClassWeights { priority, ratio }
    }

    fn counts(
        d: &mut Dispatcher,
        picks: usize,
        ready: &mut dyn FnMut(usize) -> bool,
    ) -> Vec<usize> {
        let mut c = vec![0; d.len()];
        for _ in 0..picks {
            if let Some(i) = d.pick(ready) {
                c[i] += 1;
            }
        }
        c
    }

    #[test]
    fn ratios_one_to_three_split_exactly() {
        let mut d = Dispatcher::new(vec![w(0, 1.0), w(0, 3.0)]);
        assert_eq!(counts(&mut d, 4000, &mut |_| true), vec![1000, 3000]);
        // And over every whole period, not only at the end.
        let mut d = Dispatcher::new(vec![w(0, 1.0), w(0, 3.0)]);
        for _ in 0..1000 {
            assert_eq!(counts(&mut d, 4, &mut |_| true), vec![1, 3]);
        }
    }

    #[test]
    fn three_way_ratios_hold() {
        let mut d = Dispatcher::new(vec![w(0, 2.0), w(0, 5.0), w(0, 3.0)]);
        assert_eq!(
            counts(&mut d, 10_000, &mut |_| true),
            vec![2000, 5000, 3000]
        );
    }

    #[test]
    fn priority_strictly_wins() {
        let mut d = Dispatcher::new(vec![w(0, 1000.0), w(5, 0.001), w(1, 1.0)]);
        assert_eq!(counts(&mut d, 100, &mut |_| true), vec![0, 100, 0]);
        // With the top class not ready, the next level takes everything.
        assert_eq!(counts(&mut d, 100, &mut |c| c != 1), vec![0, 0, 100]);
        assert_eq!(d.pick(&mut |_| false), None);
    }

    #[test]
    fn idle_class_does_not_bank_credit() {
        let mut d = Dispatcher::new(vec![w(0, 1.0), w(0, 1.0)]);
        // Class 1 idle while class 0 is served 1000 times.
        assert_eq!(counts(&mut d, 1000, &mut |c| c == 0), vec![1000, 0]);
        // Back together: they alternate from the start, no burst for class 1.
        let mut order = Vec::new();
        for _ in 0..10 {
            order.push(d.pick(&mut |_| true));
        }
        let ones = order.iter().take(4).filter(|p| **p == Some(1)).count();
        assert!(ones <= 2, "class 1 got a burst: {order:?}");
        assert_eq!(counts(&mut d, 1000, &mut |_| true), vec![500, 500]);
    }

    #[test]
    fn set_changes_ratio_and_priority_and_grows() {
        let mut d = Dispatcher::new(vec![w(0, 1.0), w(0, 1.0)]);
        assert_eq!(counts(&mut d, 100, &mut |_| true), vec![50, 50]);
        d.set(1, w(0, 4.0));
        assert_eq!(counts(&mut d, 500, &mut |_| true), vec![100, 400]);
        d.set(0, w(1, 1.0));
        assert_eq!(counts(&mut d, 10, &mut |_| true), vec![10, 0]);
        d.set(3, w(2, 1.0));
        assert_eq!(d.len(), 4);
        assert_eq!(d.weights(2), Some(ClassWeights::default()));
        assert_eq!(counts(&mut d, 10, &mut |_| true), vec![0, 0, 0, 10]);
    }

    #[test]
    fn silly_ratios_are_clamped() {
        let mut d = Dispatcher::new(vec![w(0, 0.0), w(0, f64::NAN), w(0, f64::INFINITY)]);
        let c = counts(&mut d, 1000, &mut |_| true);
        assert_eq!(c.iter().sum::<usize>(), 1000);
        assert!(c[2] >= 998, "{c:?}");
    }

    proptest! {
        /// The pick is always ready and of the highest ready priority, and within a level
        /// of always-ready classes the picks follow the ratios within one pick each.
        #[test]
        fn picks_are_ready_top_priority_and_proportional(
            classes in proptest::collection::vec((0i32..3, 1u32..8), 1..6),
            masks in proptest::collection::vec(any::<u8>(), 1..300),
        ) {
            let weights: Vec<_> = classes.iter().map(|&(p, r)| w(p, r as f64)).collect();
            let mut d = Dispatcher::new(weights.clone());
            for mask in masks {
                let ready = |c: usize| mask & (1 << c) != 0;
                let picked = d.pick(&mut |c| ready(c));
                let top = (0..weights.len()).filter(|&c| ready(c)).map(|c| weights[c].priority).max();
                match (picked, top) {
                    (None, None) => {}
                    (Some(c), Some(p)) => {
                        prop_assert!(ready(c));
                        prop_assert_eq!(weights[c].priority, p);
                    }
                    other => prop_assert!(false, "picked/top mismatch {:?}", other),
                }
            }
            // Proportionality among the top level when all are ready.
            let top = weights.iter().map(|x| x.priority).max().unwrap_or(0);
            let members: Vec<usize> = (0..weights.len()).filter(|&c| weights[c].priority == top).collect();
            let total_ratio: f64 = members.iter().map(|&c| weights[c].ratio).sum();
            let n = 2000usize;
            let c = counts(&mut d, n, &mut |_| true);
            for &m in &members {
                let want = n as f64 * weights[m].ratio / total_ratio;
                prop_assert!((c[m] as f64 - want).abs() <= members.len() as f64 + 1.0,
                    "class {} got {} want {}", m, c[m], want);
            }
        }
    }
}
