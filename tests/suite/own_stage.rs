//! A network stage written outside the crate, in this one file: `TopClass` adds the index of
//! each image's most likely ImageNet class. It is a params type (with the shared
//! `NetworkParams` flattened in) and a `NetworkOutput`; `NetworkTransformer` makes it a stage.
//! It registers itself, and with no other change it runs
//! through record batches of encoded bytes, a SQL function, saving and loading, and metrics —
//! what `docs/ARCHITECTURE.md` promises a new network stage.

use std::sync::{Arc, LazyLock};

use datafusion::arrow::array::{Array, ArrayRef, AsArray, BinaryArray, Int32Array, RecordBatch};
use datafusion::arrow::buffer::NullBuffer;
use datafusion::arrow::datatypes::{DataType, Field, Int32Type, Schema};
use deep_pipelines::batch::BatchTransformer;
use deep_pipelines::models::LoadedModel;
use deep_pipelines::network_stage::NetworkOutput;
use deep_pipelines::network_transformer::{NetworkStageParams, NetworkTransformer};
use deep_pipelines::prelude::*;
use deep_pipelines::registry::{LoadedStage, StageRegistry};
use deep_pipelines::{Error, NetworkParams, Result};
use serde::{Deserialize, Serialize};

use crate::common;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
struct TopClassParams {
    #[serde(flatten)]
    network: NetworkParams,
    output_col: String,
}

impl Default for TopClassParams {
    fn default() -> Self {
        TopClassParams {
            network: NetworkParams::default(),
            output_col: "top_class".into(),
        }
    }
}

impl AsRef<NetworkParams> for TopClassParams {
    fn as_ref(&self) -> &NetworkParams {
        &self.network
    }
}

impl AsMut<NetworkParams> for TopClassParams {
    fn as_mut(&mut self) -> &mut NetworkParams {
        &mut self.network
    }
}

impl Params for TopClassParams {
    /// The class name: saved, and the uid prefix. Dotted: a class of another crate.
    const STAGE: &'static str = "my_crate.TopClass";

    fn docs() -> &'static [(&'static str, &'static str)] {
        static DOCS: LazyLock<Vec<(&str, &str)>> = LazyLock::new(|| {
            NetworkParams::docs_with(&[("outputCol", "class index column to add")])
        });
        &DOCS
    }

    fn validate(&self) -> Result<()> {
        self.network.validate(Self::STAGE)?;
        if self.output_col.is_empty() {
            return Err(Error::InvalidParam {
                stage: Self::STAGE.into(),
                param: "outputCol".into(),
                message: "must not be empty".into(),
            });
        }
        Ok(())
    }
}

impl NetworkStageParams for TopClassParams {
    type Output = ArgMax;

    fn output_col(&self) -> &str {
        &self.output_col
    }

    fn output(&self, _: &LoadedModel) -> Result<ArgMax> {
        Ok(ArgMax)
    }
}

/// The stage: everything but the params and the output comes with `NetworkTransformer`.
type TopClass = NetworkTransformer<TopClassParams>;

/// The stage's per-image output: the argmax of the logits.
#[derive(Debug, PartialEq, Eq, Hash)]
struct ArgMax;

impl NetworkOutput for ArgMax {
    const VERB: &'static str = "top_class";

    fn width(&self, model: &LoadedModel) -> usize {
        model.manifest.num_classes
    }

    fn forward(&self, model: &LoadedModel, inputs: Vec<f32>, batch: usize) -> Result<Vec<f32>> {
        model.logits(inputs, batch)
    }

    fn data_type(&self, _: &LoadedModel) -> DataType {
        DataType::Int32
    }

    fn build(&self, model: &LoadedModel, logits: Vec<f32>, valid: Vec<bool>) -> Result<ArrayRef> {
        let classes = self.width(model);
        let best = logits
            .chunks(classes)
            .map(|row| (0..classes).fold(0, |b, c| if row[c] > row[b] { c } else { b }) as i32);
        Ok(Arc::new(Int32Array::new(
            best.collect(),
            Some(NullBuffer::from(valid)),
        )))
    }
}

const FILES: &[&str] = &["test/bag/00018.png", "test/sneaker/00009.png"];

/// The files as encoded bytes, plus a row that is not an image.
fn encoded_batch(column: &str) -> RecordBatch {
    let mut bytes: Vec<Vec<u8>> = FILES
        .iter()
        .map(|f| std::fs::read(format!("{}/{f}", common::DATA)).unwrap())
        .collect();
    bytes.push(b"not an image".to_vec());
    let schema = Schema::new(vec![Field::new(column, DataType::Binary, true)]);
    let column: ArrayRef = Arc::new(BinaryArray::from_iter_values(bytes));
    RecordBatch::try_new(Arc::new(schema), vec![column]).unwrap()
}

