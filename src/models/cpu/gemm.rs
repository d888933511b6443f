//! The plan's GEMM: `act(A · W + bias [+ residual])` with the weights `W` packed once, when the
//! plan is built, into the micro-kernel's panels, and the epilogue applied to each tile while it
//! is still in registers.
//!
//! Why not a general GEMM crate: it packs the weight matrix again on every call (a plan calls
//! it once per block of rows, per image) and runs bias and activation as a second pass over
//! memory. The narrow matrices of mobile networks (16 to 160 output channels) also waste most
//! of a general kernel's lanes.
//!
//! A is read in place (activations or im2col rows, `lda` apart); each `MR x NR` tile of the
//! output is accumulated over `KC`-deep slices of A and of one packed panel, which stay in L1/L2.

use std::cell::RefCell;

use super::kernels::{
    Fused, Level, MulAdd, Precision, Separate, activate, bf16_supported, clamp_of, level,
    multiversion,
};
use crate::models::layers::Act;

/// Depth of one slice of the product: `KC x NR` weights (32 KiB at NR = 32) stay in L1/L2.
pub const KC: usize = 256;

/// Where a row of A's `k` values lie: `count` runs of `len` consecutive values, `stride` apart.
/// A matrix's row is one run; a convolution's taps read in place from a (padded) image are one
/// run per kernel row (`kw x channels` values), an image row apart.
#[derive(Debug, Clone, Copy)]
pub struct Taps {
    pub count: usize,
    pub len: usize,
    pub stride: usize,
}

impl Taps {
    /// One run of `k` values: a plain row.
    fn row(k: usize) -> Taps {
        Taps {
            count: 1,
            len: k,
            stride: 0,
        }
    }

    fn k(self) -> usize {
        self.count * self.len
    }

    /// Values from a row's first to its last, inclusive.
    fn span(self) -> usize {
        (self.count - 1) * self.stride + self.len
    }
}

/// A `[k, n]` weight matrix in panels of `nr` columns (the last one padded with zeros), each
/// `KC`-deep slice of a panel contiguous: the order the micro-kernel reads them in.
///
/// In [`Precision::Bf16`] the panels hold `pairs` instead of `data`: each `u32` two rows of one
/// column as bfloat16 (the even row in the low half), a slice `kc / 2` pairs deep (rounded up,
/// the odd row zero), the operand `vdpbf16ps` multiplies.
#[derive(Debug, Clone)]
pub struct PackedWeights {
    k: usize,
    n: usize,
    nr: usize,
    data: Vec<f32>,
    pairs: Vec<u32>,
}

/// Tile width for this CPU's vectors: two registers per row.
fn panel_width() -> usize {
    match level() {
        Level::Avx512 => 32,
        Level::Avx2 => 16,
        Level::Baseline => 8,
    }
}

impl PackedWeights {
    /// Packs a row-major `[k, n]` matrix.
    pub fn new(weight: &[f32], k: usize, n: usize) -> PackedWeights {
        PackedWeights::with_width(weight, k, n, panel_width())
    }

    /// These `f32` weights packed for `precision`: in bfloat16 where this CPU multiplies it
    /// ([`bf16_supported`]), else as they are.
    pub fn in_precision(&self, precision: Precision) -> PackedWeights {
        match precision {
            Precision::Bf16 if bf16_supported() && self.pairs.is_empty() => {
                PackedWeights::in_bf16(&self.unpacked(), self.k, self.n)
            }
            _ => self.clone(),
        }
    }

    /// The `[k, n]` matrix an `f32` pack was made from.
    fn unpacked(&self) -> Vec<f32> {
        let (k, n, nr) = (self.k, self.n, self.nr);
        let mut weight = vec![0.0; k * n];
        for (p, row) in weight.chunks_exact_mut(n.max(1)).enumerate().take(k) {
            for (col, w) in row.iter_mut().enumerate() {
                *w = self.data[f32_slot(p, col, k, n, nr)];
            }
        }
        weight
    }

    /// Packed for the micro-kernel of another level than this CPU's widest (tests).
    fn with_width(weight: &[f32], k: usize, n: usize, nr: usize) -> PackedWeights {
        assert_eq!(weight.len(), k * n, "weights are not [k, n]");
        let panels = n.div_ceil(nr);
        let mut data = vec![0.0; panels * nr * k];
        for (p, row) in weight.chunks_exact(n.max(1)).enumerate().take(k) {
            for (col, &w) in row.iter().enumerate() {
                data[f32_slot(p, col, k, n, nr)] = w;
            }
        }
        let pairs = Vec::new();
        PackedWeights {
            k,
            n,
            nr,
            data,
            pairs,
        }
    }

