//! The CPU plan's inner loops over channels-last (NHWC) `f32` rows, compiled three times (AVX-512,
//! AVX2 + FMA, baseline x86-64 / other targets) and picked once at run time. Dense convolutions
//! are GEMMs: see [`super::gemm`].
//!
//! Each kernel here is serial over the rows it is given: the callers split rows across rayon's
//! threads, so a kernel never starts threads of its own.

use std::sync::OnceLock;

use crate::models::layers::Act;

/// The widest instruction set this CPU runs, detected once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    Avx512,
    Avx2,
    Baseline,
}

/// The environment variable that caps [`level`] (`avx2` or `baseline`), to compare the kernels
/// of a smaller instruction set on one machine, or to run as an older CPU would.
pub const SIMD_ENV: &str = "DEEP_PIPELINES_SIMD";

pub fn level() -> Level {
    static LEVEL: OnceLock<Level> = OnceLock::new();
    *LEVEL.get_or_init(|| capped(detected(), std::env::var(SIMD_ENV).ok().as_deref()))
}

/// What the plan's GEMMs multiply in: `f32`, or bfloat16 weights and activations summed in
/// `f32` (half the bytes per weight and twice the products per instruction, ~3 significant
/// digits per factor). The stages' `precision` param: `float32` or `bfloat16`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Precision {
    F32,
    Bf16,
}

impl Precision {
    /// The param's values, in the order docs list them.
    pub const NAMES: [&str; 2] = ["float32", "bfloat16"];

    /// `float32` or `bfloat16`.
    pub fn parse(name: &str) -> Option<Precision> {
        match name {
            "float32" => Some(Precision::F32),
            "bfloat16" => Some(Precision::Bf16),
            _ => None,
        }
    }
}

/// Whether this CPU runs the bfloat16 GEMM (and `level` was not capped below AVX-512).
pub fn bf16_supported() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        level() == Level::Avx512 && is_x86_feature_detected!("avx512bf16")
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

fn detected() -> Level {
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512vl")
            && is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
        {
            return Level::Avx512;
        }
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            return Level::Avx2;
        }
    }
    Level::Baseline
}

/// `detected`, or less where `cap` asks for less (never more: the CPU may not have it).
fn capped(detected: Level, cap: Option<&str>) -> Level {
    let rank = |l: Level| match l {
        Level::Baseline => 0,
        Level::Avx2 => 1,
        Level::Avx512 => 2,
    };
    let wanted = match cap.map(|c| c.trim().to_ascii_lowercase()).as_deref() {
        None | Some("") => return detected,
        Some("avx512") => Level::Avx512,
        Some("avx2") => Level::Avx2,
        Some("baseline") => Level::Baseline,
        Some(other) => {
            eprintln!(
                "deep-pipelines: {SIMD_ENV}={other:?} is not avx512, avx2 or baseline; using {detected:?}"
            );
            return detected;
        }
    };
    if rank(wanted) < rank(detected) {
        wanted
    } else {
        detected
    }
}

/// `a * b + c`: one fused instruction where the CPU has FMA, two roundings where it has not
/// (a software `fma` call would be far slower than the separate multiply and add).
pub(super) trait MulAdd {
    fn mul_add(a: f32, b: f32, c: f32) -> f32;
}

pub(super) struct Fused;
impl MulAdd for Fused {
    #[inline(always)]
    fn mul_add(a: f32, b: f32, c: f32) -> f32 {
        a.mul_add(b, c)
    }
}

pub(super) struct Separate;
impl MulAdd for Separate {
    #[inline(always)]
    fn mul_add(a: f32, b: f32, c: f32) -> f32 {
        a * b + c
    }
}