fn classes(array: &ArrayRef) -> Vec<Option<i32>> {
    let array = array.as_primitive::<Int32Type>();
    (0..array.len())
        .map(|r| array.is_valid(r).then(|| array.value(r)))
        .collect()
}

/// The predictor's top-1 class of the same batch: the reference.
fn predictor_top1(batch: RecordBatch) -> Vec<Option<i32>> {
    let predictor = DeepImagePredictor::new()
        .with_input_col("content")
        .with_top_k(1);
    let out = BatchTransformer::from_stage(Arc::new(predictor))
        .transform(batch)
        .unwrap();
    let lists = out
        .column_by_name("predicted_labels")
        .unwrap()
        .as_list::<i32>();
    (0..lists.len())
        .map(|r| {
            lists.is_valid(r).then(|| {
                let entry = lists.value(r);
                let class = entry.as_struct().column_by_name("class").unwrap().clone();
                class.as_primitive::<Int32Type>().value(0)
            })
        })
        .collect()
}

#[tokio::test]
async fn a_stage_of_ones_own_runs_through_batches_sql_persistence_and_metrics() {
    let registry = StageRegistry::builtin().register::<TopClass>();
    let made = registry
        .make(
            "my_crate.TopClass",
            serde_json::json!({"inputCol": "content", "errorCol": "why"}),
        )
        .unwrap();
    let LoadedStage::Transformer(stage) = made else {
        panic!("a transformer")
    };
    let network = stage.network().expect("the capability");
    assert_eq!(network.network_params().model_name, "EfficientNetLite0");
    let names: Vec<String> = network
        .params()
        .explain()
        .into_iter()
        .map(|p| p.name)
        .collect();
    assert_eq!(names[..2], ["inputCol", "modelName"]);
    assert!(names.contains(&"outputCol".to_string()), "{names:?}");

    // Record batches of encoded bytes: the image column is found through the capability.
    let expected = predictor_top1(encoded_batch("content"));
    assert_eq!(expected.len(), 3);
    assert!(
        expected[0].is_some() && expected[2].is_none(),
        "{expected:?}"
    );
    let batches = BatchTransformer::from_stage(Arc::clone(&stage));
    assert_eq!(batches.image_col(), Some("content"));
    let out = batches.transform(encoded_batch("content")).unwrap();
    assert_eq!(classes(out.column_by_name("top_class").unwrap()), expected);
    let why = out.column_by_name("why").unwrap().as_string::<i32>();
    assert!(why.is_null(0) && why.is_valid(2), "errorCol of the bad row");
    let stats = stage.network().unwrap().metrics();
    assert_eq!((stats.rows, stats.images), (3, 2), "{stats}");

    // Saved and loaded inside a pipeline, with the registry that knows it.
    let dir = tempfile::tempdir().unwrap();
    let model = PipelineModel::of(Arc::clone(&stage));
    model.save(dir.path().join("m")).unwrap();
    let err = PipelineModel::load(dir.path().join("m"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("my_crate.TopClass"), "{err}");
    let loaded = PipelineModel::load_with(dir.path().join("m"), &registry).unwrap();
    let again = BatchTransformer::new(loaded.clone())
        .transform(encoded_batch("content"))
        .unwrap();
    assert_eq!(
        classes(again.column_by_name("top_class").unwrap()),
        expected
    );

    // As a SQL function over encoded bytes.
    let ctx = SessionContext::new();
    register_model(&ctx, "top_class", &loaded).unwrap();
    ctx.register_batch("files", encoded_batch("content"))
        .unwrap();
    let df = ctx
        .sql("SELECT top_class(content) AS c FROM files")
        .await
        .unwrap();
    let batch = common::collect(df).await;
    assert_eq!(classes(batch.column(0)), expected);
    let plan = ctx
        .sql("EXPLAIN SELECT top_class(content) FROM files")
        .await
        .unwrap();
    let plan = common::collect(plan).await;
    let text = plan.column(1).as_string::<i32>();
    let text: Vec<&str> = (0..text.len()).map(|r| text.value(r)).collect();
    assert!(
        text.iter()
            .any(|l| l.contains("TopClass(EfficientNetLite0)")),
        "{text:?}"
    );
}
