//! Where a new volume goes: a decision list, not a weighted score.
//!
//! Rules, in order: the orchestrator's requisite topology filters the
//! candidates; a volume with a source goes where the source lives; otherwise
//! the orchestrator's preferred order decides among nodes that fit; then the
//! most free capacity; then the node name, so the same request in the same
//! state always lands on the same node. The rule that decided is returned so
//! it can be logged.

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

/// Matches topology terms against thousands of candidates without a scan
/// per term: when every candidate has the same segment keys (one node key,
/// for LVM), a term with exactly those keys matches the one candidate with
/// those values, found by lookup. Other terms are matched by a scan.
struct Terms<'a> {
    keys: Option<Vec<&'a str>>,
    exact: std::collections::HashMap<Vec<&'a str>, Vec<usize>>,
}

impl<'a> Terms<'a> {
    fn new(candidates: &'a [Candidate<'a>]) -> Self {
        let keys_of =
            |c: &'a Candidate<'a>| c.segments.keys().map(String::as_str).collect::<Vec<_>>();
        let keys = candidates.first().map(keys_of);
        let shared = keys
            .as_ref()
            .is_some_and(|k| candidates.iter().all(|c| keys_of(c) == *k));
        let mut exact: std::collections::HashMap<Vec<&str>, Vec<usize>> = Default::default();
        if shared {
            for (i, c) in candidates.iter().enumerate() {
                let values = c.segments.values().map(String::as_str).collect();
                exact.entry(values).or_default().push(i);
            }
        }
        Terms {
            keys: keys.filter(|_| shared),
            exact,
        }
    }

    /// Calls `f` with the index of every candidate the term matches.
    fn each_match(&self, t: &csi::Topology, candidates: &[Candidate], mut f: impl FnMut(usize)) {
        if let Some(keys) = &self.keys {
            if t.segments.len() == keys.len() && keys.iter().all(|k| t.segments.contains_key(*k)) {
                let values: Vec<&str> = keys.iter().map(|k| t.segments[*k].as_str()).collect();
                for &i in self.exact.get(&values).into_iter().flatten() {
                    f(i);
                }
                return;
            }
        }
        for (i, c) in candidates.iter().enumerate() {
            if topology_matches(t, c.segments) {
                f(i);
            }
        }
    }
}

pub(crate) fn place(
    requirement: Option<&csi::TopologyRequirement>,
    candidates: &[Candidate],
    size: u64,
    source_node: Option<&str>,
) -> Result<Decision> {
    // Built only when the request has topology terms to match.
    let terms = std::cell::OnceCell::new();
    let terms = || terms.get_or_init(|| Terms::new(candidates));
    let permitted: Vec<bool> = match requirement {
        Some(req) if !req.requisite.is_empty() => {
            let mut ok = vec![false; candidates.len()];
            for t in &req.requisite {
                terms().each_match(t, candidates, |i| ok[i] = true);
            }
            ok
        }
        _ => vec![true; candidates.len()],
    };
    let allowed: Vec<&Candidate> = candidates
        .iter()
        .zip(&permitted)
        .filter_map(|(c, ok)| ok.then_some(c))
        .collect();
    if allowed.is_empty() {
        return Err(Error::ResourceExhausted(
            "no node of this driver lies in the requested topology (requisite)".to_string(),
        ));
    }

    if let Some(source) = source_node {
        return match allowed.iter().find(|c| c.name == source) {
            Some(c) if c.available >= size => Ok(Decision {
                node: c.name.to_string(),
                rule: "source-locality",
            }),
            Some(c) => Err(Error::ResourceExhausted(format!(
                "the source's node {} has {} bytes available, {size} are needed",
                c.name, c.available
            ))),
            None => Err(Error::ResourceExhausted(format!(
                "the source's data lives on node {source}, which the requested topology excludes"
            ))),
        };
    }

    let fits: Vec<&&Candidate> = allowed.iter().filter(|c| c.available >= size).collect();
    if fits.is_empty() {
        return Err(Error::ResourceExhausted(format!(
            "no allowed node has {size} bytes available (best: {} bytes)",
            allowed.iter().map(|c| c.available).max().unwrap_or(0)
        )));
    }
    if let Some(req) = requirement {
        let fitting: Vec<bool> = candidates
            .iter()
            .zip(&permitted)
            .map(|(c, ok)| *ok && c.available >= size)
            .collect();
        for t in &req.preferred {
            let mut first: Option<usize> = None;
            terms().each_match(t, candidates, |i| {
                if fitting[i] && first.is_none_or(|f| i < f) {
                    first = Some(i);
                }
            });
            if let Some(i) = first {
                return Ok(Decision {
                    node: candidates[i].name.to_string(),
                    rule: "preferred-topology",
                });
            }
        }
    }
    let best = fits
        .iter()
        .max_by(|a, b| {
            a.available
                .cmp(&b.available)
                .then_with(|| b.name.cmp(a.name))
        })
        .expect("fits is not empty");
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
        assert_eq!(place(Some(&req), &nodes, 5, None).unwrap().node, "a");
        // "a" does not fit: next preferred.
        let d = place(Some(&req), &nodes, 20, None).unwrap();
        assert_eq!((d.node.as_str(), d.rule), ("b", "preferred-topology"));
        // No requirement: most capacity, ties broken by name.
        let d = place(None, &nodes, 20, None).unwrap();
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
            place(Some(&req), &nodes, 20, None),
            Err(Error::ResourceExhausted(_))
        ));
        let req = csi::TopologyRequirement {
            requisite: vec![topo("z")],
            preferred: vec![],
        };
        assert!(matches!(
            place(Some(&req), &nodes, 1, None),
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
        let d = place(Some(&req), &nodes, 10, Some("b")).unwrap();
        assert_eq!((d.node.as_str(), d.rule), ("b", "source-locality"));
        let req = csi::TopologyRequirement {
            requisite: vec![topo("a")],
            preferred: vec![],
        };
        let err = place(Some(&req), &nodes, 10, Some("b")).unwrap_err();
        assert!(err.to_string().contains("node b"));
    }

    #[test]
    fn thousands_of_topology_terms_are_matched_without_a_scan_each() {
        let nodes: Vec<Candidate> = (0..5000).map(|i| node(&format!("n{i:04}"), 10)).collect();
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
        let d = place(Some(&req), &nodes, 5, None).unwrap();
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
        assert_eq!(place(Some(&req), &[a, b], 5, None).unwrap().node, "b");
    }
}
