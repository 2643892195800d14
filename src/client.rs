//! A CSI client over a Unix socket, for the demo, tests and operators.

use std::path::{Path, PathBuf};

use hyper_util::rt::TokioIo;
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint};

use crate::csi::controller_client::ControllerClient;
use crate::csi::identity_client::IdentityClient;
use crate::csi::node_client::NodeClient;
use crate::csi::snapshot_metadata_client::SnapshotMetadataClient;

#[derive(Clone)]
pub struct Client {
    pub identity: IdentityClient<Channel>,
    pub controller: ControllerClient<Channel>,
    pub node: NodeClient<Channel>,
    pub snapshot_metadata: SnapshotMetadataClient<Channel>,
}

/// Connects to the socket at `path` (one channel shared by every service).
pub async fn connect(path: &Path) -> Result<Client, tonic::transport::Error> {
    let path: PathBuf = path.to_path_buf();
    // The URI is required by the API and ignored by the connector.
    let channel = Endpoint::from_static("http://[::]:50051")
        .connect_with_connector(tower::service_fn(move |_| {
            let path = path.clone();
            async move { Ok::<_, std::io::Error>(TokioIo::new(UnixStream::connect(path).await?)) }
        }))
        .await?;
    Ok(Client {
        identity: IdentityClient::new(channel.clone()),
        controller: ControllerClient::new(channel.clone()),
        node: NodeClient::new(channel.clone()),
        snapshot_metadata: SnapshotMetadataClient::new(channel),
    })
}

/// What a block-map listing asks for (the CSI SnapshotMetadata service).
#[derive(Debug, Clone, Copy)]
pub enum BlockQuery<'a> {
    /// GetMetadataAllocated of a snapshot.
    Allocated(&'a str),
    /// GetMetadataDelta from `base` to `target`.
    Delta { base: &'a str, target: &'a str },
}

/// One message of a block-map listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockPage {
    pub block_metadata_type: i32,
    pub volume_capacity_bytes: i64,
    /// (byte_offset, size_bytes) of each range.
    pub ranges: Vec<(i64, i64)>,
}

/// Every message of a block-map listing, in order.
pub async fn block_pages(
    client: &mut SnapshotMetadataClient<Channel>,
    query: BlockQuery<'_>,
    starting_offset: i64,
    max_results: i32,
    secrets: std::collections::HashMap<String, String>,
) -> Result<Vec<BlockPage>, tonic::Status> {
    use crate::csi;
    let page = |kind, capacity, ranges: Vec<csi::BlockMetadata>| BlockPage {
        block_metadata_type: kind,
        volume_capacity_bytes: capacity,
        ranges: ranges
            .iter()
            .map(|b| (b.byte_offset, b.size_bytes))
            .collect(),
    };
    let mut out = Vec::new();
    match query {
        BlockQuery::Allocated(snapshot) => {
            let req = csi::GetMetadataAllocatedRequest {
                snapshot_id: snapshot.to_string(),
                starting_offset,
                max_results,
                secrets,
            };
            let mut s = client.get_metadata_allocated(req).await?.into_inner();
            while let Some(m) = s.message().await? {
                out.push(page(
                    m.block_metadata_type,
                    m.volume_capacity_bytes,
                    m.block_metadata,
                ));
            }
        }
        BlockQuery::Delta { base, target } => {
            let req = csi::GetMetadataDeltaRequest {
                base_snapshot_id: base.to_string(),
                target_snapshot_id: target.to_string(),
                starting_offset,
                max_results,
                secrets,
            };
            let mut s = client.get_metadata_delta(req).await?.into_inner();
            while let Some(m) = s.message().await? {
                out.push(page(
                    m.block_metadata_type,
                    m.volume_capacity_bytes,
                    m.block_metadata,
                ));
            }
        }
    }
    Ok(out)
}
