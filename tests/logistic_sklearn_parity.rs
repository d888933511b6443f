//! LogisticRegression reaches scikit-learn's optimum on the same data (fixture made by
//! tests/fixtures/make_logreg_fixtures.py): C = 1/(n*lambda), standardization=false.
//!
//! Coefficients are compared relatively: |ours - sklearn| <= 1e-4 * max(|sklearn|, 1e-2 * max|sklearn|)
//! (the floor keeps the test meaningful for coefficients near zero).

use std::sync::Arc;

use datafusion::arrow::array::{FixedSizeListArray, Float32Array, Float64Array, RecordBatch};
use datafusion::arrow::datatypes::{DataType, Field, Schema};
use deep_pipelines::classification::Family;
use deep_pipelines::classification::logistic_math::{Dataset, FitSettings, FittedLogistic, fit};
use deep_pipelines::prelude::*;
use serde_json::Value;

struct Case {
    name: String,
    x: Vec<f32>,
    y: Vec<f64>,
    n: usize,
    d: usize,
    reg: f64,
    alpha: f64,
    num_classes: usize,
    coefficients: Vec<f64>,
    intercepts: Vec<f64>,
    objective: f64,
}

fn cases() -> Vec<Case> {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/logreg_sklearn.json"
    );
    let json: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let floats = |v: &Value| -> Vec<f64> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect()
    };
    json["cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            let rows: Vec<Vec<f64>> = c["X"].as_array().unwrap().iter().map(floats).collect();
            let coefficients: Vec<f64> = c["coefficients"]
                .as_array()
                .unwrap()
                .iter()
                .flat_map(floats)
                .collect();
            Case {
                name: c["name"].as_str().unwrap().to_string(),
                n: rows.len(),
                d: rows[0].len(),
                x: rows.iter().flatten().map(|v| *v as f32).collect(),
                y: floats(&c["y"]),
                reg: c["reg_param"].as_f64().unwrap(),
                alpha: c["elastic_net_param"].as_f64().unwrap(),
                num_classes: c["num_classes"].as_u64().unwrap() as usize,
                coefficients,
                intercepts: floats(&c["intercepts"]),
                objective: c["objective"].as_f64().unwrap(),
            }
        })
        .collect()
}

fn settings(c: &Case) -> FitSettings {
    FitSettings {
        max_iter: 10_000,
        reg_param: c.reg,
        elastic_net_param: c.alpha,
        // 0: run until the gradient vanishes or no step decreases the objective any more.
        tol: 0.0,
        fit_intercept: true,
        standardization: false,
        family: Family::Auto,
    }
}

fn data(c: &Case) -> Dataset<'_> {
    Dataset {
        x: &c.x,
        y: &c.y,
        w: None,
        n: c.n,
        d: c.d,
    }
}

fn assert_close(name: &str, what: &str, ours: &[f64], theirs: &[f64], rel: f64) {
    assert_eq!(ours.len(), theirs.len(), "{name} {what}: lengths");
    let max_abs = theirs.iter().fold(0.0f64, |m, v| m.max(v.abs()));
    for (i, (a, b)) in ours.iter().zip(theirs).enumerate() {
        let bound = rel * b.abs().max(1e-2 * max_abs);
        assert!(
            (a - b).abs() <= bound,
            "{name} {what}[{i}]: ours {a} vs sklearn {b} (bound {bound:e})"
        );
    }
}

/// Subgradient optimality of our own solution (independent of sklearn): gradient of the smooth
/// part g_j satisfies |g_j| <= lambda*alpha where beta_j = 0, and g_j + lambda*alpha*sign(beta_j) = 0 elsewhere.
fn assert_kkt(c: &Case, fitted: &FittedLogistic) {
    let rows = fitted.intercepts.len();
    let d = c.d;
    let mut grad = vec![0.0; rows * d];
    for i in 0..c.n {
        let x = &c.x[i * d..(i + 1) * d];
        let raw = fitted.raw_prediction(x);
        let p = fitted.probability(&raw);
        for r in 0..rows {
            let k = if rows == 1 { 1 } else { r };
            let residual = p[k] - if c.y[i] as usize == k { 1.0 } else { 0.0 };
            for j in 0..d {
                grad[r * d + j] += residual * f64::from(x[j]) / c.n as f64;
            }
        }
    }
    let l1 = c.reg * c.alpha;
    for (j, (g, b)) in grad.iter().zip(&fitted.coefficients).enumerate() {
        let g = g + c.reg * (1.0 - c.alpha) * b;
        if *b == 0.0 {
            assert!(
                g.abs() <= l1 + 1e-6,
                "{} coef {j} = 0 but |grad| {} > {l1}",
                c.name,
                g.abs()
            );
        } else {
            let r = g + l1 * b.signum();
            assert!(
                r.abs() <= 1e-6,
                "{} coef {j} = {b}: stationarity residual {r}",
                c.name
            );
        }
    }
}

