//! Loading saved stages by class. Each stage type implements [`PersistedStage`]: its class
//! name, written once, and how it rebuilds itself from a [`SavedStage`]. A [`StageRegistry`]
//! maps class names to those loaders; [`StageRegistry::builtin`] knows this crate's stages, and
//! [`StageRegistry::register`] adds yours, so a stage of your own that saves also loads, alone
//! or inside a pipeline (containers load their children through the same registry).
//! `StageRegistry::builtin` and the loaders that use it live in the `builtin` module, above
//! every stage module.
//!
//! ```no_run
//! use std::any::Any;
//!
//! use deep_pipelines::persistence::SavedStage;
//! use deep_pipelines::prelude::*;
//! use deep_pipelines::registry::{LoadedStage, PersistedStage, StageRegistry};
//!
//! /// A stage of your own: passes the data through.
//! #[derive(Debug, Clone)]
//! struct Identity {
//!     uid: String,
//! }
//!
//! impl Transformer for Identity {
//!     fn uid(&self) -> &str {
//!         &self.uid
//!     }
//!     fn transform(&self, df: DataFrame) -> deep_pipelines::Result<DataFrame> {
//!         Ok(df)
//!     }
//!     fn as_any(&self) -> &dyn Any {
//!         self
//!     }
//!     fn save_stage(&self) -> deep_pipelines::Result<SavedStage> {
//!         Ok(SavedStage::new(Self::CLASS, &self.uid))
//!     }
//! }
//!
//! impl PersistedStage for Identity {
//!     const CLASS: &'static str = "my_crate.Identity";
//!     fn restore(saved: &SavedStage, _: &StageRegistry) -> deep_pipelines::Result<Self> {
//!         Ok(Identity { uid: saved.uid.clone() })
//!     }
//!     fn into_stage(self) -> LoadedStage {
//!         LoadedStage::Transformer(std::sync::Arc::new(self))
//!     }
//! }
//!
//! # fn demo() -> deep_pipelines::Result<()> {
//! let registry = StageRegistry::builtin().register::<Identity>();
//! let model = PipelineModel::load_with("model", &registry)?;
//! # Ok(()) }
//! ```

use std::collections::BTreeMap;
use std::path::Path;

use crate::error::{Error, Result};
use crate::persistence::{SavedStage, persistence_error, read};
use crate::stage::{AnyEstimator, PipelineStage, Transformer};

/// A loaded stage: fitted (transformer) or not (estimator), as a pipeline holds it.
pub type LoadedStage = PipelineStage;

/// A stage type that can be rebuilt from what it saved (`Transformer::save_stage` /
/// `Estimator::save_stage`).
pub trait PersistedStage: Sized + 'static {
    /// The class written to `metadata.json`. A name without a dot is this crate's namespace
    /// (saved as `deep_pipelines.<name>`); give your own stages a dotted name such as
    /// `my_crate.MyStage`, which is saved as is.
    const CLASS: &'static str;

    /// Rebuilds the stage; `registry` loads child stages (for containers such as pipelines).
    fn restore(saved: &SavedStage, registry: &StageRegistry) -> Result<Self>;

    /// A new stage from its params as JSON (Spark names; missing ones take their defaults),
    /// validated: how bindings (Python) build a stage by class name. The default: this stage
    /// cannot be made that way.
    fn from_params_json(_params: serde_json::Value) -> Result<Self> {
        Err(Error::Persistence(format!(
            "stage class `{}` cannot be made from params alone",
            Self::CLASS
        )))
    }

    /// The stage as a pipeline holds it: `LoadedStage::Transformer(Arc::new(self))` for a
    /// transformer, `LoadedStage::Estimator(...)` for an estimator.
    fn into_stage(self) -> LoadedStage;
}

/// How the registry builds one class: from what it saved, or from params.
#[derive(Clone, Copy)]
struct Loader {
    restore: fn(&SavedStage, &StageRegistry) -> Result<LoadedStage>,
    from_params: fn(serde_json::Value) -> Result<LoadedStage>,
}

impl Loader {
    fn of<T: PersistedStage>() -> Self {
        Loader {
            restore: |saved, registry| Ok(T::restore(saved, registry)?.into_stage()),
            from_params: |params| Ok(T::from_params_json(params)?.into_stage()),
        }
    }
}

/// Which stage type loads each saved class.
#[derive(Clone)]
pub struct StageRegistry {
    loaders: BTreeMap<&'static str, Loader>,
}

impl std::fmt::Debug for StageRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_set().entries(self.loaders.keys()).finish()
    }
}

