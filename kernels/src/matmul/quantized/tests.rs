//! `QuantizedLinear` against an f64 reference with its error bound, its bit-exactness guarantees
//! (every ISA, any batch, any thread count), and its errors.

use candle_core::{DType, Device, IndexOp, Result, Tensor};
use half::f16;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::{Isa, QuantizedLinear};
use crate::matmul::{PackedLinear, Quantized, WeightFormat, INT8_GROUP};
use crate::test_util::{bits, uniform};

/// A random quantised `[n, k]` weight: int4 codes 0..=15 with f16 scales and minimums, or int8
/// codes in ±127 with f32 scales.
fn random_quantized(rng: &mut StdRng, n: usize, k: usize, int4: bool) -> Quantized {
    let groups = n * k.div_ceil(INT8_GROUP);
    if int4 {
        Quantized::Int4 {
            codes: (0..n * k).map(|_| rng.random_range(0..16)).collect(),
            d: (0..groups).map(|_| f16::from_f32(rng.random_range(0.001..0.05))).collect(),
            m: (0..groups).map(|_| f16::from_f32(rng.random_range(-0.4..0.0))).collect(),
        }
    } else {
        Quantized::Int8 {
            codes: (0..n * k).map(|_| rng.random_range(-127..=127)).collect(),
            scales: (0..groups).map(|_| rng.random_range(0.0001..0.01)).collect(),
        }
    }
}

/// `[m, k]` activations with a few large outliers, as real hidden states have.
fn activations(rng: &mut StdRng, m: usize, k: usize) -> Result<Tensor> {
    let data: Vec<f32> = (0..m * k)
        .map(|_| if rng.random_range(0..50) == 0 { rng.random_range(-20.0..20.0) } else { rng.random_range(-1.0..1.0) })
        .collect();
    Tensor::from_vec(data, (m, k), &Device::Cpu)
}

/// The dequantised weight `[n, k]` (what the exact f32 kernel computes with).
fn dequantized(w: &Quantized, n: usize, k: usize) -> Result<Vec<f32>> {
    PackedLinear::from_quantized(w, n, k)?.dequantized()?.flatten_all()?.to_vec1::<f32>()
}

/// Every output within the bound the activation rounding allows: `y` is the product with the
/// quantised activations, each off by at most half its group's step `s = max|x| / 127`, so
/// `|y - x·wᵀ| <= Σ_i |w_i| · s_g / 2`, plus f32 rounding.
fn check_bound(x: &Tensor, w: &Quantized, n: usize, y: &Tensor) -> Result<()> {
    let (m, k) = x.dims2()?;
    let xs = x.flatten_all()?.to_vec1::<f32>()?;
    let ys = y.flatten_all()?.to_vec1::<f32>()?;
    let dense = dequantized(w, n, k)?;
    for r in 0..m {
        let xr = &xs[r * k..][..k];
        let steps: Vec<f64> =
            xr.chunks(INT8_GROUP).map(|g| f64::from(g.iter().fold(0.0f32, |a, v| a.max(v.abs()))) / 127.0).collect();
        for c in 0..n {
            let (mut exact, mut bound, mut mag) = (0.0f64, 0.0f64, 0.0f64);
            for i in 0..k {
                let wi = f64::from(dense[c * k + i]);
                exact += f64::from(xr[i]) * wi;
                mag += (f64::from(xr[i]) * wi).abs();
                bound += wi.abs() * steps[i / INT8_GROUP] / 2.0;
            }
            let err = (f64::from(ys[r * n + c]) - exact).abs();
            assert!(err <= bound * 1.0001 + mag * 1e-5 + 1e-6, "row {r} out {c}: error {err} over bound {bound}");
        }
    }
    Ok(())
}

#[test]
fn within_the_activation_rounding_bound() -> Result<()> {
    let mut rng = StdRng::seed_from_u64(1);
    for int4 in [true, false] {
        for (m, k, n) in [(1, 576, 96), (7, 1536, 50), (3, 40, 7), (20, 33, 130)] {
            let w = random_quantized(&mut rng, n, k, int4);
            let layer = QuantizedLinear::from_quantized(&w, n, k)?;
            let x = activations(&mut rng, m, k)?;
            check_bound(&x, &w, n, &layer.forward(&x)?)?;
        }
    }
    Ok(())
}

#[test]
fn close_to_the_exact_kernel() -> Result<()> {
    // On ordinary activations the int8 rounding moves outputs by well under a percent of their
    // magnitude sum; a wrong layout or scale would move them by far more.
    let mut rng = StdRng::seed_from_u64(2);
    for int4 in [true, false] {
        let (m, k, n) = (9, 576, 192);
        let w = random_quantized(&mut rng, n, k, int4);
        let x = uniform(&mut rng, &[m, k], DType::F32, &Device::Cpu)?;
        let fast = QuantizedLinear::from_quantized(&w, n, k)?.forward(&x)?.flatten_all()?.to_vec1::<f32>()?;
        let exact = PackedLinear::from_quantized(&w, n, k)?.forward(&x)?.flatten_all()?.to_vec1::<f32>()?;
        let dense = dequantized(&w, n, k)?;
        let xs = x.flatten_all()?.to_vec1::<f32>()?;
        for r in 0..m {
            for c in 0..n {
                let mag: f32 = (0..k).map(|i| (xs[r * k + i] * dense[c * k + i]).abs()).sum();
                let diff = (fast[r * n + c] - exact[r * n + c]).abs();
                assert!(diff <= 0.005 * mag, "int4={int4} row {r} out {c}: {diff} vs magnitude {mag}");
            }
        }
    }
    Ok(())
}