#[test]
fn l2_fits_match_sklearn_within_1e_4_relative() {
    for c in cases().iter().filter(|c| c.alpha == 0.0) {
        let fitted = fit(&settings(c), &data(c), Some(c.num_classes)).unwrap();
        let objective = fitted.objective(&settings(c), &data(c));
        println!(
            "{}: objective ours {objective:.12} sklearn {:.12}, {} iterations",
            c.name, c.objective, fitted.iterations
        );
        assert!(
            ((objective - c.objective) / c.objective).abs() <= 1e-4,
            "{}: objective",
            c.name
        );
        assert_close(
            &c.name,
            "coefficients",
            &fitted.coefficients,
            &c.coefficients,
            1e-4,
        );
        assert_close(
            &c.name,
            "intercepts",
            &fitted.intercepts,
            &c.intercepts,
            1e-4,
        );
        assert_kkt(c, &fitted);
    }
}

#[test]
fn elastic_net_fits_reach_sklearn_optimum_and_are_optimal() {
    let mut seen = 0;
    for c in cases().iter().filter(|c| c.alpha > 0.0) {
        seen += 1;
        let fitted = fit(&settings(c), &data(c), Some(c.num_classes)).unwrap();
        let objective = fitted.objective(&settings(c), &data(c));
        println!(
            "{}: objective ours {objective:.12} sklearn(saga) {:.12}",
            c.name, c.objective
        );
        assert!(
            objective <= c.objective * (1.0 + 1e-6),
            "{}: ours is worse",
            c.name
        );
        assert!(
            ((objective - c.objective) / c.objective).abs() <= 1e-4,
            "{}: objective",
            c.name
        );
        assert_close(
            &c.name,
            "coefficients",
            &fitted.coefficients,
            &c.coefficients,
            1e-3,
        );
        let zeros = fitted.coefficients.iter().filter(|b| **b == 0.0).count();
        let sk_zeros = c.coefficients.iter().filter(|b| b.abs() < 1e-8).count();
        println!("{}: exact zeros ours {zeros}, sklearn {sk_zeros}", c.name);
        assert_kkt(c, &fitted);
    }
    assert_eq!(seen, 2);
}

#[tokio::test]
async fn estimator_on_a_dataframe_matches_sklearn_multinomial() {
    let all = cases();
    let c = all.iter().find(|c| c.name == "multinomial_l2").unwrap();
    let item = Arc::new(Field::new("item", DataType::Float32, true));
    let features = FixedSizeListArray::try_new(
        Arc::clone(&item),
        c.d as i32,
        Arc::new(Float32Array::from(c.x.clone())),
        None,
    )
    .unwrap();
    let schema = Arc::new(Schema::new(vec![
        Field::new("features", DataType::FixedSizeList(item, c.d as i32), true),
        Field::new("label", DataType::Float64, false),
    ]));
    let batch = RecordBatch::try_new(
        schema,
        vec![
            Arc::new(features),
            Arc::new(Float64Array::from(c.y.clone())),
        ],
    )
    .unwrap();
    let ctx = SessionContext::new();
    let df = ctx.read_batch(batch).unwrap();
    let model = LogisticRegression::new()
        .with_standardization(false)
        .with_reg_param(c.reg)
        .with_family(Family::Multinomial)
        .with_tol(0.0)
        .with_max_iter(10_000)
        .fit(&df)
        .await
        .unwrap();
    assert_close(
        &c.name,
        "coefficients (DataFrame)",
        &model.fitted().coefficients,
        &c.coefficients,
        1e-4,
    );

    let predictions = model.transform(df).unwrap();
    let accuracy = MulticlassClassificationEvaluator::new()
        .with_metric_name("accuracy")
        .evaluate(&predictions)
        .await
        .unwrap();
    let expected = (0..c.n)
        .filter(|&i| model.fitted().predict(&c.x[i * c.d..(i + 1) * c.d]) == c.y[i])
        .count() as f64
        / c.n as f64;
    assert!(
        (accuracy - expected).abs() < 1e-12 && accuracy > 0.5,
        "accuracy {accuracy}"
    );
}

#[test]
fn standardization_changes_the_penalised_problem_like_spark() {
    // With standardization=true the penalty is on std-scaled coefficients: a different
    // optimum than sklearn's unscaled one on features of different scales.
    let all = cases();
    let c = all.iter().find(|c| c.name == "binomial_l2").unwrap();
    let mut s = settings(c);
    s.standardization = true;
    let fitted = fit(&s, &data(c), Some(2)).unwrap();
    let max_diff = fitted
        .coefficients
        .iter()
        .zip(&c.coefficients)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f64::max);
    assert!(max_diff > 1e-3, "standardization had no effect");
}
