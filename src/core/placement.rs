//! Where a new volume goes: a decision list, not a weighted score.
//!
//! Rules, in order: the orchestrator's requisite topology filters the
//! candidates; a volume with a source goes where the source lives; otherwise
//! the orchestrator's preferred order decides among nodes that fit (among
//! the nodes one preferred term matches, the most free capacity); then the
//! most free capacity; then the node name, so the same request in the same
//! state always lands on the same node. The rule that decided is returned so
//! it can be logged.
//!
//! A source whose data can move to another node (a snapshot the backend can
//! copy across nodes) still prefers its own node; when that node is
//! excluded or full, the volume goes where the copy is cheapest. Every
//! other node receives the same bytes (the snapshot's allocated ranges), so
//! "cheapest" falls back to the same order as a new volume: the
//! orchestrator's preference, then room (rules `cross-node-preferred` and
//! `cross-node-capacity`).
//!
//! Placement never reads every candidate: it asks [`Candidates`] for the
//! best one, for one by name, or for a term's matches, so a backend with
//! thousands of nodes answers from an index kept in order.

use std::collections::BTreeMap;

use crate::core::request::topology_matches;
use crate::csi;
use crate::error::{Error, Result};

/// A node (or pool) that could hold the volume.
#[derive(Debug, Clone)]
pub(crate) struct Candidate<'a> {
    pub name: &'a str,
    pub segments: &'a BTreeMap<String, String>,
    /// Bytes available for a volume of this class there.
    pub available: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Decision {
    pub node: String,
    pub rule: &'static str,
}

/// The nodes (or pools) a volume could go to, as placement reads them. A
/// cluster has thousands: placement asks for the few it needs (by name, by
/// most room, by a topology term) instead of reading them all.
pub(crate) trait Candidates {
    /// The candidate of that name, if there is one.
    fn named(&self, name: &str) -> Option<Candidate<'_>>;
    /// Every candidate, the most available bytes first (ties: by name).
    fn by_room(&self) -> Box<dyn Iterator<Item = Candidate<'_>> + '_>;
    /// The candidates a term matches, when they can be found by lookup
    /// (LVM: a term naming a node); None when only a scan can tell.
    fn lookup(&self, term: &csi::Topology) -> Option<Vec<Candidate<'_>>>;
}

/// A plain list (tests and small sets): every question is a scan.
impl Candidates for [Candidate<'_>] {
    fn named(&self, name: &str) -> Option<Candidate<'_>> {
        self.iter().find(|c| c.name == name).cloned()
    }

    fn by_room(&self) -> Box<dyn Iterator<Item = Candidate<'_>> + '_> {
        let mut v: Vec<Candidate> = self.to_vec();
        v.sort_by(|a, b| room_order(b, a));
        Box::new(v.into_iter())
    }

    fn lookup(&self, _: &csi::Topology) -> Option<Vec<Candidate<'_>>> {
        None
    }
}

/// More room first, then the smaller name: `max_by(room_order)` is the
/// best candidate.
pub(crate) fn room_order(a: &Candidate, b: &Candidate) -> std::cmp::Ordering {
    a.available
        .cmp(&b.available)
        .then_with(|| b.name.cmp(a.name))
}

/// Every candidate a term matches.
fn matches<'c, C: Candidates + ?Sized>(candidates: &'c C, t: &csi::Topology) -> Vec<Candidate<'c>> {
    candidates.lookup(t).unwrap_or_else(|| {
        candidates
            .by_room()
            .filter(|c| topology_matches(t, c.segments))
            .collect()
    })
}

