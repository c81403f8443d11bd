//! `PackedLinear` against an f64 reference, its bit-exactness guarantees, and its errors.

use candle_core::{DType, Device, IndexOp, Result, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use half::f16;

use super::{Isa, PackedLinear, Quantized, WeightFormat};
use crate::test_util::{bits, uniform};

const FORMATS: [WeightFormat; 4] = [WeightFormat::F32, WeightFormat::Bf16, WeightFormat::Int8, WeightFormat::Int4];

/// `[rows, cols]` row-major f32 data of a 2-D tensor.
fn data(t: &Tensor) -> Result<Vec<f32>> {
    t.flatten_all()?.to_vec1::<f32>()
}

/// Largest `|got - want| / (Σ_i |x[r, i] · w[c, i]|)` over all outputs, with `want` accumulated in
/// f64 from `x` and `w` (`[n, k]`). Normalising by the magnitude sum makes it a relative error.
fn rel_error(x: &Tensor, w: &Tensor, got: &Tensor) -> Result<f64> {
    let ((m, k), n) = (x.dims2()?, w.dims2()?.0);
    let (xs, ws, ys) = (data(x)?, data(w)?, data(got)?);
    let mut worst = 0.0f64;
    for r in 0..m {
        for c in 0..n {
            let (mut dot, mut mag) = (0.0f64, 0.0f64);
            for i in 0..k {
                let p = f64::from(xs[r * k + i]) * f64::from(ws[c * k + i]);
                dot += p;
                mag += p.abs();
            }
            worst = worst.max((f64::from(ys[r * n + c]) - dot).abs() / mag.max(f64::MIN_POSITIVE));
        }
    }
    Ok(worst)
}

/// Int8 against the original weight `w`: each weight moves by at most half its group's step
/// (`max|w| / 127` over its 32), so `|y - x·wᵀ| <= Σ_i |x[r, i]| · step(c, i) / 2`, plus rounding.
fn check_int8_rounding(x: &Tensor, w: &Tensor, y: &Tensor) -> Result<()> {
    let ((m, k), n) = (x.dims2()?, w.dims2()?.0);
    let (xs, ws, ys) = (data(x)?, data(w)?, data(y)?);
    for c in 0..n {
        let row = &ws[c * k..][..k];
        let steps: Vec<f64> =
            row.chunks(32).map(|g| f64::from(g.iter().fold(0.0f32, |a, v| a.max(v.abs()))) / 127.0).collect();
        for r in 0..m {
            let xr = &xs[r * k..][..k];
            let exact: f64 = xr.iter().zip(row).map(|(&a, &b)| f64::from(a) * f64::from(b)).sum();
            let bound: f64 = xr.iter().enumerate().map(|(i, &a)| f64::from(a).abs() * steps[i / 32] / 2.0).sum();
            let err = (f64::from(ys[r * n + c]) - exact).abs();
            assert!(err <= bound * 1.001 + 1e-5, "int8 row {r} out {c}: {err} > {bound}");
        }
    }
    Ok(())
}

/// Int4 against the original weight `w`: each weight moves by at most half its group's step
/// (`(max - min) / 15` over its 32), plus the f16 rounding of the step and the minimum.
fn check_int4_rounding(x: &Tensor, w: &Tensor, y: &Tensor) -> Result<()> {
    let ((m, k), n) = (x.dims2()?, w.dims2()?.0);
    let (xs, ws, ys) = (data(x)?, data(w)?, data(y)?);
    for c in 0..n {
        let row = &ws[c * k..][..k];
        let errs: Vec<f64> = row
            .chunks(32)
            .map(|g| {
                let (lo, hi) = g.iter().fold((f32::INFINITY, f32::NEG_INFINITY), |(l, h), &v| (l.min(v), h.max(v)));
                let step = f64::from(hi - lo) / 15.0;
                0.5 * step + 16.0 * step * 2f64.powi(-11) + f64::from(lo.abs()) * 2f64.powi(-11)
            })
            .collect();
        for r in 0..m {
            let xr = &xs[r * k..][..k];
            let exact: f64 = xr.iter().zip(row).map(|(&a, &b)| f64::from(a) * f64::from(b)).sum();
            let bound: f64 = xr.iter().enumerate().map(|(i, &a)| f64::from(a).abs() * errs[i / 32]).sum();
            let err = (f64::from(ys[r * n + c]) - exact).abs();
            assert!(err <= bound * 1.001 + 1e-5, "int4 row {r} out {c}: {err} > {bound}");
        }
    }
    Ok(())
}

/// A random `[n, k]` weight and the layer packed from it.
fn layer(rng: &mut StdRng, n: usize, k: usize, format: WeightFormat) -> Result<(Tensor, PackedLinear)> {
    let w = uniform(rng, &[n, k], DType::F32, &Device::Cpu)?;
    let layer = PackedLinear::from_tensor(&w, format)?;
    Ok((w, layer))
}

/// `(m, k, n)`: the default model's projections, and tails of every kind.
const SHAPES: [(usize, usize, usize); 9] = [
    (3, 576, 960),
    (2, 576, 3072),
    (9, 1536, 576),
    (1, 33, 7),
    (70, 33, 7),
    (17, 1, 1),
    (5, 31, 49),
    (40, 100, 97),
    (13, 64, 48),
];

#[test]
fn matches_reference() -> Result<()> {
    let mut rng = StdRng::seed_from_u64(1);
    for format in FORMATS {
        for (m, k, n) in SHAPES {
            let (w, layer) = layer(&mut rng, n, k, format)?;
            let x = uniform(&mut rng, &[m, k], DType::F32, &Device::Cpu)?;
            let y = layer.forward(&x)?;
            assert_eq!(y.dims(), [m, n]);
            // Against the weight the kernel computes with: f32 rounding only.
            let err = rel_error(&x, &layer.dequantized()?, &y)?;
            assert!(err < 4.0 * f64::from(f32::EPSILON) * (k as f64).sqrt(), "{format:?} {m}x{k}x{n}: {err}");
            // Against the original f32 weight: bounded by the format's weight rounding.
            match format {
                WeightFormat::Int8 => check_int8_rounding(&x, &w, &y)?,
                WeightFormat::Int4 => check_int4_rounding(&x, &w, &y)?,
                _ => {
                    let bound = if format == WeightFormat::F32 { 1e-5 } else { 2f64.powi(-8) };
                    let err = rel_error(&x, &w, &y)?;
                    assert!(err < bound, "{format:?} {m}x{k}x{n} against f32 weights: {err}");
                }
            }
        }
    }
    Ok(())
}

#[test]
fn m_from_1_to_70() -> Result<()> {
    let mut rng = StdRng::seed_from_u64(2);
    for (format, (k, n)) in FORMATS.into_iter().flat_map(|f| [(f, (33, 7)), (f, (47, 53))]) {
        let (_, layer) = layer(&mut rng, n, k, format)?;
        for m in 1..=70 {
            let x = uniform(&mut rng, &[m, k], DType::F32, &Device::Cpu)?;
            let err = rel_error(&x, &layer.dequantized()?, &layer.forward(&x)?)?;
            assert!(err < 1e-6, "{format:?} {m}x{k}x{n}: {err}");
        }
    }
    Ok(())
}

#[test]
fn dequantized_weights() -> Result<()> {
    let mut rng = StdRng::seed_from_u64(3);
    let w = uniform(&mut rng, &[50, 70], DType::F32, &Device::Cpu)?;
    let f32s = PackedLinear::from_tensor(&w, WeightFormat::F32)?.dequantized()?;
    assert_eq!(bits(&f32s)?, bits(&w)?);
    let bf16s = PackedLinear::from_tensor(&w, WeightFormat::Bf16)?.dequantized()?;
    assert_eq!(bits(&bf16s)?, bits(&w.to_dtype(DType::BF16)?)?);
    // Int8: each weight within half a step of its group's scale (max|w| / 127) of the original.
    let int8s = data(&PackedLinear::from_tensor(&w, WeightFormat::Int8)?.dequantized()?)?;
    let ws = data(&w)?;
    for (row, deq) in ws.chunks(70).zip(int8s.chunks(70)) {
        for (g, d) in row.chunks(32).zip(deq.chunks(32)) {
            let step = g.iter().fold(0.0f32, |m, v| m.max(v.abs())) / 127.0;
            assert!(g.iter().zip(d).all(|(a, b)| (a - b).abs() <= 0.5001 * step));
        }
    }
    Ok(())
}

/// Random codes, scales (and minimums) for an `[n, k]` weight.
fn random_quantized(rng: &mut StdRng, n: usize, k: usize, int4: bool) -> Quantized {
    let groups = n * k.div_ceil(32);
    let mut scale = || f16::from_f32(rng.random_range(-0.05f32..0.05));
    let (d, m): (Vec<f16>, Vec<f16>) = (0..groups).map(|_| (scale(), scale())).unzip();
    if int4 {
        Quantized::Int4 { codes: (0..n * k).map(|_| rng.random_range(0..16u8)).collect(), d, m }
    } else {
        let codes = (0..n * k).map(|_| rng.random_range(-127..=127i8)).collect();
        Quantized::Int8 { codes, scales: d.iter().map(|d| d.to_f32()).collect() }
    }
}

#[test]
fn quantized_weights_keep_their_values() -> Result<()> {
    let mut rng = StdRng::seed_from_u64(8);
    for (n, k) in [(7, 33), (96, 64), (50, 70)] {
        for int4 in [false, true] {
            let q = random_quantized(&mut rng, n, k, int4);
            let groups = k.div_ceil(32);
            // What GGUF's dequantisation computes: `q * d + m` (Q4_1) or `q * d` (Q8_0), unfused.
            let want: Vec<f32> = (0..n * k)
                .map(|at| {
                    let g = at / k * groups + at % k / 32;
                    match &q {
                        Quantized::Int4 { codes, d, m } => f32::from(codes[at]) * d[g].to_f32() + m[g].to_f32(),
                        Quantized::Int8 { codes, scales } => f32::from(codes[at]) * scales[g],
                    }
                })
                .collect();
            let layer = PackedLinear::from_quantized(&q, n, k)?;
            let got = data(&layer.dequantized()?)?;
            assert_eq!(
                got.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                want.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
            );
            // And the product is the f32 layer's on those values, bit for bit, on every ISA.
            let dense = PackedLinear::from_tensor(&Tensor::from_vec(want, (n, k), &Device::Cpu)?, WeightFormat::F32)?;
            let mut layer = layer;
            for m in [1, 3, 20] {
                let x = uniform(&mut rng, &[m, k], DType::F32, &Device::Cpu)?;
                for isa in Isa::available() {
                    layer.isa = isa;
                    assert_eq!(bits(&layer.forward(&x)?)?, bits(&dense.forward(&x)?)?, "{isa:?} int4={int4} m={m}");
                }
            }
        }
    }
    Ok(())
}

#[test]
fn malformed_quantized_weights_are_errors() {
    let q = |codes: Vec<u8>, groups: usize| Quantized::Int4 {
        codes,
        d: vec![f16::ONE; groups],
        m: vec![f16::ZERO; groups],
    };
    assert!(PackedLinear::from_quantized(&q(vec![1; 64], 2), 2, 32).is_ok());
    assert!(PackedLinear::from_quantized(&q(vec![1; 63], 2), 2, 32).is_err(), "short codes");
    assert!(PackedLinear::from_quantized(&q(vec![1; 64], 1), 2, 32).is_err(), "short scales");
    assert!(PackedLinear::from_quantized(&q(vec![16; 64], 2), 2, 32).is_err(), "code over 15");
    assert!(PackedLinear::from_quantized(&q(vec![], 0), 0, 32).is_err(), "empty");
    let int8 = Quantized::Int8 { codes: vec![1; 64], scales: vec![1.0; 3] };
    assert!(PackedLinear::from_quantized(&int8, 2, 32).is_err(), "int8 scales");
}

/// Row `r` of `x` placed among `m - 1` random rows, at a random position; returns the row of `y`.
fn row_inside(rng: &mut StdRng, layer: &PackedLinear, row: &Tensor, m: usize) -> Result<Vec<u32>> {
    let k = layer.in_features();
    let at = rng.random_range(0..m);
    let before = uniform(rng, &[at, k], DType::F32, &Device::Cpu)?;
    let after = uniform(rng, &[m - 1 - at, k], DType::F32, &Device::Cpu)?;
    let x = Tensor::cat(&[&before, row, &after], 0)?;
    bits(&layer.forward(&x)?.i(at)?)
}

#[test]
fn rows_are_batch_and_thread_invariant() -> Result<()> {
    let mut rng = StdRng::seed_from_u64(4);
    for (k, n) in [(576, 960), (77, 61)] {
        for format in FORMATS {
            let (_, layer) = layer(&mut rng, n, k, format)?;
            let x = uniform(&mut rng, &[37, k], DType::F32, &Device::Cpu)?;
            let batch = layer.forward(&x)?;
            for threads in [1, 2] {
                let pool =
                    rayon::ThreadPoolBuilder::new().num_threads(threads).build().map_err(candle_core::Error::wrap)?;
                pool.install(|| -> Result<()> {
                    for r in [0, 1, 8, 17, 36] {
                        let row = x.i(r..r + 1)?;
                        let want = bits(&batch.i(r)?)?;
                        assert_eq!(bits(&layer.forward(&row)?.i(0)?)?, want, "{format:?} row {r} alone, {threads}t");
                        for m in [2, 5, 64, 300] {
                            assert_eq!(row_inside(&mut rng, &layer, &row, m)?, want, "{format:?} row {r} in m={m}");
                        }
                    }
                    Ok(())
                })?;
            }
        }
    }
    Ok(())
}

#[test]
fn every_isa_gives_the_same_bits() -> Result<()> {
    let mut rng = StdRng::seed_from_u64(5);
    let isas = Isa::available();
    for format in FORMATS {
        for (m, k, n) in [(1, 33, 7), (70, 77, 100), (19, 320, 96), (4, 5, 200)] {
            let (_, mut layer) = layer(&mut rng, n, k, format)?;
            let x = uniform(&mut rng, &[m, k], DType::F32, &Device::Cpu)?;
            let mut outs = Vec::new();
            for &isa in &isas {
                layer.isa = isa;
                outs.push((isa, bits(&layer.forward(&x)?)?));
            }
            for (isa, out) in &outs {
                assert!(out == &outs[0].1, "{format:?} {m}x{k}x{n}: {isa:?} differs from {:?}", outs[0].0);
            }
        }
    }
    Ok(())
}

#[test]
fn shareable_across_threads() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<PackedLinear>();
}