/// A public safe function `$name` that runs `$body::<Fused>` compiled for AVX-512 or AVX2 + FMA
/// when the CPU has them, `$body::<Separate>` for the baseline otherwise. The body's loops over
/// slices are what the compiler vectorises for each instruction set.
macro_rules! multiversion {
    ($(#[$meta:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) = $body:ident;) => {
        $(#[$meta])*
        #[allow(clippy::too_many_arguments)]
        $vis fn $name($($arg: $ty),*) {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
                #[allow(clippy::too_many_arguments)]
                fn avx512($($arg: $ty),*) {
                    $body::<Fused>($($arg),*)
                }
                #[target_feature(enable = "avx2,fma")]
                #[allow(clippy::too_many_arguments)]
                fn avx2($($arg: $ty),*) {
                    $body::<Fused>($($arg),*)
                }
                match level() {
                    // SAFETY: `level` found these instruction sets on this CPU.
                    Level::Avx512 => return unsafe { avx512($($arg),*) },
                    // SAFETY: as above.
                    Level::Avx2 => return unsafe { avx2($($arg),*) },
                    Level::Baseline => {}
                }
            }
            $body::<Separate>($($arg),*)
        }
    };
}

pub(super) use multiversion;

const LOG2_E: f32 = std::f32::consts::LOG2_E;
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;

/// `e^x` for `x` in [-87, 88] to ~2 ulp (clamped outside), without a branch or a call, so that
/// loops over it vectorise: Cody-Waite range reduction, a degree-6 polynomial, `2^n` from bits.
#[inline(always)]
fn exp<M: MulAdd>(x: f32) -> f32 {
    // Not `clamp`: max/min vectorise and map NaN to a bound; the result is then still finite.
    #[allow(clippy::manual_clamp)]
    let x = x.max(-87.0).min(88.0);
    let n = M::mul_add(x, LOG2_E, 0.5).floor();
    let r = M::mul_add(n, -LN2_HI, x);
    let r = M::mul_add(n, -LN2_LO, r);
    let mut p = 1.0 / 720.0;
    p = M::mul_add(p, r, 1.0 / 120.0);
    p = M::mul_add(p, r, 1.0 / 24.0);
    p = M::mul_add(p, r, 1.0 / 6.0);
    p = M::mul_add(p, r, 0.5);
    p = M::mul_add(p, r, 1.0);
    p = M::mul_add(p, r, 1.0);
    // `2^n` from bits without a float-to-int cast (whose saturation does not vectorise): adding
    // 1.5 * 2^23 puts the integer `n + 127` (in 1..=254) in the low mantissa bits.
    let biased = (n + (127.0 + 12_582_912.0)).to_bits();
    p * f32::from_bits(biased << 23)
}

#[inline(always)]
#[allow(clippy::manual_clamp)] // max/min: one instruction each, and NaN does not panic
pub(super) fn activate<M: MulAdd>(v: &mut [f32], act: Option<Act>) {
    match act {
        None => {}
        Some(Act::Relu) => v.iter_mut().for_each(|x| *x = x.max(0.0)),
        Some(Act::Relu6) => v.iter_mut().for_each(|x| *x = x.max(0.0).min(6.0)),
        Some(Act::HardSwish) => v
            .iter_mut()
            .for_each(|x| *x *= (*x + 3.0).max(0.0).min(6.0) * (1.0 / 6.0)),
        Some(Act::HardSigmoid) => v
            .iter_mut()
            .for_each(|x| *x = M::mul_add(*x, 1.0 / 6.0, 0.5).max(0.0).min(1.0)),
        Some(Act::Silu) => v.iter_mut().for_each(|x| *x /= exp::<M>(-*x) + 1.0),
        Some(Act::Sigmoid) => v.iter_mut().for_each(|x| *x = 1.0 / (exp::<M>(-*x) + 1.0)),
    }
}

#[inline(always)]
fn epilogue_body<M: MulAdd>(
    out: &mut [f32],
    cols: usize,
    bias: Option<&[f32]>,
    residual: Option<&[f32]>,
    act: Option<Act>,
) {
    for (r, row) in out.chunks_exact_mut(cols).enumerate() {
        if let Some(bias) = bias {
            row.iter_mut().zip(bias).for_each(|(x, b)| *x += b);
        }
        if let Some(residual) = residual {
            let res = &residual[r * cols..(r + 1) * cols];
            row.iter_mut().zip(res).for_each(|(x, s)| *x += s);
        }
        activate::<M>(row, act);
    }
}

multiversion! {
    /// `out = act(out + bias + residual)` over rows of `cols` channels (`residual` shaped as
    /// `out`): a convolution's bias, shortcut and activation in one pass over cache-hot rows.
    pub fn epilogue(
        out: &mut [f32],
        cols: usize,
        bias: Option<&[f32]>,
        residual: Option<&[f32]>,
        act: Option<Act>,
    ) = epilogue_body;
}

/// Geometry of a sliding window over an NHWC image: input size, kernel, stride, padding before.
#[derive(Debug, Clone, Copy)]
pub struct Window {
    pub height: usize,
    pub width: usize,
    pub channels: usize,
    pub kernel: [usize; 2],
    pub stride: [usize; 2],
    pub pad: [usize; 2],
    pub out_width: usize,
}

impl Window {
    /// The kernel rows (or columns) `[start, end)` whose input index `o * stride + k - pad` is
    /// inside `0..size`.
    #[inline(always)]
    fn valid(o: usize, stride: usize, pad: usize, kernel: usize, size: usize) -> (usize, usize) {
        let origin = (o * stride) as isize - pad as isize;
        let start = (-origin).max(0) as usize;
        let end = (size as isize - origin).clamp(0, kernel as isize) as usize;
        (start.min(end), end)
    }

    /// The taps of output pixel (`oy`, `ox`) that land on the image, into `taps`: (offset of
    /// that input pixel's channels in the image, offset of the tap's `[kh, kw, C]` weights).
    #[inline(always)]
    fn taps(&self, oy: usize, ox: usize, taps: &mut Vec<(usize, usize)>) {
        let c = self.channels;
        let [kh, kw] = self.kernel;
        let (ky0, ky1) = Window::valid(oy, self.stride[0], self.pad[0], kh, self.height);
        let (kx0, kx1) = Window::valid(ox, self.stride[1], self.pad[1], kw, self.width);
        taps.clear();
        for ky in ky0..ky1 {
            let iy = oy * self.stride[0] + ky - self.pad[0];
            for kx in kx0..kx1 {
                let ix = ox * self.stride[1] + kx - self.pad[1];
                taps.push(((iy * self.width + ix) * c, (ky * kw + kx) * c));
            }
        }
    }
}

/// Channels `[start, start + B)` of one depthwise output pixel: the `B` accumulators stay in
/// registers over every tap (`taps`: input and weight offsets), one store at the end.
#[inline(always)]
fn depthwise_block<M: MulAdd, const B: usize>(
    image: &[f32],
    weight: &[f32],
    bias: &[f32],
    taps: &[(usize, usize)],
    start: usize,
    act: Option<Act>,
    out: &mut [f32],
) {
    let mut acc = [0.0f32; B];
    acc.copy_from_slice(&bias[start..start + B]);
    for &(xi, wi) in taps {
        let x = &image[xi + start..][..B];
        let w = &weight[wi + start..][..B];
        for i in 0..B {
            acc[i] = M::mul_add(x[i], w[i], acc[i]);
        }
    }
    activate::<M>(&mut acc, act);
    out[start..start + B].copy_from_slice(&acc);
}

#[inline(always)]
fn depthwise_body<M: MulAdd>(
    image: &[f32],
    weight: &[f32],
    bias: &[f32],
    win: Window,
    oy: usize,
    act: Option<Act>,
    out: &mut [f32],
) {
    let c = win.channels;
    if depthwise_simd(image, weight, bias, win, oy, act, out) {
        if clamp_of(act).is_none() {
            activate::<M>(&mut out[..win.out_width * c], act);
        }
        return;
    }
    let mut taps = Vec::with_capacity(win.kernel[0] * win.kernel[1]);
    for (ox, o) in out.chunks_exact_mut(c).enumerate().take(win.out_width) {
        win.taps(oy, ox, &mut taps);
        // 64 channels at a time (4 AVX-512 / 8 AVX2 registers), then 16, then one by one.
        let mut start = 0;
        while start + 64 <= c {
            depthwise_block::<M, 64>(image, weight, bias, &taps, start, act, o);
            start += 64;
        }
        while start + 16 <= c {
            depthwise_block::<M, 16>(image, weight, bias, &taps, start, act, o);
            start += 16;
        }
        while start < c {
            depthwise_block::<M, 1>(image, weight, bias, &taps, start, act, o);
            start += 1;
        }
    }
}

/// The activations that are a clamp (ReLU, ReLU6): `(low, high)`.
pub(super) fn clamp_of(act: Option<Act>) -> Option<(f32, f32)> {
    match act {
        Some(Act::Relu) => Some((0.0, f32::INFINITY)),
        Some(Act::Relu6) => Some((0.0, 6.0)),
        _ => None,
    }
}

/// Row `oy` of a 3x3 or 5x5 depthwise convolution through the SIMD kernels (conv + bias, then
/// the activation if it is a clamp), edges included: each call gets the taps that land on the
/// image, for the pixels between the edges at once and for each edge pixel alone. `false` if no
/// kernel applies (the caller then runs the row pixel by pixel).
fn depthwise_simd(
    image: &[f32],
    weight: &[f32],
    bias: &[f32],
    win: Window,
    oy: usize,
    act: Option<Act>,
    out: &mut [f32],
) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        let c = win.channels;
        let k = win.kernel[0];
        // AVX-512 vectors over the channels they fill, AVX2's (which AVX-512 CPUs run too)
        // over the rest: 120 channels are 7 x 16 + 8.
        let wide = match level() {
            Level::Avx512 => c / 16 * 16,
            Level::Avx2 => 0,
            Level::Baseline => return false,
        };
        if !(c - wide).is_multiple_of(8) || win.kernel[1] != k || !(k == 3 || k == 5) {
            return false;
        }
        let ([sy, sx], [py, px], ow) = (win.stride, win.pad, win.out_width);
        let (ky0, ky1) = Window::valid(oy, sy, py, k, win.height);
        // The first input row a tap reads (any row when none does: the table is then empty).
        let iy = (oy * sy + ky0).saturating_sub(py);
        // Pixels `pixels` from `out` pixel `first`, whose taps are columns `kx0..kx1` of the
        // kernel from input column `left` on.
        let mut run = |first: usize, pixels: usize, left: usize, (kx0, kx1): (usize, usize)| {
            let mut table = [(0, 0); 25];
            let mut taps = 0;
            for ky in ky0..ky1 {
                for kx in kx0..kx1 {
                    let input = ((ky - ky0) * win.width + kx - kx0) * c;
                    table[taps] = (input, (ky * k + kx) * c);
                    taps += 1;
                }
            }
            let rows = ky1 - ky0;
            let cols = (pixels - 1) * sx + kx1 - kx0;
            let end = if rows == 0 || kx1 == kx0 {
                0
            } else {
                ((iy + rows - 1) * win.width + left + cols) * c
            };
            assert!(
                end <= image.len() && (first + pixels) * c <= out.len(),
                "depthwise: out of bounds"
            );
            assert!(
                weight.len() >= k * k * c && bias.len() >= c,
                "depthwise: weights too short"
            );
            let first_out = out[first * c..].as_mut_ptr();
            let args = |channels: std::ops::Range<usize>| depthwise_x86::Args {
                image: image.as_ptr().wrapping_add((iy * win.width + left) * c),
                taps: &table[..taps],
                c,
                channels,
                stride: sx,
                pixels,
                weight: weight.as_ptr(),
                bias: bias.as_ptr(),
                clamp: clamp_of(act),
                out: first_out,
            };
            // SAFETY: the asserts keep every tap of these pixels inside `image` and every
            // store inside `out`; `level()` found the instruction set each kernel is compiled
            // for (an AVX-512 level implies AVX2 + FMA).
            unsafe {
                if wide > 0 {
                    depthwise_x86::avx512::run(args(0..wide));
                }
                if wide < c {
                    depthwise_x86::avx2::run(args(wide..c));
                }
            }
        };
        // Pixels `[start, end)` have every column of taps on the image.
        let start = px.div_ceil(sx).min(ow);
        let end = match (win.width + px).checked_sub(k) {
            Some(span) => (span / sx + 1).clamp(start, ow),
            None => start, // narrower than the kernel: every pixel is an edge
        };
        for ox in (0..start).chain(end..ow) {
            let (kx0, kx1) = Window::valid(ox, sx, px, k, win.width);
            run(ox, 1, (ox * sx + kx0).saturating_sub(px), (kx0, kx1));
        }
        if start < end {
            run(start, end - start, start * sx - px, (0, k));
        }
        true
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (image, weight, bias, win, oy, act, out);
        false
    }
}

