//! CSI SnapshotMetadata service: which blocks of a snapshot hold data, and
//! which changed between two snapshots of one volume, for backup tools
//! (through the external-snapshot-metadata sidecar).
//!
//! Ranges are VARIABLE_LENGTH (adjacent blocks merged), in byte order, at
//! most `max_results` per message (a default when 0). A listing resumed at
//! `starting_offset` starts at that offset rounded down to the backend's
//! granularity; an offset at or past the volume's end is OUT_OF_RANGE.

use std::pin::Pin;
use std::sync::Arc;

use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use crate::core::backend::{ControllerBackend, Secrets};
use crate::core::blockmap::BlockMap;
use crate::csi::snapshot_metadata_server::SnapshotMetadata;
use crate::csi::{
    BlockMetadata, BlockMetadataType, GetMetadataAllocatedRequest, GetMetadataAllocatedResponse,
    GetMetadataDeltaRequest, GetMetadataDeltaResponse,
};
use crate::driver::traced;
use crate::error::{Error, Result};
use crate::invalid;

/// Ranges per message when the client names no maximum.
const DEFAULT_MAX_RESULTS: usize = 1024;

pub(crate) struct SnapshotMetadataService {
    pub(crate) backend: Arc<dyn ControllerBackend>,
}

impl SnapshotMetadataService {
    /// NOT_FOUND for an id no snapshot can have, without asking the backend.
    fn check_id(&self, field: &str, id: &str) -> Result<()> {
        if id.is_empty() {
            return Err(invalid!("{field} is required"));
        }
        if !self.backend.is_valid_snapshot_id(id) {
            return Err(Error::NotFound(format!("snapshot {id} does not exist")));
        }
        Ok(())
    }
}

/// The page size and start a request asks for.
fn paging(starting_offset: i64, max_results: i32) -> Result<(u64, usize)> {
    let start = u64::try_from(starting_offset)
        .map_err(|_| invalid!("starting_offset must not be negative"))?;
    let max = match usize::try_from(max_results) {
        Ok(0) => DEFAULT_MAX_RESULTS,
        Ok(n) => n,
        Err(_) => return Err(invalid!("max_results must not be negative")),
    };
    Ok((start, max))
}

/// The map from `start` on, `max` ranges per page. OUT_OF_RANGE when
/// `start` is not inside the volume.
fn pages(map: &BlockMap, start: u64, max: usize) -> Result<Vec<Vec<BlockMetadata>>> {
    if start >= map.capacity {
        return Err(Error::OutOfRange(format!(
            "starting_offset {start} is not below the volume's size ({} bytes)",
            map.capacity
        )));
    }
    let ranges: Vec<BlockMetadata> = map
        .starting_at(start)
        .map(|e| BlockMetadata {
            byte_offset: e.offset as i64,
            size_bytes: e.length as i64,
        })
        .collect();
    Ok(ranges.chunks(max).map(<[_]>::to_vec).collect())
}

type Pages<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// The stream of the map's pages, each made a response by `response`.
fn messages<T: Send + 'static>(
    map: &BlockMap,
    start: u64,
    max: usize,
    response: impl Fn(Vec<BlockMetadata>) -> T,
) -> Result<Pages<T>> {
    let all: Vec<T> = pages(map, start, max)?.into_iter().map(response).collect();
    Ok(Box::pin(tokio_stream::iter(all.into_iter().map(Ok))))
}

#[tonic::async_trait]
impl SnapshotMetadata for SnapshotMetadataService {
    type GetMetadataAllocatedStream = Pages<GetMetadataAllocatedResponse>;
    type GetMetadataDeltaStream = Pages<GetMetadataDeltaResponse>;

    async fn get_metadata_allocated(
        &self,
        request: Request<GetMetadataAllocatedRequest>,
    ) -> Result<Response<Self::GetMetadataAllocatedStream>, Status> {
        let r = request.into_inner();
        traced("GetMetadataAllocated", &r.snapshot_id, async {
            self.check_id("snapshot_id", &r.snapshot_id)?;
            let (start, max) = paging(r.starting_offset, r.max_results)?;
            let map = self
                .backend
                .allocated(&r.snapshot_id, &Secrets::from(&r.secrets))
                .await?;
            messages(&map, start, max, |block_metadata| {
                GetMetadataAllocatedResponse {
                    block_metadata_type: BlockMetadataType::VariableLength as i32,
                    volume_capacity_bytes: map.capacity as i64,
                    block_metadata,
                }
            })
        })
        .await
    }

    async fn get_metadata_delta(
        &self,
        request: Request<GetMetadataDeltaRequest>,
    ) -> Result<Response<Self::GetMetadataDeltaStream>, Status> {
        let r = request.into_inner();
        let subject = format!("{}..{}", r.base_snapshot_id, r.target_snapshot_id);
        traced("GetMetadataDelta", &subject, async {
            self.check_id("base_snapshot_id", &r.base_snapshot_id)?;
            self.check_id("target_snapshot_id", &r.target_snapshot_id)?;
            let (start, max) = paging(r.starting_offset, r.max_results)?;
            let map = self
                .backend
                .delta(
                    &r.base_snapshot_id,
                    &r.target_snapshot_id,
                    &Secrets::from(&r.secrets),
                )
                .await?;
            messages(&map, start, max, |block_metadata| {
                GetMetadataDeltaResponse {
                    block_metadata_type: BlockMetadataType::VariableLength as i32,
                    volume_capacity_bytes: map.capacity as i64,
                    block_metadata,
                }
            })
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::blockmap::Extent;
    use tonic::Code;

    fn map() -> BlockMap {
        let e = |offset, length| Extent { offset, length };
        BlockMap::new(1000, 10, [e(0, 10), e(100, 50), e(300, 10), e(990, 10)])
    }

    #[test]
    fn pages_hold_at_most_max_results_and_resume_at_the_offset() {
        let p = pages(&map(), 0, 3).unwrap();
        assert_eq!(p.iter().map(Vec::len).collect::<Vec<_>>(), vec![3, 1]);
        let p = pages(&map(), 125, 10).unwrap();
        let first = &p[0][0];
        assert_eq!((first.byte_offset, first.size_bytes), (120, 30));
        assert_eq!(p[0].len(), 3);
        assert!(pages(&map(), 995, 10).unwrap()[0].len() == 1);
        assert!(pages(&map(), 500, 10).unwrap()[0].len() == 1);
        assert!(pages(&map(), 320, 10).unwrap()[0][0].byte_offset == 990);
    }

    #[test]
    fn bad_paging_is_refused_with_the_spec_codes() {
        assert_eq!(paging(-1, 0).unwrap_err().code(), Code::InvalidArgument);
        assert_eq!(paging(0, -1).unwrap_err().code(), Code::InvalidArgument);
        assert_eq!(paging(7, 0).unwrap(), (7, DEFAULT_MAX_RESULTS));
        assert_eq!(pages(&map(), 1000, 1).unwrap_err().code(), Code::OutOfRange);
        assert_eq!(pages(&map(), 5000, 1).unwrap_err().code(), Code::OutOfRange);
    }

    #[test]
    fn an_empty_map_sends_no_message() {
        let empty = BlockMap::new(1000, 10, []);
        assert!(pages(&empty, 0, 5).unwrap().is_empty());
    }
}