pub(crate) fn place<C: Candidates + ?Sized>(
    requirement: Option<&csi::TopologyRequirement>,
    candidates: &C,
    size: u64,
    source_node: Option<&str>,
    movable: bool,
) -> Result<Decision> {
    // The union of the requisite terms; None: no requisite, all allowed.
    let permitted: Option<BTreeMap<&str, Candidate>> = match requirement {
        Some(req) if !req.requisite.is_empty() => Some(
            req.requisite
                .iter()
                .flat_map(|t| matches(candidates, t))
                .map(|c| (c.name, c))
                .collect(),
        ),
        _ => None,
    };
    let allowed = |name: &str| permitted.as_ref().is_none_or(|p| p.contains_key(name));
    let best = match &permitted {
        Some(p) => p.values().max_by(|a, b| room_order(a, b)).cloned(),
        None => candidates.by_room().next(),
    };
    let Some(best) = best else {
        return Err(Error::ResourceExhausted(
            "no node of this driver lies in the requested topology (requisite)".to_string(),
        ));
    };

    if let Some(source) = source_node {
        let at_source = candidates.named(source).filter(|c| allowed(c.name));
        let refusal = match at_source {
            Some(c) if c.available >= size => {
                return Ok(Decision {
                    node: c.name.to_string(),
                    rule: "source-locality",
                })
            }
            Some(c) => Error::ResourceExhausted(format!(
                "the source's node {} has {} bytes available, {size} are needed",
                c.name, c.available
            )),
            None => Error::ResourceExhausted(format!(
                "the source's data lives on node {source}, which the requested topology excludes"
            )),
        };
        if !movable {
            return Err(refusal);
        }
        return elsewhere(requirement, candidates, &allowed, &best, size).map(|d| Decision {
            rule: if d.rule == "preferred-topology" {
                "cross-node-preferred"
            } else {
                "cross-node-capacity"
            },
            ..d
        });
    }
    elsewhere(requirement, candidates, &allowed, &best, size)
}