/// Depthwise kernels over pixels of an output row: for each block of channels
/// (one vector), `P` output pixels at a time (`P` independent chains of FMAs) pass over the
/// taps, each tap's weights loaded once for the `P` pixels. The taps are a loop over a table of
/// offsets, not unrolled: unrolled, AVX2's 16 registers could not hold the addresses, and the
/// spills halved the kernel's speed.
#[cfg(target_arch = "x86_64")]
mod depthwise_x86 {
    use std::arch::x86_64::*;

    #[derive(Clone)]
    pub struct Args<'a> {
        /// The first pixel's first tap (channel 0).
        pub image: *const f32,
        /// (input, weight) offsets of each tap from `image` and from the weights of channel 0.
        pub taps: &'a [(usize, usize)],
        pub c: usize,
        /// The channels this call computes, whole vectors of them.
        pub channels: std::ops::Range<usize>,
        pub stride: usize,
        pub pixels: usize,
        pub weight: *const f32,
        pub bias: *const f32,
        pub clamp: Option<(f32, f32)>,
        /// The first pixel's output.
        pub out: *mut f32,
    }

    macro_rules! kernel {
        ($name:ident, $feature:literal, $lanes:literal, $pixels:literal, $v:ty, $load:ident,
         $store:ident, $set1:ident, $fmadd:ident, $max:ident, $min:ident) => {
            pub mod $name {
                use super::*;

                /// `N` pixels of one block of channels: `image` and `weight` at the block's
                /// first tap and channel, `taps` (input, weight) offsets from them.
                #[inline(always)]
                #[allow(clippy::too_many_arguments)]
                unsafe fn pixels<const N: usize>(
                    image: *const f32,
                    pixel_step: usize,
                    weight: *const f32,
                    taps: &[(usize, usize)],
                    bias: $v,
                    clamp: Option<($v, $v)>,
                    out: *mut f32,
                    c: usize,
                ) {
                    // SAFETY: the caller's bounds (`run`).
                    unsafe {
                        let mut acc = [bias; N];
                        for &(x, w) in taps {
                            let w = $load(weight.add(w));
                            let x = image.add(x);
                            for (i, acc) in acc.iter_mut().enumerate() {
                                *acc = $fmadd($load(x.add(i * pixel_step)), w, *acc);
                            }
                        }
                        for (i, acc) in acc.into_iter().enumerate() {
                            let v = match clamp {
                                Some((lo, hi)) => $min($max(acc, lo), hi),
                                None => acc,
                            };
                            $store(out.add(i * c), v);
                        }
                    }
                }

                /// `a.channels` whole vectors; every tap and store inside the buffers.
                #[target_feature(enable = $feature)]
                pub unsafe fn run(a: Args) {
                    // SAFETY (the whole body): the caller's bounds, above.
                    unsafe {
                        let (c, s, taps) = (a.c, a.stride, a.taps);
                        let clamp = a.clamp.map(|(lo, hi)| ($set1(lo), $set1(hi)));
                        for cb in a.channels.clone().step_by($lanes) {
                            let bias = $load(a.bias.add(cb));
                            let weight = a.weight.add(cb);
                            let at = |p: usize| a.image.wrapping_add(p * s * c + cb);
                            let out = |p: usize| a.out.add(p * c + cb);
                            let mut p = 0;
                            while p + $pixels <= a.pixels {
                                pixels::<$pixels>(
                                    at(p),
                                    s * c,
                                    weight,
                                    taps,
                                    bias,
                                    clamp,
                                    out(p),
                                    c,
                                );
                                p += $pixels;
                            }
                            while p + 2 <= a.pixels {
                                pixels::<2>(at(p), s * c, weight, taps, bias, clamp, out(p), c);
                                p += 2;
                            }
                            if p < a.pixels {
                                pixels::<1>(at(p), s * c, weight, taps, bias, clamp, out(p), c);
                            }
                        }
                    }
                }
            }
        };
    }

    // Four pixels fill AVX-512's FMA pipe (one 512-bit FMA a cycle on Zen 4, latency 4); AVX2
    // needs more chains in flight (two FMAs a cycle): six measured best on Zen 3.
    kernel!(
        avx512,
        "avx512f",
        16,
        4,
        __m512,
        _mm512_loadu_ps,
        _mm512_storeu_ps,
        _mm512_set1_ps,
        _mm512_fmadd_ps,
        _mm512_max_ps,
        _mm512_min_ps
    );
    kernel!(
        avx2,
        "avx2,fma",
        8,
        6,
        __m256,
        _mm256_loadu_ps,
        _mm256_storeu_ps,
        _mm256_set1_ps,
        _mm256_fmadd_ps,
        _mm256_max_ps,
        _mm256_min_ps
    );
}