    /// Packed as bfloat16 pairs for the AVX-512 BF16 micro-kernel (the caller checked the CPU).
    fn in_bf16(weight: &[f32], k: usize, n: usize) -> PackedWeights {
        assert_eq!(weight.len(), k * n, "weights are not [k, n]");
        let nr = BF16_WIDTH;
        let panels = n.div_ceil(nr);
        let mut pairs = vec![0u32; panels * nr * k.div_ceil(2)];
        for (p, row) in weight.chunks_exact(n.max(1)).enumerate().take(k) {
            let (k0, kc) = slice_of(p, k);
            let base = k0 / 2 * panels * nr + (p - k0) / 2 * nr;
            let shift = 16 * ((p - k0) % 2);
            for (col, &w) in row.iter().enumerate() {
                pairs[base + (col / nr) * kc.div_ceil(2) * nr + col % nr] |=
                    u32::from(bf16(w)) << shift;
            }
        }
        let data = Vec::new();
        PackedWeights {
            k,
            n,
            nr,
            data,
            pairs,
        }
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.data.len() * 4 + self.pairs.len() * 4
    }

    pub fn k(&self) -> usize {
        self.k
    }

    pub fn n(&self) -> usize {
        self.n
    }
}

/// Panels in bfloat16 are as wide as the AVX-512 ones: 16 pairs per register, two registers.
const BF16_WIDTH: usize = 32;

/// `x` rounded to the nearest bfloat16, ties to even (as `vcvtne2ps2bf16` rounds A's values).
fn bf16(x: f32) -> u16 {
    let bits = x.to_bits();
    if x.is_nan() {
        return ((bits >> 16) | 0x40) as u16;
    }
    ((bits + 0x7fff + ((bits >> 16) & 1)) >> 16) as u16
}

thread_local! {
    /// A block of A's rows as bfloat16 pairs, reused by every panel that passes over it.
    static A_PAIRS: RefCell<Vec<u32>> = const { RefCell::new(Vec::new()) };
}

/// Where an `f32` pack of a `[k, n]` matrix in panels of `nr` holds row `p`, column `col`.
fn f32_slot(p: usize, col: usize, k: usize, n: usize, nr: usize) -> usize {
    let (k0, kc) = slice_of(p, k);
    k0 * n.div_ceil(nr) * nr + (p - k0) * nr + (col / nr) * kc * nr + col % nr
}

/// First row and depth of the `KC`-slice holding row `p` of a `k`-deep product.
fn slice_of(p: usize, k: usize) -> (usize, usize) {
    let k0 = p / KC * KC;
    (k0, KC.min(k - k0))
}

/// What is applied to each output tile after its last slice.
#[derive(Debug, Clone, Copy)]
pub struct Epilogue<'a> {
    /// `n` values added to every row.
    pub bias: &'a [f32],
    /// Shaped as the output (`ldc` apart): added before the activation.
    pub residual: Option<&'a [f32]>,
    pub act: Option<Act>,
}

/// Where a tile's rows go and what happens to them: `rows x cols` of C from `c` (`ldc` apart),
/// starting from zero on the first slice or from C's partial sums, with the bias (and residual,
/// `ldc` apart) added after the last slice.
#[derive(Clone, Copy)]
struct Tile {
    c: *mut f32,
    ldc: usize,
    rows: usize,
    cols: usize,
    first: bool,
    bias: Option<*const f32>,
    residual: Option<*const f32>,
    /// `(low, high)`: the activation, when it is a clamp (ReLU, ReLU6).
    clamp: Option<(f32, f32)>,
}

