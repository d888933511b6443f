//! The fast CPU path: a network's folded layers copied once into a [`Plan`] of channels-last
//! (NHWC) operations that the featurizer and predictor run instead of burn-flex's generic ops.
//!
//! Why: burn-flex convolves in NCHW, so every convolution transposes its input to NHWC, rebuilds
//! its weight matrix, runs im2col, scatters the GEMM result back to NCHW, then adds the bias and
//! applies the activation in separate passes over memory. A plan keeps activations in NHWC from
//! the first layer to the last, packs each weight matrix once ([`gemm`]), runs 1x1 convolutions
//! as a plain GEMM on the activations, 3x3 stride-1 ones by Winograd's F(2x2, 3x3), depthwise
//! ones with SIMD over channels, and applies bias, shortcut and activation to each tile of GEMM
//! output while it is still in registers or cache. A batch runs one image per thread when it
//! has enough images, so that each image's activations stay in cache from layer to layer.
//!
//! Burn stays the model definition and the weight loader: [`CpuPlan::cpu_plan`] reads the
//! folded burn modules, and anything a plan does not cover (autodiff, a GPU device, dilation,
//! grouped non-depthwise convolutions) runs through burn as before. The golden parity tests run
//! both paths.

mod fused;
pub mod gemm;
pub mod kernels;
mod pool;
mod winograd;

use std::sync::Arc;

use burn::nn::PaddingConfig2d;
use burn::nn::conv::Conv2d;
use burn::prelude::*;
use rayon::prelude::*;

use super::ImageNetwork;
use super::layers::{Act, ConvBn, FoldBatchNorms, SqueezeExcitation};
use gemm::{Epilogue, PackedWeights, Taps};
pub use kernels::Precision;
use kernels::Window;
use winograd::WinogradWeights;

/// A batch of images, channels last: `data[((b * height + y) * width + x) * channels + c]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Nhwc {
    pub batch: usize,
    pub height: usize,
    pub width: usize,
    pub channels: usize,
    pub data: pool::Buffer,
}

impl Nhwc {
    /// From an NCHW tensor (one transpose).
    pub fn from_nchw(data: &[f32], [batch, channels, height, width]: [usize; 4]) -> Nhwc {
        let plane = height * width;
        let mut out = pool::take(batch * plane * channels);
        out.par_chunks_mut(plane * channels)
            .zip(data.par_chunks(plane * channels))
            .for_each(|(dst, src)| transpose_to_nhwc(src, channels, dst));
        Nhwc {
            batch,
            height,
            width,
            channels,
            data: out,
        }
    }

    /// Back to NCHW.
    pub fn to_nchw(&self) -> Vec<f32> {
        let plane = self.height * self.width;
        let c = self.channels;
        let mut out = vec![0.0; self.data.len()];
        out.par_chunks_mut(plane * c)
            .zip(self.data.par_chunks(plane * c))
            .for_each(|(dst, src)| {
                for (p, px) in src.chunks_exact(c).enumerate() {
                    for (ch, v) in px.iter().enumerate() {
                        dst[ch * plane + p] = *v;
                    }
                }
            });
        out
    }

    /// As an NCHW burn tensor on `device`.
    pub fn to_tensor(&self, device: &Device) -> Tensor<4> {
        let shape = [self.batch, self.channels, self.height, self.width];
        Tensor::from_data(TensorData::new(self.to_nchw(), shape), device)
    }

    fn image_len(&self) -> usize {
        self.height * self.width * self.channels
    }

    /// Image `b` of the batch.
    fn image(&self, b: usize) -> &[f32] {
        &self.data[b * self.image_len()..][..self.image_len()]
    }

    /// `data` shaped as `self` with `channels` channels and `height x width` pixels.
    fn with(&self, height: usize, width: usize, channels: usize, data: pool::Buffer) -> Nhwc {
        Nhwc {
            batch: self.batch,
            height,
            width,
            channels,
            data,
        }
    }
}

/// One image from channels-first (`src`, `channels` planes) to channels-last (`dst`).
fn transpose_to_nhwc(src: &[f32], channels: usize, dst: &mut [f32]) {
    let plane = src.len() / channels.max(1);
    for (p, px) in dst.chunks_exact_mut(channels).enumerate() {
        for (c, v) in px.iter_mut().enumerate() {
            *v = src[c * plane + p];
        }
    }
}

/// Why a plan could not run an input; the network then runs through burn.
pub type PlanError = String;

