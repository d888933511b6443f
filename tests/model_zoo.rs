//! The model zoo: every architecture family against torchvision (small seeded configurations,
//! golden tensors made by `tests/fixtures/zoo/make_zoo_fixtures.py`), every full-size named model
//! built and loaded with a torchvision-named weight file, EfficientNet-Lite1/2 with their real
//! weights, DeepImagePredictor, featurizer output modes, users' own networks, and load errors.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use burn::module::Module;
use burn::prelude::*;
use burn::store::ModuleSnapshot;
use datafusion::arrow::array::{Array, AsArray, Float32Array};
use datafusion::arrow::datatypes::{DataType, Float16Type, Int32Type};
use datafusion::functions::core::expr_ext::FieldAccessor;
use deep_pipelines::image::{DecodeLimits, decode_rgb8};
use deep_pipelines::models::efficientnet::EfficientNetConfig;
use deep_pipelines::models::inception_v3::{self, InceptionV3Config};
use deep_pipelines::models::layers::{FoldBatchNorms, NameMap};
use deep_pipelines::models::mobilenet_v2::MobileNetV2Config;
use deep_pipelines::models::mobilenet_v3::MobileNetV3Config;
use deep_pipelines::models::resnet::{self, ResNetConfig};
use deep_pipelines::models::squeezenet::{self, SqueezeNetConfig};
use deep_pipelines::models::vgg::VggConfig;
use deep_pipelines::models::{
    ImageNetwork, LoadedModel, available_models, load_model, load_weights, manifest,
    register_network,
};
use deep_pipelines::prelude::*;
use deep_pipelines::preprocess::preprocess;
use deep_pipelines::{DeepImagePredictor, Error};
use safetensors::SafeTensors;
use safetensors::tensor::TensorView;

const ZOO: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/zoo");
const PHOTOS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/photos");

/// Every f32 tensor of a safetensors file, with its shape.
fn read_tensors(path: &str) -> BTreeMap<String, (Vec<usize>, Vec<f32>)> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{path}: {e}"));
    let tensors = SafeTensors::deserialize(&bytes).unwrap();
    tensors
        .tensors()
        .into_iter()
        .map(|(name, view)| {
            let values = view
                .data()
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect();
            (name, (view.shape().to_vec(), values))
        })
        .collect()
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "lengths differ");
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn values<const D: usize>(t: Tensor<D>) -> (Vec<usize>, Vec<f32>) {
    (
        t.dims().to_vec(),
        t.into_data().try_to_vec::<f32>().unwrap(),
    )
}

/// Loads `<case>.safetensors` (or `weights`) into `net` through the users' loader and compares
/// feature map, features and logits with torchvision's, within 1e-4: as loaded, and with the
/// BatchNorms folded into the convolutions (as the featurizer runs it).
fn parity<N: ImageNetwork + ModuleSnapshot + Module + FoldBatchNorms>(
    case: &str,
    net: N,
    names: &NameMap,
    weights: &str,
) {
    let net = load_weights(
        net,
        Path::new(&format!("{ZOO}/{weights}")),
        names,
        None,
        case,
    )
    .unwrap_or_else(|e| panic!("{case}: {e}"));
    let io = read_tensors(&format!("{ZOO}/{case}_io.safetensors"));
    compare(case, "as loaded", &net, &io);
    compare(case, "folded", &net.fold_batch_norms(), &io);
}

fn compare(
    case: &str,
    variant: &str,
    net: &impl ImageNetwork,
    io: &BTreeMap<String, (Vec<usize>, Vec<f32>)>,
) {
    let (shape, input) = &io["input"];
    let device = Device::flex();
    let x = Tensor::<4>::from_data(
        TensorData::new(input.clone(), [shape[0], shape[1], shape[2], shape[3]]),
        &device,
    );
    let map = net.feature_map(x);
    let outputs = [
        ("feature_map", values(map.clone())),
        ("features", values(net.features(map.clone()))),
        ("logits", values(net.logits(map).expect("has a head"))),
    ];
    for (name, (shape, got)) in outputs {
        let (want_shape, want) = &io[name];
        assert_eq!(&shape, want_shape, "{case} {name} shape");
        let diff = max_abs_diff(&got, want);
        let scale = want.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        println!(
            "{case:>20} {variant:<9} {name:<12} max |diff| {diff:.2e} (max |value| {scale:.2})"
        );
        assert!(
            diff <= 1e-4,
            "{case} {variant} {name}: max |diff| {diff:e} > 1e-4"
        );
    }
}

