//! Inverted-residual blocks (expand 1x1 -> depthwise -> project 1x1, MobileNetV2's and the
//! EfficientNets') run over bands of output rows, so that the expanded activation, the block's
//! largest, stays in cache instead of going to memory and back. Measured per op on MobileNetV2
//! before this: the expand convolutions at 56x56 and 112x112 ran at under half the GEMM's
//! speed and the depthwise ones after them at a fifth of it, bound by that traffic.

use rayon::prelude::*;

use super::gemm::{self, Epilogue, PackedWeights};
use super::kernels::{self, Window};
use super::{Conv, ConvWeights, Nhwc, Op, Padding, PlanError, min_split, op_threads, pool};

/// Bytes a band's expanded rows and depthwise output take at most (a few rows more when a
/// row alone is bigger): they stay in L2 between the three steps.
const BAND_BYTES: usize = 384 << 10;

/// `project(depthwise(expand(x))) [+ x]`, each convolution with its own bias and activation.
#[derive(Debug, Clone)]
pub struct InvertedResidual {
    /// `None` in blocks that do not expand (expansion ratio 1): the depthwise convolution then
    /// reads the input.
    expand: Option<Conv>,
    depthwise: Conv,
    /// `None` when something else (a squeeze-excite) comes between the depthwise convolution
    /// and the projection: the block then ends with the depthwise output.
    project: Option<Conv>,
    /// The block's input added to the projection before its activation.
    shortcut: bool,
}

impl Conv {
    /// A 1x1, stride-1, unpadded dense convolution: a GEMM over the activations as they are.
    fn pointwise(&self) -> Option<&PackedWeights> {
        let unpadded = matches!(
            self.padding,
            Padding::Same | Padding::Explicit([0, 0, 0, 0])
        );
        match &self.weights {
            ConvWeights::Dense(w) if self.kernel == [1, 1] && self.stride == [1, 1] && unpadded => {
                Some(w)
            }
            _ => None,
        }
    }

    fn depthwise(&self) -> Option<&[f32]> {
        match &self.weights {
            ConvWeights::Depthwise(w) => Some(w),
            _ => None,
        }
    }
}

/// `ops` with every pointwise -> depthwise -> pointwise run of convolutions as one
/// [`InvertedResidual`] (or a run of two: pointwise -> depthwise, depthwise -> pointwise), and a
/// residual block that is one such run as one with its shortcut.
pub(super) fn fuse(ops: Vec<Op>) -> Vec<Op> {
    let mut out: Vec<Op> = Vec::with_capacity(ops.len());
    for op in ops {
        let op = match op {
            Op::Residual { shortcut, body } => residual(shortcut, body),
            Op::Concat(branches) => Op::Concat(branches.into_iter().map(fuse).collect()),
            op => op,
        };
        if matches!(op, Op::Conv(_)) {
            out.push(op);
            fuse_tail(&mut out, false);
        } else {
            fuse_tail(&mut out, true);
            out.push(op);
        }
    }
    fuse_tail(&mut out, true);
    out
}

/// A residual block with its body fused; its last convolution stays apart (it takes the
/// shortcut) unless the whole body is one block and the shortcut is the input.
fn residual(shortcut: Vec<Op>, mut body: Vec<Op>) -> Op {
    let Some(last) = body.pop() else {
        return Op::Residual { shortcut, body };
    };
    let mut init = fuse(body);
    if let (true, Op::Conv(project)) = (shortcut.is_empty(), &last)
        && project.pointwise().is_some()
    {
        let whole = match init.as_mut_slice() {
            [Op::InvertedResidual(block)] if block.project.is_none() => {
                block.project = Some(project.clone());
                block.shortcut = true;
                init.pop()
            }
            [Op::Conv(depthwise)] if depthwise.depthwise().is_some() => {
                Some(Op::InvertedResidual(Box::new(InvertedResidual {
                    expand: None,
                    depthwise: depthwise.clone(),
                    project: Some(project.clone()),
                    shortcut: true,
                })))
            }
            _ => None,
        };
        if let Some(block) = whole {
            return block;
        }
    }
    init.push(last);
    Op::Residual {
        shortcut: fuse(shortcut),
        body: init,
    }
}

