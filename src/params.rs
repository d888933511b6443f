//! Typed stage parameters, Spark-ML style: every param has a name, a doc string, a default and a
//! validity check. A stage's params live in one serde struct (field names are Spark's camelCase
//! names), so listing them, validating them and persisting them all read the same struct.

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::error::{Error, Result};

/// One parameter as shown by [`Params::explain_params`].
#[derive(Debug, Clone, PartialEq)]
pub struct ParamInfo {
    pub name: String,
    pub doc: &'static str,
    pub value: serde_json::Value,
    pub default: serde_json::Value,
}

/// The parameter set of one stage.
///
/// Implementors are plain structs with `#[serde(rename_all = "camelCase")]` and a `Default`
/// holding Spark's defaults; `validate` names the offending param in its error.
pub trait Params: Serialize + DeserializeOwned + Default + Clone {
    /// Name used in error messages, e.g. `"LogisticRegression"`.
    const STAGE: &'static str;

    /// One line of documentation per param name.
    fn docs() -> &'static [(&'static str, &'static str)];

    /// Checks every param; the error names the first invalid one.
    fn validate(&self) -> Result<()>;

    /// All params with their current and default values, in declaration order.
    fn explain_params(&self) -> Vec<ParamInfo> {
        let value = serde_json::to_value(self).unwrap_or_default();
        let default = serde_json::to_value(Self::default()).unwrap_or_default();
        Self::docs()
            .iter()
            .map(|(name, doc)| ParamInfo {
                name: name.to_string(),
                doc,
                value: value.get(name).cloned().unwrap_or_default(),
                default: default.get(name).cloned().unwrap_or_default(),
            })
            .collect()
    }

    /// Restores params from their JSON form (as written by persistence), validating them.
    fn from_json(value: serde_json::Value) -> Result<Self> {
        let params: Self = serde_json::from_value(value)
            .map_err(|e| Error::Persistence(format!("{} params: {e}", Self::STAGE)))?;
        params.validate()?;
        Ok(params)
    }
}

/// Validation helpers shared by all stages.
pub(crate) mod check {
    use crate::error::{Error, Result};

    pub fn non_empty(stage: &str, param: &str, value: &str) -> Result<()> {
        if value.trim().is_empty() {
            return Err(Error::param(stage, param, "must not be empty"));
        }
        Ok(())
    }

    pub fn in_range(stage: &str, param: &str, value: f64, lo: f64, hi: f64) -> Result<()> {
        if !(value.is_finite() && value >= lo && value <= hi) {
            return Err(Error::param(
                stage,
                param,
                format!("must be in [{lo}, {hi}], got {value}"),
            ));
        }
        Ok(())
    }

    pub fn at_least(stage: &str, param: &str, value: f64, lo: f64) -> Result<()> {
        if !(value.is_finite() && value >= lo) {
            return Err(Error::param(
                stage,
                param,
                format!("must be >= {lo}, got {value}"),
            ));
        }
        Ok(())
    }
}

/// A unique stage id in Spark's form `<Prefix>_<12 hex digits>`.
pub fn new_uid(prefix: &str) -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    // splitmix64 of (time, counter): distinct within a process, unlikely to collide across runs.
    let mut z = nanos ^ n.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    format!("{prefix}_{:012x}", z & 0xFFFF_FFFF_FFFF)
}
