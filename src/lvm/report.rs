//! Typed parsing of `lvm fullreport --reportformat json --units b --nosuffix`.
//! LVM prints every value as a string; sizes are bytes, times are epoch
//! seconds (we ask for `report/time_format="%s"`).

use serde::Deserialize;

/// Fields asked of each sub-report, in the order of the `--configreport` flags.
pub(crate) const VG_FIELDS: &str = "vg_name,vg_size,vg_free,vg_extent_size";
/// (A VG field here, or the segment field `zero`, would make LVM switch the
/// sub-report's type; the VG comes from the section and zeroing from lv_attr.)
pub(crate) const LV_FIELDS: &str =
    "lv_name,lv_size,lv_attr,lv_tags,pool_lv,data_percent,metadata_percent,lv_when_full,lv_time";

#[derive(Debug, Deserialize)]
pub(crate) struct FullReport {
    #[serde(default)]
    pub report: Vec<VgSection>,
}

#[derive(Debug, Deserialize)]
pub(crate) struct VgSection {
    #[serde(default)]
    pub vg: Vec<RawVg>,
    #[serde(default)]
    pub lv: Vec<RawLv>,
}

#[derive(Debug, Deserialize)]
pub(crate) struct RawVg {
    pub vg_name: String,
    pub vg_size: String,
    pub vg_free: String,
    pub vg_extent_size: String,
}

