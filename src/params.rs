//! Typed stage parameters, Spark-ML style: every param has a name, a doc string, a default and a
//! validity check. A stage's params live in one serde struct (field names are Spark's camelCase
//! names), so listing them, validating them and persisting them all read the same struct.

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::error::{Error, Result};

/// One parameter as shown by [`Params::explain_params`].
#[derive(Debug, Clone, PartialEq, Serialize)]
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

    /// Closed-choice values a setter could not parse (none for most stages).
    fn rejected(&self) -> &Rejected {
        static NONE: Rejected = Rejected(Vec::new());
        &NONE
    }

    /// The JSON form (Spark names): what persistence writes and a [`ParamMap`] edits. A value
    /// a setter could not parse is written as given, so reading it back fails as it should.
    fn to_json(&self) -> serde_json::Value {
        let mut value = serde_json::to_value(self).unwrap_or_default();
        if let Some(object) = value.as_object_mut() {
            for unparsed in &self.rejected().0 {
                object.insert(unparsed.param.to_string(), unparsed.raw.clone().into());
            }
        }
        value
    }

    /// All params with their current and default values, in declaration order. A param left
    /// out of the JSON (an optional string saved only when set) explains as `""`.
    fn explain_params(&self) -> Vec<ParamInfo> {
        let value = self.to_json();
        let default = Self::default().to_json();
        let empty = || serde_json::Value::from("");
        Self::docs()
            .iter()
            .map(|(name, doc)| ParamInfo {
                name: name.to_string(),
                doc,
                value: value.get(name).cloned().unwrap_or_else(empty),
                default: default.get(name).cloned().unwrap_or_else(empty),
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

/// Object-safe view of a stage's [`Params`], for code that holds stages as trait objects (see
/// [`crate::network_stage::NetworkStage::params`]).
pub trait AnyParams {
    /// [`Params::to_json`]: every param (Spark names), defaults filled in.
    fn json(&self) -> serde_json::Value;
    /// [`Params::explain_params`]: name, doc, value and default of every param.
    fn explain(&self) -> Vec<ParamInfo>;
}

impl<P: Params> AnyParams for P {
    fn json(&self) -> serde_json::Value {
        self.to_json()
    }

    fn explain(&self) -> Vec<ParamInfo> {
        self.explain_params()
    }
}

/// A closed set of values (Spark's `ParamValidators.inArray`) as an enum whose serde names
/// and `as_str` are Spark's strings, so saved JSON and [`ParamMap`] values stay those strings.
/// Defined with `choice!`.
pub trait Choice: Copy + 'static {
    /// The accepted strings, in declaration order.
    const NAMES: &'static [&'static str];
    /// The value named `name`, if any.
    fn from_name(name: &str) -> Option<Self>;
}

/// The error text for `value` outside `names`.
pub fn not_one_of(value: &str, names: &[&str]) -> String {
    format!("`{value}` is not one of {}", names.join(", "))
}

/// What a closed-choice setter takes: the enum, or its Spark string.
pub trait IntoChoice<T> {
    /// The value, or the string that names none.
    fn into_choice(self) -> std::result::Result<T, String>;
}

impl<T: Choice> IntoChoice<T> for T {
    fn into_choice(self) -> std::result::Result<T, String> {
        Ok(self)
    }
}

impl<T: Choice> IntoChoice<T> for &str {
    fn into_choice(self) -> std::result::Result<T, String> {
        T::from_name(self).ok_or_else(|| self.to_string())
    }
}

impl<T: Choice> IntoChoice<T> for String {
    fn into_choice(self) -> std::result::Result<T, String> {
        T::from_name(&self).ok_or(self)
    }
}

/// Strings that closed-choice setters could not parse. Setters chain (they return `Self`), so
/// instead of failing they keep the string here: `validate` reports it naming the param, and
/// [`Params::to_json`] writes it as given. Never saved or read by serde itself.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Rejected(Vec<Unparsed>);

#[derive(Debug, Clone, PartialEq)]
struct Unparsed {
    param: &'static str,
    raw: String,
    names: &'static [&'static str],
}

impl Rejected {
    /// Sets `field` to `value`, or records the string that names no choice.
    pub(crate) fn set<T: Choice>(
        &mut self,
        param: &'static str,
        value: std::result::Result<T, String>,
        field: &mut T,
    ) {
        self.0.retain(|u| u.param != param);
        match value {
            Ok(v) => *field = v,
            Err(raw) => self.0.push(Unparsed {
                param,
                raw,
                names: T::NAMES,
            }),
        }
    }

    /// The first rejected value as an error naming `stage` and the param.
    pub(crate) fn check(&self, stage: &str) -> Result<()> {
        match self.0.first() {
            Some(u) => Err(Error::param(stage, u.param, not_one_of(&u.raw, u.names))),
            None => Ok(()),
        }
    }
}

/// Defines a [`Choice`] enum: `Variant = "sparkName"` per value; adds `as_str`, `FromStr` and
/// `Display`.
macro_rules! choice {
    (
        $(#[$meta:meta])*
        pub enum $name:ident { $($(#[$vmeta:meta])* $variant:ident = $text:literal,)+ }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
        pub enum $name {
            $($(#[$vmeta])* #[serde(rename = $text)] $variant,)+
        }

        impl $crate::params::Choice for $name {
            const NAMES: &'static [&'static str] = &[$($text),+];
            fn from_name(name: &str) -> Option<Self> {
                match name {
                    $($text => Some($name::$variant),)+
                    _ => None,
                }
            }
        }

        impl $name {
            /// The Spark string of this value.
            pub fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $text,)+
                }
            }
        }

        impl std::str::FromStr for $name {
            type Err = String;
            fn from_str(s: &str) -> std::result::Result<Self, String> {
                <Self as $crate::params::Choice>::from_name(s).ok_or_else(|| {
                    $crate::params::not_one_of(s, <Self as $crate::params::Choice>::NAMES)
                })
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}
pub(crate) use choice;

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
        let mut value = params.to_json();
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
        let params: P = serde_json::from_value(value.clone()).map_err(|e| {
            let param =
                first_unreadable::<P>(&value).unwrap_or_else(|| self.names_for(uid).join(", "));
            Error::param(P::STAGE, &param, format!("wrong value type: {e}"))
        })?;
        params.validate()?;
        Ok(params)
    }
}

/// The first param of `value` that does not read as `P`'s on its own (serde's errors do not
/// name the field).
fn first_unreadable<P: Params>(value: &serde_json::Value) -> Option<String> {
    let defaults = serde_json::to_value(P::default()).ok()?;
    value.as_object()?.iter().find_map(|(name, v)| {
        let mut single = defaults.clone();
        single.as_object_mut()?.insert(name.clone(), v.clone());
        serde_json::from_value::<P>(single)
            .is_err()
            .then(|| name.clone())
    })
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

/// [`setters!`] for closed-choice params: each takes the enum or its string, and a string that
/// names no choice waits in the params' `rejected` field for `validate`.
macro_rules! choice_setters {
    ($($name:ident: $field:ident: $ty:ty = $param:literal),* $(,)?) => {
        $(pub fn $name(mut self, v: impl $crate::params::IntoChoice<$ty>) -> Self {
            self.params.rejected.set($param, v.into_choice(), &mut self.params.$field);
            self
        })*
    };
}
pub(crate) use choice_setters;
