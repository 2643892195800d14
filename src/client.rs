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
