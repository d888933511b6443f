//! Logistic regression maths, Spark ML semantics, no Arrow: the objective, its gradient
//! (parallel over rows), standardisation, and the fit by L-BFGS / OWL-QN.
//!
//! Objective (Spark's): `(1/sum w) * sum_i w_i * logloss_i
//!     + regParam * ((1 - alpha)/2 * ||beta||^2 + alpha * ||beta||_1)`, intercepts unpenalised.
//! With `standardization` the penalty applies to the coefficients of the features divided by
//! their standard deviation (not centred), as in Spark; coefficients are always returned on the
//! original scale. Internally the features are always scaled (better conditioning) and the
//! penalty weights adjusted, exactly as Spark does.
//!
//! Over 600 lines on purpose: the code is ~530 lines, one optimisation problem; the rest
//! (a third of the file) is unit tests of the objective, gradient and optima.

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::optim::{LbfgsConfig, minimize};

/// `family` param.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Family {
    /// Binomial for 1 or 2 classes, multinomial otherwise.
    Auto,
    Binomial,
    Multinomial,
}

/// The params that shape the fit.
#[derive(Clone, Debug, PartialEq)]
pub struct FitSettings {
    pub max_iter: usize,
    pub reg_param: f64,
    pub elastic_net_param: f64,
    pub tol: f64,
    pub fit_intercept: bool,
    pub standardization: bool,
    pub family: Family,
}

/// Training data: row-major `n x d` features (f32 halves memory; maths is f64), labels
/// `0..k-1` as f64 (Spark's convention), optional non-negative row weights.
#[derive(Clone, Copy, Debug)]
pub struct Dataset<'a> {
    pub x: &'a [f32],
    pub y: &'a [f64],
    pub w: Option<&'a [f64]>,
    pub n: usize,
    pub d: usize,
}

impl Dataset<'_> {
    fn weight(&self, i: usize) -> f64 {
        self.w.map_or(1.0, |w| w[i])
    }

    fn row(&self, i: usize) -> &[f32] {
        &self.x[i * self.d..(i + 1) * self.d]
    }
}

/// A fitted model: coefficients on the original feature scale.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FittedLogistic {
    pub num_classes: usize,
    pub num_features: usize,
    pub multinomial: bool,
    /// `rows x num_features`, row-major; one row when binomial, `num_classes` when multinomial.
    pub coefficients: Vec<f64>,
    /// One per row of `coefficients`.
    pub intercepts: Vec<f64>,
    /// Objective per iteration (scaled problem; the first entry is the starting point).
    pub objective_history: Vec<f64>,
    pub iterations: usize,
    pub converged: bool,
}

impl FittedLogistic {
    fn rows(&self) -> usize {
        self.intercepts.len()
    }

    /// Margins as Spark's `rawPrediction`: `[-m, m]` for binomial, one per class otherwise.
    pub fn raw_prediction(&self, x: &[f32]) -> Vec<f64> {
        let d = self.num_features;
        let margins: Vec<f64> = (0..self.rows())
            .map(|k| {
                let coef = &self.coefficients[k * d..(k + 1) * d];
                self.intercepts[k]
                    + coef
                        .iter()
                        .zip(x)
                        .map(|(c, v)| c * f64::from(*v))
                        .sum::<f64>()
            })
            .collect();
        if self.multinomial {
            margins
        } else {
            vec![-margins[0], margins[0]]
        }
    }

    /// Class probabilities from `raw_prediction` (stable softmax; sigmoid for binomial).
    pub fn probability(&self, raw: &[f64]) -> Vec<f64> {
        if !self.multinomial {
            let p1 = sigmoid(raw[1]);
            return vec![1.0 - p1, p1];
        }
        softmax(raw)
    }

    /// Predicted class index (argmax of the margins, first on ties).
    pub fn predict(&self, x: &[f32]) -> f64 {
        let raw = self.raw_prediction(x);
        let mut best = 0;
        for (k, v) in raw.iter().enumerate() {
            if *v > raw[best] {
                best = k;
            }
        }
        best as f64
    }