#[test]
fn resnet_basic_block_matches_torchvision() {
    let c = ResNetConfig::resnet18().narrow(8).with_num_classes(10);
    parity(
        "resnet_basic",
        c.init(&Device::flex()),
        &resnet::weight_names(),
        "resnet_basic.safetensors",
    );
}

#[test]
fn resnet_bottleneck_matches_torchvision() {
    let c = ResNetConfig::resnet50().narrow(8).with_num_classes(10);
    parity(
        "resnet_bottleneck",
        c.init(&Device::flex()),
        &resnet::weight_names(),
        "resnet_bottleneck.safetensors",
    );
}

#[test]
fn vgg16_matches_torchvision() {
    let c = VggConfig::vgg16(false).narrow(16).with_num_classes(10);
    parity(
        "vgg16",
        c.init(&Device::flex()),
        &c.weight_names(),
        "vgg16.safetensors",
    );
}

#[test]
fn vgg19_bn_matches_torchvision() {
    let c = VggConfig::vgg19(true).narrow(16).with_num_classes(10);
    parity(
        "vgg19_bn",
        c.init(&Device::flex()),
        &c.weight_names(),
        "vgg19_bn.safetensors",
    );
}

#[test]
fn squeezenet_matches_torchvision_from_safetensors_and_pth() {
    let c = SqueezeNetConfig::squeezenet1_1()
        .narrow(8)
        .with_num_classes(10);
    let names = squeezenet::weight_names();
    parity(
        "squeezenet1_1",
        c.init(&Device::flex()),
        &names,
        "squeezenet1_1.safetensors",
    );
    // The same weights from torch.save() checkpoints (zip and pre-1.6 legacy formats), read
    // without running pickle code.
    parity(
        "squeezenet1_1",
        c.init(&Device::flex()),
        &names,
        "squeezenet1_1_legacy.pth",
    );
    parity(
        "squeezenet1_1",
        c.init(&Device::flex()),
        &names,
        "squeezenet1_1.pth",
    );
}

/// A `.pth` is checked against an expected sha256 (or its first hex digits) before parsing.
#[test]
fn pytorch_checkpoint_hash_is_checked() {
    use sha2::{Digest, Sha256};
    let path = Path::new(ZOO).join("squeezenet1_1.pth");
    let digest = hex::encode(Sha256::digest(std::fs::read(&path).unwrap()));
    let c = SqueezeNetConfig::squeezenet1_1()
        .narrow(8)
        .with_num_classes(10);
    let names = squeezenet::weight_names();
    let load = |sha: &str| load_weights(c.init(&Device::flex()), &path, &names, Some(sha), "sq");
    assert!(load(&digest[..8]).is_ok());
    assert!(load(&digest).is_ok());
    let err = load("00000000").unwrap_err().to_string();
    assert!(err.contains(&digest) && err.contains("00000000"), "{err}");
}

#[test]
fn mobilenet_v2_matches_torchvision() {
    let c = MobileNetV2Config::mobilenet_v2()
        .with_width_mult(0.25)
        .with_num_classes(10);
    parity(
        "mobilenet_v2",
        c.init(&Device::flex()),
        &c.weight_names(),
        "mobilenet_v2.safetensors",
    );
}

#[test]
fn mobilenet_v3_large_and_small_match_torchvision() {
    for (case, c) in [
        ("mobilenet_v3_large", MobileNetV3Config::large()),
        ("mobilenet_v3_small", MobileNetV3Config::small()),
    ] {
        let c = c.with_width_mult(0.25).with_num_classes(10);
        if case == "mobilenet_v3_small" {
            // torch.save(model.state_dict()) as is: int64 num_batches_tracked buffers included.
            let file = "mobilenet_v3_small_full_state.pth";
            parity(case, c.init(&Device::flex()), &c.weight_names(), file);
        }
        parity(
            case,
            c.init(&Device::flex()),
            &c.weight_names(),
            &format!("{case}.safetensors"),
        );
    }
}