#[derive(Debug, Deserialize)]
pub struct RawLv {
    pub lv_name: String,
    #[serde(default)]
    pub vg_name: String,
    pub lv_size: String,
    pub lv_attr: String,
    #[serde(default)]
    pub lv_tags: String,
    #[serde(default)]
    pub pool_lv: String,
    #[serde(default)]
    pub data_percent: String,
    #[serde(default)]
    pub metadata_percent: String,
    #[serde(default)]
    pub lv_when_full: String,
    #[serde(default)]
    pub lv_time: String,
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Vg {
    pub name: String,
    pub size: u64,
    pub free: u64,
    pub extent_size: u64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Lv {
    pub vg: String,
    pub name: String,
    pub size: u64,
    pub attr: String,
    pub tags: Vec<String>,
    /// The thin pool a thin volume lives in.
    pub pool: Option<String>,
    /// Thin pools and thin volumes: percent of data allocated.
    pub data_percent: Option<f64>,
    pub metadata_percent: Option<f64>,
    /// Thin pools: "error" or "queue".
    pub when_full: String,
    /// Thin pools: whether new blocks are zeroed.
    pub zeroing: bool,
    /// Creation time, seconds since the epoch.
    pub created: Option<i64>,
}

impl Lv {
    fn attr_char(&self, i: usize) -> char {
        self.attr.chars().nth(i).unwrap_or('-')
    }
    pub fn is_thin_pool(&self) -> bool {
        self.attr_char(0) == 't'
    }
    pub fn is_read_only(&self) -> bool {
        self.attr_char(1) == 'r'
    }
    pub fn is_active(&self) -> bool {
        self.attr_char(4) == 'a'
    }
    pub fn is_open(&self) -> bool {
        self.attr_char(5) == 'o'
    }
}

#[derive(Debug, thiserror::Error)]
#[error("bad LVM report value {field}={value:?}")]
pub struct BadValue {
    field: &'static str,
    value: String,
}

fn bytes(field: &'static str, value: &str) -> Result<u64, BadValue> {
    value.trim().parse::<u64>().map_err(|_| BadValue {
        field,
        value: value.to_string(),
    })
}

fn percent(value: &str) -> Option<f64> {
    value.trim().parse::<f64>().ok()
}

impl TryFrom<RawVg> for Vg {
    type Error = BadValue;
    fn try_from(r: RawVg) -> Result<Self, BadValue> {
        Ok(Vg {
            size: bytes("vg_size", &r.vg_size)?,
            free: bytes("vg_free", &r.vg_free)?,
            extent_size: bytes("vg_extent_size", &r.vg_extent_size)?,
            name: r.vg_name,
        })
    }
}

impl Lv {
    pub fn from_raw(r: RawLv, vg: &str) -> Result<Self, BadValue> {
        Ok(Lv {
            vg: if r.vg_name.is_empty() {
                vg.to_string()
            } else {
                r.vg_name
            },
            size: bytes("lv_size", &r.lv_size)?,
            tags: r
                .lv_tags
                .split(',')
                .filter(|t| !t.is_empty())
                .map(String::from)
                .collect(),
            pool: Some(r.pool_lv).filter(|p| !p.is_empty()),
            data_percent: percent(&r.data_percent),
            metadata_percent: percent(&r.metadata_percent),
            // lv_attr[7] is 'z' for a thin pool that zeroes new blocks.
            zeroing: r.lv_attr.chars().nth(7) == Some('z'),
            created: r.lv_time.trim().parse().ok(),
            when_full: r.lv_when_full,
            attr: r.lv_attr,
            name: r.lv_name,
        })
    }
}

/// The VGs and LVs of a report.
pub(crate) fn parse(report: FullReport) -> Result<(Vec<Vg>, Vec<Lv>), BadValue> {
    let mut vgs = Vec::new();
    let mut lvs = Vec::new();
    for section in report.report {
        let Some(raw_vg) = section.vg.into_iter().next() else {
            continue;
        };
        let vg = Vg::try_from(raw_vg)?;
        for raw in section.lv {
            lvs.push(Lv::from_raw(raw, &vg.name)?);
        }
        vgs.push(vg);
    }
    Ok((vgs, lvs))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = r#"{
      "report": [
        {
          "vg": [{"vg_name":"vg0", "vg_size":"2143289344", "vg_free":"524288000",
                  "vg_extent_size":"4194304"}],
          "pv": [{"pv_name":"/dev/loop0"}],
          "lv": [
            {"lv_name":"pool0", "vg_name":"vg0", "lv_size":"1610612736",
             "lv_attr":"twi-aotz--", "lv_tags":"", "pool_lv":"", "data_percent":"12.50",
             "metadata_percent":"10.05", "lv_when_full":"error",
             "lv_time":"1763769600"},
            {"lv_name":"lds-0123456789abcdef0123456789abcdef", "vg_name":"vg0",
             "lv_size":"1073741824", "lv_attr":"Vwi-aotz--",
             "lv_tags":"lodestone.v1.vol,lodestone.v1.name=61,lodestone.v1.params=00",
             "pool_lv":"pool0", "data_percent":"3.00", "metadata_percent":"",
             "lv_when_full":"", "lv_time":"1763769601"}
          ],
          "pvseg": [], "seg": []
        },
        {"vg": [{"vg_name":"vg1", "vg_size":"1069547520", "vg_free":"1069547520",
                 "vg_extent_size":"4194304"}], "lv": []}
      ]
    }"#;

    #[test]
    fn parses_a_full_report() {
        let report: FullReport = serde_json::from_str(SAMPLE).unwrap();
        let (vgs, lvs) = parse(report).unwrap();
        assert_eq!(vgs.len(), 2);
        assert_eq!(vgs[0].extent_size, 4 << 20);
        assert_eq!(vgs[1].free, 1069547520);
        let pool = &lvs[0];
        assert!(pool.is_thin_pool() && pool.is_active() && pool.zeroing);
        assert_eq!(pool.when_full, "error");
        assert_eq!(pool.data_percent, Some(12.5));
        let vol = &lvs[1];
        assert_eq!(vol.pool.as_deref(), Some("pool0"));
        assert!(vol.is_open() && !vol.is_thin_pool());
        assert_eq!(vol.tags.len(), 3);
        assert_eq!(vol.created, Some(1763769601));
    }

    #[test]
    fn bad_numbers_are_errors() {
        let text = r#"{"report":[{"vg":[{"vg_name":"v","vg_size":"x","vg_free":"1",
                       "vg_extent_size":"1"}]}]}"#;
        assert!(parse(serde_json::from_str(text).unwrap()).is_err());
    }
}