/// Fuses the convolutions that end `ops` when they chain: pointwise -> depthwise ->
/// pointwise, else depthwise -> pointwise; when `closing` (something other than a convolution
/// follows), pointwise -> depthwise.
fn fuse_tail(ops: &mut Vec<Op>, closing: bool) {
    let convs: Vec<&Conv> = ops
        .iter()
        .rev()
        .take(3)
        .map_while(|op| match op {
            Op::Conv(c) => Some(c),
            _ => None,
        })
        .collect();
    let pw = |c: &Conv| c.pointwise().is_some();
    let dw = |c: &Conv| c.depthwise().is_some();
    let chains = |a: &Conv, b: &Conv| a.output == b.input;
    // Newest first: [project, depthwise, expand].
    let [expand, project] = match convs.as_slice() {
        [p, d, e, ..] if !closing && pw(e) && dw(d) && pw(p) && chains(e, d) && chains(d, p) => {
            [true, true]
        }
        [p, d, ..] if !closing && dw(d) && pw(p) && chains(d, p) => [false, true],
        [d, e, ..] if closing && pw(e) && dw(d) && chains(e, d) => [true, false],
        _ => return,
    };
    let project = project.then(|| ops.pop());
    let depthwise = ops.pop();
    let expand = expand.then(|| ops.pop());
    let conv = |op: Option<Op>| match op {
        Some(Op::Conv(c)) => Some(c),
        _ => None,
    };
    let Some(depthwise) = conv(depthwise) else {
        return;
    };
    ops.push(Op::InvertedResidual(Box::new(InvertedResidual {
        expand: expand.and_then(conv),
        depthwise,
        project: project.and_then(conv),
        shortcut: false,
    })));
}

impl InvertedResidual {
    pub(super) fn convs_mut(&mut self) -> impl Iterator<Item = &mut Conv> {
        [
            Some(&mut self.depthwise),
            self.expand.as_mut(),
            self.project.as_mut(),
        ]
        .into_iter()
        .flatten()
    }

    pub(super) fn weight_bytes(&self) -> usize {
        [
            Some(&self.depthwise),
            self.expand.as_ref(),
            self.project.as_ref(),
        ]
        .into_iter()
        .flatten()
        .map(Conv::weight_bytes)
        .sum()
    }

    pub(super) fn run(&self, x: &Nhwc) -> Result<Nhwc, PlanError> {
        let pointwise = |c: Option<&Conv>| c.is_none_or(|c| c.pointwise().is_some());
        if self.depthwise.depthwise().is_none()
            || !pointwise(self.expand.as_ref())
            || !pointwise(self.project.as_ref())
        {
            return Err("a fused block holds a convolution of another kind".to_string());
        }
        let c = self.expand.as_ref().map_or(x.channels, |e| e.output);
        if let Some(expand) = &self.expand
            && x.channels != expand.input
        {
            return Err(format!(
                "convolution expects {} channels, got {}",
                expand.input, x.channels
            ));
        }
        let (win, oh) = self.depthwise.window_over(c, x.height, x.width)?;
        let ow = win.out_width;
        let n = self.project.as_ref().map_or(c, |p| p.output);
        if self.shortcut && (oh, ow, n) != (x.height, x.width, x.channels) {
            return Err("shortcut and block output differ in shape".to_string());
        }
        let row_len = ow * n;
        let mut out = pool::take(x.batch * oh * row_len);
        // Threads share an image when there are fewer images than threads (each share then
        // expands the few rows above it twice).
        let shares = op_threads().div_ceil(x.batch.max(1)).clamp(1, oh.max(1));
        let share_rows = oh.div_ceil(shares).max(1);
        out.par_chunks_mut((oh * row_len).max(1))
            .with_min_len(min_split())
            .enumerate()
            .for_each(|(b, image_out)| {
                image_out
                    .par_chunks_mut(share_rows * row_len)
                    .with_min_len(min_split())
                    .enumerate()
                    .for_each(|(i, rows)| {
                        let first = i * share_rows;
                        let last = first + rows.len() / row_len;
                        self.run_rows(x.image(b), x.width, win, first..last, rows);
                    })
            });
        Ok(x.with(oh, ow, n, out))
    }

