//! Quasi-Newton minimisation: L-BFGS for smooth objectives and OWL-QN (orthant-wise L-BFGS,
//! Andrew & Gao 2007) when some coordinates carry an L1 term — the same pair Spark ML uses
//! (through Breeze) for logistic regression with L2 / elastic-net penalties.

/// Settings of [`minimize`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LbfgsConfig {
    /// Maximum number of iterations (each one a line search).
    pub max_iter: usize,
    /// Stop when the relative change of the objective over an iteration is below this.
    pub tol: f64,
    /// Number of (s, y) correction pairs kept.
    pub memory: usize,
}

impl Default for LbfgsConfig {
    fn default() -> Self {
        LbfgsConfig {
            max_iter: 100,
            tol: 1e-6,
            memory: 10,
        }
    }
}

/// Outcome of [`minimize`].
#[derive(Debug, Clone, PartialEq)]
pub struct OptimResult {
    pub x: Vec<f64>,
    /// Objective at `x`, L1 terms included.
    pub value: f64,
    pub iterations: usize,
    /// False when the iteration budget ran out or the objective became non-finite.
    pub converged: bool,
    /// Objective after each iteration (the first entry is the starting point).
    pub history: Vec<f64>,
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

fn norm(a: &[f64]) -> f64 {
    dot(a, a).sqrt()
}

/// Gradient of the smooth part plus the L1 part's minimum-norm subgradient.
fn pseudo_gradient(x: &[f64], g: &[f64], l1: &[f64]) -> Vec<f64> {
    x.iter()
        .zip(g)
        .zip(l1)
        .map(|((&xj, &gj), &c)| {
            if c == 0.0 {
                gj
            } else if xj > 0.0 {
                gj + c
            } else if xj < 0.0 {
                gj - c
            } else if gj + c < 0.0 {
                gj + c
            } else if gj - c > 0.0 {
                gj - c
            } else {
                0.0
            }
        })
        .collect()
}

fn l1_value(x: &[f64], l1: &[f64]) -> f64 {
    x.iter().zip(l1).map(|(xj, c)| c * xj.abs()).sum()
}

/// Minimises `f(x) + sum_j l1[j] * |x_j|`. `f` writes its gradient into the slice and returns
/// its value. With all `l1` zero this is plain L-BFGS.
pub fn minimize<F: FnMut(&[f64], &mut [f64]) -> f64>(
    mut f: F,
    x0: Vec<f64>,
    l1: &[f64],
    cfg: &LbfgsConfig,
) -> OptimResult {
    let n = x0.len();
    let l1: Vec<f64> = if l1.len() == n {
        l1.to_vec()
    } else {
        vec![0.0; n]
    };
    let has_l1 = l1.iter().any(|&c| c > 0.0);
    let mut x = x0;
    let mut g = vec![0.0; n];
    let mut value = f(&x, &mut g) + l1_value(&x, &l1);
    let mut history = vec![value];
    let mut s_hist: Vec<Vec<f64>> = Vec::new();
    let mut y_hist: Vec<Vec<f64>> = Vec::new();
    let mut iterations = 0;
    if !value.is_finite() {
        return OptimResult {
            x,
            value,
            iterations,
            converged: false,
            history,
        };
    }
    let memory = cfg.memory.max(1);
    let mut converged = false;

    while iterations < cfg.max_iter {
        let pg = pseudo_gradient(&x, &g, &l1);
        let pg_norm = norm(&pg);
        // Stationary to working precision (objectives here are O(1) means of losses).
        if pg_norm <= 1e-9 * value.abs().max(1.0) {
            converged = true;
            break;
        }

        // Two-loop recursion: d = -H pg.
        let mut q = pg.clone();
        let mut alphas = vec![0.0; s_hist.len()];
        for i in (0..s_hist.len()).rev() {
            let rho = 1.0 / dot(&y_hist[i], &s_hist[i]);
            alphas[i] = rho * dot(&s_hist[i], &q);
            q.iter_mut()
                .zip(&y_hist[i])
                .for_each(|(qj, yj)| *qj -= alphas[i] * yj);
        }
        if let (Some(s), Some(y)) = (s_hist.last(), y_hist.last()) {
            let gamma = dot(s, y) / dot(y, y);
            q.iter_mut().for_each(|qj| *qj *= gamma);
        }
        for i in 0..s_hist.len() {
            let rho = 1.0 / dot(&y_hist[i], &s_hist[i]);
            let beta = rho * dot(&y_hist[i], &q);
            q.iter_mut()
                .zip(&s_hist[i])
                .for_each(|(qj, sj)| *qj += (alphas[i] - beta) * sj);
        }
        let mut d: Vec<f64> = q.iter().map(|v| -v).collect();
        if has_l1 {
            // Keep only components that agree with the steepest-descent orthant.
            d.iter_mut().zip(&pg).for_each(|(dj, pj)| {
                if *dj * -pj <= 0.0 {
                    *dj = 0.0;
                }
            });
        }
        let mut slope = dot(&d, &pg);
        if slope >= 0.0 || !slope.is_finite() {
            // Not a descent direction: restart from steepest descent.
            s_hist.clear();
            y_hist.clear();
            d = pg.iter().map(|v| -v).collect();
            slope = -pg_norm * pg_norm;
        }
        // Orthant of the step for L1 coordinates.
        let orthant: Vec<f64> = x
            .iter()
            .zip(&pg)
            .map(
                |(&xj, &pj)| {
                    if xj != 0.0 { xj.signum() } else { -pj.signum() }
                },
            )
            .collect();

        let mut step = if s_hist.is_empty() {
            (1.0 / pg_norm).min(1.0)
        } else {
            1.0
        };
        let mut accepted = None;
        for _ in 0..60 {
            let mut x_new: Vec<f64> = x.iter().zip(&d).map(|(xj, dj)| xj + step * dj).collect();
            if has_l1 {
                for j in 0..n {
                    if l1[j] > 0.0 && x_new[j] * orthant[j] <= 0.0 {
                        x_new[j] = 0.0;
                    }
                }
            }
            let mut g_new = vec![0.0; n];
            let v_new = f(&x_new, &mut g_new) + l1_value(&x_new, &l1);
            let decrease: f64 = if has_l1 {
                x_new
                    .iter()
                    .zip(&x)
                    .zip(&pg)
                    .map(|((a, b), p)| (a - b) * p)
                    .sum()
            } else {
                step * slope
            };
            if v_new.is_finite() && v_new <= value + 1e-4 * decrease {
                accepted = Some((x_new, g_new, v_new));
                break;
            }
            step *= 0.5;
        }
        let Some((x_new, g_new, v_new)) = accepted else {
            // No further decrease is possible at machine precision: we are at the optimum
            // unless the gradient is still large.
            converged = pg_norm <= 1e-6 * norm(&x).max(1.0);
            break;
        };
        iterations += 1;
        let s: Vec<f64> = x_new.iter().zip(&x).map(|(a, b)| a - b).collect();
        let y: Vec<f64> = g_new.iter().zip(&g).map(|(a, b)| a - b).collect();
        let moved = norm(&s) > 1e-15 * norm(&x).max(1.0);
        if dot(&s, &y) > 1e-12 * norm(&s) * norm(&y) {
            if s_hist.len() == memory {
                s_hist.remove(0);
                y_hist.remove(0);
            }
            s_hist.push(s);
            y_hist.push(y);
        }
        let change = (value - v_new).abs() / value.abs().max(v_new.abs()).max(1.0);
        x = x_new;
        g = g_new;
        value = v_new;
        history.push(value);
        if change < cfg.tol || !moved {
            converged = true;
            break;
        }
    }
    OptimResult {
        x,
        value,
        iterations,
        converged,
        history,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lbfgs_minimises_rosenbrock() {
        let f = |x: &[f64], g: &mut [f64]| {
            let (a, b) = (x[0], x[1]);
            g[0] = -2.0 * (1.0 - a) - 400.0 * a * (b - a * a);
            g[1] = 200.0 * (b - a * a);
            (1.0 - a).powi(2) + 100.0 * (b - a * a).powi(2)
        };
        let cfg = LbfgsConfig {
            max_iter: 500,
            tol: 1e-15,
            memory: 10,
        };
        let r = minimize(f, vec![-1.2, 1.0], &[], &cfg);
        assert!(
            (r.x[0] - 1.0).abs() < 1e-5 && (r.x[1] - 1.0).abs() < 1e-5,
            "{:?}",
            r.x
        );
        assert!(r.history.windows(2).all(|w| w[1] <= w[0]));
    }

    #[test]
    fn owlqn_solves_separable_lasso_exactly() {
        // 0.5 * sum (x_j - c_j)^2 + lambda |x_j|  ->  soft-threshold(c_j, lambda).
        let c = [3.0, -0.5, 0.2, -2.0];
        let lambda = 1.0;
        let f = |x: &[f64], g: &mut [f64]| {
            let mut v = 0.0;
            for j in 0..4 {
                g[j] = x[j] - c[j];
                v += 0.5 * (x[j] - c[j]).powi(2);
            }
            v
        };
        let cfg = LbfgsConfig {
            max_iter: 200,
            tol: 1e-15,
            memory: 5,
        };
        let r = minimize(f, vec![0.0; 4], &[lambda; 4], &cfg);
        let expected = [2.0, 0.0, 0.0, -1.0];
        for (got, want) in r.x.iter().zip(expected) {
            assert!((got - want).abs() < 1e-8, "{:?}", r.x);
        }
        assert!(r.converged);
    }

    #[test]
    fn nan_objective_stops_without_panicking() {
        let r = minimize(|_, _| f64::NAN, vec![1.0], &[], &LbfgsConfig::default());
        assert!(!r.converged);
    }
}