/// `C[rows x cols] (+)= A[rows x kc] · panel`: `a` rows `lda` apart, each row's `kc` values
/// where `taps` says, `panel` `kc x NR`.
#[inline(always)]
fn tile<M: MulAdd, const MR: usize, const NR: usize>(
    a: &[f32],
    lda: usize,
    taps: Taps,
    panel: &[f32],
    t: Tile,
) {
    let kc = taps.k();
    assert!(t.rows <= MR && t.cols <= NR && t.rows > 0 && taps.count > 0);
    assert!(a.len() >= (t.rows - 1) * lda + taps.span() && panel.len() >= kc * NR);
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: the asserts keep every read inside `a` and `panel`; the caller gives `c`,
        // `bias` and `residual` for `rows x cols`. Panels are 32 wide only when `level()`
        // found AVX-512, 16 wide only when it found AVX2 + FMA (`panel_width`).
        unsafe {
            let (a, b) = (a.as_ptr(), panel.as_ptr());
            // A panel's last columns may fill one register of the two: half the work.
            macro_rules! rows {
                ($kernel:ident: $($r:literal)*) => {
                    match (t.rows, t.cols <= NR / 2) {
                        $(($r, true) => return x86::$kernel::<$r, 1>(a, lda, taps, b, t),)*
                        $(($r, false) => return x86::$kernel::<$r, 2>(a, lda, taps, b, t),)*
                        _ => {}
                    }
                };
            }
            match NR {
                32 => rows!(avx512: 1 2 3 4 5 6 7 8),
                16 => rows!(avx2: 1 2 3 4 5 6),
                _ => {}
            }
        }
    }
    let mut acc = [[0.0f32; NR]; MR];
    for (r, acc) in acc.iter_mut().enumerate().take(t.rows) {
        // SAFETY: the caller gives `rows x cols` of C, bias and residual.
        unsafe {
            let c = std::slice::from_raw_parts_mut(t.c.add(r * t.ldc), t.cols);
            if !t.first {
                acc[..t.cols].copy_from_slice(c);
            }
            let row = (0..taps.count).flat_map(|s| &a[r * lda + s * taps.stride..][..taps.len]);
            for (x, b) in row.zip(panel.chunks_exact(NR)) {
                for j in 0..NR {
                    acc[j] = M::mul_add(*x, b[j], acc[j]);
                }
            }
            if let Some(bias) = t.bias {
                let bias = std::slice::from_raw_parts(bias, t.cols);
                acc.iter_mut().zip(bias).for_each(|(x, b)| *x += b);
            }
            if let Some(res) = t.residual {
                let res = std::slice::from_raw_parts(res.add(r * t.ldc), t.cols);
                acc.iter_mut().zip(res).for_each(|(x, s)| *x += s);
            }
            if let Some((low, high)) = t.clamp {
                acc.iter_mut().for_each(|x| *x = x.max(low).min(high));
            }
            c.copy_from_slice(&acc[..t.cols]);
        }
    }
}

/// `rows x kc` of A (`lda` apart) as bfloat16 pairs, `kc / 2` (rounded up) per row.
fn bf16_rows(a: &[f32], lda: usize, rows: usize, kc: usize, pairs: &mut [u32]) {
    let kp = kc.div_ceil(2);
    assert!(rows > 0 && a.len() >= (rows - 1) * lda + kc && pairs.len() >= rows * kp);
    #[cfg(target_arch = "x86_64")]
    // SAFETY: the assert bounds every row; pairs are packed only where the CPU has AVX-512
    // BF16 (`PackedWeights::in_precision`).
    unsafe {
        x86::bf16_rows(a.as_ptr(), lda, rows, kc, pairs.as_mut_ptr())
    }
    #[cfg(not(target_arch = "x86_64"))]
    unreachable!("bfloat16 panels are packed on x86-64 only");
}

/// [`tile`] over bfloat16 pairs: `a` rows of `kp` pairs, back to back (a block converted by
/// [`bf16_rows`]), `panel` `kp x 32` pairs.
fn tile_bf16(a: &[u32], kp: usize, panel: &[u32], t: Tile) {
    assert!(t.rows <= 8 && t.cols <= BF16_WIDTH && t.rows > 0);
    assert!(a.len() >= t.rows * kp && panel.len() >= kp * BF16_WIDTH);
    #[cfg(target_arch = "x86_64")]
    // SAFETY: the asserts bound the reads; the caller gives `c`, `bias` and `residual` for
    // `rows x cols`; pairs exist only where the CPU has AVX-512 BF16.
    unsafe {
        let (a, b) = (a.as_ptr(), panel.as_ptr());
        macro_rules! rows {
            ($($r:literal)*) => {
                match (t.rows, t.cols <= BF16_WIDTH / 2) {
                    $(($r, true) => x86::avx512bf16::<$r, 1>(a, kp, kp, b, t),)*
                    $(($r, false) => x86::avx512bf16::<$r, 2>(a, kp, kp, b, t),)*
                    _ => unreachable!("at most 8 rows"),
                }
            };
        }
        rows!(1 2 3 4 5 6 7 8)
    }
    #[cfg(not(target_arch = "x86_64"))]
    unreachable!("bfloat16 panels are packed on x86-64 only");
}

