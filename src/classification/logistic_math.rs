// PLACEHOLDER (compile-only) — replaced by the real implementation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Family {
    Auto,
    Binomial,
    Multinomial,
}
#[derive(Clone, Debug)]
pub struct FitSettings {
    pub max_iter: usize,
    pub reg_param: f64,
    pub elastic_net_param: f64,
    pub tol: f64,
    pub fit_intercept: bool,
    pub standardization: bool,
    pub family: Family,
}
pub struct Dataset<'a> {
    pub x: &'a [f32],
    pub y: &'a [f64],
    pub w: Option<&'a [f64]>,
    pub n: usize,
    pub d: usize,
}
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct FittedLogistic {
    pub num_classes: usize,
    pub num_features: usize,
    pub multinomial: bool,
    pub coefficients: Vec<f64>,
    pub intercepts: Vec<f64>,
    pub objective_history: Vec<f64>,
    pub iterations: usize,
    pub converged: bool,
}
pub fn fit(
    _s: &FitSettings,
    _data: &Dataset,
    _num_classes: Option<usize>,
) -> Result<FittedLogistic, String> {
    Err("placeholder".into())
}
impl FittedLogistic {
    pub fn raw_prediction(&self, _x: &[f32]) -> Vec<f64> {
        vec![]
    }
    pub fn probability(&self, _raw: &[f64]) -> Vec<f64> {
        vec![]
    }
}
