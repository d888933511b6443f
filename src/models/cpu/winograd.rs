//! 3x3 stride-1 convolutions by Winograd's F(2x2, 3x3): each 2x2 block of output pixels from
//! its 4x4 input patch with 16 multiplies per channel pair instead of 36, as 16 GEMMs
//! `[tiles, C_in] x [C_in, C_out]` on the plan's GEMM.
//!
//! Why: the ResNets (and Inception, VGG) spend most of their time in these convolutions, with
//! the GEMM already at the machine's peak; fewer multiplies is what is left. F(2x2, 3x3)'s
//! transforms only add and halve, so results stay within f32 rounding of the direct sum
//! (larger tiles, F(4x4, 3x3), would multiply the rounding error by ~10).

use super::gemm::{self, Epilogue, PackedWeights};
use super::kernels::{Fused, Level, MulAdd, Separate, activate, level, multiversion};
use crate::models::layers::Act;

/// Tiles per block: the block's 16 transformed inputs and outputs stay in L2.
const TILES: usize = 32;

/// The 16 transformed `[C_in, C_out]` weight matrices `G g Gᵀ`, packed.
#[derive(Debug, Clone)]
pub struct WinogradWeights {
    input: usize,
    output: usize,
    u: Vec<PackedWeights>,
}

impl WinogradWeights {
    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.u.iter().map(PackedWeights::bytes).sum()
    }

    pub(super) fn for_each_pack(&mut self, f: &mut dyn FnMut(&mut PackedWeights)) {
        self.u.iter_mut().for_each(f);
    }

    /// From dense 3x3 weights `[3, 3, C_in, C_out]`.
    pub fn new(weight: &[f32], input: usize, output: usize) -> WinogradWeights {
        assert_eq!(
            weight.len(),
            9 * input * output,
            "weights are not [3, 3, C_in, C_out]"
        );
        let mut u = vec![vec![0.0f32; input * output]; 16];
        let g = |ky: usize, kx: usize, i: usize| weight[((ky * 3 + kx) * input) * output + i];
        // G = [[1, 0, 0], [1/2, 1/2, 1/2], [1/2, -1/2, 1/2], [0, 0, 1]], per (c_in, c_out).
        let transform = |v: [f32; 3]| {
            [
                v[0],
                0.5 * (v[0] + v[1] + v[2]),
                0.5 * (v[0] - v[1] + v[2]),
                v[2],
            ]
        };
        // Per (c_in, c_out): the columns of G g, then (G g) Gᵀ row by row, as `[r * 4 + c]`.
        let per_pair = (0..input * output).map(|i| {
            let cols: [[f32; 4]; 3] =
                std::array::from_fn(|kx| transform([g(0, kx, i), g(1, kx, i), g(2, kx, i)]));
            let rows: [[f32; 4]; 4] =
                std::array::from_fn(|r| transform([cols[0][r], cols[1][r], cols[2][r]]));
            std::array::from_fn::<f32, 16, _>(|x| rows[x / 4][x % 4])
        });
        for (i, values) in per_pair.enumerate() {
            for (matrix, v) in u.iter_mut().zip(values) {
                matrix[i] = v;
            }
        }
        WinogradWeights {
            input,
            output,
            u: u.iter()
                .map(|m| PackedWeights::new(m, input, output))
                .collect(),
        }
    }
}

/// Geometry of one image's convolution: input `height x width x C_in`, padding before, output
/// `out_height x out_width x C_out`.
#[derive(Debug, Clone, Copy)]
pub struct Shape {
    pub height: usize,
    pub width: usize,
    pub pad: [usize; 2],
    pub out_height: usize,
    pub out_width: usize,
}

