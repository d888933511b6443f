//! The model zoo: every architecture family against torchvision (small seeded configurations,
//! golden tensors made by `tests/fixtures/zoo/make_zoo_fixtures.py`), every full-size named model
//! built and loaded with a torchvision-named weight file, EfficientNet-Lite1/2 with their real
//! weights, DeepImagePredictor, featurizer output modes, users' own networks, and load errors.

use crate::common;

use common::{max_abs_diff, read_tensors};

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
use deep_pipelines::models::cpu::{CpuPlan, Precision};
use deep_pipelines::models::efficientnet::EfficientNetConfig;
use deep_pipelines::models::inception_v3::InceptionV3Config;
use deep_pipelines::models::layers::{FoldBatchNorms, NameMap};
use deep_pipelines::models::mobilenet_v2::MobileNetV2Config;
use deep_pipelines::models::mobilenet_v3::MobileNetV3Config;
use deep_pipelines::models::resnet::ResNetConfig;
use deep_pipelines::models::squeezenet::SqueezeNetConfig;
use deep_pipelines::models::vgg::VggConfig;
use deep_pipelines::models::{
    Architecture, ImageNetwork, LoadedModel, available_models, load_model, load_weights, manifest,
    register_network,
};
use deep_pipelines::prelude::*;
use deep_pipelines::preprocess::preprocess;
use deep_pipelines::{DeepImagePredictor, Error};
use safetensors::SafeTensors;
use safetensors::tensor::TensorView;

const ZOO: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/zoo");
const PHOTOS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/photos");

fn values<const D: usize>(t: Tensor<D>) -> (Vec<usize>, Vec<f32>) {
    (
        t.dims().to_vec(),
        t.into_data().try_to_vec::<f32>().unwrap(),
    )
}

/// Loads `<case>.safetensors` (or `weights`) into `net` through the users' loader and compares
/// feature map, features and logits with torchvision's, within 1e-4: as loaded, with the
/// BatchNorms folded into the convolutions, and through the folded network's CPU plan (the
/// NHWC path the featurizer runs on the CPU).
fn parity<N: ImageNetwork + ModuleSnapshot + Module + FoldBatchNorms + CpuPlan>(
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
    compare(case, "as loaded", &net, &io, F32, |x| net.feature_map(x));
    let folded = net.fold_batch_norms();
    compare(case, "folded", &folded, &io, F32, |x| folded.feature_map(x));
    let plan = folded
        .cpu_plan()
        .unwrap_or_else(|| panic!("{case}: no CPU plan"));
    compare(case, "cpu plan", &folded, &io, F32, |x| {
        plan.feature_map(&x)
            .unwrap_or_else(|e| panic!("{case}: plan: {e}"))
    });
    let bf16 = plan.clone().in_precision(Precision::Bf16);
    compare(case, "bf16 plan", &folded, &io, BF16, |x| {
        bf16.feature_map(&x)
            .unwrap_or_else(|e| panic!("{case}: bf16 plan: {e}"))
    });
}

/// How far an output may be from torchvision's.
#[derive(Clone, Copy)]
enum Tolerance {
    Absolute(f32),
    /// Times the output's largest magnitude.
    Relative(f32),
}

/// `f32` paths.
const F32: Tolerance = Tolerance::Absolute(1e-4);
/// The bfloat16 plan: its weights and activations keep 8 significant bits into every GEMM
/// (the sums stay `f32`).
const BF16: Tolerance = Tolerance::Relative(3e-2);

/// Compares the feature map `map_of` makes, and `net`'s features and logits from it, within
/// `tolerance`.
fn compare(
    case: &str,
    variant: &str,
    net: &impl ImageNetwork,
    io: &BTreeMap<String, (Vec<usize>, Vec<f32>)>,
    tolerance: Tolerance,
    map_of: impl Fn(Tensor<4>) -> Tensor<4>,
) {
    let (shape, input) = &io["input"];
    let device = Device::flex();
    let x = Tensor::<4>::from_data(
        TensorData::new(input.clone(), [shape[0], shape[1], shape[2], shape[3]]),
        &device,
    );
    let map = map_of(x);
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
        let bound = match tolerance {
            Tolerance::Absolute(bound) => bound,
            Tolerance::Relative(fraction) => fraction * scale,
        };
        println!(
            "{case:>20} {variant:<9} {name:<12} max |diff| {diff:.2e} (max |value| {scale:.2}, relative {:.2e})",
            diff / scale
        );
        assert!(
            diff <= bound,
            "{case} {variant} {name}: max |diff| {diff:e} > {bound:e}"
        );
    }
}

