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

/// Param values for several stages, addressed as (stage uid, Spark param name): one point of
/// a tuning grid, like Spark's `ParamMap`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, serde::Deserialize)]
pub struct ParamMap {
    entries: Vec<ParamPair>,
}

/// One entry of a [`ParamMap`].
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
pub struct ParamPair {
    pub stage: String,
    pub param: String,
    pub value: serde_json::Value,
}

impl ParamMap {
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets `param` of the stage with uid `stage` (replacing an earlier value).
    pub fn put(mut self, stage: &str, param: &str, value: impl Into<serde_json::Value>) -> Self {
        let value = value.into();
        match self
            .entries
            .iter_mut()
            .find(|e| e.stage == stage && e.param == param)
        {
            Some(entry) => entry.value = value,
            None => self.entries.push(ParamPair {
                stage: stage.to_string(),
                param: param.to_string(),
                value,
            }),
        }
        self
    }

    /// The entries, in insertion order.
    pub fn entries(&self) -> &[ParamPair] {
        &self.entries
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Names of the params set for stage `uid`.
    pub fn names_for(&self, uid: &str) -> Vec<&str> {
        self.entries
            .iter()
            .filter(|e| e.stage == uid)
            .map(|e| e.param.as_str())
            .collect()
    }

    /// `params` with the values this map sets for stage `uid`, validated. Unknown param names
    /// and values of the wrong type are errors naming the param.
    pub fn apply<P: Params>(&self, uid: &str, params: &P) -> Result<P> {
        let mut value = serde_json::to_value(params)
            .map_err(|e| Error::param(P::STAGE, "*", format!("cannot serialise params: {e}")))?;
        let Some(object) = value.as_object_mut() else {
            return Err(Error::param(P::STAGE, "*", "params are not a JSON object"));
        };
        for entry in self.entries.iter().filter(|e| e.stage == uid) {
            if !object.contains_key(&entry.param) {
                let known: Vec<&str> = P::docs().iter().map(|(n, _)| *n).collect();
                return Err(Error::param(
                    P::STAGE,
                    &entry.param,
                    format!("no such param; known: {}", known.join(", ")),
                ));
            }
            object.insert(entry.param.clone(), entry.value.clone());
        }
        let params: P = serde_json::from_value(value).map_err(|e| {
            let names = self.names_for(uid).join(", ");
            Error::param(P::STAGE, &names, format!("wrong value type: {e}"))
        })?;
        params.validate()?;
        Ok(params)
    }
}

impl std::fmt::Display for ParamMap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let parts: Vec<String> = self
            .entries
            .iter()
            .map(|e| format!("{}.{}={}", e.stage, e.param, e.value))
            .collect();
        write!(f, "{{{}}}", parts.join(", "))
    }
}

/// `save_stage` and `copy_with` for a stage whose whole state is `uid` + `params`; used inside
/// its `impl Estimator` / `impl Transformer` block.
macro_rules! params_stage_methods {
    (estimator, $class:expr) => {
        fn save_stage(&self) -> $crate::Result<$crate::persistence::SavedStage> {
            Ok($crate::persistence::SavedStage::of(
                $class,
                &self.uid,
                &self.params,
            ))
        }

        fn copy_with(&self, overrides: &$crate::params::ParamMap) -> $crate::Result<Self> {
            Ok(Self {
                uid: self.uid.clone(),
                params: overrides.apply(&self.uid, &self.params)?,
            })
        }
    };
    (transformer, $class:expr) => {
        fn save_stage(&self) -> $crate::Result<$crate::persistence::SavedStage> {
            Ok($crate::persistence::SavedStage::of(
                $class,
                &self.uid,
                &self.params,
            ))
        }

        fn copy_with(
            &self,
            overrides: &$crate::params::ParamMap,
        ) -> $crate::Result<std::sync::Arc<dyn $crate::Transformer>> {
            Ok(std::sync::Arc::new(Self {
                uid: self.uid.clone(),
                params: overrides.apply(&self.uid, &self.params)?,
            }))
        }
    };
}
pub(crate) use params_stage_methods;

/// Builder setters `with_x(mut self, v) -> Self` writing `self.params.x`, for stages and
/// evaluators whose params live in a `params` field.
macro_rules! setters {
    ($($name:ident: $field:ident: $ty:ty),* $(,)?) => {
        $(pub fn $name(mut self, v: $ty) -> Self {
            self.params.$field = v;
            self
        })*
    };
}
pub(crate) use setters;

/// [`setters!`] for string params (`impl Into<String>`).
macro_rules! string_setters {
    ($($name:ident: $field:ident),* $(,)?) => {
        $(pub fn $name(mut self, v: impl Into<String>) -> Self {
            self.params.$field = v.into();
            self
        })*
    };
}
pub(crate) use string_setters;