multiversion! {
    /// `out = act(conv3x3(image) + bias [+ residual])` for one NHWC image, output rows
    /// `[2 * tile_rows.start, 2 * tile_rows.end)` (the last one clipped to the image): `out` and
    /// `residual` hold those rows only. Serial: callers split images or rows over threads.
    pub fn convolve(
        w: &WinogradWeights,
        image: &[f32],
        shape: Shape,
        tile_rows: std::ops::Range<usize>,
        bias: &[f32],
        residual: Option<&[f32]>,
        act: Option<Act>,
        out: &mut [f32],
    ) = convolve_body;
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn convolve_body<M: MulAdd>(
    w: &WinogradWeights,
    image: &[f32],
    shape: Shape,
    tile_rows: std::ops::Range<usize>,
    bias: &[f32],
    residual: Option<&[f32]>,
    act: Option<Act>,
    out: &mut [f32],
) {
    assert!(
        image.len() >= shape.height * shape.width * w.input,
        "winograd: image too short"
    );
    let rows = (2 * tile_rows.end).min(shape.out_height) - 2 * tile_rows.start;
    assert!(
        out.len() >= rows * shape.out_width * w.output,
        "winograd: out too short"
    );
    assert!(bias.len() >= w.output, "winograd: bias too short");
    if let Some(r) = residual {
        assert!(
            r.len() >= rows * shape.out_width * w.output,
            "winograd: residual too short"
        );
    }
    let (ci, co) = (w.input, w.output);
    let tw = shape.out_width.div_ceil(2);
    let tiles = tile_rows.len() * tw;
    let ty0 = tile_rows.start;
    let mut v = vec![0.0f32; 16 * TILES * ci];
    let mut m = vec![0.0f32; 16 * TILES * co];
    let zeros = vec![0.0f32; co];
    let mut patch = vec![0.0f32; 16 * ci];
    let mut y = vec![[0.0f32; 4]; co];
    for first in (0..tiles).step_by(TILES) {
        let block = TILES.min(tiles - first);
        for t in 0..block {
            let (ty, tx) = (ty0 + (first + t) / tw, (first + t) % tw);
            gather(image, shape, ci, ty, tx, &mut patch);
            input_transform(&patch, ci, t, TILES, &mut v);
        }
        for (xi, u) in w.u.iter().enumerate() {
            let epilogue = Epilogue {
                bias: &zeros,
                residual: None,
                act: None,
            };
            let a = &v[xi * TILES * ci..][..block * ci];
            gemm::multiply(
                block,
                a,
                ci,
                u,
                &mut m[xi * TILES * co..][..block * co],
                co,
                epilogue,
            );
        }
        for t in 0..block {
            let (ty, tx) = (ty0 + (first + t) / tw, (first + t) % tw);
            let at = Tile {
                t,
                ty,
                tx,
                first_row: 2 * ty0,
            };
            output_transform::<M>(&mut y, &m, co, at, shape, bias, residual, act, out);
        }
    }
}

/// The 4x4 input patch of tile (`ty`, `tx`), zeros off the image: `[4, 4, C]`.
#[inline(always)]
fn gather(image: &[f32], shape: Shape, c: usize, ty: usize, tx: usize, patch: &mut [f32]) {
    for r in 0..4 {
        let iy = (2 * ty + r) as isize - shape.pad[0] as isize;
        for q in 0..4 {
            let ix = (2 * tx + q) as isize - shape.pad[1] as isize;
            let dst = &mut patch[(r * 4 + q) * c..][..c];
            if (0..shape.height as isize).contains(&iy) && (0..shape.width as isize).contains(&ix) {
                dst.copy_from_slice(&image[(iy as usize * shape.width + ix as usize) * c..][..c]);
            } else {
                dst.fill(0.0);
            }
        }
    }
}

/// `Bᵀ d B` of a patch into row `t` of the 16 matrices `v[ξ]` (`stride` rows each, `C` wide).
/// Bᵀ = [[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]].
#[inline(always)]
fn input_transform(patch: &[f32], c: usize, t: usize, stride: usize, v: &mut [f32]) {
    let d = |r: usize, q: usize| &patch[(r * 4 + q) * c..][..c];
    for q in 0..4 {
        // Column q of Bᵀ d, kept in the output's rows 4 * r + q for now.
        let (d0, d1, d2, d3) = (d(0, q), d(1, q), d(2, q), d(3, q));
        for i in 0..c {
            let col = [d0[i] - d2[i], d1[i] + d2[i], d2[i] - d1[i], d1[i] - d3[i]];
            for (r, x) in col.into_iter().enumerate() {
                v[((r * 4 + q) * stride + t) * c + i] = x;
            }
        }
    }
    for r in 0..4 {
        // Row r of (Bᵀ d) B, in place.
        let at = |q: usize| ((r * 4 + q) * stride + t) * c;
        for i in 0..c {
            let x = [v[at(0) + i], v[at(1) + i], v[at(2) + i], v[at(3) + i]];
            let y = [x[0] - x[2], x[1] + x[2], x[2] - x[1], x[1] - x[3]];
            for (q, y) in y.into_iter().enumerate() {
                v[at(q) + i] = y;
            }
        }
    }
}

/// Tile `t` of a block, at tile row `ty` and column `tx`; `first_row` is the first output row
/// the caller's `out` holds.
#[derive(Clone, Copy)]
struct Tile {
    t: usize,
    ty: usize,
    tx: usize,
    first_row: usize,
}

/// `Aᵀ m A` of row `t` of the 16 products, plus bias, residual and activation, into the output
/// pixels of tile (`ty`, `tx`) that exist. Aᵀ = [[1, 1, 1, 0], [0, 1, -1, -1]].
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn output_transform<M: MulAdd>(
    y: &mut [[f32; 4]],
    m: &[f32],
    c: usize,
    Tile {
        t,
        ty,
        tx,
        first_row,
    }: Tile,
    shape: Shape,
    bias: &[f32],
    residual: Option<&[f32]>,
    act: Option<Act>,
    out: &mut [f32],
) {
    let at = |r: usize, q: usize| ((r * 4 + q) * TILES + t) * c;
    for (i, y) in y.iter_mut().enumerate().take(c) {
        let x = |r: usize, q: usize| m[at(r, q) + i];
        // Aᵀ m: two rows of four (written out: `array::from_fn` is not always inlined, and a
        // call per channel cost a quarter of ResNet-18's time).
        let top = |q: usize| x(0, q) + x(1, q) + x(2, q);
        let bottom = |q: usize| x(1, q) - x(2, q) - x(3, q);
        let top = [top(0), top(1), top(2), top(3)];
        let bottom = [bottom(0), bottom(1), bottom(2), bottom(3)];
        *y = [
            top[0] + top[1] + top[2],
            top[1] - top[2] - top[3],
            bottom[0] + bottom[1] + bottom[2],
            bottom[1] - bottom[2] - bottom[3],
        ];
    }
    for dy in 0..2 {
        let oy = 2 * ty + dy;
        for dx in 0..2 {
            let ox = 2 * tx + dx;
            if oy >= shape.out_height || ox >= shape.out_width {
                continue;
            }
            let at = ((oy - first_row) * shape.out_width + ox) * c;
            let px = &mut out[at..at + c];
            for (i, p) in px.iter_mut().enumerate() {
                *p = y[i][dy * 2 + dx] + bias[i];
            }
            if let Some(r) = residual {
                px.iter_mut().zip(&r[at..at + c]).for_each(|(p, r)| *p += r);
            }
            activate::<M>(px, act);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_the_direct_sum() {
        for (h, w, ci, co, pad) in [(7, 9, 5, 6, 1), (6, 6, 16, 40, 1), (5, 4, 3, 2, 0)] {
            let (oh, ow) = (h + 2 * pad - 2, w + 2 * pad - 2);
            let image: Vec<f32> = (0..h * w * ci)
                .map(|i| ((i * 7) % 13) as f32 * 0.25 - 1.5)
                .collect();
            let weight: Vec<f32> = (0..9 * ci * co)
                .map(|i| ((i * 5) % 11) as f32 * 0.125 - 0.625)
                .collect();
            let bias: Vec<f32> = (0..co).map(|i| i as f32 * 0.5 - 1.0).collect();
            let res: Vec<f32> = (0..oh * ow * co).map(|i| (i % 3) as f32 - 1.0).collect();
            let ww = WinogradWeights::new(&weight, ci, co);
            let shape = Shape {
                height: h,
                width: w,
                pad: [pad, pad],
                out_height: oh,
                out_width: ow,
            };
            let mut out = vec![f32::NAN; oh * ow * co];
            // Whole, then in two calls of tile rows.
            convolve(
                &ww,
                &image,
                shape,
                0..oh.div_ceil(2),
                &bias,
                Some(&res),
                Some(Act::Relu6),
                &mut out,
            );
            let mut split = vec![f32::NAN; oh * ow * co];
            let (top, bottom) = split.split_at_mut(2 * ow * co);
            convolve(
                &ww,
                &image,
                shape,
                0..1,
                &bias,
                Some(&res),
                Some(Act::Relu6),
                top,
            );
            let rest = &res[2 * ow * co..];
            convolve(
                &ww,
                &image,
                shape,
                1..oh.div_ceil(2),
                &bias,
                Some(rest),
                Some(Act::Relu6),
                bottom,
            );
            assert_eq!(split, out);
            for oy in 0..oh {
                for ox in 0..ow {
                    for k in 0..co {
                        let mut want = bias[k] + res[(oy * ow + ox) * co + k];
                        for ky in 0..3 {
                            for kx in 0..3 {
                                let (iy, ix) = (
                                    (oy + ky) as isize - pad as isize,
                                    (ox + kx) as isize - pad as isize,
                                );
                                if (0..h as isize).contains(&iy) && (0..w as isize).contains(&ix) {
                                    for c in 0..ci {
                                        want += image[(iy as usize * w + ix as usize) * ci + c]
                                            * weight[((ky * 3 + kx) * ci + c) * co + k];
                                    }
                                }
                            }
                        }
                        let want = want.clamp(0.0, 6.0);
                        let got = out[(oy * ow + ox) * co + k];
                        assert!(
                            (got - want).abs() < 1e-4,
                            "({h}x{w}, {ci}->{co}) at ({oy}, {ox}, {k}): {got} vs {want}"
                        );
                    }
                }
            }
        }
    }
}