/// A volume without a source (or whose source's data moves): the
/// orchestrator's preferred order, then the most room.
fn elsewhere<C: Candidates + ?Sized>(
    requirement: Option<&csi::TopologyRequirement>,
    candidates: &C,
    allowed: &dyn Fn(&str) -> bool,
    best: &Candidate,
    size: u64,
) -> Result<Decision> {
    if best.available < size {
        return Err(Error::ResourceExhausted(format!(
            "no allowed node has {size} bytes available (best: {} bytes)",
            best.available
        )));
    }
    // Preferred terms in the orchestrator's order; among the nodes one term
    // matches, the most room.
    for t in requirement.iter().flat_map(|r| &r.preferred) {
        let pick = matches(candidates, t)
            .into_iter()
            .filter(|c| allowed(c.name) && c.available >= size)
            .max_by(|a, b| room_order(a, b));
        if let Some(c) = pick {
            return Ok(Decision {
                node: c.name.to_string(),
                rule: "preferred-topology",
            });
        }
    }
    Ok(Decision {
        node: best.name.to_string(),
        rule: "most-capacity",
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A candidate node (leaked: tests only).
    fn node(name: &str, available: u64) -> Candidate<'static> {
        let segments: BTreeMap<String, String> =
            [("topology.lodestone.dev/node".to_string(), name.to_string())].into();
        Candidate {
            name: Box::leak(name.to_string().into_boxed_str()),
            segments: Box::leak(Box::new(segments)),
            available,
        }
    }

    fn topo(name: &str) -> csi::Topology {
        csi::Topology {
            segments: [("topology.lodestone.dev/node".to_string(), name.to_string())].into(),
        }
    }

    #[test]
    fn preferred_then_capacity_then_name() {
        let nodes = [node("a", 10), node("b", 50), node("c", 50)];
        let req = csi::TopologyRequirement {
            requisite: vec![topo("a"), topo("b"), topo("c")],
            preferred: vec![topo("a"), topo("b")],
        };
        assert_eq!(
            place(Some(&req), &nodes[..], 5, None, false).unwrap().node,
            "a"
        );
        // "a" does not fit: next preferred.
        let d = place(Some(&req), &nodes[..], 20, None, false).unwrap();
        assert_eq!((d.node.as_str(), d.rule), ("b", "preferred-topology"));
        // No requirement: most capacity, ties broken by name.
        let d = place(None, &nodes[..], 20, None, false).unwrap();
        assert_eq!((d.node.as_str(), d.rule), ("b", "most-capacity"));
    }

    #[test]
    fn requisite_filters_and_exhaustion() {
        let nodes = [node("a", 10), node("b", 50)];
        let req = csi::TopologyRequirement {
            requisite: vec![topo("a")],
            preferred: vec![],
        };
        assert!(matches!(
            place(Some(&req), &nodes[..], 20, None, false),
            Err(Error::ResourceExhausted(_))
        ));
        let req = csi::TopologyRequirement {
            requisite: vec![topo("z")],
            preferred: vec![],
        };
        assert!(matches!(
            place(Some(&req), &nodes[..], 1, None, false),
            Err(Error::ResourceExhausted(_))
        ));
    }

    #[test]
    fn source_locality_wins_over_preference() {
        let nodes = [node("a", 100), node("b", 100)];
        let req = csi::TopologyRequirement {
            requisite: vec![topo("a"), topo("b")],
            preferred: vec![topo("a")],
        };
        let d = place(Some(&req), &nodes[..], 10, Some("b"), false).unwrap();
        assert_eq!((d.node.as_str(), d.rule), ("b", "source-locality"));
        let req = csi::TopologyRequirement {
            requisite: vec![topo("a")],
            preferred: vec![],
        };
        let err = place(Some(&req), &nodes[..], 10, Some("b"), false).unwrap_err();
        assert!(err.to_string().contains("node b"));
        // A snapshot's data can move: the next best node, by the rules of
        // a new volume, with a rule that says the data is copied.
        let d = place(Some(&req), &nodes[..], 10, Some("b"), true).unwrap();
        assert_eq!((d.node.as_str(), d.rule), ("a", "cross-node-capacity"));
        let nodes = [node("a", 100), node("b", 5), node("c", 100)];
        let req = csi::TopologyRequirement {
            requisite: vec![topo("a"), topo("b"), topo("c")],
            preferred: vec![topo("b"), topo("c")],
        };
        let d = place(Some(&req), &nodes[..], 10, Some("b"), true).unwrap();
        assert_eq!((d.node.as_str(), d.rule), ("c", "cross-node-preferred"));
        // Room at the source: it stays there, movable or not.
        let d = place(Some(&req), &nodes[..], 5, Some("b"), true).unwrap();
        assert_eq!((d.node.as_str(), d.rule), ("b", "source-locality"));
    }

    /// Answers node terms by lookup, as the LVM index does.
    struct ByName<'a>(BTreeMap<&'a str, Candidate<'a>>);

    impl Candidates for ByName<'_> {
        fn named(&self, name: &str) -> Option<Candidate<'_>> {
            self.0.get(name).cloned()
        }
        fn by_room(&self) -> Box<dyn Iterator<Item = Candidate<'_>> + '_> {
            let mut all: Vec<Candidate> = self.0.values().cloned().collect();
            all.sort_by(|a, b| room_order(b, a));
            Box::new(all.into_iter())
        }
        fn lookup(&self, term: &csi::Topology) -> Option<Vec<Candidate<'_>>> {
            let name = term.segments.get("topology.lodestone.dev/node")?;
            Some(self.named(name).into_iter().collect())
        }
    }

    #[test]
    fn thousands_of_topology_terms_are_matched_without_a_scan_each() {
        let nodes = ByName(
            (0..5000)
                .map(|i| node(&format!("n{i:04}"), 10))
                .map(|c| (c.name, c))
                .collect(),
        );
        // What the provisioner sends with strict topology off: every node
        // in requisite, every node in preferred (the pick first).
        let all: Vec<csi::Topology> = (0..5000).map(|i| topo(&format!("n{i:04}"))).collect();
        let mut preferred = all.clone();
        preferred.rotate_left(4321);
        let req = csi::TopologyRequirement {
            requisite: all,
            preferred,
        };
        let started = std::time::Instant::now();
        let d = place(Some(&req), &nodes, 5, None, false).unwrap();
        assert_eq!((d.node.as_str(), d.rule), ("n4321", "preferred-topology"));
        assert!(started.elapsed() < std::time::Duration::from_millis(500));
    }

    #[test]
    fn terms_with_fewer_keys_still_match_by_subset() {
        let zoned = |name: &str, zone: &str| {
            let mut c = node(name, 10);
            let mut segments = c.segments.clone();
            segments.insert("zone".into(), zone.into());
            c.segments = Box::leak(Box::new(segments));
            c
        };
        let (a, b) = (zoned("a", "z1"), zoned("b", "z2"));
        let zone = csi::Topology {
            segments: [("zone".to_string(), "z2".to_string())].into(),
        };
        let req = csi::TopologyRequirement {
            requisite: vec![zone],
            preferred: vec![],
        };
        assert_eq!(
            place(Some(&req), &[a, b][..], 5, None, false).unwrap().node,
            "b"
        );
    }
}