thread_local! {
    /// Set while this thread runs one image of a batch on its own (`Plan::run_batch`): its ops
    /// then run serially, the other threads having images of their own.
    static SERIAL: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Threads an op may split its work over.
fn op_threads() -> usize {
    if SERIAL.with(|s| s.get()) {
        1
    } else {
        rayon::current_num_threads().max(1)
    }
}

/// The smallest piece a parallel iterator over an op's rows is split into: everything, when
/// the op runs serially.
fn min_split() -> usize {
    if op_threads() == 1 { usize::MAX } else { 1 }
}

/// Padding as burn's `PaddingConfig2d` means it, resolved per input size.
#[derive(Debug, Clone, Copy)]
enum Padding {
    /// (top, left, bottom, right)
    Explicit([usize; 4]),
    /// TensorFlow "SAME": total padding split with the extra pixel after.
    Same,
}

impl Padding {
    /// `[top, left, bottom, right]` for an input of `height x width`.
    fn resolve(
        &self,
        height: usize,
        width: usize,
        kernel: [usize; 2],
        stride: [usize; 2],
    ) -> [usize; 4] {
        match *self {
            Padding::Explicit(p) => p,
            Padding::Same => {
                let same = |size: usize, k: usize, s: usize| {
                    let total = ((size.div_ceil(s).max(1) - 1) * s + k).saturating_sub(size);
                    (total / 2, total - total / 2)
                };
                let (top, bottom) = same(height, kernel[0], stride[0]);
                let (left, right) = same(width, kernel[1], stride[1]);
                [top, left, bottom, right]
            }
        }
    }
}

/// Output size of a window over `size` (PyTorch's formula, with its ceil-mode rule that the
/// last window starts inside the input or its leading padding).
fn out_size(
    size: usize,
    kernel: usize,
    stride: usize,
    pad_begin: usize,
    pad_end: usize,
    ceil: bool,
) -> Option<usize> {
    let span = (size + pad_begin + pad_end).checked_sub(kernel)?;
    let mut out = if ceil {
        span.div_ceil(stride)
    } else {
        span / stride
    } + 1;
    if ceil && (out - 1) * stride >= size + pad_begin {
        out -= 1;
    }
    Some(out)
}

/// A convolution with its bias, an optional shortcut added, then its activation:
/// `act(conv(x) + bias [+ shortcut])`.
#[derive(Debug, Clone)]
pub struct Conv {
    input: usize,
    output: usize,
    kernel: [usize; 2],
    stride: [usize; 2],
    padding: Padding,
    weights: ConvWeights,
    bias: Vec<f32>,
    act: Option<Act>,
}

#[derive(Debug, Clone)]
enum ConvWeights {
    /// `[kh * kw * C_in, C_out]`, the GEMM's right-hand side, packed once.
    Dense(PackedWeights),
    /// `[kh, kw, C]`.
    Depthwise(Vec<f32>),
    /// A 3x3 stride-1 convolution's, transformed for Winograd's F(2x2, 3x3).
    Winograd(WinogradWeights),
    /// As `Dense`, for a convolution whose taps the GEMM reads in place ([`Conv::taps`]).
    /// Kept in `f32` in every precision: the bfloat16 kernel converts contiguous rows of A,
    /// and a window of several runs is not one.
    Taps(PackedWeights),
}

/// A tensor's values as `f32`, `None` for another dtype (the plan then is not built).
fn floats<const D: usize>(t: Tensor<D>) -> Option<Vec<f32>> {
    t.into_data().try_into_vec::<f32>().ok()
}

impl Conv {
    /// The plan's copy of a burn convolution followed by `act`; `None` for what the plan does
    /// not run (dilation, groups other than 1 or depthwise, a non-`f32` weight).
    pub fn from_burn(conv: &Conv2d, act: Option<Act>) -> Option<Conv> {
        let (conv, weight) = Conv::unpacked(conv, act)?;
        Some(match conv.weights {
            ConvWeights::Depthwise(_) => conv,
            ConvWeights::Dense(_) if conv.winograd() => Conv {
                weights: ConvWeights::Winograd(WinogradWeights::new(
                    &weight,
                    conv.input,
                    conv.output,
                )),
                ..conv
            },
            _ => {
                let k = conv.kernel[0] * conv.kernel[1] * conv.input;
                let weight = PackedWeights::new(&weight, k, conv.output);
                let weights = if conv.taps() {
                    ConvWeights::Taps(weight)
                } else {
                    ConvWeights::Dense(weight)
                };
                Conv { weights, ..conv }
            }
        })
    }

    /// The plan's copy of `conv` with its dense weights `[kh, kw, C_in, C_out]` beside it, not
    /// packed yet (an empty pack in the `Conv`).
    fn unpacked(conv: &Conv2d, act: Option<Act>) -> Option<(Conv, Vec<f32>)> {
        let [output, per_group, kh, kw] = conv.weight.dims();
        let input = per_group * conv.groups;
        let depthwise = conv.groups > 1 && per_group == 1 && output == conv.groups;
        if conv.dilation != [1, 1] || (conv.groups != 1 && !depthwise) {
            return None;
        }
        let padding = match conv.padding {
            PaddingConfig2d::Same => Padding::Same,
            PaddingConfig2d::Valid => Padding::Explicit([0; 4]),
            PaddingConfig2d::Explicit(top, left, bottom, right) => {
                Padding::Explicit([top, left, bottom, right])
            }
        };
        let w = floats(conv.weight.val())?;
        let mut weight = vec![0.0; w.len()];
        // burn: [C_out, C_in / groups, kh, kw].
        for o in 0..output {
            for i in 0..per_group {
                for y in 0..kh {
                    for x in 0..kw {
                        let src = ((o * per_group + i) * kh + y) * kw + x;
                        let dst = if depthwise {
                            (y * kw + x) * output + o
                        } else {
                            ((y * kw + x) * input + i) * output + o
                        };
                        weight[dst] = w[src];
                    }
                }
            }
        }
        let bias = match &conv.bias {
            Some(b) => floats(b.val())?,
            None => vec![0.0; output],
        };
        let weights = if depthwise {
            ConvWeights::Depthwise(std::mem::take(&mut weight))
        } else {
            ConvWeights::Dense(PackedWeights::new(&[], 0, 0))
        };
        let conv = Conv {
            input,
            output,
            kernel: [kh, kw],
            stride: conv.stride,
            padding,
            weights,
            bias,
            act,
        };
        Some((conv, weight))
    }

    /// A folded conv + BatchNorm pair; `None` while the BatchNorm is still there.
    pub fn from_conv_bn(conv: &ConvBn, act: Option<Act>) -> Option<Conv> {
        if conv.bn.is_some() {
            return None;
        }
        Conv::from_burn(&conv.conv, act)
    }

    /// The sliding window over `x` and the output height.
    fn window(&self, x: &Nhwc) -> Result<(Window, usize), PlanError> {
        self.window_over(x.channels, x.height, x.width)
    }

    /// The sliding window over a `height x width` image of `channels`, and the output height.
    fn window_over(
        &self,
        channels: usize,
        height: usize,
        width: usize,
    ) -> Result<(Window, usize), PlanError> {
        if channels != self.input {
            return Err(format!(
                "convolution expects {} channels, got {}",
                self.input, channels
            ));
        }
        let pad = self
            .padding
            .resolve(height, width, self.kernel, self.stride);
        let oh = out_size(
            height,
            self.kernel[0],
            self.stride[0],
            pad[0],
            pad[2],
            false,
        );
        let ow = out_size(width, self.kernel[1], self.stride[1], pad[1], pad[3], false);
        let (Some(oh), Some(ow)) = (oh, ow) else {
            return Err(format!(
                "a {}x{} input is smaller than a {:?} kernel",
                height, width, self.kernel
            ));
        };
        let win = Window {
            height,
            width,
            channels,
            kernel: self.kernel,
            stride: self.stride,
            pad: [pad[0], pad[1]],
            out_width: ow,
        };
        Ok((win, oh))
    }

    fn run(&self, x: &Nhwc, shortcut: Option<&Nhwc>) -> Result<Nhwc, PlanError> {
        let (win, oh) = self.window(x)?;
        let ow = win.out_width;
        let n = self.output;
        let rows = x.batch * oh * ow;
        if let Some(s) = shortcut
            && s.data.len() != rows * n
        {
            return Err("shortcut and block output differ in shape".to_string());
        }
        let mut out = pool::take(rows * n);
        match &self.weights {
            ConvWeights::Depthwise(weight) => {
                self.run_depthwise(weight, x, win, oh, shortcut, &mut out)
            }
            ConvWeights::Dense(weight) => self.run_dense(weight, x, win, oh, shortcut, &mut out),
            ConvWeights::Winograd(weight) => {
                self.run_winograd(weight, x, win, oh, shortcut, &mut out)
            }
            ConvWeights::Taps(weight) => self.run_taps(weight, x, win, oh, shortcut, &mut out),
        }
        Ok(x.with(oh, ow, n, out))
    }

    fn for_each_pack(&mut self, f: &mut dyn FnMut(&mut PackedWeights)) {
        match &mut self.weights {
            ConvWeights::Dense(w) => f(w),
            ConvWeights::Depthwise(_) | ConvWeights::Taps(_) => {}
            ConvWeights::Winograd(w) => w.for_each_pack(f),
        }
    }

    fn weight_bytes(&self) -> usize {
        4 * self.bias.len()
            + match &self.weights {
                ConvWeights::Dense(w) | ConvWeights::Taps(w) => w.bytes(),
                ConvWeights::Depthwise(w) => 4 * w.len(),
                ConvWeights::Winograd(w) => w.bytes(),
            }
    }

    /// Whether this convolution runs by Winograd: 3x3, stride 1, dense, with enough channels
    /// for the 16 products to be GEMMs worth the transforms, which cost `in + out` per tile
    /// against the products' `in x out`. Measured per op: im2col ran 16 -> 64 (SqueezeNet),
    /// 32 -> 32 and 32 -> 64 (Inception's stem) 1.1-1.5x faster, Winograd 32 -> 128 and
    /// 64 -> 64 1.1-1.3x faster.
    fn winograd(&self) -> bool {
        self.kernel == [3, 3]
            && self.stride == [1, 1]
            && matches!(self.weights, ConvWeights::Dense(_))
            && self.input * self.output >= 24 * (self.input + self.output)
    }

    /// Whether the GEMM reads this dense convolution's taps in place, from a padded copy of
    /// the input rows (or the input itself, unpadded), instead of an im2col copy: when each
    /// window is one slice of the product. The RGB stems' im2col rows are 3 (3x3) to 16 (7x7)
    /// times their input, and took half of a stem's time (3 -> 16 channels, 3x3 stride 2).
    fn taps(&self) -> bool {
        let pointwise = self.kernel == [1, 1] && self.stride == [1, 1];
        !pointwise && self.kernel[0] * self.kernel[1] * self.input <= gemm::KC
    }

    fn run_winograd(
        &self,
        weight: &WinogradWeights,
        x: &Nhwc,
        win: Window,
        oh: usize,
        shortcut: Option<&Nhwc>,
        out: &mut [f32],
    ) {
        let (ow, n) = (win.out_width, self.output);
        let shape = winograd::Shape {
            height: x.height,
            width: x.width,
            pad: win.pad,
            out_height: oh,
            out_width: ow,
        };
        let image_out = oh * ow * n;
        // Tile rows: two output rows each.
        row_pieces(out, x.batch, oh, 2, ow * n)
            .into_par_iter()
            .with_min_len(min_split())
            .for_each(|(b, rows, piece)| {
                let start = b * image_out + 2 * rows.start * ow * n;
                let residual = shortcut.map(|s| &s.data[start..][..piece.len()]);
                winograd::convolve(
                    weight,
                    x.image(b),
                    shape,
                    rows,
                    &self.bias,
                    residual,
                    self.act,
                    piece,
                );
            });
    }

    fn run_taps(
        &self,
        weight: &PackedWeights,
        x: &Nhwc,
        win: Window,
        oh: usize,
        shortcut: Option<&Nhwc>,
        out: &mut [f32],
    ) {
        let (ow, n, c) = (win.out_width, self.output, win.channels);
        let ([kh, kw], [sh, sw]) = (win.kernel, win.stride);
        // The input as the windows read it: `width` values apart, every window inside.
        let width = (ow - 1) * sw + kw;
        let in_place = win.pad == [0, 0] && width <= win.width && (oh - 1) * sh + kh <= win.height;
        let width = if in_place { win.width } else { width };
        let taps = Taps {
            count: kh,
            len: kw * c,
            stride: width * c,
        };
        let image_out = oh * ow * n;
        row_pieces(out, x.batch, oh, 1, ow * n)
            .into_par_iter()
            .with_min_len(min_split())
            .for_each(|(b, rows, piece)| {
                let image = x.image(b);
                let band_rows = (rows.len() - 1) * sh + kh;
                let mut band = None;
                let input: &[f32] = if in_place {
                    &image[rows.start * sh * width * c..]
                } else {
                    let band = band.insert(pool::take(band_rows * width * c));
                    kernels::padded_rows(image, win, rows.start * sh, width, band);
                    band
                };
                let start = b * image_out + rows.start * ow * n;
                for (i, row_out) in piece.chunks_exact_mut(ow * n).enumerate() {
                    let at = start + i * ow * n;
                    let epilogue = Epilogue {
                        bias: &self.bias,
                        residual: shortcut.map(|s| &s.data[at..][..ow * n]),
                        act: self.act,
                    };
                    let a = &input[i * sh * width * c..];
                    gemm::multiply_taps(ow, a, sw * c, taps, weight, row_out, n, epilogue);
                }
            });
    }

    fn run_depthwise(
        &self,
        weight: &[f32],
        x: &Nhwc,
        win: Window,
        oh: usize,
        shortcut: Option<&Nhwc>,
        out: &mut [f32],
    ) {
        let row_len = win.out_width * self.output;
        out.par_chunks_mut(row_len)
            .with_min_len(min_split())
            .enumerate()
            .for_each(|(r, row)| {
                let (b, oy) = (r / oh, r % oh);
                let image = x.image(b);
                match shortcut {
                    None => {
                        kernels::depthwise_row(image, weight, &self.bias, win, oy, self.act, row)
                    }
                    Some(s) => {
                        kernels::depthwise_row(image, weight, &self.bias, win, oy, None, row);
                        let res = &s.data[r * row_len..][..row_len];
                        kernels::epilogue(row, self.output, None, Some(res), self.act);
                    }
                }
            });
    }

    fn run_dense(
        &self,
        weight: &PackedWeights,
        x: &Nhwc,
        win: Window,
        oh: usize,
        shortcut: Option<&Nhwc>,
        out: &mut [f32],
    ) {
        let n = self.output;
        let k = weight.k();
        let rows = x.batch * oh * win.out_width;
        // A 1x1, stride-1, unpadded convolution reads the activations as the GEMM's left side.
        let direct = self.kernel == [1, 1]
            && self.stride == [1, 1]
            && win.out_width == x.width
            && oh == x.height;
        // Rows per block: a block's rows and results stay within ~4 MiB, its im2col rows and
        // results within ~512 KiB (L2: written, then read right back); the blocks are
        // balanced over the threads and whole micro-kernel tiles (8 rows).
        let threads = op_threads();
        let cap = if direct {
            ((1 << 20) / (k + n)).max(64)
        } else {
            ((1 << 17) / (k + n)).max(256)
        };
        let blocks = rows.div_ceil(cap).div_ceil(threads) * threads;
        let block = rows.div_ceil(blocks).div_ceil(8) * 8;
        out.par_chunks_mut(block * n)
            .with_min_len(min_split())
            .enumerate()
            .for_each(|(i, chunk)| {
                let first = i * block;
                let m = chunk.len() / n;
                let mut cols = None;
                let a: &[f32] = if direct {
                    &x.data[first * k..][..m * k]
                } else {
                    let cols = cols.insert(pool::take(m * k));
                    kernels::im2col(&x.data, win, oh, first, cols);
                    cols
                };
                let epilogue = Epilogue {
                    bias: &self.bias,
                    residual: shortcut.map(|s| &s.data[first * n..][..m * n]),
                    act: self.act,
                };
                gemm::multiply(m, a, k, weight, chunk, n, epilogue);
            });
    }
}

/// `out` (`batch` images of `height` rows of `row_len` values) in pieces of whole units of
/// `unit` rows (the last unit of an image may be shorter), a few per thread over the batch:
/// `(image, units, piece)`.
fn row_pieces(
    out: &mut [f32],
    batch: usize,
    height: usize,
    unit: usize,
    row_len: usize,
) -> Vec<(usize, std::ops::Range<usize>, &mut [f32])> {
    let units = height.div_ceil(unit);
    let pieces = (op_threads() * 2).div_ceil(batch).clamp(1, units);
    let per = units.div_ceil(pieces);
    let pieces = units.div_ceil(per);
    let mut chunks = Vec::with_capacity(batch * pieces);
    for (b, image) in out.chunks_mut(height * row_len).enumerate() {
        let mut rest = image;
        for p in 0..pieces {
            let rows = p * per..((p + 1) * per).min(units);
            let len = ((unit * rows.end).min(height) - unit * rows.start) * row_len;
            let (piece, tail) = rest.split_at_mut(len);
            rest = tail;
            chunks.push((b, rows, piece));
        }
    }
    chunks
}

/// A max or average pool (average counts padded zeros, PyTorch's default).
#[derive(Debug, Clone, Copy)]
pub struct Pool {
    pub kernel: usize,
    pub stride: usize,
    pub padding: usize,
    pub ceil: bool,
    pub average: bool,
}

impl Pool {
    fn run(&self, x: &Nhwc) -> Result<Nhwc, PlanError> {
        let size = |s| {
            out_size(
                s,
                self.kernel,
                self.stride,
                self.padding,
                self.padding,
                self.ceil,
            )
        };
        let (Some(oh), Some(ow)) = (size(x.height), size(x.width)) else {
            return Err(format!(
                "a {}x{} input is smaller than the pool",
                x.height, x.width
            ));
        };
        let win = Window {
            height: x.height,
            width: x.width,
            channels: x.channels,
            kernel: [self.kernel; 2],
            stride: [self.stride; 2],
            pad: [self.padding; 2],
            out_width: ow,
        };
        let row_len = ow * x.channels;
        let mut out = pool::take(x.batch * oh * row_len);
        out.par_chunks_mut(row_len)
            .with_min_len(min_split())
            .enumerate()
            .for_each(|(r, row)| {
                let (b, oy) = (r / oh, r % oh);
                let image = x.image(b);
                if self.average {
                    kernels::avg_pool_row(image, win, oy, row);
                } else {
                    kernels::max_pool_row(image, win, oy, row);
                }
            });
        Ok(x.with(oh, ow, x.channels, out))
    }
}

/// Squeeze-and-excitation: `x * gate(fc2(act(fc1(mean(x)))))` per image.
#[derive(Debug, Clone)]
pub struct SqueezeExcite {
    /// `[C, squeeze]` and `[squeeze, C]`, as [`kernels::dense`] takes them.
    fc1: (Vec<f32>, Vec<f32>),
    fc2: (Vec<f32>, Vec<f32>),
    act: Act,
    gate: Act,
}

impl SqueezeExcite {
    pub fn from_burn(se: &SqueezeExcitation, act: Act, gate: Act) -> Option<SqueezeExcite> {
        // fc1, fc2 are 1x1 convolutions with bias: their dense weights are `[C_in, C_out]`.
        let fc = |conv: &Conv2d| {
            let (c, weight) = Conv::unpacked(conv, None)?;
            let dense = matches!(c.weights, ConvWeights::Dense(_));
            (c.kernel == [1, 1] && dense).then_some((weight, c.bias))
        };
        Some(SqueezeExcite {
            fc1: fc(&se.fc1)?,
            fc2: fc(&se.fc2)?,
            act,
            gate,
        })
    }

    /// Scales `x` in place (the plan owns every activation after its input).
    fn run(&self, mut x: Nhwc) -> Result<Nhwc, PlanError> {
        let c = x.channels;
        if !self.fc1.0.len().is_multiple_of(c) || self.fc2.1.len() != c {
            return Err("squeeze-excite expects other channels".to_string());
        }
        let squeeze = self.fc1.1.len();
        let image_len = x.image_len();
        x.data
            .par_chunks_mut(image_len)
            .with_min_len(min_split())
            .for_each(|image| {
                let mut mean = vec![0.0; c];
                let mut hidden = vec![0.0; squeeze];
                let mut gate = vec![0.0; c];
                kernels::channel_mean(image, c, &mut mean);
                kernels::dense(&mean, &self.fc1.0, &self.fc1.1, Some(self.act), &mut hidden);
                kernels::dense(
                    &hidden,
                    &self.fc2.0,
                    &self.fc2.1,
                    Some(self.gate),
                    &mut gate,
                );
                kernels::scale_channels(image, &gate);
            });
        Ok(x)
    }
}

/// One step of a plan.
#[derive(Debug, Clone)]
pub enum Op {
    Conv(Conv),
    Pool(Pool),
    SqueezeExcite(SqueezeExcite),
    /// `body(x)` with `shortcut(x)` (`x` itself when empty) added before the last
    /// convolution's activation; [`Op::residual`] checks the body ends in one.
    Residual {
        shortcut: Vec<Op>,
        body: Vec<Op>,
    },
    /// The branches' outputs concatenated along channels.
    Concat(Vec<Vec<Op>>),
    /// Expand, depthwise and project convolutions run band by band ([`Plan::new`] fuses them).
    InvertedResidual(Box<fused::InvertedResidual>),
}

impl Op {
    /// A residual block; `None` unless `body` ends in a convolution.
    pub fn residual(shortcut: Vec<Op>, body: Vec<Op>) -> Option<Op> {
        matches!(body.last(), Some(Op::Conv(_))).then_some(Op::Residual { shortcut, body })
    }

    pub fn max_pool(kernel: usize, stride: usize, padding: usize, ceil: bool) -> Op {
        Op::Pool(Pool {
            kernel,
            stride,
            padding,
            ceil,
            average: false,
        })
    }

    pub fn avg_pool(kernel: usize, stride: usize, padding: usize) -> Op {
        Op::Pool(Pool {
            kernel,
            stride,
            padding,
            ceil: false,
            average: true,
        })
    }

    /// Calls `f` on each packed GEMM operand of the op.
    fn for_each_pack(&mut self, f: &mut dyn FnMut(&mut PackedWeights)) {
        let mut all = |ops: &mut [Op]| ops.iter_mut().for_each(|op| op.for_each_pack(f));
        match self {
            Op::Conv(conv) => conv.for_each_pack(f),
            Op::Pool(_) | Op::SqueezeExcite(_) => {}
            Op::Residual { shortcut, body } => {
                all(shortcut);
                all(body);
            }
            Op::Concat(branches) => branches.iter_mut().for_each(|b| all(b)),
            Op::InvertedResidual(block) => block.convs_mut().for_each(|c| c.for_each_pack(f)),
        }
    }

    /// Bytes of weights the op reads per pass.
    fn weight_bytes(&self) -> usize {
        let all = |ops: &[Op]| ops.iter().map(Op::weight_bytes).sum::<usize>();
        match self {
            Op::Conv(conv) => conv.weight_bytes(),
            Op::Pool(_) => 0,
            Op::SqueezeExcite(se) => {
                4 * (se.fc1.0.len() + se.fc1.1.len() + se.fc2.0.len() + se.fc2.1.len())
            }
            Op::Residual { shortcut, body } => all(shortcut) + all(body),
            Op::Concat(branches) => branches.iter().map(|b| all(b)).sum(),
            Op::InvertedResidual(block) => block.weight_bytes(),
        }
    }

    fn run(&self, x: &Nhwc) -> Result<Nhwc, PlanError> {
        match self {
            Op::Conv(conv) => conv.run(x, None),
            Op::Pool(pool) => pool.run(x),
            Op::SqueezeExcite(se) => se.run(x.clone()),
            Op::InvertedResidual(block) => block.run(x),
            Op::Residual { shortcut, body } => {
                let projected;
                let s = if shortcut.is_empty() {
                    x
                } else {
                    projected = run_all(shortcut, x)?;
                    &projected
                };
                let Some((Op::Conv(last), init)) = body.split_last() else {
                    return Err("a residual body must end in a convolution".to_string());
                };
                let y = run_all(init, x)?;
                last.run(&y, Some(s))
            }
            Op::Concat(branches) => {
                let outs = branches
                    .par_iter()
                    .with_min_len(min_split())
                    .map(|b| run_all(b, x))
                    .collect::<Result<Vec<_>, _>>()?;
                concat(&outs)
            }
        }
    }
}

/// How many times an image's activations an op's weights may weigh for the op to still run
/// image by image. Past it the batch runs whole: MobileNetV3 and Lite0 at batch 32 ran 3-7%
/// faster with their 7x7 blocks (weights ~40x an image's input) batched; ResNet-50 ran slower
/// with its 28x28 stage (~1x) batched.
const WEIGHTS_PER_IMAGE_BYTES: usize = 16;

/// Runs `ops` in order on `x` while `go(op's index, its input)` holds: how many ran, and the
/// last output (`None` when none ran).
fn run_while(
    ops: &[Op],
    x: &Nhwc,
    go: impl Fn(usize, &Nhwc) -> bool,
) -> Result<(usize, Option<Nhwc>), PlanError> {
    let mut current: Option<Nhwc> = None;
    for (i, op) in ops.iter().enumerate() {
        if !go(i, current.as_ref().unwrap_or(x)) {
            return Ok((i, current));
        }
        current = Some(match (op, current.take()) {
            (Op::SqueezeExcite(se), Some(owned)) => se.run(owned)?,
            (op, borrowed) => op.run(borrowed.as_ref().unwrap_or(x))?,
        });
    }
    Ok((ops.len(), current))
}

/// Runs `ops` in order on `x` (a copy of `x` when there are none).
fn run_all(ops: &[Op], x: &Nhwc) -> Result<Nhwc, PlanError> {
    let (_, out) = run_while(ops, x, |_, _| true)?;
    Ok(out.unwrap_or_else(|| x.clone()))
}

fn concat(parts: &[Nhwc]) -> Result<Nhwc, PlanError> {
    let Some(first) = parts.first() else {
        return Err("concatenation of nothing".to_string());
    };
    if parts
        .iter()
        .any(|p| (p.batch, p.height, p.width) != (first.batch, first.height, first.width))
    {
        return Err("concatenated branches differ in size".to_string());
    }
    let channels: usize = parts.iter().map(|p| p.channels).sum();
    let pixels = first.batch * first.height * first.width;
    let mut data = pool::take(pixels * channels);
    let chunk = pixels.div_ceil(op_threads() * 4).max(1);
    data.par_chunks_mut(chunk * channels)
        .with_min_len(min_split())
        .enumerate()
        .for_each(|(i, out)| {
            for (j, px) in out.chunks_exact_mut(channels).enumerate() {
                let p = i * chunk + j;
                let mut offset = 0;
                for part in parts {
                    let c = part.channels;
                    px[offset..offset + c].copy_from_slice(&part.data[p * c..(p + 1) * c]);
                    offset += c;
                }
            }
        });
    Ok(first.with(first.height, first.width, channels, data))
}

/// A network's feature map as NHWC operations.
#[derive(Debug, Clone)]
pub struct Plan {
    ops: Vec<Op>,
    /// Bytes of weights each op reads.
    weight_bytes: Vec<usize>,
}

impl Plan {
    pub fn new(ops: Vec<Op>) -> Plan {
        let ops = fused::fuse(ops);
        let weight_bytes = ops.iter().map(Op::weight_bytes).collect();
        Plan { ops, weight_bytes }
    }

    /// This `f32` plan with its GEMMs' weights packed for `precision`; depthwise convolutions
    /// and squeeze-excites stay `f32`. Bfloat16 needs the AVX-512 BF16 instructions: without
    /// them the plan stays `f32` (said once on stderr).
    pub fn in_precision(mut self, precision: Precision) -> Plan {
        if precision == Precision::Bf16 && !kernels::bf16_supported() {
            static ONCE: std::sync::Once = std::sync::Once::new();
            ONCE.call_once(|| {
                eprintln!(
                    "deep-pipelines: precision bfloat16 needs AVX-512 BF16 instructions, which \
                     this CPU (or {}) does not give; running float32",
                    kernels::SIMD_ENV
                )
            });
            return self;
        }
        if precision != Precision::F32 {
            for op in &mut self.ops {
                op.for_each_pack(&mut |w| *w = w.in_precision(precision));
            }
            self.weight_bytes = self.ops.iter().map(Op::weight_bytes).collect();
        }
        self
    }

    /// Runs the plan on an NHWC batch.
    pub fn run(&self, x: &Nhwc) -> Result<Nhwc, PlanError> {
        let [c, h, w] = [x.channels, x.height, x.width];
        self.run_batch(
            x.batch,
            x.image_len(),
            |b, dst| dst.copy_from_slice(x.image(b)),
            [c, h, w],
        )
    }

    /// Runs the plan on an NCHW batch `[batch, channels, height, width]` (each image turned
    /// channels-last by the task that runs it).
    pub fn run_nchw(&self, data: &[f32], dims: [usize; 4]) -> Result<Nhwc, PlanError> {
        let [batch, channels, height, width] = dims;
        let len = channels * height * width;
        if data.len() != batch * len {
            return Err(format!("input has {} values, not {dims:?}", data.len()));
        }
        let image =
            |b: usize, dst: &mut [f32]| transpose_to_nhwc(&data[b * len..][..len], channels, dst);
        self.run_batch(batch, len, image, [channels, height, width])
    }

    /// Runs the plan over `batch` images that `fill(b, buffer)` writes channels-last: one image
    /// per task when there are at least as many images as threads, so that each image's
    /// activations stay in cache from layer to layer (a whole batch's do not: 32 MobileNet
    /// images are 150 MB per layer); the whole batch at once, split inside each op, otherwise.
    fn run_batch(
        &self,
        batch: usize,
        image_len: usize,
        fill: impl Fn(usize, &mut [f32]) + Sync,
        [channels, height, width]: [usize; 3],
    ) -> Result<Nhwc, PlanError> {
        let input = |images: std::ops::Range<usize>| {
            let mut data = pool::take(images.len() * image_len);
            for (b, dst) in images.zip(data.chunks_exact_mut(image_len)) {
                fill(b, dst);
            }
            Nhwc {
                batch: data.len() / image_len.max(1),
                height,
                width,
                channels,
                data,
            }
        };
        if batch < 2 || batch < rayon::current_num_threads() {
            return run_all(&self.ops, &input(0..batch));
        }
        // Image by image while an op's weights are small beside an image's activations, then
        // the whole batch at once, where each weight read serves every image.
        let outs = (0..batch)
            .into_par_iter()
            .map(|b| {
                SERIAL.with(|s| s.set(true));
                let image = input(b..b + 1);
                let out = run_while(&self.ops, &image, |i, x| {
                    self.weight_bytes[i] <= WEIGHTS_PER_IMAGE_BYTES * 4 * x.image_len()
                })
                .map(|(split, out)| (split, out.unwrap_or(image)));
                SERIAL.with(|s| s.set(false));
                out
            })
            .collect::<Result<Vec<_>, _>>()?;
        let split = outs[0].0;
        if outs.iter().any(|(s, _)| *s != split) {
            return Err("images of one batch stopped at different ops".to_string());
        }
        let outs: Vec<Nhwc> = outs.into_iter().map(|(_, x)| x).collect();
        let first = &outs[0];
        let mut data = pool::take(batch * first.image_len());
        for (dst, out) in data.chunks_exact_mut(first.image_len()).zip(&outs) {
            dst.copy_from_slice(&out.data);
        }
        let images = Nhwc {
            batch,
            height: first.height,
            width: first.width,
            channels: first.channels,
            data,
        };
        drop(outs);
        let (_, out) = run_while(&self.ops[split..], &images, |_, _| true)?;
        Ok(out.unwrap_or(images))
    }

    /// The feature map of an NCHW `f32` tensor, as an NCHW tensor on the input's device.
    pub fn feature_map(&self, input: &Tensor<4>) -> Result<Tensor<4>, PlanError> {
        let dims = input.dims();
        let data = floats(input.clone()).ok_or("input is not f32")?;
        Ok(self.run_nchw(&data, dims)?.to_tensor(&input.device()))
    }
}

/// How a built-in network is written as a [`Plan`], once its BatchNorms are folded.
pub trait CpuPlan {
    /// `None` when some layer is not one a plan runs (or a BatchNorm is not folded yet).
    fn cpu_plan(&self) -> Option<Plan>;
}

/// A network whose feature map runs through its [`Plan`] on the CPU device, and through burn
/// elsewhere (or if the plan refuses an input); features and logits are the network's own.
#[derive(Debug)]
pub struct Planned<N> {
    network: N,
    plan: Plan,
}

impl<N: ImageNetwork> ImageNetwork for Planned<N> {
    fn feature_map(&self, input: Tensor<4>) -> Tensor<4> {
        let device = input.device();
        if device == Device::flex() {
            match self.plan.feature_map(&input) {
                Ok(map) => return map,
                Err(e) => warn_once(&e),
            }
        }
        self.network.feature_map(input)
    }

    fn features(&self, map: Tensor<4>) -> Tensor<2> {
        self.network.features(map)
    }

    fn logits(&self, map: Tensor<4>) -> Option<Tensor<2>> {
        self.network.logits(map)
    }

    fn plan(&self) -> Option<&Plan> {
        Some(&self.plan)
    }
}

/// Says once per process that a plan refused an input (the network then runs through burn:
/// the same values, more slowly).
pub(crate) fn warn_once(reason: &str) {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        eprintln!(
            "deep-pipelines: the CPU plan refused an input ({reason}); running it through burn"
        )
    });
}