multiversion! {
    /// One output row `oy` of a depthwise convolution of one NHWC `image`: `weight` is
    /// `[kh, kw, C]`, `out` is `[out_width, C]`, `act(conv + bias)`.
    pub fn depthwise_row(
        image: &[f32],
        weight: &[f32],
        bias: &[f32],
        win: Window,
        oy: usize,
        act: Option<Act>,
        out: &mut [f32],
    ) = depthwise_body;
}

#[inline(always)]
fn max_pool_body<M: MulAdd>(image: &[f32], win: Window, oy: usize, out: &mut [f32]) {
    let c = win.channels;
    let mut taps = Vec::with_capacity(win.kernel[0] * win.kernel[1]);
    for (ox, acc) in out.chunks_exact_mut(c).enumerate().take(win.out_width) {
        acc.fill(f32::NEG_INFINITY);
        win.taps(oy, ox, &mut taps);
        for &(xi, _) in &taps {
            // NaN propagates, as in PyTorch's max pool.
            acc.iter_mut()
                .zip(&image[xi..xi + c])
                .for_each(|(a, &x)| *a = if x > *a || x.is_nan() { x } else { *a });
        }
    }
}

multiversion! {
    /// One output row of a max pool (padding never wins) over one NHWC image.
    pub fn max_pool_row(image: &[f32], win: Window, oy: usize, out: &mut [f32]) = max_pool_body;
}

