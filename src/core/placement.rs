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
pub(crate) struct Candidate {
    pub name: String,
    pub segments: BTreeMap<String, String>,
    /// Bytes available for a volume of this class there.
    pub available: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Decision {
    pub node: String,
    pub rule: &'static str,
}

pub(crate) fn place(
    requirement: Option<&csi::TopologyRequirement>,
    candidates: &[Candidate],
    size: u64,
    source_node: Option<&str>,
) -> Result<Decision> {
    let allowed: Vec<&Candidate> = match requirement {
        Some(req) if !req.requisite.is_empty() => candidates
            .iter()
            .filter(|c| {
                req.requisite
                    .iter()
                    .any(|t| topology_matches(t, &c.segments))
            })
            .collect(),
        _ => candidates.iter().collect(),
    };
    if allowed.is_empty() {
        return Err(Error::ResourceExhausted(
            "no node of this driver lies in the requested topology (requisite)".to_string(),
        ));
    }

    if let Some(source) = source_node {
        return match allowed.iter().find(|c| c.name == source) {
            Some(c) if c.available >= size => Ok(Decision {
                node: c.name.clone(),
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
        for t in &req.preferred {
            if let Some(c) = fits.iter().find(|c| topology_matches(t, &c.segments)) {
                return Ok(Decision {
                    node: c.name.clone(),
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
                .then_with(|| b.name.cmp(&a.name))
        })
        .expect("fits is not empty");
    Ok(Decision {
        node: best.name.clone(),
        rule: "most-capacity",
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str, available: u64) -> Candidate {
        Candidate {
            name: name.into(),
            segments: [("topology.lodestone.dev/node".to_string(), name.to_string())].into(),
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
}