/// What the featurizer and predictor run: `network` with its BatchNorms folded and, on the CPU
/// device, its [`Plan`] in `precision` (which the burn path, on other devices, ignores).
pub fn inference_network<N>(
    network: N,
    device: &Device,
    precision: Precision,
) -> Arc<dyn ImageNetwork>
where
    N: ImageNetwork + FoldBatchNorms + CpuPlan + 'static,
{
    let network = network.fold_batch_norms();
    if *device == Device::flex()
        && let Some(plan) = network.cpu_plan()
    {
        let plan = plan.in_precision(precision);
        return Arc::new(Planned { network, plan });
    }
    Arc::new(network)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nhwc_round_trips() {
        let dims = [2, 3, 4, 5];
        let data: Vec<f32> = (0..120).map(|i| i as f32).collect();
        let x = Nhwc::from_nchw(&data, dims);
        assert_eq!(x.data[1], 20.0); // (b 0, y 0, x 0, c 1) = NCHW index 1 * 20
        assert_eq!(x.to_nchw(), data);
    }

    #[test]
    fn taps_read_in_place_equal_im2col() {
        use crate::models::layers::ConvSpec;
        // (spec, input height, width): the stems' shapes (3x3 stride 2, TF "SAME", 7x7), a
        // 1x1 stride-2 downsample and a valid 3x3 (read in place), a 3x3 stride 1 over 16
        // channels; odd sizes, so that windows stop short of the last rows and columns.
        let cases = [
            (ConvSpec::new(3, 16, 3).stride(2).padding([1, 1]), 17, 13),
            (ConvSpec::new(3, 32, 3).stride(2).same(), 16, 15),
            (ConvSpec::new(3, 40, 7).stride(2).padding([3, 3]), 19, 12),
            (ConvSpec::new(24, 33, 1).stride(2), 9, 10),
            (ConvSpec::new(3, 8, 3).stride(2), 11, 12),
            (ConvSpec::new(16, 20, 3).padding([1, 1]), 7, 9),
            (ConvSpec::new(5, 12, 3).kernel([1, 3]).padding([0, 1]), 6, 5),
        ];
        for (spec, height, width) in cases {
            let conv =
                Conv::from_burn(&spec.bias().init(&Device::flex()), Some(Act::Relu)).unwrap();
            let ConvWeights::Taps(weight) = &conv.weights else {
                panic!("{spec:?} does not read its taps in place");
            };
            let im2col = Conv {
                weights: ConvWeights::Dense(weight.clone()),
                ..conv.clone()
            };
            let channels = conv.input;
            let data: Vec<f32> = (0..3 * channels * height * width)
                .map(|i| ((i * 7919) % 1000) as f32 / 500.0 - 1.0)
                .collect();
            let x = Nhwc::from_nchw(&data, [3, channels, height, width]);
            // Any values of the output's shape.
            let shortcut = im2col.run(&x, None).unwrap();
            for serial in [false, true] {
                SERIAL.with(|s| s.set(serial));
                for residual in [None, Some(&shortcut)] {
                    let got = conv.run(&x, residual).unwrap();
                    let want = im2col.run(&x, residual).unwrap();
                    assert_eq!(
                        (got.height, got.width, got.channels),
                        (want.height, want.width, want.channels)
                    );
                    // The same products in the same order: equal, not close.
                    assert_eq!(got.data[..], want.data[..], "{spec:?} serial {serial}");
                }
            }
            SERIAL.with(|s| s.set(false));
        }
    }

    #[test]
    fn out_size_matches_pytorch() {
        // 112 -> 56 (3x3 s2 p1), ceil-mode SqueezeNet pools 111 -> 55, 55 -> 27.
        assert_eq!(out_size(112, 3, 2, 1, 1, false), Some(56));
        assert_eq!(out_size(111, 3, 2, 0, 0, true), Some(55));
        assert_eq!(out_size(55, 3, 2, 0, 0, true), Some(27));
        assert_eq!(out_size(2, 3, 1, 0, 0, false), None);
    }
}