    /// Spark's objective at these coefficients on `data` (for tests and diagnostics).
    pub fn objective(&self, s: &FitSettings, data: &Dataset) -> f64 {
        let scale = FeatureScale::new(data);
        let d = self.num_features;
        let rows = self.rows();
        let mut params = vec![0.0; rows * (d + 1)];
        for k in 0..rows {
            for j in 0..d {
                params[k * d + j] = self.coefficients[k * d + j] * scale.std[j];
            }
            params[rows * d + k] = self.intercepts[k];
        }
        let problem = Problem::new(s, data, &scale, self.multinomial, rows);
        let mut grad = vec![0.0; params.len()];
        problem.smooth(&params, &mut grad) + problem.l1_value(&params)
    }
}

fn sigmoid(m: f64) -> f64 {
    if m >= 0.0 {
        1.0 / (1.0 + (-m).exp())
    } else {
        let e = m.exp();
        e / (1.0 + e)
    }
}

/// `log(1 + exp(m))` without overflow.
fn log1p_exp(m: f64) -> f64 {
    if m > 0.0 {
        m + (-m).exp().ln_1p()
    } else {
        m.exp().ln_1p()
    }
}

/// Weighted (unbiased, as Spark's summarizer) standard deviation of every feature.
struct FeatureScale {
    std: Vec<f64>,
    /// 1/std, 0 for constant features (their coefficient stays 0).
    inv_std: Vec<f64>,
}

impl FeatureScale {
    fn new(data: &Dataset) -> Self {
        let d = data.d;
        let zero = || (0.0, 0.0, vec![0.0; d], vec![0.0; d]);
        let (sum_w, sum_w2, sum, sum_sq) = ordered_sum(
            data.n.div_ceil(CHUNK_ROWS),
            |c| {
                let (mut w, mut w2, mut s, mut q) = zero();
                for i in c * CHUNK_ROWS..((c + 1) * CHUNK_ROWS).min(data.n) {
                    let wi = data.weight(i);
                    w += wi;
                    w2 += wi * wi;
                    for (j, v) in data.row(i).iter().enumerate() {
                        let v = f64::from(*v);
                        s[j] += wi * v;
                        q[j] += wi * v * v;
                    }
                }
                (w, w2, s, q)
            },
            |mut a, b| {
                a.0 += b.0;
                a.1 += b.1;
                a.2.iter_mut().zip(&b.2).for_each(|(x, y)| *x += y);
                a.3.iter_mut().zip(&b.3).for_each(|(x, y)| *x += y);
                a
            },
        )
        .unwrap_or_else(zero);
        let denom = sum_w - sum_w2 / sum_w;
        let std: Vec<f64> = (0..d)
            .map(|j| {
                let mean = sum[j] / sum_w;
                let var = (sum_sq[j] - sum_w * mean * mean) / denom;
                if var.is_finite() && var > 0.0 {
                    var.sqrt()
                } else {
                    0.0
                }
            })
            .collect();
        let inv_std = std
            .iter()
            .map(|&s| if s > 0.0 { 1.0 / s } else { 0.0 })
            .collect();
        FeatureScale { std, inv_std }
    }
}

/// The scaled optimisation problem. Parameters: `rows x d` scaled coefficients (row-major),
/// then `rows` intercepts (kept at 0 without `fitIntercept`).
struct Problem<'a> {
    data: &'a Dataset<'a>,
    inv_std: &'a [f64],
    multinomial: bool,
    rows: usize,
    fit_intercept: bool,
    weight_sum: f64,
    /// Per-coordinate L2 weight: regParam * (1 - alpha) * (1 or 1/std^2).
    l2: Vec<f64>,
    /// Per-coordinate L1 weight for OWL-QN: regParam * alpha * (1 or 1/std); 0 on intercepts.
    l1: Vec<f64>,
}

const CHUNK_ROWS: usize = 256;

/// Combines `body(c)` for chunks `0..chunks` with `op`, in parallel but with a fixed grouping
/// and order, so sums come out bit for bit the same on every run and any thread count (rayon's
/// `reduce` associates as work-stealing happens to split, which is not reproducible).
fn ordered_sum<T: Send>(
    chunks: usize,
    body: impl Fn(usize) -> T + Sync,
    op: impl Fn(T, T) -> T + Sync,
) -> Option<T> {
    const GROUPS: usize = 64;
    let groups = chunks.min(GROUPS);
    let parts: Vec<T> = (0..groups)
        .into_par_iter()
        .filter_map(|g| {
            (g * chunks / groups..(g + 1) * chunks / groups)
                .map(&body)
                .reduce(&op)
        })
        .collect();
    parts.into_iter().reduce(op)
}