/// The micro-kernels: `R` rows of A broadcast against two vector registers of a panel row,
/// `2 R` accumulators held in registers over the whole slice, then bias and residual added, the
/// clamp applied and the tile stored (masked where the panel is wider than C).
#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{Taps, Tile};
    use std::arch::x86_64::*;

    /// Lanes `[from, cols)` of a vector of 16, as an AVX-512 mask.
    #[inline(always)]
    fn mask16(cols: usize, from: usize) -> __mmask16 {
        ((1u32 << cols.saturating_sub(from).min(16)) - 1) as __mmask16
    }

    /// Lanes `[from, cols)` of a vector of 8, as an AVX2 mask.
    #[inline]
    #[target_feature(enable = "avx2")]
    fn mask8(cols: usize, from: usize) -> __m256i {
        let n = cols.saturating_sub(from).min(8) as i32;
        _mm256_cmpgt_epi32(
            _mm256_set1_epi32(n),
            _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
        )
    }

    // The helpers take whether the mask is full: a plain load or store then. AVX2's masked
    // store (`vmaskmovps`) is microcoded on AMD's Zen: a 6 x 16 tile stored with it ran at
    // half the speed of one stored plainly.

    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn load16(p: *const f32, m: __mmask16, full: bool) -> __m512 {
        // SAFETY: the caller's lanes are in bounds.
        unsafe {
            if full {
                _mm512_loadu_ps(p)
            } else {
                _mm512_maskz_loadu_ps(m, p)
            }
        }
    }

    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn store16(p: *mut f32, m: __mmask16, full: bool, v: __m512) {
        // SAFETY: as for `load16`.
        unsafe {
            if full {
                _mm512_storeu_ps(p, v)
            } else {
                _mm512_mask_storeu_ps(p, m, v)
            }
        }
    }

    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn load8(p: *const f32, m: __m256i, full: bool) -> __m256 {
        // SAFETY: as for `load16`.
        unsafe {
            if full {
                _mm256_loadu_ps(p)
            } else {
                _mm256_maskload_ps(p, m)
            }
        }
    }

    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn store8(p: *mut f32, m: __m256i, full: bool, v: __m256) {
        // SAFETY: as for `load16`.
        unsafe {
            if full {
                _mm256_storeu_ps(p, v)
            } else {
                _mm256_maskstore_ps(p, m, v)
            }
        }
    }

    /// Asks for the rows this tile's epilogue reads and writes, and the next tile's down the
    /// same column: the residual rows and, on the last slice, the output rows. Tiles walk down
    /// a column of C, a stride the hardware prefetchers miss, and a ResNet block's shortcut and
    /// output are rarely in L2: ResNet-50's 1x1 expansions, which add the shortcut, took about
    /// a quarter less time with this. Only hints, so safe: addresses past C do not fault.
    #[inline(always)]
    fn prefetch<const R: usize, const H: usize>(t: Tile, lanes: usize) {
        let rows = |base: *const f32| {
            for r in 0..2 * R {
                let row = base.wrapping_add(r * t.ldc);
                // SAFETY: a prefetch reads nothing and never faults.
                unsafe {
                    _mm_prefetch::<_MM_HINT_T0>(row.cast());
                    _mm_prefetch::<_MM_HINT_T0>(row.wrapping_add(lanes * H - 1).cast());
                }
            }
        };
        if let Some(res) = t.residual {
            rows(res);
        }
        if t.bias.is_some() {
            rows(t.c);
        }
    }

    macro_rules! kernel {
        ($name:ident, $start:ident, $finish:ident, $feature:literal, $rows:literal,
         $lanes:literal, $mask:ident, $load:ident, $store:ident, $loadu:ident, $set1:ident,
         $zero:ident, $fmadd:ident, $add:ident, $max:ident, $min:ident, $vec:ty) => {
            /// A tile's accumulators: zero on the first slice, else C's partial sums. Always
            /// inlined (so without a `target_feature` of its own; its callers have it): the
            /// accumulators must stay in registers.
            #[inline(always)]
            pub unsafe fn $start<const R: usize, const H: usize>(t: Tile) -> [[$vec; 2]; R] {
                // SAFETY: the caller gives `R x cols` at `t.c`.
                unsafe {
                    let masks = [$mask(t.cols, 0), $mask(t.cols, $lanes)];
                    let full = [t.cols >= $lanes, t.cols >= 2 * $lanes];
                    let mut c = [[$zero(); 2]; R];
                    if !t.first {
                        for (r, c) in c.iter_mut().enumerate() {
                            for h in 0..H {
                                c[h] = $load(t.c.add(r * t.ldc + $lanes * h), masks[h], full[h]);
                            }
                        }
                    }
                    c
                }
            }

            /// Bias, residual and clamp added to a tile's accumulators, and the tile stored
            /// (always inlined, as `start`).
            #[inline(always)]
            pub unsafe fn $finish<const R: usize, const H: usize>(mut c: [[$vec; 2]; R], t: Tile) {
                // SAFETY: the caller gives `R x cols` at `t.c`, `t.bias` and `t.residual`.
                unsafe {
                    let masks = [$mask(t.cols, 0), $mask(t.cols, $lanes)];
                    let full = [t.cols >= $lanes, t.cols >= 2 * $lanes];
                    let at = |r: usize, h: usize| r * t.ldc + $lanes * h;
                    if let Some(bias) = t.bias {
                        let high = if H > 1 {
                            $load(bias.add($lanes), masks[1], full[1])
                        } else {
                            $zero()
                        };
                        let bias = [$load(bias, masks[0], full[0]), high];
                        for c in c.iter_mut() {
                            for h in 0..H {
                                c[h] = $add(c[h], bias[h]);
                            }
                        }
                    }
                    if let Some(res) = t.residual {
                        for (r, c) in c.iter_mut().enumerate() {
                            for h in 0..H {
                                c[h] = $add(c[h], $load(res.add(at(r, h)), masks[h], full[h]));
                            }
                        }
                    }
                    if let Some((low, high)) = t.clamp {
                        let (low, high) = ($set1(low), $set1(high));
                        for c in c.iter_mut() {
                            for h in 0..H {
                                c[h] = $min($max(c[h], low), high);
                            }
                        }
                    }
                    for (r, c) in c.iter().enumerate() {
                        for h in 0..H {
                            $store(t.c.add(at(r, h)), masks[h], full[h], c[h]);
                        }
                    }
                }
            }

            #[doc = concat!("`R <= ", $rows, "` rows x ", $lanes, " x `H` columns (`H` <= 2).")]
            #[target_feature(enable = $feature)]
            pub unsafe fn $name<const R: usize, const H: usize>(
                a: *const f32,
                lda: usize,
                taps: Taps,
                b: *const f32,
                t: Tile,
            ) {
                // SAFETY (the whole body): the caller guarantees R rows `lda` apart at `a`,
                // each with `taps`' runs, `taps.k()` rows of 2 x lanes at `b`, and `R x cols`
                // at `t.c`, `t.bias`, `t.residual`.
                unsafe {
                    let mut c = $start::<R, H>(t);
                    prefetch::<R, H>(t, $lanes);
                    for s in 0..taps.count {
                        let (a, b) = (a.add(s * taps.stride), b.add(s * taps.len * 2 * $lanes));
                        for p in 0..taps.len {
                            let b0 = $loadu(b.add(p * 2 * $lanes));
                            let b1 = if H > 1 {
                                $loadu(b.add(p * 2 * $lanes + $lanes))
                            } else {
                                b0
                            };
                            for (r, c) in c.iter_mut().enumerate() {
                                let x = $set1(*a.add(r * lda + p));
                                c[0] = $fmadd(x, b0, c[0]);
                                if H > 1 {
                                    c[1] = $fmadd(x, b1, c[1]);
                                }
                            }
                        }
                    }
                    $finish::<R, H>(c, t)
                }
            }
        };
    }

    kernel!(
        avx512,
        avx512_start,
        avx512_finish,
        "avx512f",
        8,
        16,
        mask16,
        load16,
        store16,
        _mm512_loadu_ps,
        _mm512_set1_ps,
        _mm512_setzero_ps,
        _mm512_fmadd_ps,
        _mm512_add_ps,
        _mm512_max_ps,
        _mm512_min_ps,
        __m512
    );
    kernel!(
        avx2,
        avx2_start,
        avx2_finish,
        "avx2,fma",
        6,
        8,
        mask8,
        load8,
        store8,
        _mm256_loadu_ps,
        _mm256_set1_ps,
        _mm256_setzero_ps,
        _mm256_fmadd_ps,
        _mm256_add_ps,
        _mm256_max_ps,
        _mm256_min_ps,
        __m256
    );

    /// 16 lanes of bfloat16 pairs, as `vdpbf16ps` takes them.
    #[inline(always)]
    fn pairs(v: __m512i) -> __m512bh {
        // SAFETY: both are 64 bytes of plain lanes.
        unsafe { std::mem::transmute::<__m512i, __m512bh>(v) }
    }

    /// The AVX-512 kernel over bfloat16 pairs: `R <= 8` rows of `kp` pairs `lda` apart at `a`,
    /// `kp` rows of 32 pairs at `b`; each `vdpbf16ps` adds two rows' products in `f32`.
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub unsafe fn avx512bf16<const R: usize, const H: usize>(
        a: *const u32,
        lda: usize,
        kp: usize,
        b: *const u32,
        t: Tile,
    ) {
        // SAFETY (the whole body): as for `avx512`, in pairs.
        unsafe {
            let mut c = avx512_start::<R, H>(t);
            for p in 0..kp {
                let b0 = pairs(_mm512_loadu_si512(b.add(p * 32).cast()));
                let b1 = if H > 1 {
                    pairs(_mm512_loadu_si512(b.add(p * 32 + 16).cast()))
                } else {
                    b0
                };
                for (r, c) in c.iter_mut().enumerate() {
                    let x = pairs(_mm512_set1_epi32(*a.add(r * lda + p) as i32));
                    c[0] = _mm512_dpbf16_ps(c[0], x, b0);
                    if H > 1 {
                        c[1] = _mm512_dpbf16_ps(c[1], x, b1);
                    }
                }
            }
            avx512_finish::<R, H>(c, t)
        }
    }

    /// `rows x kc` f32 values (`lda` apart) to `rows x ceil(kc / 2)` bfloat16 pairs, the odd
    /// tail's high half zero.
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub unsafe fn bf16_rows(a: *const f32, lda: usize, rows: usize, kc: usize, pairs: *mut u32) {
        let kp = kc.div_ceil(2);
        // SAFETY: the caller gives `rows` rows of `kc` values at `a` and `rows x kp` at `pairs`.
        unsafe {
            for r in 0..rows {
                let (src, dst) = (a.add(r * lda), pairs.add(r * kp));
                for c in (0..kc).step_by(32) {
                    let low = _mm512_maskz_loadu_ps(mask16(kc, c), src.wrapping_add(c));
                    let high = _mm512_maskz_loadu_ps(mask16(kc, c + 16), src.wrapping_add(c + 16));
                    let v = _mm512_cvtne2ps_pbh(high, low);
                    let m = mask16(kp, c / 2);
                    let v = std::mem::transmute::<__m512bh, __m512i>(v);
                    _mm512_mask_storeu_epi32(dst.add(c / 2).cast(), m, v);
                }
            }
        }
    }
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn multiply_tiles<M: MulAdd, const MR: usize, const NR: usize>(
    m: usize,
    a: &[f32],
    lda: usize,
    taps: Taps,
    w: &PackedWeights,
    c: &mut [f32],
    ldc: usize,
    epilogue: Epilogue,
) {
    let (k, n) = (w.k, w.n);
    let panels = n.div_ceil(NR);
    let mut k0 = 0;
    loop {
        let kc = KC.min(k - k0);
        let last = k0 + kc == k;
        // A slice of a plain row is a run; runs of taps are one slice (`multiply_taps`).
        let slice = if taps.count == 1 { Taps::row(kc) } else { taps };
        // Rows per block: the block's slice of A and its rows of C (~256 KiB) stay in L2
        // while every panel passes over them, and each row of C is written whole at once.
        let mc = ((1 << 16) / (kc + n)).clamp(MR, 512) / MR * MR;
        let kp = kc.div_ceil(2);
        for i0 in (0..m).step_by(mc) {
            let block = mc.min(m - i0);
            let bf16 = !w.pairs.is_empty();
            let mut a_pairs = Vec::new();
            if bf16 {
                a_pairs = A_PAIRS.take();
                a_pairs.resize(block * kp, 0);
                bf16_rows(&a[i0 * lda + k0..], lda, block, kc, &mut a_pairs);
            }
            for j in 0..panels {
                let c0 = j * NR;
                let cols = NR.min(n - c0);
                for i in (i0..i0 + block).step_by(MR) {
                    let rows = MR.min(i0 + block - i);
                    let at = i * ldc + c0;
                    let t = Tile {
                        // In bounds: `multiply` checked `c` and `residual` for `m x n`.
                        c: c[at..].as_mut_ptr(),
                        ldc,
                        rows,
                        cols,
                        first: k0 == 0,
                        bias: last.then(|| epilogue.bias[c0..].as_ptr()),
                        residual: epilogue.residual.filter(|_| last).map(|r| r[at..].as_ptr()),
                        clamp: if last { clamp_of(epilogue.act) } else { None },
                    };
                    if !bf16 {
                        let panel = &w.data[k0 * panels * NR + j * kc * NR..][..kc * NR];
                        tile::<M, MR, NR>(&a[i * lda + k0..], lda, slice, panel, t);
                    } else {
                        let panel = &w.pairs[k0 / 2 * panels * NR + j * kp * NR..][..kp * NR];
                        tile_bf16(&a_pairs[(i - i0) * kp..], kp, panel, t);
                    }
                }
            }
            if bf16 {
                A_PAIRS.set(a_pairs);
            }
            if last && clamp_of(epilogue.act).is_none() && epilogue.act.is_some() {
                for r in i0..i0 + block {
                    activate::<M>(&mut c[r * ldc..][..n], epilogue.act);
                }
            }
        }
        k0 += kc;
        if k0 >= k {
            break;
        }
    }
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn multiply_body<M: MulAdd>(
    m: usize,
    a: &[f32],
    lda: usize,
    taps: Taps,
    w: &PackedWeights,
    c: &mut [f32],
    ldc: usize,
    epilogue: Epilogue,
) {
    match w.nr {
        32 => multiply_tiles::<M, 8, 32>(m, a, lda, taps, w, c, ldc, epilogue),
        16 => multiply_tiles::<M, 6, 16>(m, a, lda, taps, w, c, ldc, epilogue),
        _ => multiply_tiles::<M, 4, 8>(m, a, lda, taps, w, c, ldc, epilogue),
    }
}

multiversion! {
    /// The unchecked product; [`multiply_taps`] checks the shapes.
    fn multiply_unchecked(
        m: usize,
        a: &[f32],
        lda: usize,
        taps: Taps,
        w: &PackedWeights,
        c: &mut [f32],
        ldc: usize,
        epilogue: Epilogue,
    ) = multiply_body;
}

/// `c[m x n] = act(a[m x k] · w + bias [+ residual])`, row-major: `a` rows `lda` apart, `c`
/// (and `residual`) rows `ldc` apart. Serial: callers split rows over threads.
pub fn multiply(
    m: usize,
    a: &[f32],
    lda: usize,
    w: &PackedWeights,
    c: &mut [f32],
    ldc: usize,
    epilogue: Epilogue,
) {
    assert!(lda >= w.k, "gemm: lhs rows overlap");
    multiply_taps(m, a, lda, Taps::row(w.k), w, c, ldc, epilogue);
}

/// [`multiply`] with each row of A read where `taps` says: rows may overlap (a convolution's
/// neighbouring windows). Runs of taps are one slice of the product (`k <= KC`), in `f32`.
#[allow(clippy::too_many_arguments)]
pub fn multiply_taps(
    m: usize,
    a: &[f32],
    lda: usize,
    taps: Taps,
    w: &PackedWeights,
    c: &mut [f32],
    ldc: usize,
    epilogue: Epilogue,
) {
    if m == 0 || w.n == 0 {
        return;
    }
    let (k, n) = (w.k, w.n);
    assert!(taps.count > 0 && taps.k() == k, "gemm: taps are not k deep");
    assert!(
        taps.count == 1 || (k <= KC && w.pairs.is_empty()),
        "gemm: runs of taps deeper than a slice or in bfloat16"
    );
    assert!(
        a.len() >= (m - 1) * lda + taps.span(),
        "gemm: lhs too short"
    );
    assert!(
        ldc >= n && c.len() >= (m - 1) * ldc + n,
        "gemm: dst too short"
    );
    assert!(epilogue.bias.len() >= n, "gemm: bias too short");
    if let Some(res) = epilogue.residual {
        assert!(res.len() >= (m - 1) * ldc + n, "gemm: residual too short");
    }
    multiply_unchecked(m, a, lda, taps, w, c, ldc, epilogue);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every micro-kernel this CPU runs, not only its widest.
    fn widths() -> Vec<usize> {
        let mut widths = vec![8];
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                widths.push(16);
            }
            if level() == Level::Avx512 {
                widths.push(32);
            }
        }
        widths
    }

    /// Every packing this CPU multiplies: each width in `f32`, and bfloat16 where it has it.
    type Pack = fn(&[f32], usize, usize) -> PackedWeights;

    fn packings() -> Vec<(&'static str, Pack)> {
        let mut packings: Vec<(&str, Pack)> = vec![];
        for width in widths() {
            packings.push(match width {
                8 => ("f32 x 8", |w, k, n| PackedWeights::with_width(w, k, n, 8)),
                16 => ("f32 x 16", |w, k, n| PackedWeights::with_width(w, k, n, 16)),
                _ => ("f32 x 32", |w, k, n| PackedWeights::with_width(w, k, n, 32)),
            });
        }
        if super::super::kernels::bf16_supported() {
            packings.push(("bf16", PackedWeights::in_bf16));
        }
        packings
    }

    #[test]
    fn unpacks_what_it_packed() {
        let (k, n) = (300, 40);
        let w: Vec<f32> = (0..k * n).map(|i| i as f32).collect();
        for nr in widths() {
            assert_eq!(
                PackedWeights::with_width(&w, k, n, nr).unpacked(),
                w,
                "width {nr}"
            );
        }
    }

    #[test]
    fn bf16_rounds_to_nearest_even() {
        assert_eq!(bf16(1.0), 0x3f80);
        // 1 + 2^-8 is halfway between 1 and 1 + 2^-7: ties go to the even 1.
        assert_eq!(bf16(1.0 + 1.0 / 256.0), 0x3f80);
        assert_eq!(bf16(1.0 + 3.0 / 256.0), 0x3f82);
        assert_eq!(bf16(-2.0), 0xc000);
        assert!(f32::from_bits(u32::from(bf16(f32::NAN)) << 16).is_nan());
    }

    #[test]
    fn reads_runs_of_taps() {
        // Rows 6 apart, each 3 runs of 9 values 40 apart (a 3x3 stride-2 window over an RGB
        // image 40 values wide): rows overlap.
        let taps = Taps {
            count: 3,
            len: 9,
            stride: 40,
        };
        let (m, n, k, lda) = (13, 21, 27, 6);
        let a: Vec<f32> = (0..(m - 1) * lda + taps.span())
            .map(|i| ((i * 7) % 13) as f32 - 6.0)
            .collect();
        let b: Vec<f32> = (0..k * n).map(|i| ((i * 5) % 11) as f32 - 5.0).collect();
        let bias: Vec<f32> = (0..n).map(|i| i as f32 * 0.5).collect();
        for nr in widths() {
            let w = PackedWeights::with_width(&b, k, n, nr);
            let mut c = vec![f32::NAN; m * n];
            let epilogue = Epilogue {
                bias: &bias,
                residual: None,
                act: None,
            };
            multiply_taps(m, &a, lda, taps, &w, &mut c, n, epilogue);
            for i in 0..m {
                for j in 0..n {
                    let x = |p: usize| a[i * lda + p / 9 * 40 + p % 9];
                    let dot: f32 = (0..k).map(|p| x(p) * b[p * n + j]).sum();
                    assert_eq!(c[i * n + j], dot + bias[j], "width {nr} at ({i}, {j})");
                }
            }
        }
    }

    #[test]
    fn matches_naive_over_tails_and_slices() {
        // k over two slices (odd, for the pairs), n over a padded panel, m over a partial
        // tile; a residual, an act. Small integers: exact in bfloat16 and in every order.
        let shapes = [
            (37, 19, 23),
            (9, 40, 300),
            (1, 3, 1),
            (17, 33, 513),
            (20, 100, 27),
        ];
        for ((m, n, k), (packing, pack)) in shapes
            .into_iter()
            .flat_map(|s| packings().into_iter().map(move |p| (s, p)))
        {
            let nr = packing;
            let a: Vec<f32> = (0..m * k).map(|i| ((i * 7) % 13) as f32 - 6.0).collect();
            let b: Vec<f32> = (0..k * n).map(|i| ((i * 5) % 11) as f32 - 5.0).collect();
            let bias: Vec<f32> = (0..n).map(|i| i as f32 * 0.5).collect();
            let res: Vec<f32> = (0..m * n).map(|i| (i % 5) as f32).collect();
            let w = pack(&b, k, n);
            // In registers (ReLU) and as a pass over each stored block of rows (hard-swish,
            // SiLU).
            for act in [Act::Relu, Act::HardSwish, Act::Silu] {
                let mut c = vec![f32::NAN; m * n];
                let epilogue = Epilogue {
                    bias: &bias,
                    residual: Some(&res),
                    act: Some(act),
                };
                multiply(m, &a, k, &w, &mut c, n, epilogue);
                for i in 0..m {
                    for j in 0..n {
                        let dot: f32 = (0..k).map(|p| a[i * k + p] * b[p * n + j]).sum();
                        let mut want = [dot + bias[j] + res[i * n + j]];
                        super::super::kernels::epilogue(&mut want, 1, None, None, Some(act));
                        assert_eq!(
                            c[i * n + j],
                            want[0],
                            "({m}, {n}, {k}) {nr} {act:?} at ({i}, {j})"
                        );
                    }
                }
            }
        }
    }
}
