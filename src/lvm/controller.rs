//! LVM controller logic: places volumes on nodes and manages them through
//! each node's agent. Identity is in LVM (see `ids`), so any controller
//! process can restart at any time and a retried call finds what an earlier
//! attempt made.

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::config::{LvmConfig, TOPOLOGY_NODE_KEY};
use crate::core::backend::{Capacity, ControllerBackend, CreateVolume, VolumeInfo};
use crate::core::capacity::Range;
use crate::core::placement::{self, Candidate};
use crate::core::request::{topology_matches, Access, FsType};
use crate::csi;
use crate::error::{Error, Result};
use crate::lvm::agent::{Agent, LvSpec};
use crate::lvm::ids::{self, VolumeId};
use crate::lvm::report::Lv;

pub const PARAM_DEVICE_CLASS: &str = "deviceClass";
const PARAMETER_KEYS: &[&str] = &[PARAM_DEVICE_CLASS];

pub struct LvmController {
    config: LvmConfig,
    /// The agents of known nodes, by node id.
    agents: BTreeMap<String, Arc<dyn Agent>>,
    not_ready: Box<dyn Fn() -> Option<String> + Send + Sync>,
}

fn node_segments(node: &str) -> BTreeMap<String, String> {
    [(TOPOLOGY_NODE_KEY.to_string(), node.to_string())].into()
}

impl LvmController {
    pub fn new(
        config: LvmConfig,
        agents: Vec<Arc<dyn Agent>>,
        not_ready: Box<dyn Fn() -> Option<String> + Send + Sync>,
    ) -> Self {
        let agents = agents
            .into_iter()
            .map(|a| (a.node().to_string(), a))
            .collect();
        LvmController {
            config,
            agents,
            not_ready,
        }
    }

    fn class_for(&self, params: &BTreeMap<String, String>) -> Result<&crate::config::DeviceClass> {
        match params.get(PARAM_DEVICE_CLASS) {
            None => Ok(self.config.default_class()),
            Some(name) => self.config.class(name).ok_or_else(|| {
                Error::InvalidArgument(format!(
                    "unknown deviceClass {name:?}; configured classes: {}",
                    self.config
                        .classes
                        .iter()
                        .map(|c| c.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ))
            }),
        }
    }

    fn agent(&self, node: &str) -> Option<&Arc<dyn Agent>> {
        self.agents.get(node)
    }

    /// An LV of that name in any class on any node.
    async fn find_anywhere(&self, lv_name: &str) -> Result<Option<(String, String, Lv)>> {
        for (node, agent) in &self.agents {
            for class in &self.config.classes {
                if let Some(lv) = agent.find(&class.name, lv_name).await? {
                    return Ok(Some((node.clone(), class.name.clone(), lv)));
                }
            }
        }
        Ok(None)
    }

    async fn lookup(&self, id: &str) -> Result<Option<(VolumeId, Lv)>> {
        let Some(vid) = VolumeId::parse(id) else {
            return Ok(None);
        };
        let Some(agent) = self.agent(&vid.node) else {
            return Ok(None);
        };
        if self.config.class(&vid.class).is_none() {
            return Ok(None);
        }
        let lv = agent.find(&vid.class, &vid.lv_name()).await?;
        Ok(lv
            .filter(|l| l.tags.iter().any(|t| t == ids::TAG_VOLUME))
            .map(|l| (vid, l)))
    }

    fn info(vid: &VolumeId, lv: &Lv) -> VolumeInfo {
        VolumeInfo {
            id: vid.encode(),
            capacity: lv.size,
            topology: vec![node_segments(&vid.node)],
            context: BTreeMap::new(),
            abnormal: (!lv.is_active()).then(|| "logical volume is not active".to_string()),
        }
    }
}

#[tonic::async_trait]
impl ControllerBackend for LvmController {
    fn parameter_keys(&self) -> &'static [&'static str] {
        PARAMETER_KEYS
    }

    fn is_valid_id(&self, id: &str) -> bool {
        VolumeId::parse(id).is_some()
    }

    fn not_ready(&self) -> Option<String> {
        (self.not_ready)()
    }