#[test]
fn empty_batch_and_strided_input() -> Result<()> {
    let mut rng = StdRng::seed_from_u64(6);
    let (_, layer) = layer(&mut rng, 9, 12, WeightFormat::Bf16)?;
    let empty = layer.forward(&Tensor::zeros((0, 12), DType::F32, &Device::Cpu)?)?;
    assert_eq!(empty.dims(), [0, 9]);
    let xt = uniform(&mut rng, &[12, 5], DType::F32, &Device::Cpu)?.t()?;
    assert_eq!(bits(&layer.forward(&xt)?)?, bits(&layer.forward(&xt.contiguous()?)?)?);
    Ok(())
}

#[test]
fn bad_inputs_are_errors() -> Result<()> {
    let mut rng = StdRng::seed_from_u64(7);
    let (_, layer) = layer(&mut rng, 9, 12, WeightFormat::Int8)?;
    let dev = &Device::Cpu;
    assert!(layer.forward(&Tensor::zeros((3, 11), DType::F32, dev)?).is_err(), "wrong k");
    assert!(layer.forward(&Tensor::zeros((3, 12), DType::BF16, dev)?).is_err(), "bf16 x");
    assert!(layer.forward(&Tensor::zeros((3, 12), DType::F64, dev)?).is_err(), "f64 x");
    assert!(layer.forward(&Tensor::zeros(12, DType::F32, dev)?).is_err(), "1-D x");
    assert!(layer.forward(&Tensor::zeros((1, 3, 12), DType::F32, dev)?).is_err(), "3-D x");
    assert!(PackedLinear::from_tensor(&Tensor::zeros((2, 3, 4), DType::F32, dev)?, WeightFormat::F32).is_err());
    assert!(PackedLinear::from_tensor(&Tensor::zeros((0, 4), DType::F32, dev)?, WeightFormat::F32).is_err());
    assert!(PackedLinear::from_tensor(&Tensor::zeros((2, 4), DType::U32, dev)?, WeightFormat::F32).is_err());
    Ok(())
}
