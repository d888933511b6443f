//! The frozen trunk of a fine-tuning fit and its activation cache: [`TrunkCache`] holds, per
//! model and cut, a [`Trunk`] (the CPU plan below the trained blocks) and the activations at
//! the cut of every image it has run, keyed by a hash of the image's network input. A
//! `DeepImageClassifier` and its tuning copies share one cache, so an image goes through the
//! trunk once however many folds and param maps fit on it. The cache holds every training
//! image's activations (e.g. 2 x 37 KiB per image for EfficientNet-Lite0 with 2 trained blocks
//! and mirror images): memory for the training set, like Spark's `cache()` of features.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use datafusion::arrow::array::{ArrayRef, FixedSizeListArray, Float32Array, UInt64Array};
use datafusion::arrow::buffer::NullBuffer;
use datafusion::arrow::datatypes::{DataType, Field, FieldRef};

use crate::error::{Error, Result};
use crate::models::cpu::{Nhwc, Plan};
use crate::models::inverted_residual::InvertedResidualNet;
use crate::models::{LoadedModel, load_trainable, model_error};
use crate::network_stage::NetworkOutput;

/// Which trunk: model, model folder, cut and views (preprocessing needs no place here: the key
/// of an image within a trunk is its network input).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct TrunkKey {
    pub model_name: String,
    pub model_dir: String,
    /// The cut: how many of the network's last blocks train above the trunk.
    pub trainable_blocks: usize,
    /// 2 with mirror images, else 1.
    pub views: usize,
}

/// The frozen trunks an estimator (and its copies) has run, each with its cached activations.
#[derive(Debug, Clone, Default)]
pub(crate) struct TrunkCache(Arc<Mutex<HashMap<TrunkKey, Arc<Trunk>>>>);

impl TrunkCache {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<TrunkKey, Arc<Trunk>>> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The trunk for `key`, loaded on first use.
    pub(crate) fn get(&self, key: TrunkKey) -> Result<Arc<Trunk>> {
        if let Some(trunk) = self.lock().get(&key) {
            return Ok(Arc::clone(trunk));
        }
        let p = &key;
        let dir = (!p.model_dir.is_empty()).then(|| Path::new(&p.model_dir));
        let (manifest, network) = load_trainable(&p.model_name, dir)?;
        if p.trainable_blocks > network.trainable_blocks() {
            return Err(too_many_blocks(&p.model_name, &network, p.trainable_blocks));
        }
        let plan = network.trunk_plan(p.trainable_blocks).ok_or_else(|| {
            model_error(
                &p.model_name,
                "the frozen trunk has a layer the CPU plan cannot run",
            )
        })?;
        let size = manifest.input_size as usize;
        let probe = plan
            .run_nchw(&vec![0.0; 3 * size * size], [1, 3, size, size])
            .map_err(|e| model_error(&p.model_name, e))?;
        let dims = if p.trainable_blocks == 0 {
            [probe.channels, 1, 1]
        } else {
            [probe.channels, probe.height, probe.width]
        };
        let trunk = Arc::new(Trunk {
            network: Arc::new(network),
            plan,
            input_size: size,
            dims,
            views: key.views,
            pooled: p.trainable_blocks == 0,
            cached: Mutex::default(),
            images: AtomicU64::new(0),
        });
        Ok(Arc::clone(self.lock().entry(key).or_insert(trunk)))
    }

    pub(crate) fn images(&self) -> u64 {
        self.lock()
            .values()
            .map(|t| t.images.load(Ordering::Relaxed))
            .sum()
    }

    pub(crate) fn bytes(&self) -> usize {
        self.lock().values().map(|t| t.bytes()).sum()
    }

    pub(crate) fn clear(&self) {
        self.lock().clear();
    }
}

/// The error for a cut above the network's top: says how many blocks it has.
pub(crate) fn too_many_blocks(model: &str, network: &InvertedResidualNet, blocks: usize) -> Error {
    Error::param(
        "DeepImageClassifier",
        "trainableBlocks",
        format!(
            "{model} has {} trainable blocks ({} inverted residuals and the head conv); got {blocks}",
            network.trainable_blocks(),
            network.trainable_blocks() - 1,
        ),
    )
}

