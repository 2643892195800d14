//! LVM on the node side: a volume's device is its LV on this node, found in
//! the agent's in-memory state (no lvm process) and activated when needed.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use crate::config::TOPOLOGY_NODE_KEY;
use crate::core::backend::{Attach, NodeBackend, NodeVolume};
use crate::error::{Error, Result};
use crate::lvm::agent::{Agent, LocalAgent};
use crate::lvm::detached::detach;
use crate::lvm::ids::{Kind, LvId};
use crate::lvm::report::Lv;

pub(crate) struct LvmNode {
    agent: Arc<LocalAgent>,
}

impl LvmNode {
    pub(crate) fn new(agent: Arc<LocalAgent>) -> Self {
        LvmNode { agent }
    }

    async fn lv(&self, id: &str) -> Result<Option<Lv>> {
        let Some(vid) = LvId::parse(Kind::Volume, id) else {
            return Ok(None);
        };
        if vid.node != self.agent.node() || self.agent.config().class(&vid.class).is_none() {
            return Ok(None);
        }
        Ok(self.agent.find(&vid.class, &vid.lv_name()).await?)
    }
}

#[tonic::async_trait]
impl NodeBackend for LvmNode {
    fn node_id(&self) -> &str {
        self.agent.node()
    }

    fn topology(&self) -> BTreeMap<String, String> {
        [(TOPOLOGY_NODE_KEY.to_string(), self.agent.node().to_string())].into()
    }

    fn not_ready(&self) -> Option<String> {
        self.agent.readiness().err()
    }

    async fn attach(&self, req: &Attach<'_>) -> Result<PathBuf> {
        let id = req.id;
        let lv = self.lv(id).await?.ok_or_else(|| {
            Error::NotFound(format!(
                "volume {id} does not exist on node {}",
                self.agent.node()
            ))
        })?;
        if crate::lvm::ids::has_tag(&lv.tags, crate::lvm::ids::TAG_COPYING) {
            return Err(Error::FailedPrecondition(format!(
                "volume {id} is still being filled from its source"
            )));
        }
        let device = LocalAgent::device_path(&lv.vg, &lv.name);
        if !lv.is_active() {
            // Like the agent's mutations: the activation and the state update
            // after it finish even if the caller leaves.
            let agent = self.agent.clone();
            detach(
                "activate",
                async move { agent.activate(&lv.vg, &lv.name).await },
            )
            .await?;
        }
        Ok(device)
    }

    async fn detach(&self, _id: &str, _staging: &std::path::Path) -> Result<()> {
        Ok(())
    }

    async fn volume(&self, id: &str) -> Result<NodeVolume> {
        Ok(match self.lv(id).await? {
            None => NodeVolume::Missing,
            Some(lv) => NodeVolume::Present {
                device: LocalAgent::device_path(&lv.vg, &lv.name),
                abnormal: (!lv.is_active())
                    .then(|| format!("logical volume {}/{} is not active", lv.vg, lv.name)),
            },
        })
    }
}