#[test]
fn efficientnet_b0_matches_torchvision() {
    let c = EfficientNetConfig::b0()
        .with_width_mult(0.25)
        .with_num_classes(10);
    parity(
        "efficientnet_b0",
        c.init(&Device::flex()),
        &c.weight_names(),
        "efficientnet_b0.safetensors",
    );
}

#[test]
fn inception_v3_matches_torchvision() {
    let c = InceptionV3Config::inception_v3()
        .narrow(8)
        .with_num_classes(10);
    parity(
        "inception_v3",
        c.init(&Device::flex()),
        &inception_v3::weight_names(),
        "inception_v3.safetensors",
    );
}

/// A deterministic uniform value in [-1, 1) (xorshift), so weight files need no rand crate.
struct Values(u64);

impl Values {
    fn next(&mut self) -> f32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
}

/// A safetensors file with torchvision's names and shapes (from `tensors/<folder>.txt`) and
/// random values scaled to keep activations finite through deep networks.
fn random_torchvision_weights(folder: &str, path: &Path) {
    let list = std::fs::read_to_string(format!("{ZOO}/tensors/{folder}.txt")).unwrap();
    let mut rng = Values(0x9E37_79B9_7F4A_7C15);
    let mut data: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    for line in list.lines() {
        let mut parts = line.split('\t');
        let name = parts.next().unwrap().to_string();
        let shape: Vec<usize> = serde_json::from_str(parts.next().unwrap()).unwrap();
        let n: usize = shape.iter().product();
        let fan_in: usize = shape.iter().skip(1).product::<usize>().max(1);
        let bound = (3.0 / fan_in as f32).sqrt();
        let value = |rng: &mut Values| -> f32 {
            if name.ends_with("running_var") {
                1.0
            } else if name.ends_with("running_mean") || name.ends_with("bias") {
                0.0
            } else if shape.len() == 1 {
                1.0 // BatchNorm weight
            } else {
                rng.next() * bound
            }
        };
        let bytes = (0..n).flat_map(|_| value(&mut rng).to_le_bytes()).collect();
        data.push((name, shape, bytes));
    }
    let views: Vec<(String, TensorView)> = data
        .iter()
        .map(|(name, shape, bytes)| {
            (
                name.clone(),
                TensorView::new(safetensors::Dtype::F32, shape.clone(), bytes).unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, path).unwrap();
}

/// Every full-size torchvision model: torchvision's names and shapes load into our module with
/// nothing missing or left over, and one image gives the output sizes the manifest promises.
#[test]
fn full_size_models_load_torchvision_names_and_give_manifest_dimensions() {
    let dir = tempfile::tempdir().unwrap();
    let device = Device::flex();
    let mut checked = Vec::new();
    for name in available_models() {
        let (manifest, _) = manifest(&name).unwrap();
        if manifest.architecture.starts_with("efficientnet_lite") {
            continue; // real weights are bundled: see the Lite tests
        }
        let weights = dir
            .path()
            .join(format!("{}.safetensors", manifest.architecture));
        random_torchvision_weights(&manifest.architecture, &weights);
        // The manifest names torchvision's file by the start of its sha256: random values fail it.
        let prefix = manifest
            .weights
            .sha256_prefix
            .clone()
            .expect("torchvision hash prefix");
        if name == "SqueezeNet1_1" {
            let err = LoadedModel::from_weights(manifest.clone(), &weights, dir.path(), &device)
                .unwrap_err()
                .to_string();
            assert!(err.contains(&prefix) && err.contains("sha256"), "{err}");
        }
        let mut manifest = manifest;
        manifest.weights.sha256_prefix = None;
        let model = LoadedModel::from_weights(manifest.clone(), &weights, dir.path(), &device)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        std::fs::remove_file(&weights).unwrap();
        let s = manifest.input_size as usize;
        let mut rng = Values(7);
        let input: Vec<f32> = (0..3 * s * s).map(|_| rng.next()).collect();
        let x = Tensor::<4>::from_data(TensorData::new(input, [1, 3, s, s]), &device);
        let map = model.network.feature_map(x);
        assert_eq!(map.dims()[1..], manifest.feature_map, "{name} feature map");
        let features = model.network.features(map.clone());
        assert_eq!(
            features.dims(),
            [1, manifest.feature_dim],
            "{name} features"
        );
        let logits = model.network.logits(map).unwrap();
        assert_eq!(logits.dims(), [1, manifest.num_classes], "{name} logits");
        let logits = logits.into_data().try_to_vec::<f32>().unwrap();
        assert!(
            logits.iter().all(|v| v.is_finite()),
            "{name}: non-finite logits"
        );
        checked.push(name);
    }
    println!("checked {}: {checked:?}", checked.len());
    assert_eq!(checked.len(), 15);
}

/// EfficientNet-Lite1/2 with their real (bundled) weights reproduce the PyTorch package's
/// features and logits on the two photos' preprocessed tensors.
#[test]
fn efficientnet_lite1_and_lite2_real_weights_match_pytorch() {
    for (name, file) in [
        ("EfficientNetLite1", "lite1_photos"),
        ("EfficientNetLite2", "lite2_photos"),
    ] {
        let model = load_model(name, "cpu").unwrap();
        let golden = read_tensors(&format!("{ZOO}/{file}.safetensors"));
        let (shape, input) = &golden["input"];
        assert_eq!(shape[2], model.manifest.input_size as usize);
        let features = model.features(input.clone(), 2).unwrap();
        let logits = model.logits(input.clone(), 2).unwrap();
        let f = max_abs_diff(&features, &golden["features"].1);
        let l = max_abs_diff(&logits, &golden["logits"].1);
        println!("{name}: max |diff| features {f:.2e}, logits {l:.2e}");
        assert!(
            f <= 1e-4 && l <= 1e-4,
            "{name}: features {f:e}, logits {l:e}"
        );
    }
}

/// (class, label) of each row's top-K, from a DeepImagePredictor output column.
fn decoded(
    batch: &datafusion::arrow::array::RecordBatch,
    column: &str,
) -> Vec<Vec<(i32, String, f32)>> {
    let list = batch.column_by_name(column).unwrap().as_list::<i32>();
    (0..list.len())
        .map(|row| {
            let entries = list.value(row);
            let entries = entries.as_struct();
            let class = entries.column(0).as_primitive::<Int32Type>();
            let label = entries.column(1).as_string::<i32>();
            let p = entries
                .column(2)
                .as_any()
                .downcast_ref::<Float32Array>()
                .unwrap();
            (0..entries.len())
                .map(|i| (class.value(i), label.value(i).to_string(), p.value(i)))
                .collect()
        })
        .collect()
}

#[tokio::test]
async fn predictor_gives_model_md_top5_with_imagenet_labels() {
    let ctx = SessionContext::new();
    let images = read_images(&ctx, PHOTOS, ReadImagesOptions::default()).unwrap();
    let predictor = DeepImagePredictor::new().with_model_name("EfficientNetLite0");
    let out = common::collect(
        predictor
            .transform(images)
            .unwrap()
            .sort_by(vec![col("image").field("origin")])
            .unwrap(),
    )
    .await;
    let rows = decoded(&out, "predicted_labels");
    let expect = [
        // MODEL.md, chelsea.png then coffee.png
        vec![
            (282, "tiger cat"),
            (285, "Egyptian cat"),
            (281, "tabby"),
            (287, "lynx"),
            (904, "window screen"),
        ],
        vec![
            (967, "espresso"),
            (968, "cup"),
            (925, "consomme"),
            (960, "chocolate sauce"),
            (504, "coffee mug"),
        ],
    ];
    for (row, want) in rows.iter().zip(expect) {
        let got: Vec<(i32, &str)> = row.iter().map(|(c, l, _)| (*c, l.as_str())).collect();
        assert_eq!(got, want);
        let p: Vec<f32> = row.iter().map(|r| r.2).collect();
        assert!(p.windows(2).all(|w| w[0] >= w[1]), "sorted: {p:?}");
        assert!(p[0] > 0.0 && p.iter().sum::<f32>() <= 1.0 + 1e-6);
    }
    println!("{rows:?}");

    // The same predictor as a SQL function.
    let model = PipelineModel::new("top", vec![Arc::new(predictor)]);
    register_model(&ctx, "top5", &model).unwrap();
    register_images_table(&ctx, "photos", PHOTOS, ReadImagesOptions::default()).unwrap();
    let sql = "SELECT top5(image) AS p FROM photos ORDER BY image.origin";
    let out = common::collect(ctx.sql(sql).await.unwrap()).await;
    let from_sql = decoded(&out, "p");
    assert_eq!(from_sql, rows);
}

#[tokio::test]
async fn predictor_probabilities_without_decoding_and_survives_save_load() {
    let ctx = SessionContext::new();
    let images = read_images(&ctx, PHOTOS, ReadImagesOptions::default()).unwrap();
    let predictor = DeepImagePredictor::new()
        .with_decode_predictions(false)
        .with_output_col("p");
    let dir = tempfile::tempdir().unwrap();
    let model = PipelineModel::new("p", vec![Arc::new(predictor.clone())]);
    model.save(dir.path().join("m")).unwrap();
    let loaded = PipelineModel::load(dir.path().join("m")).unwrap();
    let a = common::collect(predictor.transform(images.clone()).unwrap()).await;
    let b = common::collect(loaded.transform(images).unwrap()).await;
    let (a, b) = (
        a.column_by_name("p").unwrap(),
        b.column_by_name("p").unwrap(),
    );
    assert_eq!(
        a.data_type(),
        &DataType::FixedSizeList(
            Arc::new(datafusion::arrow::datatypes::Field::new(
                "item",
                DataType::Float32,
                true
            )),
            1000,
        )
    );
    assert_eq!(a.as_ref(), b.as_ref());
    let first = a.as_fixed_size_list().value(0);
    let p = first.as_any().downcast_ref::<Float32Array>().unwrap();
    assert!((p.values().iter().sum::<f32>() - 1.0).abs() < 1e-4);
}

#[tokio::test]
async fn featurizer_flattened_and_float16_outputs() {
    let ctx = SessionContext::new();
    let images = read_images(&ctx, PHOTOS, ReadImagesOptions::default()).unwrap();
    let pooled = DeepImageFeaturizer::new().with_output_col("f32");
    let half = DeepImageFeaturizer::new()
        .with_output_col("f16")
        .with_output_type("float16");
    let flat = DeepImageFeaturizer::new()
        .with_output_col("map")
        .with_feature_mode("flattened");
    let df = flat
        .transform(half.transform(pooled.transform(images).unwrap()).unwrap())
        .unwrap();
    let out = common::collect(df).await;
    let f32s = out
        .column_by_name("f32")
        .unwrap()
        .as_fixed_size_list()
        .value(0);
    let f32s = f32s.as_any().downcast_ref::<Float32Array>().unwrap();
    let f16s = out
        .column_by_name("f16")
        .unwrap()
        .as_fixed_size_list()
        .value(0);
    let f16s = f16s.as_primitive::<Float16Type>();
    assert_eq!(f16s.len(), 1280);
    for (a, b) in f32s.values().iter().zip(f16s.values()) {
        assert!(
            (a - b.to_f32()).abs() <= 1e-3 * a.abs().max(1.0),
            "{a} vs {b}"
        );
    }
    let map = out.column_by_name("map").unwrap().as_fixed_size_list();
    assert_eq!(map.value_length(), 1280 * 7 * 7);
    // The pooled vector is the mean of the map over its 7x7 positions.
    let map0 = map.value(0);
    let map0 = map0.as_any().downcast_ref::<Float32Array>().unwrap();
    let c5: f32 = map0.values()[5 * 49..6 * 49].iter().sum::<f32>() / 49.0;
    assert!((c5 - f32s.value(5)).abs() < 1e-4);

    // float16 features feed a logistic regression like float32 ones.
    let ctx = SessionContext::new();
    let images = read_images(&ctx, PHOTOS, ReadImagesOptions::default()).unwrap();
    let coffee = col("image").field("origin").like(lit("%coffee%"));
    let labelled = half
        .transform(images)
        .unwrap()
        .with_column(
            "labelIndex",
            datafusion::prelude::when(coffee, lit(1.0))
                .otherwise(lit(0.0))
                .unwrap(),
        )
        .unwrap();
    let lr = LogisticRegression::new()
        .with_features_col("f16")
        .with_label_col("labelIndex")
        .fit(&labelled)
        .await
        .unwrap();
    assert_eq!(lr.num_features(), 1280);
}

/// A user's own burn module: per-channel mean colour, and "logits" that favour the brightest.
#[derive(Module, Debug)]
struct MeanColour {
    scale: burn::module::Param<Tensor<1>>,
}

impl ImageNetwork for MeanColour {
    fn feature_map(&self, input: Tensor<4>) -> Tensor<4> {
        let [n, c, _, _] = input.dims();
        input.mean_dim(3).mean_dim(2).reshape([n, c, 1, 1])
    }

    fn logits(&self, map: Tensor<4>) -> Option<Tensor<2>> {
        let [n, c, _, _] = map.dims();
        Some(map.reshape([n, c]) * self.scale.val().unsqueeze())
    }
}

#[tokio::test]
async fn users_own_network_works_in_featurizer_predictor_and_sql() {
    let device = Device::flex();
    let (mut m, _) = manifest("EfficientNetLite0").unwrap();
    m.name = "MeanColour".into();
    m.architecture = "custom".into();
    m.feature_dim = 3;
    m.feature_map = [3, 1, 1];
    m.num_classes = 3;
    m.labels = None;
    let net = MeanColour {
        scale: burn::module::Param::from_tensor(Tensor::from_data([1.0f32, 1.0, 1.0], &device)),
    };
    register_network(m.clone(), Arc::new(net), &device).unwrap();
    assert!(available_models().contains(&"MeanColour".to_string()));

    let ctx = SessionContext::new();
    let images = read_images(&ctx, PHOTOS, ReadImagesOptions::default()).unwrap();
    let featurizer = DeepImageFeaturizer::new().with_model_name("MeanColour");
    let predictor = DeepImagePredictor::new()
        .with_model_name("MeanColour")
        .with_top_k(1);
    let out = common::collect(
        predictor
            .transform(featurizer.transform(images.clone()).unwrap())
            .unwrap(),
    )
    .await;
    let features = out.column_by_name("features").unwrap().as_fixed_size_list();
    assert_eq!(features.value_length(), 3);
    // Row 0 against the manifest's preprocessing done here: mean of the normalised crop.
    let origin = out
        .column_by_name("image")
        .unwrap()
        .as_struct()
        .column(0)
        .as_string::<i32>()
        .value(0)
        .to_string();
    let path = origin.trim_start_matches("file://");
    let bytes = std::fs::read(path).unwrap();
    let rgb = decode_rgb8(&bytes, path, &DecodeLimits::default()).unwrap();
    let input = preprocess(&rgb, &m).unwrap();
    let plane = input.len() / 3;
    let f0 = features.value(0);
    let f0 = f0.as_any().downcast_ref::<Float32Array>().unwrap();
    for c in 0..3 {
        let mean = input[c * plane..(c + 1) * plane]
            .iter()
            .map(|&v| v as f64)
            .sum::<f64>()
            / plane as f64;
        assert!(
            (mean as f32 - f0.value(c)).abs() < 1e-4,
            "channel {c}: {mean} vs {}",
            f0.value(c)
        );
    }
    let top = decoded(&out, "predicted_labels");
    for (row, entries) in top.iter().enumerate() {
        let f = features.value(row);
        let f = f.as_any().downcast_ref::<Float32Array>().unwrap();
        let brightest = (0..3)
            .max_by(|&a, &b| f.value(a).total_cmp(&f.value(b)))
            .unwrap();
        assert_eq!(entries.len(), 1);
        assert_eq!(entries[0].0 as usize, brightest);
    }

    // A manifest that preprocessing could not honour is refused when registered.
    let mut bad = m.clone();
    bad.name = "ZeroStd".into();
    bad.preprocess.std = [128.0, 0.0, 128.0];
    let err = register_network(
        bad,
        Arc::new(MeanColour {
            scale: burn::module::Param::from_tensor(Tensor::from_data([1.0f32; 3], &device)),
        }),
        &device,
    )
    .unwrap_err();
    assert!(err.to_string().contains("std"), "{err}");

    // Registering over a built-in name is refused.
    let mut clash = m;
    clash.name = "ResNet50".into();
    let err = register_network(
        clash,
        Arc::new(MeanColour {
            scale: burn::module::Param::from_tensor(Tensor::from_data([1.0f32, 1.0, 1.0], &device)),
        }),
        &device,
    )
    .unwrap_err();
    assert!(err.to_string().contains("built-in"), "{err}");
}

#[test]
fn missing_weight_file_says_which_file_where_to_get_it_and_where_to_put_it() {
    // A model folder without a manifest: the bundled one describes the weights expected there.
    let dir = tempfile::tempdir().unwrap();
    let err = LoadedModel::load_from("ResNet50", Some(dir.path()), &Device::flex()).unwrap_err();
    let msg = err.to_string();
    println!("{msg}");
    let expected_path = dir.path().join("resnet50/resnet50-0676ba61.pth");
    assert!(msg.contains(&expected_path.display().to_string()), "{msg}");
    assert!(
        msg.contains("https://download.pytorch.org/models/resnet50-0676ba61.pth"),
        "{msg}"
    );
    assert!(msg.contains("DEEP_PIPELINES_MODEL_DIR"), "{msg}");
    // The same through the featurizer's modelDir param, at transform time.
    let ctx = SessionContext::new();
    let images = read_images(&ctx, PHOTOS, ReadImagesOptions::default()).unwrap();
    let err = DeepImageFeaturizer::new()
        .with_model_name("ResNet50")
        .with_model_dir(dir.path().display().to_string())
        .transform(images)
        .unwrap_err();
    assert!(err.to_string().contains("resnet50-0676ba61.pth"), "{err}");
}

/// Random torchvision-named weights for `folder` with tensor `name` given `shape` instead.
fn weights_with_wrong_shape(
    dir: &Path,
    folder: &str,
    name: &str,
    shape: Vec<usize>,
) -> std::path::PathBuf {
    let path = dir.join(format!("{folder}.safetensors"));
    random_torchvision_weights(folder, &path);
    let bytes = std::fs::read(&path).unwrap();
    let tensors = SafeTensors::deserialize(&bytes).unwrap();
    let zeros = vec![0u8; shape.iter().product::<usize>() * 4];
    let views: Vec<(String, TensorView)> = tensors
        .tensors()
        .into_iter()
        .map(|(n, view)| {
            if n == name {
                let wrong = TensorView::new(safetensors::Dtype::F32, shape.clone(), &zeros);
                (n, wrong.unwrap())
            } else {
                (n, view)
            }
        })
        .collect();
    let bad = dir.join(format!("{folder}_bad.safetensors"));
    safetensors::serialize_to_file(views, None, &bad).unwrap();
    bad
}

#[test]
fn wrong_tensor_shape_names_the_tensor() {
    let dir = tempfile::tempdir().unwrap();
    // fc.weight as [10, 512]: a checkpoint for another head.
    let bad = weights_with_wrong_shape(dir.path(), "resnet18", "fc.weight", vec![10, 512]);
    let net = ResNetConfig::resnet18().init(&Device::flex());
    let err = load_weights(net, &bad, &resnet::weight_names(), None, "ResNet18").unwrap_err();
    let msg = err.to_string();
    println!("{msg}");
    assert!(
        msg.contains("fc.weight") && msg.contains("[512, 1000]"),
        "{msg}"
    );
    assert!(matches!(err, Error::Model { .. }));

    // A renamed layer is reported by the checkpoint's name (and the module path).
    let name = "features.1.conv.1.weight";
    let bad = weights_with_wrong_shape(dir.path(), "mobilenet_v2", name, vec![16, 32, 3, 3]);
    let c = MobileNetV2Config::mobilenet_v2();
    let msg = load_weights(
        c.init(&Device::flex()),
        &bad,
        &c.weight_names(),
        None,
        "MobileNetV2",
    )
    .unwrap_err()
    .to_string();
    println!("{msg}");
    assert!(
        msg.contains(&format!(
            "`{name}` (module path `body.blocks.0.project.conv.weight`)"
        )),
        "{msg}"
    );
    assert!(
        msg.contains("[16, 32, 3, 3]") && msg.contains("[16, 32, 1, 1]"),
        "{msg}"
    );
}

#[test]
fn unknown_model_name_lists_the_available_ones() {
    let err = manifest("ResNet51").unwrap_err().to_string();
    assert!(
        err.contains("ResNet51") && err.contains("ResNet50") && err.contains("InceptionV3"),
        "{err}"
    );
    let err = DeepImageFeaturizer::new()
        .with_model_name("ResNet51")
        .params()
        .validate()
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("modelName") && err.contains("VGG19BN"),
        "{err}"
    );
    let err = DeepImagePredictor::new()
        .with_model_name("resnet50")
        .params()
        .validate()
        .unwrap_err()
        .to_string();
    assert!(err.contains("ResNet50"), "{err}");
}