impl<'a> Problem<'a> {
    fn new(
        s: &FitSettings,
        data: &'a Dataset<'a>,
        scale: &'a FeatureScale,
        multinomial: bool,
        rows: usize,
    ) -> Self {
        let d = data.d;
        let mut l2 = vec![0.0; rows * (d + 1)];
        let mut l1 = vec![0.0; rows * (d + 1)];
        let (ridge, lasso) = (
            s.reg_param * (1.0 - s.elastic_net_param),
            s.reg_param * s.elastic_net_param,
        );
        for k in 0..rows {
            for j in 0..d {
                let inv = if s.standardization {
                    1.0
                } else {
                    scale.inv_std[j]
                };
                l2[k * d + j] = ridge * inv * inv;
                l1[k * d + j] = lasso * inv;
            }
        }
        Problem {
            data,
            inv_std: &scale.inv_std,
            multinomial,
            rows,
            fit_intercept: s.fit_intercept,
            weight_sum: (0..data.n).map(|i| data.weight(i)).sum(),
            l2,
            l1,
        }
    }

    fn l1_value(&self, params: &[f64]) -> f64 {
        params.iter().zip(&self.l1).map(|(p, c)| c * p.abs()).sum()
    }

    /// Smooth part (mean weighted loss + L2) and its gradient.
    fn smooth(&self, params: &[f64], grad: &mut [f64]) -> f64 {
        let (d, rows, data) = (self.data.d, self.rows, self.data);
        // Coefficients on the original scale, so margins read the raw features directly.
        let mut coef = vec![0.0; rows * d];
        for k in 0..rows {
            for j in 0..d {
                coef[k * d + j] = params[k * d + j] * self.inv_std[j];
            }
        }
        let intercepts = &params[rows * d..];
        let chunks = data.n.div_ceil(CHUNK_ROWS);
        let zero = || (0.0, vec![0.0; rows * d], vec![0.0; rows]);
        let (loss, g_coef, g_int) = ordered_sum(
            chunks,
            |c| {
                let mut loss = 0.0;
                let mut g_coef = vec![0.0; rows * d];
                let mut g_int = vec![0.0; rows];
                let mut x = vec![0.0; d];
                let mut margins = vec![0.0; rows];
                for i in c * CHUNK_ROWS..((c + 1) * CHUNK_ROWS).min(data.n) {
                    let w = data.weight(i);
                    if w == 0.0 {
                        continue;
                    }
                    x.iter_mut()
                        .zip(data.row(i))
                        .for_each(|(a, b)| *a = f64::from(*b));
                    for k in 0..rows {
                        margins[k] = intercepts[k]
                            + coef[k * d..(k + 1) * d]
                                .iter()
                                .zip(&x)
                                .map(|(a, b)| a * b)
                                .sum::<f64>();
                    }
                    let label = data.y[i] as usize;
                    if self.multinomial {
                        let max = margins.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                        let sum: f64 = margins.iter().map(|m| (m - max).exp()).sum();
                        loss += w * (max + sum.ln() - margins[label]);
                        for k in 0..rows {
                            let p = (margins[k] - max).exp() / sum;
                            let r = w * (p - if k == label { 1.0 } else { 0.0 });
                            g_int[k] += r;
                            g_coef[k * d..(k + 1) * d]
                                .iter_mut()
                                .zip(&x)
                                .for_each(|(g, v)| *g += r * v);
                        }
                    } else {
                        let m = margins[0];
                        let y = label as f64;
                        loss += w * (log1p_exp(m) - y * m);
                        let r = w * (sigmoid(m) - y);
                        g_int[0] += r;
                        g_coef.iter_mut().zip(&x).for_each(|(g, v)| *g += r * v);
                    }
                }
                (loss, g_coef, g_int)
            },
            |mut a, b| {
                a.0 += b.0;
                a.1.iter_mut().zip(&b.1).for_each(|(x, y)| *x += y);
                a.2.iter_mut().zip(&b.2).for_each(|(x, y)| *x += y);
                a
            },
        )
        .unwrap_or_else(zero);
        let inv_w = 1.0 / self.weight_sum;
        let mut value = loss * inv_w;
        for k in 0..rows {
            for j in 0..d {
                let idx = k * d + j;
                // d/d(scaled coef) = d/d(coef) * inv_std.
                grad[idx] = g_coef[idx] * inv_w * self.inv_std[j] + self.l2[idx] * params[idx];
                value += 0.5 * self.l2[idx] * params[idx] * params[idx];
            }
            grad[rows * d + k] = if self.fit_intercept {
                g_int[k] * inv_w
            } else {
                0.0
            };
        }
        value
    }
}

