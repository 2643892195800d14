//! CSI capacity_range semantics: pick the size a new volume gets, and decide
//! whether an existing volume satisfies a range.

use crate::error::{Error, Result};

/// A validated capacity range; 0 means "not set", as in the spec.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Range {
    pub required: u64,
    pub limit: u64,
}

impl Range {
    /// From the wire: negative values are malformed; a limit below the
    /// required size can never be satisfied.
    pub fn new(required: i64, limit: i64) -> Result<Self> {
        if required < 0 || limit < 0 {
            return Err(Error::InvalidArgument(format!(
                "capacity_range must not be negative (required_bytes {required}, limit_bytes \
                 {limit})"
            )));
        }
        let r = Range {
            required: required as u64,
            limit: limit as u64,
        };
        if r.limit > 0 && r.limit < r.required {
            return Err(Error::OutOfRange(format!(
                "capacity_range limit_bytes {limit} is below required_bytes {required}"
            )));
        }
        Ok(r)
    }

    /// Whether an existing volume of `size` bytes satisfies this range.
    pub fn accepts(&self, size: u64) -> bool {
        size >= self.required && (self.limit == 0 || size <= self.limit)
    }

    /// The size of a new volume: the smallest multiple of `granule` that is at
    /// least the required size (or `default` when none is required), at least
    /// `minimum` (e.g. what the filesystem needs), and within the limit.
    pub fn pick(&self, granule: u64, minimum: u64, default: u64) -> Result<u64> {
        let granule = granule.max(1);
        let wanted = match (self.required, self.limit) {
            (0, 0) => default,
            (0, limit) => default.min(limit),
            (required, _) => required,
        };
        let wanted = wanted.max(minimum).max(1);
        let size = round_up(wanted, granule).ok_or_else(|| {
            Error::OutOfRange(format!("requested capacity {wanted} bytes is too large"))
        })?;
        if size > i64::MAX as u64 {
            return Err(Error::OutOfRange(format!(
                "capacity {size} bytes is too large"
            )));
        }
        if self.limit > 0 && size > self.limit {
            let why = if minimum > self.required.max(1) && minimum > self.limit {
                format!("the filesystem needs at least {minimum} bytes")
            } else {
                format!("volumes are allocated in units of {granule} bytes")
            };
            return Err(Error::OutOfRange(format!(
                "cannot satisfy capacity_range (required {}, limit {}): {why}, so the \
                 smallest possible size is {size} bytes; raise limit_bytes",
                self.required, self.limit
            )));
        }
        Ok(size)
    }
}

pub(crate) fn round_up(value: u64, granule: u64) -> Option<u64> {
    let granule = granule.max(1);
    value.div_ceil(granule).checked_mul(granule)
}

#[cfg(test)]
mod tests {
    use super::*;
    const MIB: u64 = 1 << 20;
    const EXT: u64 = 4 * MIB;

    #[test]
    fn rounds_up_to_extents() {
        let r = Range::new(1, 0).unwrap();
        assert_eq!(r.pick(EXT, 0, 1 << 30).unwrap(), EXT);
        let r = Range::new((10 * MIB) as i64, 0).unwrap();
        assert_eq!(r.pick(EXT, 0, 1 << 30).unwrap(), 12 * MIB);
    }

    #[test]
    fn default_and_limit_only() {
        let r = Range::new(0, 0).unwrap();
        assert_eq!(r.pick(EXT, 0, 1 << 30).unwrap(), 1 << 30);
        let r = Range::new(0, (100 * MIB) as i64).unwrap();
        assert_eq!(r.pick(EXT, 0, 1 << 30).unwrap(), 100 * MIB);
        // A limit that is not a whole number of extents: round down is
        // impossible without going under nothing, so the next extent up fails.
        let r = Range::new(0, (2 * MIB) as i64).unwrap();
        assert!(matches!(r.pick(EXT, 0, 1 << 30), Err(Error::OutOfRange(_))));
    }

    #[test]
    fn filesystem_minimum_within_limit() {
        let r = Range::new((10 * MIB) as i64, 0).unwrap();
        assert_eq!(r.pick(EXT, 300 * MIB, 1 << 30).unwrap(), 300 * MIB);
        let r = Range::new((10 * MIB) as i64, (400 * MIB) as i64).unwrap();
        assert_eq!(r.pick(EXT, 300 * MIB, 1 << 30).unwrap(), 300 * MIB);
        let r = Range::new((10 * MIB) as i64, (100 * MIB) as i64).unwrap();
        let err = r.pick(EXT, 300 * MIB, 1 << 30).unwrap_err();
        assert!(
            matches!(&err, Error::OutOfRange(m) if m.contains("filesystem")),
            "{err}"
        );
    }

    #[test]
    fn malformed_ranges() {
        assert!(matches!(Range::new(-1, 0), Err(Error::InvalidArgument(_))));
        assert!(matches!(Range::new(10, 5), Err(Error::OutOfRange(_))));
        let r = Range::new(i64::MAX, 0).unwrap();
        assert!(r.pick(EXT, 0, 0).is_err());
    }

    #[test]
    fn accepts_existing_sizes() {
        let r = Range::new(100, 200).unwrap();
        assert!(r.accepts(150));
        assert!(!r.accepts(99));
        assert!(!r.accepts(201));
        assert!(Range::new(100, 0).unwrap().accepts(1 << 40));
    }
}