#[inline(always)]
fn avg_pool_body<M: MulAdd>(image: &[f32], win: Window, oy: usize, out: &mut [f32]) {
    let c = win.channels;
    let [kh, kw] = win.kernel;
    // PyTorch's divisor with count_include_pad: the window clipped to the padded input.
    let rows = (oy * win.stride[0] + kh).min(win.height + 2 * win.pad[0]) - oy * win.stride[0];
    let mut taps = Vec::with_capacity(kh * kw);
    for (ox, acc) in out.chunks_exact_mut(c).enumerate().take(win.out_width) {
        acc.fill(0.0);
        win.taps(oy, ox, &mut taps);
        for &(xi, _) in &taps {
            acc.iter_mut()
                .zip(&image[xi..xi + c])
                .for_each(|(a, x)| *a += x);
        }
        let cols = (ox * win.stride[1] + kw).min(win.width + 2 * win.pad[1]) - ox * win.stride[1];
        let scale = 1.0 / (rows * cols) as f32;
        acc.iter_mut().for_each(|a| *a *= scale);
    }
}

multiversion! {
    /// One output row of an average pool counting padded zeros (PyTorch's default).
    pub fn avg_pool_row(image: &[f32], win: Window, oy: usize, out: &mut [f32]) = avg_pool_body;
}