fn validate(data: &Dataset, num_classes: Option<usize>) -> Result<usize, String> {
    if data.n == 0 {
        return Err("no training rows".into());
    }
    if data.d == 0 {
        return Err("feature vectors are empty".into());
    }
    if data.x.len() != data.n * data.d || data.y.len() != data.n {
        return Err(format!(
            "inconsistent data: {} feature values, {} labels for {} x {}",
            data.x.len(),
            data.y.len(),
            data.n,
            data.d
        ));
    }
    if let Some(i) = data.x.iter().position(|v| !v.is_finite()) {
        return Err(format!(
            "feature {} of row {} is {}",
            i % data.d,
            i / data.d,
            data.x[i]
        ));
    }
    let max_label = data.y.iter().copied().fold(0.0, f64::max);
    let k = num_classes.unwrap_or(max_label as usize + 1);
    for (i, &y) in data.y.iter().enumerate() {
        if !(y.is_finite() && y >= 0.0 && y.fract() == 0.0 && (y as usize) < k) {
            return Err(format!(
                "label {y} of row {i} is not a class index in 0..{k} (index labels with StringIndexer)"
            ));
        }
    }
    if let Some(w) = data.w {
        if w.len() != data.n {
            return Err(format!("{} weights for {} rows", w.len(), data.n));
        }
        if let Some(i) = w.iter().position(|v| !(v.is_finite() && *v >= 0.0)) {
            return Err(format!(
                "weight {} of row {i} must be finite and >= 0",
                w[i]
            ));
        }
        if w.iter().sum::<f64>() <= 0.0 {
            return Err("the weights sum to 0".into());
        }
    }
    Ok(k)
}

/// Fits a logistic regression. `num_classes` defaults to `max(label) + 1`.
pub fn fit(
    s: &FitSettings,
    data: &Dataset,
    num_classes: Option<usize>,
) -> Result<FittedLogistic, String> {
    let k = validate(data, num_classes)?;
    let multinomial = match (s.family, k) {
        (Family::Binomial, k) if k > 2 => {
            return Err(format!(
                "family binomial needs at most 2 classes, the labels have {k}"
            ));
        }
        (Family::Binomial, _) => false,
        (Family::Multinomial, _) => true,
        (Family::Auto, k) => k > 2,
    };
    let (d, rows) = (data.d, if multinomial { k } else { 1 });
    let scale = FeatureScale::new(data);

    // Class priors start the intercepts, as Spark does.
    let mut counts = vec![0.0; k.max(2)];
    for i in 0..data.n {
        counts[data.y[i] as usize] += data.weight(i);
    }
    let mut x0 = vec![0.0; rows * (d + 1)];
    if s.fit_intercept {
        if multinomial {
            if counts.iter().all(|&c| c > 0.0) {
                let logs: Vec<f64> = counts.iter().map(|c| c.ln()).collect();
                let mean = logs.iter().sum::<f64>() / k as f64;
                for c in 0..k {
                    x0[rows * d + c] = logs[c] - mean;
                }
            }
        } else if counts[0] == 0.0 || counts[1] == 0.0 {
            // One class only: Spark's answer, coefficients 0 and an infinite intercept.
            let intercept = if counts[1] > 0.0 {
                f64::INFINITY
            } else {
                f64::NEG_INFINITY
            };
            return Ok(FittedLogistic {
                num_classes: k,
                num_features: d,
                multinomial,
                coefficients: vec![0.0; d],
                intercepts: vec![intercept],
                objective_history: vec![0.0],
                iterations: 0,
                converged: true,
            });
        } else {
            x0[d] = (counts[1] / counts[0]).ln();
        }
    }

    let problem = Problem::new(s, data, &scale, multinomial, rows);
    let cfg = LbfgsConfig {
        max_iter: s.max_iter,
        tol: s.tol,
        memory: 10,
    };
    let result = minimize(|p, g| problem.smooth(p, g), x0, &problem.l1, &cfg);
    if !result.value.is_finite() {
        return Err("the objective became non-finite".into());
    }

    let mut coefficients = vec![0.0; rows * d];
    for r in 0..rows {
        for j in 0..d {
            coefficients[r * d + j] = result.x[r * d + j] * scale.inv_std[j];
        }
    }
    let mut intercepts = result.x[rows * d..].to_vec();
    if multinomial {
        // Softmax is invariant to shifting all classes: report Spark's centred form.
        let mean = intercepts.iter().sum::<f64>() / rows as f64;
        intercepts.iter_mut().for_each(|b| *b -= mean);
        if s.reg_param == 0.0 {
            for j in 0..d {
                let mean = (0..rows).map(|r| coefficients[r * d + j]).sum::<f64>() / rows as f64;
                (0..rows).for_each(|r| coefficients[r * d + j] -= mean);
            }
        }
    }
    Ok(FittedLogistic {
        num_classes: k,
        num_features: d,
        multinomial,
        coefficients,
        intercepts,
        objective_history: result.history,
        iterations: result.iterations,
        converged: result.converged,
    })
}