#[test]
fn resnet_basic_block_matches_torchvision() {
    let c = ResNetConfig::resnet18().narrow(8).with_num_classes(10);
    parity(
        "resnet_basic",
        c.init(&Device::flex()),
        &c.weight_names(),
        "resnet_basic.safetensors",
    );
}

#[test]
fn resnet_bottleneck_matches_torchvision() {
    let c = ResNetConfig::resnet50().narrow(8).with_num_classes(10);
    parity(
        "resnet_bottleneck",
        c.init(&Device::flex()),
        &c.weight_names(),
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
    let names = c.weight_names();
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
    let names = c.weight_names();
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
        &c.weight_names(),
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

/// The built-in full-size torchvision models, `(modelName, torchvision name)`: a fixed list, not
/// `available_models()`, which other tests in this binary extend with users' networks.
const FULL_SIZE_MODELS: [(&str, &str); 15] = [
    ("ResNet18", "resnet18"),
    ("ResNet34", "resnet34"),
    ("ResNet50", "resnet50"),
    ("ResNet101", "resnet101"),
    ("ResNet152", "resnet152"),
    ("MobileNetV2", "mobilenet_v2"),
    ("MobileNetV3Large", "mobilenet_v3_large"),
    ("MobileNetV3Small", "mobilenet_v3_small"),
    ("SqueezeNet1_1", "squeezenet1_1"),
    ("EfficientNetB0", "efficientnet_b0"),
    ("InceptionV3", "inception_v3"),
    ("VGG16", "vgg16"),
    ("VGG16BN", "vgg16_bn"),
    ("VGG19", "vgg19"),
    ("VGG19BN", "vgg19_bn"),
];

/// torchvision's output shapes of one full-size model (`tensors/shapes.json`, written by
/// `make_shapes.py` from torchvision's own models): input size, feature map `[C, h, w]`, pooled
/// feature vector length, number of logits.
struct TorchvisionShapes {
    input_size: usize,
    feature_map: [usize; 3],
    features: usize,
    logits: usize,
}

fn torchvision_shapes() -> BTreeMap<String, TorchvisionShapes> {
    let text = std::fs::read_to_string(format!("{ZOO}/tensors/shapes.json")).unwrap();
    let json: serde_json::Value = serde_json::from_str(&text).unwrap();
    let size = |v: &serde_json::Value| v.as_u64().expect("a size") as usize;
    json["models"]
        .as_object()
        .expect("models")
        .iter()
        .map(|(name, m)| {
            let map: Vec<usize> = m["feature_map"]
                .as_array()
                .unwrap()
                .iter()
                .map(size)
                .collect();
            let shapes = TorchvisionShapes {
                input_size: size(&m["input_size"]),
                feature_map: map.try_into().expect("[C, h, w]"),
                features: size(&m["features"]),
                logits: size(&m["logits"]),
            };
            (name.clone(), shapes)
        })
        .collect()
}

/// Every full-size torchvision model: torchvision's names and shapes load into our module with
/// nothing missing or left over, and one image gives the output shapes torchvision's own model
/// gives (feature map, features, logits, from `tensors/shapes.json`); the manifest states the same.
#[test]
fn full_size_models_load_torchvision_names_and_give_manifest_dimensions() {
    let dir = tempfile::tempdir().unwrap();
    let device = Device::flex();
    let expected = torchvision_shapes();
    let listed: Vec<&str> = FULL_SIZE_MODELS.iter().map(|m| m.1).collect();
    assert_eq!(
        expected.keys().map(String::as_str).collect::<Vec<_>>(),
        {
            let mut sorted = listed.clone();
            sorted.sort();
            sorted
        },
        "shapes.json covers exactly the built-in full-size models"
    );
    let available = available_models();
    let mut checked = Vec::new();
    for (name, torchvision) in FULL_SIZE_MODELS {
        assert!(available.iter().any(|a| a == name), "{name} is built in");
        let want = &expected[torchvision];
        let (manifest, _) = manifest(name).unwrap();
        assert_eq!(manifest.architecture, torchvision, "{name} architecture");
        // The manifest's promises are torchvision's shapes.
        assert_eq!(
            manifest.input_size as usize, want.input_size,
            "{name} manifest input_size"
        );
        assert_eq!(
            manifest.feature_map, want.feature_map,
            "{name} manifest feature_map"
        );
        assert_eq!(
            manifest.feature_dim, want.features,
            "{name} manifest feature_dim"
        );
        assert_eq!(
            manifest.num_classes, want.logits,
            "{name} manifest num_classes"
        );
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
        let s = want.input_size;
        let mut rng = Values(7);
        let input: Vec<f32> = (0..3 * s * s).map(|_| rng.next()).collect();
        let x = Tensor::<4>::from_data(TensorData::new(input, [1, 3, s, s]), &device);
        let network = model.network().unwrap();
        let map = network.feature_map(x);
        assert_eq!(map.dims()[0], 1, "{name} batch");
        assert_eq!(map.dims()[1..], want.feature_map, "{name} feature map");
        let features = network.features(map.clone());
        assert_eq!(features.dims(), [1, want.features], "{name} features");
        let logits = network.logits(map).unwrap();
        assert_eq!(logits.dims(), [1, want.logits], "{name} logits");
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
    assert_eq!(rows.len(), 2, "one row per photo");
    for (row, want) in rows.iter().zip(expect) {
        let got: Vec<(i32, &str)> = row.iter().map(|(c, l, _)| (*c, l.as_str())).collect();
        assert_eq!(got, want);
        let p: Vec<f32> = row.iter().map(|r| r.2).collect();
        assert!(p.windows(2).all(|w| w[0] >= w[1]), "sorted: {p:?}");
        assert!(p[0] > 0.0 && p.iter().sum::<f32>() <= 1.0 + 1e-6);
    }
    println!("{rows:?}");
    // chelsea.png: the probabilities README states, to its three decimals.
    let chelsea: Vec<f32> = rows[0].iter().map(|r| r.2).collect();
    for (got, readme) in chelsea.iter().zip([0.400f32, 0.350, 0.169, 0.014, 0.001]) {
        assert!(
            (got - readme).abs() <= 5e-4,
            "README says {readme}, got {got}"
        );
    }
    // ... and the reference's: softmax of PyTorch's logits for chelsea (MODEL.md's golden
    // tensors, from PIL's resize). Our resize differs from PIL's by rounding (measured against
    // the reference input in efficientnet_parity.rs), which moves these by up to 0.015; a wrong
    // softmax, class order or top-K moves them by far more.
    let golden = read_tensors(&format!(
        "{}/reference_chelsea.safetensors",
        PHOTOS.trim_end_matches("/photos")
    ));
    let logits = &golden["logits_chelsea"].1;
    let top = logits.iter().fold(f32::MIN, |m, v| m.max(*v));
    let total: f64 = logits.iter().map(|v| ((v - top) as f64).exp()).sum();
    for (class, _, p) in &rows[0] {
        let reference = (((logits[*class as usize] - top) as f64).exp() / total) as f32;
        println!("class {class}: ours {p:.4}, reference {reference:.4}");
        assert!(
            (p - reference).abs() <= 0.02,
            "class {class}: {p} vs {reference}"
        );
    }

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
    // Partitions finish in any order: compare rows by origin.
    let by_origin = |df: DataFrame| {
        df.sort(vec![col("image").field("origin").sort(true, false)])
            .unwrap()
    };
    let a = common::collect(by_origin(predictor.transform(images.clone()).unwrap())).await;
    let b = common::collect(by_origin(loaded.transform(images).unwrap())).await;
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

/// `precision = bfloat16` runs the bundled model's plan with bfloat16 GEMMs: features within
/// the bfloat16 tolerance on real images of float32's, the same top-1 class on the two photos,
/// saved and loaded with the stage; a bad value and a model file with it are param errors.
#[tokio::test]
async fn bfloat16_precision_is_a_stage_param() {
    let ctx = SessionContext::new();
    let images = read_images(&ctx, PHOTOS, ReadImagesOptions::default()).unwrap();
    let by_origin = |df: DataFrame| {
        df.sort(vec![col("image").field("origin").sort(true, false)])
            .unwrap()
    };
    let f32s = DeepImageFeaturizer::new().with_output_col("f");
    let bf16 = f32s.clone().with_precision("bfloat16");
    let dir = tempfile::tempdir().unwrap();
    let saved = PipelineModel::new("p", vec![Arc::new(bf16.clone())]);
    saved.save(dir.path().join("m")).unwrap();
    let json: String = walkdir(&dir.path().join("m"))
        .iter()
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .map(|p| std::fs::read_to_string(p).unwrap())
        .collect();
    assert!(json.contains(r#""precision": "bfloat16""#), "{json}");
    let loaded = PipelineModel::load(dir.path().join("m")).unwrap();
    let features = |df: DataFrame| async move {
        let out = common::collect(by_origin(df)).await;
        let list = out
            .column_by_name("f")
            .unwrap()
            .as_fixed_size_list()
            .clone();
        (0..list.len())
            .flat_map(|i| {
                let row = list.value(i);
                row.as_any()
                    .downcast_ref::<Float32Array>()
                    .unwrap()
                    .values()
                    .to_vec()
            })
            .collect::<Vec<f32>>()
    };
    let want = features(f32s.transform(images.clone()).unwrap()).await;
    let got = features(bf16.transform(images.clone()).unwrap()).await;
    let reloaded = features(loaded.transform(images.clone()).unwrap()).await;
    assert_eq!(got, reloaded, "the saved stage keeps its precision");
    // On real images: each image's features within 8% of their float32 norm.
    let norm = |v: &[f32]| v.iter().map(|x| x * x).sum::<f32>().sqrt();
    let errors: Vec<f32> = got
        .chunks(1280)
        .zip(want.chunks(1280))
        .map(|(g, w)| {
            let d: Vec<f32> = g.iter().zip(w).map(|(a, b)| a - b).collect();
            norm(&d) / norm(w)
        })
        .collect();
    println!("bfloat16 features: |diff| / |float32| per image {errors:?}");
    assert!(errors.iter().all(|e| *e <= 0.08), "{errors:?}");
    if deep_pipelines::models::cpu::kernels::bf16_supported() {
        assert!(
            errors.iter().all(|e| *e > 0.0),
            "bfloat16 ran as float32 on a CPU with AVX-512 BF16"
        );
    }
    let predict = |p: &str| {
        DeepImagePredictor::new()
            .with_precision(p)
            .with_output_col("p")
    };
    let top1 = |df: DataFrame| async move {
        let out = common::collect(by_origin(df)).await;
        decoded(&out, "p")
            .into_iter()
            .map(|k| k[0].0)
            .collect::<Vec<_>>()
    };
    assert_eq!(
        top1(predict("bfloat16").transform(images.clone()).unwrap()).await,
        top1(predict("float32").transform(images.clone()).unwrap()).await
    );

    let err = f32s
        .clone()
        .with_precision("half")
        .transform(images.clone())
        .unwrap_err();
    assert!(
        err.to_string().contains("precision") && err.to_string().contains("`half`"),
        "{err}"
    );
    let err = f32s
        .with_model_file("model.onnx")
        .with_precision("bfloat16")
        .transform(images)
        .unwrap_err();
    assert!(
        err.to_string().contains("precision") && err.to_string().contains("modelFile"),
        "{err}"
    );
}

/// Every file under `dir`.
fn walkdir(dir: &Path) -> Vec<std::path::PathBuf> {
    std::fs::read_dir(dir)
        .unwrap()
        .flat_map(|e| {
            let path = e.unwrap().path();
            if path.is_dir() {
                walkdir(&path)
            } else {
                vec![path]
            }
        })
        .collect()
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

    // float16 features feed a logistic regression like float32 ones: the same rows (bundled
    // Fashion-MNIST images, both feature columns computed once and cached), one fit on each
    // column (Spark's default standardization, L2, run to convergence), compared. f16 keeps
    // 11 significant bits: every feature is its f32 value within u = 2^-11 = 4.9e-4 relative.
    let ctx = SessionContext::new();
    let images = common::images(&ctx, "test", 0.08);
    let indexed = StringIndexer::new()
        .with_input_col("label")
        .with_output_col("labelIndex")
        .fit(&images)
        .await
        .unwrap()
        .transform(images)
        .unwrap();
    let both = half
        .transform(pooled.transform(indexed).unwrap())
        .unwrap()
        .cache()
        .await
        .unwrap();
    let fit = |column: &'static str| {
        let both = both.clone();
        async move {
            LogisticRegression::new()
                .with_features_col(column)
                .with_label_col("labelIndex")
                .with_prediction_col(format!("prediction_{column}"))
                .with_probability_col(format!("probability_{column}"))
                .with_raw_prediction_col(format!("raw_{column}"))
                .with_reg_param(1e-2)
                .with_tol(1e-12)
                .with_max_iter(1000)
                .fit(&both)
                .await
                .unwrap()
        }
    };
    let (lr32, lr16) = (fit("f32").await, fit("f16").await);
    assert_eq!(lr16.num_features(), 1280);
    assert_eq!(lr16.num_skipped_rows(), 0);
    assert_eq!(lr16.num_classes(), lr32.num_classes());
    let (a, b) = (lr32.fitted(), lr16.fitted());
    assert!(a.converged && b.converged);

    let out = common::collect(lr16.transform(lr32.transform(both).unwrap()).unwrap()).await;
    let (n, d, k) = (out.num_rows(), 1280, a.num_classes);
    assert!(n >= 30 && k == 10, "{n} rows, {k} classes");
    let floats = |name: &str| {
        let list = out.column_by_name(name).unwrap().as_fixed_size_list();
        let values = list.values();
        match values.data_type() {
            DataType::Float16 => values
                .as_primitive::<Float16Type>()
                .values()
                .iter()
                .map(|v| f64::from(v.to_f32()))
                .collect::<Vec<f64>>(),
            DataType::Float32 => values
                .as_primitive::<datafusion::arrow::datatypes::Float32Type>()
                .values()
                .iter()
                .map(|v| f64::from(*v))
                .collect(),
            _ => values
                .as_primitive::<datafusion::arrow::datatypes::Float64Type>()
                .values()
                .to_vec(),
        }
    };
    let x = floats("f32");

    // Coefficients, in the units the penalty sees (beta_j * sigma_j, sigma_j the features'
    // sample std, computed here from the f32 column): there every coefficient is O(1) and the
    // problem is well conditioned. (On the original scale a nearly constant feature, sigma ~
    // 1e-4, has a coefficient ~ 1e3 whose absolute change says nothing.) Rounding the data by
    // u moves these by a few u of the largest one (measured 1.1e-3); 1e-2 leaves 10x room.
    // Reading f16 wrongly (e.g. truncated) moves them by O(1).
    let mean: Vec<f64> = (0..d)
        .map(|j| (0..n).map(|i| x[i * d + j]).sum::<f64>() / n as f64)
        .collect();
    let sigma: Vec<f64> = (0..d)
        .map(|j| {
            let ss = (0..n)
                .map(|i| (x[i * d + j] - mean[j]).powi(2))
                .sum::<f64>();
            (ss / (n - 1) as f64).sqrt()
        })
        .collect();
    let scaled = |f: &[f64]| -> Vec<f64> {
        f.iter()
            .enumerate()
            .map(|(i, c)| c * sigma[i % d])
            .collect()
    };
    let (sa, sb) = (scaled(&a.coefficients), scaled(&b.coefficients));
    let largest = sa.iter().fold(0.0f64, |m, v| m.max(v.abs()));
    let worst = sa
        .iter()
        .zip(&sb)
        .map(|(p, q)| (p - q).abs())
        .fold(0.0f64, f64::max);
    // Intercepts in the same units: each class's margin at the mean row (the raw intercept
    // also carries beta_j * mean_j of every nearly constant feature).
    let centred = |intercepts: &[f64], coefficients: &[f64]| -> Vec<f64> {
        intercepts
            .iter()
            .zip(coefficients.chunks(d))
            .map(|(b, beta)| b + beta.iter().zip(&mean).map(|(w, u)| w * u).sum::<f64>())
            .collect()
    };
    let intercepts = centred(&a.intercepts, &a.coefficients)
        .iter()
        .zip(&centred(&b.intercepts, &b.coefficients))
        .map(|(p, q)| (p - q).abs())
        .fold(0.0f64, f64::max);
    println!(
        "{n} rows: float16 vs float32 fit, standardized coefficients differ by {:.1e} of the \
         largest ({largest:.3}), intercepts by {intercepts:.1e}",
        worst / largest
    );
    assert!(largest > 1e-2, "{largest}");
    assert!(
        worst <= 1e-2 * largest && intercepts <= 1e-2,
        "float16 fit: coefficients differ by {worst} (largest {largest}), intercepts by \
         {intercepts}"
    );

    // Margins, each model on its own column: rounding a row's inputs once can move margin k by
    // at most u * sum_j |beta_kj x_ij|; the f16 pipeline rounds them at fit and at prediction,
    // so twice that bounds it (measured: a tenth of one bound).
    let (raw32, raw16) = (floats("raw_f32"), floats("raw_f16"));
    let u = 2f64.powi(-11);
    let mut ratio = 0.0f64;
    for i in 0..n {
        for c in 0..k {
            let coef = &a.coefficients[c * d..(c + 1) * d];
            let bound = u * coef
                .iter()
                .zip(&x[i * d..(i + 1) * d])
                .map(|(b, v)| (b * v).abs())
                .sum::<f64>();
            let diff = (raw32[i * k + c] - raw16[i * k + c]).abs();
            ratio = ratio.max(diff / bound);
            assert!(
                diff <= 2.0 * bound,
                "row {i} class {c}: margins {} (f32) vs {} (f16), bound {bound}",
                raw32[i * k + c],
                raw16[i * k + c]
            );
        }
    }
    println!("margins: largest difference / rounding bound {ratio:.3}");
    // Identical predictions on every row.
    let prediction = |name: &str| {
        out.column_by_name(name)
            .unwrap()
            .as_primitive::<datafusion::arrow::datatypes::Float64Type>()
            .values()
            .to_vec()
    };
    assert_eq!(prediction("prediction_f16"), prediction("prediction_f32"));
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
    assert_eq!(top.len(), 2, "one row per photo");
    for (row, entries) in top.iter().enumerate() {
        let f = features.value(row);
        let f = f.as_any().downcast_ref::<Float32Array>().unwrap();
        let brightest = (0..3)
            .max_by(|&a, &b| f.value(a).total_cmp(&f.value(b)))
            .unwrap();
        assert_eq!(entries.len(), 1);
        assert_eq!(entries[0].0 as usize, brightest);
    }

    // The same network as SQL functions: the featurizer's vectors and the predictor's top-1,
    // row for row as the DataFrame transform gave them.
    register_featurizer(&ctx, "mean_colour", &featurizer).unwrap();
    register_model(
        &ctx,
        "brightest",
        &PipelineModel::new("brightest", vec![Arc::new(predictor.clone())]),
    )
    .unwrap();
    register_images_table(&ctx, "own_photos", PHOTOS, ReadImagesOptions::default()).unwrap();
    let sql = common::collect(
        ctx.sql(
            "SELECT image.origin AS origin, mean_colour(image) AS f, brightest(image) AS p \
             FROM own_photos",
        )
        .await
        .unwrap(),
    )
    .await;
    assert_eq!(sql.num_rows(), out.num_rows());
    let origins = out.column_by_name("image").unwrap().as_struct().column(0);
    let origins = origins.as_string::<i32>();
    let sql_origins = sql.column_by_name("origin").unwrap().as_string::<i32>();
    let sql_features = sql.column_by_name("f").unwrap().as_fixed_size_list();
    let sql_top = decoded(&sql, "p");
    for (row, top_row) in top.iter().enumerate() {
        let i = (0..sql.num_rows())
            .find(|&i| sql_origins.value(i) == origins.value(row))
            .expect("same photos through SQL");
        assert_eq!(sql_features.value(i).as_ref(), features.value(row).as_ref());
        assert_eq!(&sql_top[i], top_row);
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
    let c = ResNetConfig::resnet18();
    let err = load_weights(
        c.init(&Device::flex()),
        &bad,
        &c.weight_names(),
        None,
        "ResNet18",
    )
    .unwrap_err();
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