    /// Output rows `rows` of one image (`width` pixels wide), band by band; the expanded rows
    /// a band shares with the next are kept, not expanded again.
    fn run_rows(
        &self,
        image: &[f32],
        width: usize,
        win: Window,
        rows: std::ops::Range<usize>,
        out: &mut [f32],
    ) {
        let depthwise = &self.depthwise;
        let Some(depthwise_w) = depthwise.depthwise() else {
            return; // `run` checked the kinds
        };
        let c = win.channels;
        let height = win.height;
        let [stride, kernel, pad] = [win.stride[0], win.kernel[0], win.pad[0]];
        let ow = win.out_width;
        let n = self.project.as_ref().map_or(c, |p| p.output);
        let expanded_row = width * c;
        let band = (BAND_BYTES / 4 / (stride * expanded_row + ow * c)).max(2);
        let held_rows = ((band - 1) * stride + kernel).min(height);
        let mut held = self
            .expand
            .as_ref()
            .map(|_| pool::take(held_rows * expanded_row));
        let mut depthwise_out = self.project.as_ref().map(|_| pool::take(band * ow * c));
        // Expanded rows [lo, hi) are held, row `lo` first.
        let (mut lo, mut hi) = (0, 0);
        for a in rows.clone().step_by(band) {
            let b = (a + band).min(rows.end);
            // What the depthwise convolution reads: the input itself when nothing expands it,
            // else the held rows, as an image whose row 0 is row `lo`.
            let (input, band_win) = match (&self.expand, held.as_mut()) {
                (Some(expand), Some(held)) => {
                    let need_lo = (a * stride).saturating_sub(pad).min(height);
                    let need_hi = ((b - 1) * stride + kernel)
                        .saturating_sub(pad)
                        .clamp(need_lo, height);
                    if (lo..hi).contains(&need_lo) {
                        held.copy_within(
                            (need_lo - lo) * expanded_row..(hi - lo) * expanded_row,
                            0,
                        );
                    } else {
                        hi = need_lo;
                    }
                    lo = need_lo;
                    if need_hi > hi {
                        let m = (need_hi - hi) * width;
                        let dst = &mut held[(hi - lo) * expanded_row..][..m * c];
                        pointwise(expand, m, &image[hi * width * expand.input..], dst, None);
                        hi = need_hi;
                    }
                    let band_win = Window {
                        height: hi - lo,
                        pad: [pad + lo, win.pad[1]],
                        ..win
                    };
                    (&held[..(hi - lo) * expanded_row], band_win)
                }
                _ => (image, win),
            };
            let band_out = &mut out[(a - rows.start) * ow * n..][..(b - a) * ow * n];
            let depthwise_rows = |dst: &mut [f32]| {
                for (oy, row) in (a..b).zip(dst.chunks_exact_mut(ow * c)) {
                    kernels::depthwise_row(
                        input,
                        depthwise_w,
                        &depthwise.bias,
                        band_win,
                        oy,
                        depthwise.act,
                        row,
                    );
                }
            };
            match (&self.project, depthwise_out.as_mut()) {
                (Some(project), Some(dw)) => {
                    let dw = &mut dw[..(b - a) * ow * c];
                    depthwise_rows(dw);
                    let shortcut = self
                        .shortcut
                        .then(|| &image[a * ow * n..][..(b - a) * ow * n]);
                    pointwise(project, (b - a) * ow, dw, band_out, shortcut);
                }
                _ => depthwise_rows(band_out),
            }
        }
    }
}

/// `act(a · w + bias [+ shortcut])` for the `m` rows of `a` of a pointwise convolution (of
/// which `run` checked the kind).
fn pointwise(conv: &Conv, m: usize, a: &[f32], out: &mut [f32], shortcut: Option<&[f32]>) {
    if let Some(w) = conv.pointwise() {
        let epilogue = Epilogue {
            bias: &conv.bias,
            residual: shortcut,
            act: conv.act,
        };
        gemm::multiply(m, a, conv.input, w, out, conv.output, epilogue);
    }
}

#[cfg(test)]
mod tests {
    use super::super::{SERIAL, run_all};
    use super::*;
    use crate::models::layers::{Act, ConvSpec};
    use burn::prelude::*;

    fn conv(spec: ConvSpec, act: Option<Act>) -> Op {
        Op::Conv(Conv::from_burn(&spec.bias().init(&Device::flex()), act).expect("plan conv"))
    }