/// Softmax of margins (stable: the largest is subtracted first).
pub(crate) fn softmax(raw: &[f64]) -> Vec<f64> {
    let max = raw.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let exp: Vec<f64> = raw.iter().map(|m| (m - max).exp()).collect();
    let sum: f64 = exp.iter().sum();
    exp.into_iter().map(|e| e / sum).collect()
}

/// Index of the largest value (first on ties), as Spark's `argmax` of rawPrediction.
pub(crate) fn argmax(values: &[f64]) -> usize {
    values
        .iter()
        .enumerate()
        .fold((0, f64::NEG_INFINITY), |best, (i, &v)| {
            if v > best.1 { (i, v) } else { best }
        })
        .0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(reg: f64, alpha: f64, standardization: bool) -> FitSettings {
        FitSettings {
            max_iter: 1000,
            reg_param: reg,
            elastic_net_param: alpha,
            tol: 1e-14,
            fit_intercept: true,
            standardization,
            family: Family::Auto,
        }
    }

    /// Small deterministic data set: 3 classes, 4 features of different scales.
    fn toy() -> (Vec<f32>, Vec<f64>) {
        let mut state = 12345u64;
        let mut rand = move || {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (state >> 11) as f64 / (1u64 << 53) as f64
        };
        let (mut x, mut y) = (Vec::new(), Vec::new());
        for i in 0..120 {
            let class = i % 3;
            for j in 0..4 {
                let scale = [1.0, 10.0, 0.1, 3.0][j];
                x.push(((rand() - 0.5 + class as f64 * 0.4 * (j as f64 - 1.5)) * scale) as f32);
            }
            y.push(class as f64);
        }
        (x, y)
    }

    #[test]
    fn gradient_matches_finite_differences() {
        let (x, y) = toy();
        let data = Dataset {
            x: &x,
            y: &y,
            w: None,
            n: 120,
            d: 4,
        };
        let scale = FeatureScale::new(&data);
        for multinomial in [true, false] {
            let y2: Vec<f64> = y.iter().map(|v| if *v > 0.0 { 1.0 } else { 0.0 }).collect();
            let data = if multinomial {
                data
            } else {
                Dataset { y: &y2, ..data }
            };
            let rows = if multinomial { 3 } else { 1 };
            let s = settings(0.1, 0.0, false);
            let problem = Problem::new(&s, &data, &scale, multinomial, rows);
            let p: Vec<f64> = (0..rows * 5).map(|i| (i as f64 * 0.37).sin()).collect();
            let mut g = vec![0.0; p.len()];
            problem.smooth(&p, &mut g);
            for i in 0..p.len() {
                let (mut a, mut b) = (p.clone(), p.clone());
                a[i] += 1e-6;
                b[i] -= 1e-6;
                let mut tmp = vec![0.0; p.len()];
                let numeric = (problem.smooth(&a, &mut tmp) - problem.smooth(&b, &mut tmp)) / 2e-6;
                assert!(
                    (numeric - g[i]).abs() < 1e-6,
                    "coord {i}: {numeric} vs {}",
                    g[i]
                );
            }
        }
    }

    #[test]
    fn standardization_without_penalty_does_not_change_the_optimum() {
        // regParam = 0: no penalty, so both settings minimise the same mean log-loss and must
        // report the same coefficients on the original scale. The toy classes overlap (not
        // separable), so the unpenalised optimum is finite and unique up to the softmax shift,
        // which the fit removes by centring (Spark's convention). Both fits run to tol 1e-14;
        // agreement within 1e-8 relative leaves room for the optimiser's last step only.
        let (x, y) = toy();
        let data = Dataset {
            x: &x,
            y: &y,
            w: None,
            n: 120,
            d: 4,
        };
        let raw = fit(&settings(0.0, 0.0, false), &data, None).unwrap();
        let standardized = fit(&settings(0.0, 0.0, true), &data, None).unwrap();
        assert!(raw.converged && standardized.converged);
        // A real optimum: the gradient of the mean log-loss vanishes (independent of the flag).
        let scale = FeatureScale::new(&data);
        let problem = Problem::new(&settings(0.0, 0.0, false), &data, &scale, true, 3);
        let mut params: Vec<f64> = (0..3 * 4)
            .map(|i| raw.coefficients[i] * scale.std[i % 4])
            .collect();
        params.extend(&raw.intercepts);
        let mut grad = vec![0.0; params.len()];
        problem.smooth(&params, &mut grad);
        assert!(grad.iter().all(|g| g.abs() < 1e-7), "gradient {grad:?}");
        let max = raw.coefficients.iter().fold(0.0f64, |m, v| m.max(v.abs()));
        assert!(max > 0.1, "coefficients {:?}", raw.coefficients);
        for (what, a, b) in [
            ("coefficient", &raw.coefficients, &standardized.coefficients),
            ("intercept", &raw.intercepts, &standardized.intercepts),
        ] {
            for (i, (a, b)) in a.iter().zip(b.iter()).enumerate() {
                assert!(
                    (a - b).abs() <= 1e-8 * a.abs().max(1.0),
                    "{what} {i}: {a} without vs {b} with standardization"
                );
            }
        }
    }

    #[test]
    fn standardization_penalises_the_coefficients_of_x_over_its_sample_std() {
        // Spark: with standardization the penalty applies to the coefficients of x_j / sigma_j,
        // sigma_j the unbiased sample std (n - 1), and the coefficients are reported on the
        // original scale. So the standardized fit on x equals the unstandardized fit on
        // x / sigma (sigma computed here by hand, two-pass), its coefficients divided by sigma.
        let (x, y) = toy();
        let (n, d) = (120, 4);
        let data = Dataset {
            x: &x,
            y: &y,
            w: None,
            n,
            d,
        };
        let sigma: Vec<f64> = (0..d)
            .map(|j| {
                let col = (0..n).map(|i| f64::from(x[i * d + j]));
                let mean = col.clone().sum::<f64>() / n as f64;
                (col.map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1) as f64).sqrt()
            })
            .collect();
        let scaled: Vec<f32> = x
            .iter()
            .enumerate()
            .map(|(i, v)| (f64::from(*v) / sigma[i % d]) as f32)
            .collect();
        let reg = 1e-2;
        for alpha in [0.0, 0.5] {
            let standardized = fit(&settings(reg, alpha, true), &data, None).unwrap();
            let on_scaled = fit(
                &settings(reg, alpha, false),
                &Dataset { x: &scaled, ..data },
                None,
            )
            .unwrap();
            let max = standardized
                .coefficients
                .iter()
                .fold(0.0f64, |m, v| m.max(v.abs()));
            // x / sigma is rounded to f32 (relative 6e-8): 1e-5 of the largest coefficient
            // is far above that and far below the 0.3% the population std (n) moves them.
            for (i, (a, b)) in standardized
                .coefficients
                .iter()
                .zip(&on_scaled.coefficients)
                .enumerate()
            {
                let b = b / sigma[i % d];
                assert!(
                    (a - b).abs() <= 1e-5 * max,
                    "alpha {alpha} coefficient {i}: standardized {a} vs fit on x/sigma {b}"
                );
            }
            for (a, b) in standardized.intercepts.iter().zip(&on_scaled.intercepts) {
                assert!(
                    (a - b).abs() <= 1e-5 * a.abs().max(1.0),
                    "intercept {a} vs {b}"
                );
            }

            // And the flag matters: penalised on the raw scale, the optimum is another one,
            // each fit optimal for its own objective.
            let raw = fit(&settings(reg, alpha, false), &data, None).unwrap();
            let (s_raw, s_std) = (settings(reg, alpha, false), settings(reg, alpha, true));
            assert!(raw.objective(&s_raw, &data) <= standardized.objective(&s_raw, &data) + 1e-12);
            assert!(standardized.objective(&s_std, &data) <= raw.objective(&s_std, &data) + 1e-12);
            let diff = raw
                .coefficients
                .iter()
                .zip(&standardized.coefficients)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0, f64::max);
            assert!(diff > 1e-2 * max, "standardization changed nothing: {diff}");
        }
    }

    #[test]
    fn weights_equal_to_duplicated_rows() {
        // Without standardization the optimum does not depend on the (weighted, reliability-
        // style as in Spark) standard deviation, so weight 2 == the row twice.
        let (x, y) = toy();
        let w: Vec<f64> = (0..120)
            .map(|i| if i % 5 == 0 { 2.0 } else { 1.0 })
            .collect();
        let (mut x2, mut y2) = (x.clone(), y.clone());
        for i in (0..120).filter(|i| i % 5 == 0) {
            x2.extend_from_slice(&x[i * 4..(i + 1) * 4]);
            y2.push(y[i]);
        }
        let s = settings(1e-2, 0.0, false);
        let weighted = fit(
            &s,
            &Dataset {
                x: &x,
                y: &y,
                w: Some(&w),
                n: 120,
                d: 4,
            },
            None,
        )
        .unwrap();
        let n2 = y2.len();
        let duplicated = fit(
            &s,
            &Dataset {
                x: &x2,
                y: &y2,
                w: None,
                n: n2,
                d: 4,
            },
            None,
        )
        .unwrap();
        for (a, b) in weighted.coefficients.iter().zip(&duplicated.coefficients) {
            assert!((a - b).abs() < 1e-5, "{a} vs {b}");
        }
    }

    #[test]
    fn bad_labels_and_weights_are_rejected() {
        let x = [0.0f32, 1.0, 2.0];
        let data = |y: &'static [f64]| Dataset {
            x: &x,
            y,
            w: None,
            n: 3,
            d: 1,
        };
        let s = settings(0.0, 0.0, true);
        assert!(
            fit(&s, &data(&[0.0, 1.5, 1.0]), None)
                .unwrap_err()
                .contains("row 1")
        );
        assert!(fit(&s, &data(&[0.0, -1.0, 1.0]), None).is_err());
        assert!(fit(&s, &data(&[0.0, 1.0, 5.0]), Some(3)).is_err());
        let w = [1.0, -1.0, 1.0];
        let bad_w = Dataset {
            w: Some(&w),
            ..data(&[0.0, 1.0, 1.0])
        };
        assert!(fit(&s, &bad_w, None).unwrap_err().contains("weight"));
        let mut binomial = s.clone();
        binomial.family = Family::Binomial;
        assert!(fit(&binomial, &data(&[0.0, 1.0, 2.0]), None).is_err());
    }

    #[test]
    fn single_class_gives_infinite_intercept_like_spark() {
        let x = [0.0f32, 1.0, 2.0];
        let y = [1.0, 1.0, 1.0];
        let f = fit(
            &settings(0.0, 0.0, true),
            &Dataset {
                x: &x,
                y: &y,
                w: None,
                n: 3,
                d: 1,
            },
            Some(2),
        )
        .unwrap();
        assert_eq!(f.intercepts[0], f64::INFINITY);
        assert_eq!(f.predict(&[5.0]), 1.0);
    }
}