#[test]
fn every_isa_gives_the_same_bits() -> Result<()> {
    let mut rng = StdRng::seed_from_u64(3);
    let isas = Isa::available();
    for int4 in [true, false] {
        for (m, k, n) in [(1, 33, 7), (70, 77, 100), (19, 320, 96), (4, 5, 200), (6, 1536, 48)] {
            let w = random_quantized(&mut rng, n, k, int4);
            let mut layer = QuantizedLinear::from_quantized(&w, n, k)?;
            let x = activations(&mut rng, m, k)?;
            let mut outs = Vec::new();
            for &isa in &isas {
                layer.isa = isa;
                outs.push((isa, bits(&layer.forward(&x)?)?));
            }
            for (isa, out) in &outs {
                assert!(out == &outs[0].1, "int4={int4} {m}x{k}x{n}: {isa:?} differs from {:?}", outs[0].0);
            }
        }
    }
    Ok(())
}

#[test]
fn rows_are_batch_and_thread_invariant() -> Result<()> {
    let mut rng = StdRng::seed_from_u64(4);
    for int4 in [true, false] {
        for (k, n) in [(576, 960), (77, 61)] {
            let w = random_quantized(&mut rng, n, k, int4);
            let layer = QuantizedLinear::from_quantized(&w, n, k)?;
            let x = activations(&mut rng, 37, k)?;
            let batch = layer.forward(&x)?;
            for threads in [1, 2] {
                let pool =
                    rayon::ThreadPoolBuilder::new().num_threads(threads).build().map_err(candle_core::Error::wrap)?;
                pool.install(|| -> Result<()> {
                    for r in [0, 1, 4, 17, 36] {
                        let row = x.i(r..r + 1)?;
                        let want = bits(&batch.i(r)?)?;
                        assert_eq!(bits(&layer.forward(&row)?.i(0)?)?, want, "int4={int4} row {r} alone, {threads}t");
                        for m in [2, 5, 64] {
                            let others = activations(&mut rng, m - 1, k)?;
                            let at = rng.random_range(0..m);
                            let rows = Tensor::cat(&[others.i(..at)?, row.clone(), others.i(at..)?], 0)?;
                            let got = bits(&layer.forward(&rows)?.i(at)?)?;
                            assert_eq!(got, want, "int4={int4} row {r} at {at} of m={m}");
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
fn quantises_dense_weights() -> Result<()> {
    let mut rng = StdRng::seed_from_u64(5);
    let (m, k, n) = (3, 64, 20);
    let w = uniform(&mut rng, &[n, k], DType::F32, &Device::Cpu)?;
    let x = uniform(&mut rng, &[m, k], DType::F32, &Device::Cpu)?;
    for format in [WeightFormat::Int4, WeightFormat::Int8] {
        let layer = QuantizedLinear::from_tensor(&w, format)?;
        assert_eq!((layer.format(), layer.out_features(), layer.in_features()), (format, n, k));
        let exact = PackedLinear::from_tensor(&w, format)?.forward(&x)?;
        let diff = (layer.forward(&x)? - exact)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff < 0.05, "{format:?}: {diff}");
    }
    assert!(QuantizedLinear::from_tensor(&w, WeightFormat::F32).is_err());
    assert!(QuantizedLinear::from_tensor(&w, WeightFormat::Bf16).is_err());
    Ok(())
}

#[test]
fn empty_batch_strided_input_and_bad_inputs() -> Result<()> {
    let mut rng = StdRng::seed_from_u64(6);
    let (k, n) = (64, 50);
    let layer = QuantizedLinear::from_quantized(&random_quantized(&mut rng, n, k, true), n, k)?;
    assert_eq!(layer.forward(&Tensor::zeros((0, k), DType::F32, &Device::Cpu)?)?.dims(), &[0, n]);
    let wide = uniform(&mut rng, &[k, 5], DType::F32, &Device::Cpu)?;
    let strided = wide.t()?;
    assert_eq!(bits(&layer.forward(&strided)?)?, bits(&layer.forward(&strided.contiguous()?)?)?);
    // Zero rows give zero outputs (no NaN from a zero scale).
    let zeros = layer.forward(&Tensor::zeros((2, k), DType::F32, &Device::Cpu)?)?;
    assert_eq!(zeros.abs()?.max_all()?.to_scalar::<f32>()?, 0.0);
    assert!(layer.forward(&Tensor::zeros((2, k + 1), DType::F32, &Device::Cpu)?).is_err());
    assert!(layer.forward(&Tensor::zeros((2, k), DType::BF16, &Device::Cpu)?).is_err());
    assert!(layer.forward(&Tensor::zeros(k, DType::F32, &Device::Cpu)?).is_err());
    let bad = Quantized::Int4 { codes: vec![16; n * k], d: vec![f16::ONE; n * 2], m: vec![f16::ZERO; n * 2] };
    assert!(QuantizedLinear::from_quantized(&bad, n, k).is_err());
    assert!(QuantizedLinear::from_quantized(&random_quantized(&mut rng, n, k, false), n, k + 32).is_err());
    Ok(())
}

#[test]
fn shareable_across_threads() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<QuantizedLinear>();
}