/// One frozen trunk: its plan, and the activations at its cut of every image it has run,
/// keyed by a 64-bit hash of the image's network input.
#[derive(Debug)]
pub(crate) struct Trunk {
    /// The whole folded network the trunk was cut from (the fit takes its top from it).
    pub(crate) network: Arc<InvertedResidualNet>,
    plan: Plan,
    input_size: usize,
    /// One view's activations `[C, h, w]` (`[C, 1, 1]`: pooled, when nothing but the
    /// classifier trains).
    pub(crate) dims: [usize; 3],
    pub(crate) views: usize,
    pooled: bool,
    cached: Mutex<HashMap<u64, Arc<[f32]>>>,
    /// Images run through the trunk (each view counted once per image).
    images: AtomicU64,
}

impl Trunk {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<[f32]>>> {
        self.cached
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub(crate) fn activations(&self, key: u64) -> Option<Arc<[f32]>> {
        self.lock().get(&key).cloned()
    }

    fn bytes(&self) -> usize {
        self.lock().values().map(|v| v.len() * 4).sum()
    }

    /// Values of one row: every view's `[C, h, w]` activations.
    pub(crate) fn row_len(&self) -> usize {
        self.views * self.dims.iter().product::<usize>()
    }

    /// The activations at the cut of the images `picks` of `inputs` (network inputs,
    /// `[batch, 3, S, S]`), one row ([`Self::row_len`] values, the views in turn) per pick.
    fn run(&self, inputs: &[f32], picks: &[usize], model: &str) -> Result<Vec<f32>> {
        let len = 3 * self.input_size * self.input_size;
        let mut x = Vec::with_capacity(picks.len() * self.views * len);
        for view in 0..self.views {
            for &i in picks {
                let image = &inputs[i * len..][..len];
                if view == 0 {
                    x.extend_from_slice(image);
                } else {
                    extend_mirrored(&mut x, image, self.input_size);
                }
            }
        }
        let n = picks.len() * self.views;
        let size = self.input_size;
        let out = self
            .plan
            .run_nchw(&x, [n, 3, size, size])
            .map_err(|e| model_error(model, format!("the frozen trunk refused a batch: {e}")))?;
        let per_view: usize = self.dims.iter().product();
        let maps = if self.pooled {
            pooled(&out)
        } else {
            out.to_nchw()
        };
        self.images.fetch_add(n as u64, Ordering::Relaxed);
        let mut rows = Vec::with_capacity(maps.len());
        for m in 0..picks.len() {
            for view in 0..self.views {
                let at = (view * picks.len() + m) * per_view;
                rows.extend_from_slice(&maps[at..at + per_view]);
            }
        }
        Ok(rows)
    }

    /// Cache keys of `batch` network inputs, running the trunk on those not cached yet.
    fn keys(&self, inputs: &[f32], batch: usize, model: &str) -> Result<Vec<u64>> {
        let len = 3 * self.input_size * self.input_size;
        let keys: Vec<u64> = inputs.chunks(len).map(input_key).collect();
        let missing: Vec<usize> = {
            let cached = self.lock();
            let mut seen = std::collections::HashSet::new();
            (0..batch)
                .filter(|&i| !cached.contains_key(&keys[i]) && seen.insert(keys[i]))
                .collect()
        };
        if missing.is_empty() {
            return Ok(keys);
        }
        let rows = self.run(inputs, &missing, model)?;
        let mut cached = self.lock();
        for (row, &i) in rows.chunks(self.row_len()).zip(&missing) {
            cached.insert(keys[i], row.into());
        }
        Ok(keys)
    }
}

/// Channel means of an NHWC batch, `[batch, channels]`.
fn pooled(x: &Nhwc) -> Vec<f32> {
    let plane = x.height * x.width;
    let mut out = vec![0.0f32; x.batch * x.channels];
    for (b, image) in x.data.chunks(plane * x.channels).enumerate() {
        let sums = &mut out[b * x.channels..][..x.channels];
        for pixel in image.chunks(x.channels) {
            for (s, v) in sums.iter_mut().zip(pixel) {
                *s += v;
            }
        }
        for s in sums.iter_mut() {
            *s /= plane as f32;
        }
    }
    out
}

/// Appends the left-right mirror of an NCHW image (`3 x size x size`).
fn extend_mirrored(out: &mut Vec<f32>, image: &[f32], size: usize) {
    for row in image.chunks(size) {
        out.extend(row.iter().rev());
    }
}

/// A 64-bit hash of a network input's bits (SipHash with fixed keys: stable within a process).
fn input_key(input: &[f32]) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    for pair in input.chunks(2) {
        let hi = pair[0].to_bits() as u64;
        let lo = pair.get(1).map_or(0, |v| v.to_bits() as u64);
        h.write_u64(hi << 32 | lo);
    }
    h.finish()
}