#[inline(always)]
fn channel_mean_body<M: MulAdd>(image: &[f32], channels: usize, out: &mut [f32]) {
    out.fill(0.0);
    let pixels = image.len() / channels;
    for px in image.chunks_exact(channels) {
        out.iter_mut().zip(px).for_each(|(a, x)| *a += x);
    }
    let scale = 1.0 / pixels as f32;
    out.iter_mut().for_each(|a| *a *= scale);
}

multiversion! {
    /// Mean of each channel over the pixels of one NHWC image.
    pub fn channel_mean(image: &[f32], channels: usize, out: &mut [f32]) = channel_mean_body;
}

#[inline(always)]
fn dense_body<M: MulAdd>(
    input: &[f32],
    weight: &[f32],
    bias: &[f32],
    act: Option<Act>,
    out: &mut [f32],
) {
    // `weight` is `[in, out]`: accumulate one input at a time over the contiguous outputs.
    out.copy_from_slice(bias);
    let n = out.len();
    for (x, w) in input.iter().zip(weight.chunks_exact(n)) {
        out.iter_mut()
            .zip(w)
            .for_each(|(o, w)| *o = M::mul_add(*x, *w, *o));
    }
    activate::<M>(out, act);
}

multiversion! {
    /// `out = act(input · weight + bias)` for one vector, `weight` `[in, out]` (squeeze-excite).
    pub fn dense(
        input: &[f32],
        weight: &[f32],
        bias: &[f32],
        act: Option<Act>,
        out: &mut [f32],
    ) = dense_body;
}

