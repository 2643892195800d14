//! Block maps: which byte ranges of a snapshot hold data, or which changed
//! between two snapshots of one volume. Backends find them (from thin-pool
//! metadata, from RBD object maps); the CSI SnapshotMetadata service pages
//! them out; cross-node copies send only these ranges.

/// One byte range of a volume.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub offset: u64,
    pub length: u64,
}

impl Extent {
    pub fn end(&self) -> u64 {
        self.offset + self.length
    }
}

/// The ranges of a volume that hold data (or changed), in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockMap {
    /// Size in bytes of the volume the snapshot was taken of.
    pub capacity: u64,
    /// The unit the backend tracks data in (a thin pool's chunk, an RBD
    /// object): every extent starts and ends on it, except at `capacity`.
    pub granularity: u64,
    /// Sorted, non-overlapping, adjacent ranges merged, within `capacity`.
    extents: Vec<Extent>,
}

impl BlockMap {
    /// A map of the given ranges (in any order; overlapping and adjacent
    /// ones are merged, anything past `capacity` is cut off).
    pub fn new(capacity: u64, granularity: u64, ranges: impl IntoIterator<Item = Extent>) -> Self {
        let mut all: Vec<Extent> = ranges
            .into_iter()
            .filter(|e| e.length > 0 && e.offset < capacity)
            .map(|e| Extent {
                offset: e.offset,
                length: e.length.min(capacity - e.offset),
            })
            .collect();
        all.sort_by_key(|e| e.offset);
        let mut extents: Vec<Extent> = Vec::with_capacity(all.len());
        for e in all {
            match extents.last_mut() {
                Some(last) if e.offset <= last.end() => {
                    last.length = last.length.max(e.end() - last.offset);
                }
                _ => extents.push(e),
            }
        }
        BlockMap {
            capacity,
            granularity: granularity.max(1),
            extents,
        }
    }

    /// The whole volume as one range (a backend that cannot tell which
    /// blocks hold data).
    pub fn whole(capacity: u64, granularity: u64) -> Self {
        Self::new(
            capacity,
            granularity,
            [Extent {
                offset: 0,
                length: capacity,
            }],
        )
    }

    pub fn extents(&self) -> &[Extent] {
        &self.extents
    }

    /// Bytes covered by the map.
    pub fn bytes(&self) -> u64 {
        self.extents.iter().map(|e| e.length).sum()
    }

    /// The ranges at and after `start`, for a client resuming an
    /// interrupted listing: `start` is rounded down to the granularity, and
    /// a range that holds it begins there.
    pub fn starting_at(&self, start: u64) -> impl Iterator<Item = Extent> + '_ {
        let start = start - start % self.granularity;
        let first = self.extents.partition_point(|e| e.end() <= start);
        self.extents[first..].iter().map(move |e| {
            let offset = e.offset.max(start);
            Extent {
                offset,
                length: e.end() - offset,
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ext(offset: u64, length: u64) -> Extent {
        Extent { offset, length }
    }

    #[test]
    fn ranges_are_sorted_merged_and_cut_at_capacity() {
        let m = BlockMap::new(
            100,
            10,
            [
                ext(50, 10),
                ext(0, 10),
                ext(10, 10),
                ext(55, 10),
                ext(90, 30),
                ext(200, 5),
                ext(30, 0),
            ],
        );
        assert_eq!(m.extents(), &[ext(0, 20), ext(50, 15), ext(90, 10)]);
        assert_eq!(m.bytes(), 45);
        assert_eq!(BlockMap::whole(64, 16).extents(), &[ext(0, 64)]);
        assert!(BlockMap::whole(0, 16).extents().is_empty());
    }

    #[test]
    fn a_listing_resumes_at_the_granule_that_holds_the_offset() {
        let m = BlockMap::new(100, 10, [ext(0, 20), ext(50, 20), ext(90, 10)]);
        let from = |s| m.starting_at(s).collect::<Vec<_>>();
        assert_eq!(from(0), m.extents());
        assert_eq!(from(15), vec![ext(10, 10), ext(50, 20), ext(90, 10)]);
        assert_eq!(from(20), vec![ext(50, 20), ext(90, 10)]);
        assert_eq!(from(69), vec![ext(60, 10), ext(90, 10)]);
        assert_eq!(from(70), vec![ext(90, 10)]);
        assert!(from(100).is_empty());
    }
}