impl StageRegistry {
    /// A registry that loads nothing.
    pub fn empty() -> Self {
        StageRegistry {
            loaders: BTreeMap::new(),
        }
    }

    /// This registry plus stage type `T` (replacing an earlier type of the same class).
    #[must_use]
    pub fn register<T: PersistedStage>(mut self) -> Self {
        self.loaders.insert(T::CLASS, Loader::of::<T>());
        self
    }

    /// The registered classes, sorted.
    pub fn classes(&self) -> impl Iterator<Item = &'static str> + '_ {
        self.loaders.keys().copied()
    }

    fn loader(&self, class: &str, what: &str) -> Result<Loader> {
        self.loaders.get(class).copied().ok_or_else(|| {
            Error::Persistence(format!(
                "{what}unknown class `{class}`; register its type with StageRegistry::register (known: {})",
                self.classes().collect::<Vec<_>>().join(", ")
            ))
        })
    }

    /// Rebuilds a stage from what [`crate::persistence::read`] returned, by class.
    pub fn build(&self, saved: &SavedStage) -> Result<LoadedStage> {
        let what = format!("stage `{}`: ", saved.uid);
        (self.loader(&saved.class, &what)?.restore)(saved, self)
    }

    /// A new stage of `class` from its params as JSON (Spark names; missing ones take their
    /// defaults), e.g. `make("DeepImageFeaturizer", json!({"modelName": "ResNet50"}))`.
    pub fn make(&self, class: &str, params: serde_json::Value) -> Result<LoadedStage> {
        (self.loader(class, "")?.from_params)(params)
    }

    /// Loads any saved stage.
    pub fn load(&self, path: impl AsRef<Path>) -> Result<LoadedStage> {
        self.build(&read(path.as_ref())?)
    }

    /// Loads a saved transformer (fitted model) of concrete type `T`.
    pub fn load_transformer_as<T: Transformer + Clone>(&self, path: impl AsRef<Path>) -> Result<T> {
        let path = path.as_ref();
        match self.load(path)? {
            LoadedStage::Transformer(t) => t.as_any().downcast_ref::<T>().cloned(),
            LoadedStage::Estimator(_) => None,
        }
        .ok_or_else(|| not_a::<T>(path))
    }

    /// Loads a saved estimator of concrete type `E`.
    pub fn load_estimator_as<E: AnyEstimator + Clone + 'static>(
        &self,
        path: impl AsRef<Path>,
    ) -> Result<E> {
        let path = path.as_ref();
        match self.load(path)? {
            LoadedStage::Estimator(e) => e.as_any().downcast_ref::<E>().cloned(),
            LoadedStage::Transformer(_) => None,
        }
        .ok_or_else(|| not_a::<E>(path))
    }
}

fn not_a<T>(path: &Path) -> Error {
    let name = std::any::type_name::<T>();
    let short = name.rsplit("::").next().unwrap_or(name);
    persistence_error(path, format!("holds another kind of stage, not a {short}"))
}

/// `save_stage` and `copy_with` for a stage whose whole state is `uid` + `params`; used inside
/// its `impl Estimator` / `impl Transformer` block (the class is its [`PersistedStage::CLASS`]).
macro_rules! params_stage_methods {
    (@save) => {
        fn save_stage(&self) -> $crate::Result<$crate::persistence::SavedStage> {
            Ok($crate::persistence::SavedStage::of(
                <Self as $crate::registry::PersistedStage>::CLASS,
                &self.uid,
                &self.params,
            ))
        }
    };
    (estimator) => {
        $crate::registry::params_stage_methods!(@save);

        fn copy_with(&self, overrides: &$crate::params::ParamMap) -> $crate::Result<Self> {
            Ok(Self {
                uid: self.uid.clone(),
                params: overrides.apply(&self.uid, &self.params)?,
            })
        }
    };
    (transformer) => {
        $crate::registry::params_stage_methods!(@save);

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

/// [`PersistedStage`] for a stage whose whole state is `uid` + `params`: `$kind` is
/// `Transformer` or `Estimator`.
macro_rules! params_stage_persisted {
    ($ty:ident, $class:literal, $kind:ident) => {
        impl $crate::registry::PersistedStage for $ty {
            const CLASS: &'static str = $class;

            fn restore(
                saved: &$crate::persistence::SavedStage,
                _: &$crate::registry::StageRegistry,
            ) -> $crate::Result<Self> {
                Ok($ty {
                    uid: saved.uid.clone(),
                    params: saved.params()?,
                })
            }

            fn into_stage(self) -> $crate::registry::LoadedStage {
                $crate::registry::LoadedStage::$kind(std::sync::Arc::new(self))
            }
        }
    };
}
pub(crate) use params_stage_persisted;