#[inline(always)]
fn scale_channels_body<M: MulAdd>(image: &mut [f32], scale: &[f32]) {
    for px in image.chunks_exact_mut(scale.len()) {
        px.iter_mut().zip(scale).for_each(|(x, s)| *x *= s);
    }
}

multiversion! {
    /// Multiplies every pixel of one NHWC image by a per-channel `scale`.
    pub fn scale_channels(image: &mut [f32], scale: &[f32]) = scale_channels_body;
}

/// Rows `y0..` of `image` (`win`'s `height x width x channels`) padded as `win` pads them,
/// `width` pixels per row, as many rows as `band` holds: band pixel `(y, x)` is image pixel
/// `(y0 + y - pad_top, x - pad_left)`, zero off the image.
pub fn padded_rows(image: &[f32], win: Window, y0: usize, width: usize, band: &mut [f32]) {
    let c = win.channels;
    let [top, left] = win.pad;
    // The image columns inside the band, and where they start in it.
    let cols = win.width.min(width.saturating_sub(left));
    for (y, row) in band.chunks_exact_mut(width * c).enumerate() {
        let iy = (y0 + y).checked_sub(top).filter(|&iy| iy < win.height);
        let Some(iy) = iy else {
            row.fill(0.0);
            continue;
        };
        let (head, rest) = row.split_at_mut(left.min(width) * c);
        head.fill(0.0);
        let (body, tail) = rest.split_at_mut(cols * c);
        body.copy_from_slice(&image[iy * win.width * c..][..cols * c]);
        tail.fill(0.0);
    }
}