    async fn create_volume(&self, req: &CreateVolume) -> Result<VolumeInfo> {
        let class = self.class_for(&req.params)?;
        let mut params = req.params.clone();
        params.insert(PARAM_DEVICE_CLASS.to_string(), class.name.clone());
        let digest = ids::params_digest(&params);
        let key = ids::key_for_name(&req.name);
        let lv_name = ids::lv_name(&key);
        let fs_minimum = req
            .capabilities
            .iter()
            .map(|c| match &c.access {
                Access::Mount { fs, .. } => fs.unwrap_or(FsType::Ext4).min_bytes(),
                Access::Block => 0,
            })
            .max()
            .unwrap_or(0);

        // A retry (or a replay after a crash) finds what the first attempt made.
        if let Some((node, class_name, lv)) = self.find_anywhere(&lv_name).await? {
            let tagged = ids::tagged_name(&lv.tags);
            if tagged.as_deref() != Some(req.name.as_str()) {
                return Err(Error::AlreadyExists(format!(
                    "logical volume {}/{} exists but was not created for {:?}; remove or \
                     rename it",
                    lv.vg, lv.name, req.name
                )));
            }
            if class_name != class.name || ids::tagged_digest(&lv.tags) != Some(digest.as_str()) {
                return Err(Error::AlreadyExists(format!(
                    "volume {:?} already exists with different parameters (device class {})",
                    req.name, class_name
                )));
            }
            if !req.range.accepts(lv.size) {
                return Err(Error::AlreadyExists(format!(
                    "volume {:?} already exists with {} bytes, outside the requested range",
                    req.name, lv.size
                )));
            }
            let vid = VolumeId {
                node,
                class: class_name,
                key,
            };
            return Ok(Self::info(&vid, &lv));
        }

        // Placement: every node's capacity for this class, then the decision list.
        let mut candidates = Vec::new();
        let mut sizes = BTreeMap::new();
        let mut full_pools = Vec::new();
        for (node, agent) in &self.agents {
            let cap = match agent.capacity(&class.name).await {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(node, error = %e, "node skipped for placement");
                    continue;
                }
            };
            if cap.pool_full {
                full_pools.push(format!(
                    "{node}: thin pool {}/{} is {:.1}% full (threshold {}%)",
                    class.volume_group,
                    class.thin_pool.as_deref().unwrap_or(""),
                    cap.used_percent,
                    class.pool_full_threshold_percent
                ));
            }
            let size = req
                .range
                .pick(cap.extent_size, fs_minimum, class.default_size_bytes)?;
            sizes.insert(node.clone(), size);
            candidates.push(Candidate {
                name: node.clone(),
                segments: node_segments(node),
                available: cap.available,
            });
        }
        let Some(&largest) = sizes.values().max() else {
            return Err(Error::Unavailable(format!(
                "no node can serve device class {} right now",
                class.name
            )));
        };
        let decision = placement::place(req.requirement.as_ref(), &candidates, largest, None)
            .map_err(|e| match (e, full_pools.is_empty()) {
                (Error::ResourceExhausted(m), false) => {
                    Error::ResourceExhausted(format!("{m}; {}", full_pools.join("; ")))
                }
                (e, _) => e,
            })?;
        let size = sizes[&decision.node];
        tracing::info!(
            name = %req.name, node = %decision.node, rule = decision.rule, class = %class.name,
            size, "placed volume"
        );
        let agent = self.agent(&decision.node).expect("placed on a known node");
        let spec = LvSpec {
            class: class.name.clone(),
            name: lv_name,
            size,
            tags: ids::volume_tags(&req.name, &digest),
        };
        let lv = agent.create(&spec).await?;
        let vid = VolumeId {
            node: decision.node,
            class: class.name.clone(),
            key,
        };
        Ok(Self::info(&vid, &lv))
    }

    async fn delete_volume(&self, id: &str) -> Result<()> {
        let Some(vid) = VolumeId::parse(id) else {
            return Ok(());
        };
        let Some(agent) = self.agent(&vid.node) else {
            tracing::warn!(
                volume = id,
                "delete of a volume on an unknown node: nothing to do"
            );
            return Ok(());
        };
        if self.config.class(&vid.class).is_none() {
            return Ok(());
        }
        match agent.find(&vid.class, &vid.lv_name()).await? {
            Some(lv) if lv.tags.iter().any(|t| t == ids::TAG_VOLUME) => {
                agent.remove(&vid.class, &lv.name).await
            }
            _ => Ok(()),
        }
    }

    async fn get_volume(&self, id: &str) -> Result<Option<VolumeInfo>> {
        Ok(self
            .lookup(id)
            .await?
            .map(|(vid, lv)| Self::info(&vid, &lv)))
    }

    async fn list_volumes(&self) -> Result<Vec<VolumeInfo>> {
        let mut out = Vec::new();
        for (node, agent) in &self.agents {
            for (class, lv) in agent.list().await? {
                if !lv.tags.iter().any(|t| t == ids::TAG_VOLUME) {
                    continue;
                }
                let Some(key) = ids::key_of_lv(&lv.name) else {
                    continue;
                };
                let vid = VolumeId {
                    node: node.clone(),
                    class,
                    key: key.to_string(),
                };
                out.push(Self::info(&vid, &lv));
            }
        }
        out.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(out)
    }

    async fn expand_volume(&self, id: &str, range: Range) -> Result<u64> {
        let (vid, lv) = self
            .lookup(id)
            .await?
            .ok_or_else(|| Error::NotFound(format!("volume {id} does not exist")))?;
        let agent = self.agent(&vid.node).expect("lookup found the node");
        let cap = agent.capacity(&vid.class).await?;
        if range.accepts(lv.size) && lv.size >= range.required {
            return Ok(lv.size);
        }
        let size = range.pick(cap.extent_size, 0, lv.size)?;
        if size <= lv.size {
            return Ok(lv.size);
        }
        if size - lv.size > cap.available {
            return Err(Error::ResourceExhausted(format!(
                "growing {id} by {} bytes needs more than the {} bytes available in device \
                 class {}",
                size - lv.size,
                cap.available,
                vid.class
            )));
        }
        Ok(agent.extend(&vid.class, &lv.name, size).await?.size)
    }

    async fn capacity(
        &self,
        params: &BTreeMap<String, String>,
        topology: Option<&csi::Topology>,
    ) -> Result<Capacity> {
        let class = self.class_for(params)?;
        let mut total = Capacity::default();
        for (node, agent) in &self.agents {
            if let Some(t) = topology {
                if !topology_matches(t, &node_segments(node)) {
                    continue;
                }
            }
            let cap = agent.capacity(&class.name).await?;
            total.available += cap.available;
            total.maximum_volume = total.maximum_volume.max(cap.available);
            total.minimum_volume = total.minimum_volume.max(cap.extent_size);
        }
        Ok(total)
    }
}