    /// expand (16 -> 40, ReLU6) -> depthwise `k`x`k` stride `s` -> project (40 -> `out`).
    fn block(k: usize, s: usize, same: bool, out: usize) -> Vec<Op> {
        let mut dw = ConvSpec::new(40, 40, k).depthwise().stride(s);
        if same {
            dw = dw.same();
        }
        vec![
            conv(ConvSpec::new(16, 40, 1), Some(Act::Relu6)),
            conv(dw, Some(Act::Relu6)),
            conv(ConvSpec::new(40, out, 1), None),
        ]
    }

    fn input(batch: usize, channels: usize, height: usize, width: usize) -> Nhwc {
        let data: Vec<f32> = (0..batch * channels * height * width)
            .map(|i| ((i * 7919) % 1000) as f32 / 500.0 - 1.0)
            .collect();
        Nhwc::from_nchw(&data, [batch, channels, height, width])
    }

    fn assert_close(case: &str, got: &Nhwc, want: &Nhwc) {
        assert_eq!(
            (got.batch, got.height, got.width, got.channels),
            (want.batch, want.height, want.width, want.channels),
            "{case}"
        );
        let diff = got
            .data
            .iter()
            .zip(want.data.iter())
            .fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(diff <= 1e-5, "{case}: max |diff| {diff:e}");
    }

    #[test]
    fn fused_blocks_equal_their_convolutions_run_one_by_one() {
        // Tall images have several bands (each row here is 40 channels x 200 pixels wide).
        for (k, s, same) in [(3, 1, false), (3, 2, false), (5, 2, true), (5, 1, false)] {
            for (height, width) in [(7, 5), (61, 200), (200, 17)] {
                for (batch, serial, expand) in [
                    (1, false, true),
                    (3, false, true),
                    (2, true, true),
                    (2, true, false),
                ] {
                    let case = format!(
                        "k{k} s{s} same {same}, {height}x{width}, batch {batch}, expand {expand}"
                    );
                    let mut ops = block(k, s, same, 24);
                    if !expand {
                        ops.remove(0);
                    }
                    let x = input(batch, if expand { 16 } else { 40 }, height, width);
                    let want = run_all(&ops, &x).expect("unfused");
                    let fused = fuse(ops);
                    assert!(
                        matches!(fused.as_slice(), [Op::InvertedResidual(_)]),
                        "{case}: not fused"
                    );
                    SERIAL.with(|f| f.set(serial));
                    let got = run_all(&fused, &x);
                    SERIAL.with(|f| f.set(false));
                    assert_close(&case, &got.expect("fused"), &want);
                }
            }
        }
    }

    #[test]
    fn a_residual_block_takes_its_shortcut_inside_and_an_squeeze_excite_stays_apart() {
        let x = input(2, 16, 30, 30);
        let residual = Op::residual(vec![], block(3, 1, false, 16)).expect("ends in a conv");
        let want = run_all(std::slice::from_ref(&residual), &x).expect("unfused");
        let fused = fuse(vec![residual]);
        assert!(matches!(fused.as_slice(), [Op::InvertedResidual(b)] if b.shortcut));
        assert_close("residual", &run_all(&fused, &x).expect("fused"), &want);

        // Without an expansion (ratio 1): depthwise -> project + shortcut.
        let x40 = input(2, 40, 30, 30);
        let mut body = block(3, 1, false, 40);
        body.remove(0);
        let residual = Op::residual(vec![], body).expect("ends in a conv");
        let want = run_all(std::slice::from_ref(&residual), &x40).expect("unfused");
        let fused = fuse(vec![residual]);
        assert!(matches!(
            fused.as_slice(),
            [Op::InvertedResidual(b)] if b.shortcut && b.expand.is_none()
        ));
        assert_close(
            "residual, no expansion",
            &run_all(&fused, &x40).expect("fused"),
            &want,
        );

        // expand -> depthwise, then something else: the two fuse, the rest stays.
        let mut ops = block(3, 2, false, 24);
        ops.insert(2, Op::max_pool(1, 1, 0, false));
        let want = run_all(&ops, &x).expect("unfused");
        let fused = fuse(ops);
        assert!(matches!(
            fused.as_slice(),
            [Op::InvertedResidual(b), Op::Pool(_), Op::Conv(_)] if b.project.is_none()
        ));
        assert_close("no projection", &run_all(&fused, &x).expect("fused"), &want);
    }
}