/// One im2col row per output pixel of image rows: `[kh * kw * C]`, zeros where the window is
/// off the image. `first` is the index of the first output pixel (image-major) in `rows`.
pub fn im2col(image_batch: &[f32], win: Window, out_height: usize, first: usize, rows: &mut [f32]) {
    let c = win.channels;
    let [kh, kw] = win.kernel;
    let k = kh * kw * c;
    let per_image = out_height * win.out_width;
    let image_len = win.height * win.width * c;
    // The pixel of the first row, then stepped along (no division per pixel).
    let (mut b, rem) = (first / per_image, first % per_image);
    let (mut oy, mut ox) = (rem / win.out_width, rem % win.out_width);
    for row in rows.chunks_exact_mut(k) {
        let image = &image_batch[b * image_len..][..image_len];
        let ix0 = (ox * win.stride[1]) as isize - win.pad[1] as isize;
        let inside_x = ix0 >= 0 && ix0 as usize + kw <= win.width;
        for ky in 0..kh {
            let iy = (oy * win.stride[0] + ky) as isize - win.pad[0] as isize;
            let dst = &mut row[ky * kw * c..][..kw * c];
            if iy < 0 || iy as usize >= win.height {
                dst.fill(0.0);
            } else if inside_x {
                // The row's taps are `kw * c` consecutive values of the image row.
                dst.copy_from_slice(
                    &image[(iy as usize * win.width + ix0 as usize) * c..][..kw * c],
                );
            } else {
                for (kx, dst) in dst.chunks_exact_mut(c).enumerate() {
                    let ix = ix0 + kx as isize;
                    if ix >= 0 && (ix as usize) < win.width {
                        dst.copy_from_slice(
                            &image[(iy as usize * win.width + ix as usize) * c..][..c],
                        );
                    } else {
                        dst.fill(0.0);
                    }
                }
            }
        }
        ox += 1;
        if ox == win.out_width {
            ox = 0;
            oy += 1;
            if oy == out_height {
                oy = 0;
                b += 1;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_is_close_to_std() {
        let mut worst = 0.0f32;
        for i in -8700..=8800 {
            let x = i as f32 * 0.01;
            let want = x.exp();
            let got = exp::<Separate>(x);
            worst = worst.max(((got - want) / want).abs());
        }
        assert!(worst < 1e-6, "relative error {worst}");
    }

    #[test]
    fn activations_match_their_definitions() {
        let xs: Vec<f32> = (-80..=80).map(|i| i as f32 * 0.125).collect();
        let sigmoid = |x: f32| 1.0 / (1.0 + (-x).exp());
        let cases: [(Act, &dyn Fn(f32) -> f32); 6] = [
            (Act::Relu, &|x| x.max(0.0)),
            (Act::Relu6, &|x| x.clamp(0.0, 6.0)),
            (Act::HardSwish, &|x| x * (x + 3.0).clamp(0.0, 6.0) / 6.0),
            (Act::HardSigmoid, &|x| (x / 6.0 + 0.5).clamp(0.0, 1.0)),
            (Act::Silu, &|x| x * sigmoid(x)),
            (Act::Sigmoid, &sigmoid),
        ];
        for (act, f) in cases {
            let mut v = xs.clone();
            epilogue(&mut v, xs.len(), None, None, Some(act));
            for (x, got) in xs.iter().zip(&v) {
                assert!((got - f(*x)).abs() < 1e-6, "{act:?}({x}) = {got}");
            }
        }
    }

    #[test]
    fn the_simd_cap_only_lowers_the_level() {
        assert_eq!(capped(Level::Avx512, Some("avx2")), Level::Avx2);
        assert_eq!(capped(Level::Avx512, Some(" AVX2 ")), Level::Avx2);
        assert_eq!(capped(Level::Avx2, Some("avx512")), Level::Avx2);
        assert_eq!(capped(Level::Avx2, Some("baseline")), Level::Baseline);
        assert_eq!(capped(Level::Avx512, None), Level::Avx512);
        assert_eq!(capped(Level::Avx512, Some("sse9")), Level::Avx512);
    }

    #[test]
    fn depthwise_rows_match_naive() {
        // Channel counts for each kernel (16 and 8 lanes, neither), 3x3 and 5x5 (the SIMD
        // interior) and 7x7 (pixel by pixel), strides 1 and 2, clamp and other activations.
        for (c, k, s, act) in [
            (32, 3, 1, Some(Act::Relu6)),
            (24, 3, 2, Some(Act::Relu)),
            (16, 5, 1, Some(Act::Silu)),
            (24, 3, 1, Some(Act::HardSwish)),
            (40, 5, 2, None),
            (5, 3, 1, Some(Act::Relu6)),
            (8, 7, 1, Some(Act::HardSwish)),
        ] {
            // Wide rows (an interior and both edges: every count of pixels the SIMD kernels
            // take at a time), 7x7 (mostly edges), narrower than the kernel.
            for (h, w) in [(9, 11), (4, 20), (7, 7), (3, 2)] {
                let pad = k / 2;
                let image: Vec<f32> = (0..h * w * c)
                    .map(|i| ((i * 7) % 13) as f32 - 6.0)
                    .collect();
                let weight: Vec<f32> = (0..k * k * c)
                    .map(|i| ((i * 5) % 11) as f32 * 0.25 - 1.0)
                    .collect();
                let bias: Vec<f32> = (0..c).map(|i| i as f32 * 0.125).collect();
                let (oh, ow) = ((h + 2 * pad - k) / s + 1, (w + 2 * pad - k) / s + 1);
                let win = Window {
                    height: h,
                    width: w,
                    channels: c,
                    kernel: [k, k],
                    stride: [s, s],
                    pad: [pad, pad],
                    out_width: ow,
                };
                for oy in 0..oh {
                    let mut row = vec![f32::NAN; ow * c];
                    depthwise_row(&image, &weight, &bias, win, oy, act, &mut row);
                    for ox in 0..ow {
                        for ch in 0..c {
                            let mut want = bias[ch];
                            for ky in 0..k {
                                for kx in 0..k {
                                    let (iy, ix) = (
                                        (oy * s + ky) as isize - pad as isize,
                                        (ox * s + kx) as isize - pad as isize,
                                    );
                                    if (0..h as isize).contains(&iy)
                                        && (0..w as isize).contains(&ix)
                                    {
                                        want += image[(iy as usize * w + ix as usize) * c + ch]
                                            * weight[(ky * k + kx) * c + ch];
                                    }
                                }
                            }
                            let mut want = [want];
                            epilogue(&mut want, 1, None, None, act);
                            let got = row[ox * c + ch];
                            assert!(
                                (got - want[0]).abs() < 1e-4,
                                "c {c} k {k} s {s} {h}x{w} at ({oy}, {ox}, {ch}): {got} vs {}",
                                want[0]
                            );
                        }
                    }
                }
            }
        }
    }
}