/// What a pass of the frozen trunk gives per image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum TrunkPass {
    /// The cache key (the activations stay in the [`Trunk`]): the key's 64 bits travel as two
    /// f32 bit patterns through the network stage's value buffer (copied, never computed on)
    /// and come out as a `UInt64` column.
    CacheKey,
    /// The activations themselves (a `FixedSizeList<Float32>` of [`Trunk::row_len`]), nothing
    /// cached: what a distributed fit's executors send to where the top trains.
    Activations,
}

/// The frozen trunk as a network stage's output.
#[derive(Debug)]
pub(crate) struct TrunkOutput(pub(crate) Arc<Trunk>, pub(crate) TrunkPass);

impl PartialEq for TrunkOutput {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0) && self.1 == other.1
    }
}

impl Eq for TrunkOutput {}

impl Hash for TrunkOutput {
    fn hash<H: Hasher>(&self, state: &mut H) {
        Arc::as_ptr(&self.0).hash(state);
        self.1.hash(state);
    }
}

impl TrunkOutput {
    fn item() -> FieldRef {
        Arc::new(Field::new("item", DataType::Float32, true))
    }
}

impl NetworkOutput for TrunkOutput {
    const VERB: &'static str = "trunk";

    fn width(&self, _: &LoadedModel) -> usize {
        match self.1 {
            TrunkPass::CacheKey => 2,
            TrunkPass::Activations => self.0.row_len(),
        }
    }

    fn forward(&self, model: &LoadedModel, inputs: Vec<f32>, batch: usize) -> Result<Vec<f32>> {
        let name = &model.manifest.name;
        match self.1 {
            TrunkPass::Activations => self.0.run(&inputs, &(0..batch).collect::<Vec<_>>(), name),
            TrunkPass::CacheKey => {
                let keys = self.0.keys(&inputs, batch, name)?;
                Ok(keys
                    .iter()
                    .flat_map(|k| [f32::from_bits((k >> 32) as u32), f32::from_bits(*k as u32)])
                    .collect())
            }
        }
    }

    fn data_type(&self, model: &LoadedModel) -> DataType {
        match self.1 {
            TrunkPass::CacheKey => DataType::UInt64,
            TrunkPass::Activations => {
                DataType::FixedSizeList(Self::item(), self.width(model) as i32)
            }
        }
    }

    fn build(&self, model: &LoadedModel, values: Vec<f32>, valid: Vec<bool>) -> Result<ArrayRef> {
        let valid = Some(NullBuffer::from(valid));
        Ok(match self.1 {
            TrunkPass::CacheKey => {
                let keys: Vec<u64> = values
                    .chunks(2)
                    .map(|p| (p[0].to_bits() as u64) << 32 | p[1].to_bits() as u64)
                    .collect();
                Arc::new(UInt64Array::new(keys.into(), valid))
            }
            TrunkPass::Activations => Arc::new(FixedSizeListArray::try_new(
                Self::item(),
                self.width(model) as i32,
                Arc::new(Float32Array::from(values)),
                valid,
            )?),
        })
    }
}
