//! Block maps: which byte ranges of a snapshot hold data, or which changed
//! between two snapshots of one volume. Backends find them (from thin-pool
//! metadata, from RBD object maps); the CSI SnapshotMetadata service pages
//! them out; cross-node copies send only these ranges.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

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

/// The unit a delta computed by comparing data is reported in.
pub(crate) const COMPARE_CHUNK: u64 = 64 << 10;
/// How much of each side one read takes when comparing.
pub(crate) const COMPARE_READ: usize = 1 << 20;

/// Set when dropped: tells a comparison running on a blocking thread that
/// its caller went away (see `check` of [`differing_chunks`]).
#[derive(Default)]
pub(crate) struct StopOnDrop(Arc<AtomicBool>);

impl StopOnDrop {
    /// The flag to check, for the blocking thread.
    pub(crate) fn flag(&self) -> Arc<AtomicBool> {
        self.0.clone()
    }
}

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// Which snapshot a [`differing_chunks`] read is of.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Side {
    Base,
    Target,
}

/// A delta where no backend tracks one: the [`COMPARE_CHUNK`] chunks of a
/// `size`-byte target that differ from the base, looking only within
/// `ranges` (outside them both are known to read alike, e.g. as zeroes).
/// `read(side, offset, buf)` fills `buf` exactly; the base is read only
/// below `base_size`, and a chunk that reaches past it counts as changed.
/// `check` runs before each read and ends the comparison with its error
/// (the caller went away).
pub(crate) fn differing_chunks<E>(
    ranges: &[Extent],
    base_size: u64,
    size: u64,
    mut read: impl FnMut(Side, u64, &mut [u8]) -> Result<(), E>,
    check: impl Fn() -> Result<(), E>,
) -> Result<Vec<Extent>, E> {
    let chunk = COMPARE_CHUNK;
    let aligned = ranges.iter().map(|e| {
        let offset = e.offset - e.offset % chunk;
        let end = e.end().div_ceil(chunk) * chunk;
        Extent {
            offset,
            length: end - offset,
        }
    });
    let todo = BlockMap::new(size, chunk, aligned);
    let (mut bbuf, mut tbuf) = (vec![0u8; COMPARE_READ], vec![0u8; COMPARE_READ]);
    let mut out = Vec::new();
    for range in todo.extents() {
        let mut at = range.offset;
        while at < range.end() {
            check()?;
            let len = (range.end() - at).min(COMPARE_READ as u64) as usize;
            read(Side::Target, at, &mut tbuf[..len])?;
            let from_base = base_size.saturating_sub(at).min(len as u64) as usize;
            if from_base > 0 {
                read(Side::Base, at, &mut bbuf[..from_base])?;
            }
            for start in (0..len).step_by(chunk as usize) {
                let end = (start + chunk as usize).min(len);
                if end > from_base || bbuf[start..end] != tbuf[start..end] {
                    out.push(Extent {
                        offset: at + start as u64,
                        length: (end - start) as u64,
                    });
                }
            }
            at += len as u64;
        }
    }
    Ok(out)
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
    fn a_compared_delta_is_the_chunks_that_differ_within_the_ranges() {
        const C: u64 = COMPARE_CHUNK;
        let size = 40 * C;
        let base_size = 30 * C;
        let mut base = vec![0u8; base_size as usize];
        let mut target = vec![0u8; size as usize];
        for (i, b) in base.iter_mut().enumerate() {
            *b = (i % 251) as u8;
        }
        target[..base_size as usize].copy_from_slice(&base);
        // Changed: one byte of chunk 3, chunk 20 (spanning a 1 MiB read),
        // and chunk 35 (past the base's end). Chunk 25 changed but lies
        // outside the ranges looked at.
        target[(3 * C + 7) as usize] ^= 1;
        target[(20 * C) as usize] ^= 1;
        target[(25 * C) as usize] ^= 1;
        target[(35 * C) as usize] = 9;
        let ranges = [ext(0, 4 * C), ext(10 * C + 5, 12 * C), ext(32 * C, 6 * C)];
        let mut reads = 0;
        let got = differing_chunks(
            &ranges,
            base_size,
            size,
            |side, at, buf: &mut [u8]| {
                reads += 1;
                let from = if side == Side::Base { &base } else { &target };
                buf.copy_from_slice(&from[at as usize..at as usize + buf.len()]);
                Ok::<(), ()>(())
            },
            || Ok(()),
        )
        .unwrap();
        // 32..38 lies past the base's end: changed whatever it holds.
        let mut want = vec![ext(3 * C, C), ext(20 * C, C)];
        want.extend((32..38).map(|i| ext(i * C, C)));
        assert_eq!(got, want);
        assert!(reads > 0);
        // A caller that went away stops the comparison.
        let stopped = differing_chunks(&ranges, base_size, size, |_, _, _| Ok(()), || Err("gone"));
        assert_eq!(stopped, Err("gone"));
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
