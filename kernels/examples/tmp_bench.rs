use candle_core::{DType, Device, Tensor};
use std::time::Instant;
fn main() -> candle_core::Result<()> {
    let dev = Device::Cpu;
    let (h, kvh, d, bs) = (9usize, 3usize, 64usize, 16usize);
    for dtype in [DType::F32, DType::BF16] {
        for (name, nseq, ctx, qlen) in
            [("decode 8x1024", 8usize, 1024usize, 1usize), ("decode 1x2048", 1, 2048, 1), ("prefill 512", 1, 512, 512)]
        {
            let blocks_per = ctx.div_ceil(bs);
            let nb = nseq * blocks_per;
            let kc = Tensor::randn(0f32, 1., (nb, bs, kvh, d), &dev)?.to_dtype(dtype)?;
            let vc = Tensor::randn(0f32, 1., (nb, bs, kvh, d), &dev)?.to_dtype(dtype)?;
            let q = Tensor::randn(0f32, 1., (nseq * qlen, h, d), &dev)?.to_dtype(dtype)?;
            let bt: Vec<u32> = (0..nb as u32).collect();
            let bt = Tensor::from_vec(bt, (nseq, blocks_per), &dev)?;
            let cu: Vec<u32> = (0..=nseq as u32).map(|i| i * qlen as u32).collect();
            let cu = Tensor::new(cu, &dev)?;
            let sl = Tensor::new(vec![ctx as u32; nseq], &dev)?;
            let f = || sluice_kernels::paged_attention(&q, &kc, &vc, &bt, &cu, &sl, 0.125);
            f()?;
            let n = 20;
            let t = Instant::now();
            for _ in 0..n {
                f()?;
            }
            let ms = t.elapsed().as_secs_f64() * 1e3 / n as f64;
            let bytes = (nseq * ctx * kvh * d * 2 * dtype.size_in_bytes()) as f64;
            println!("{dtype:?} {name}: {ms:.3} ms  (KV {:.1} MB, {:.1} GB/s)", bytes / 1e6, bytes / ms / 1e6);
        }
    }
    Ok(())
}
