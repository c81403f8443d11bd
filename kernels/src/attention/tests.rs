//! `paged_attention` against a naive reference, its bit-exactness guarantees, and its errors.

use candle_core::{DType, Device, IndexOp, Result, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::paged_attention;
use crate::test_util::{bits, cu_seqlens, max_abs_diff, reference, test_device, u32s, uniform, Config, Scenario};

/// Largest error allowed against the f32 reference; outputs are convex mixes of values in [-1, 1].
fn tolerance(dtype: DType) -> f32 {
    match dtype {
        DType::F32 => 1e-5,
        DType::F16 => 2e-3,
        _ => 1e-2,
    }
}

/// Runs `paged_attention` for sequences `seqs` of `sc`, with the given packed `q`.
fn run(sc: &Scenario, q: &Tensor, seqs: &[usize], q_lens: &[usize], seq_lens: &[usize]) -> Result<Tensor> {
    let dev = q.device();
    let scale = 1.0 / (sc.cfg.head_dim as f32).sqrt();
    paged_attention(
        q,
        &sc.k_cache,
        &sc.v_cache,
        &sc.block_tables(seqs, dev)?,
        &cu_seqlens(q_lens, dev)?,
        &u32s(seq_lens, dev)?,
        scale,
    )
}

/// A random batch: some decodes, whole prompts, prompt chunks, and idle sequences, packed together.
fn random_case(rng: &mut StdRng, dtype: DType, dev: &Device) -> Result<()> {
    // Query heads per kv head 1, 4, 6, 3, 2 and 8 (on CUDA: per-head and grouped kernels).
    let (num_heads, num_kv_heads) = [(4, 4), (8, 2), (6, 1), (12, 4), (4, 2), (16, 2)][rng.random_range(0..6)];
    // Vectorised rows or not, and up to the CUDA kernels' limits (128 grouped, 256 per head).
    let head_dim = [64, 12, 8, 40, 6, 128, 256][rng.random_range(0..7)];
    let block_size = [1, 4, 16][rng.random_range(0..3)];
    let (mut seq_lens, mut q_lens) = (Vec::new(), Vec::new());
    for _ in 0..rng.random_range(1..6) {
        // Now and then a long one: more 32-position tiles than the CUDA kernels have warps.
        let seq_len = if rng.random_range(0..4) == 0 { rng.random_range(130..400) } else { rng.random_range(1..70) };
        let q_len = match rng.random_range(0..4) {
            0 => 1,
            1 => seq_len,
            2 => rng.random_range(1..=seq_len),
            _ => 0,
        };
        seq_lens.push(seq_len);
        q_lens.push(q_len);
    }
    let num_blocks = seq_lens.iter().map(|l: &usize| l.div_ceil(block_size)).sum::<usize>() + 3;
    let cfg = Config { num_heads, num_kv_heads, head_dim, block_size, num_blocks };
    let num_tokens = q_lens.iter().sum();
    let sc = Scenario::new(rng, cfg, &seq_lens, num_tokens, dtype, dev)?;
    let seqs: Vec<usize> = (0..seq_lens.len()).collect();
    let out = run(&sc, &sc.q, &seqs, &q_lens, &seq_lens)?;
    assert_eq!(out.dims(), sc.q.dims());
    assert_eq!(out.dtype(), dtype);
    let scale = 1.0 / (head_dim as f32).sqrt();
    let want = reference(&sc, &sc.q, &seqs, &q_lens, &seq_lens, scale)?;
    let diff = max_abs_diff(&out, &want)?;
    assert!(diff <= tolerance(dtype), "{dtype:?} {cfg:?} seq_lens {seq_lens:?} q_lens {q_lens:?}: max diff {diff}");
    // Off the CPU, the CPU body on the same inputs is a second reference.
    if !dev.is_cpu() {
        let cpu = sc.to_device(&Device::Cpu)?;
        let on_cpu = run(&cpu, &cpu.q, &seqs, &q_lens, &seq_lens)?;
        let diff = max_abs_diff(&out.to_device(&Device::Cpu)?, &on_cpu)?;
        assert!(
            diff <= tolerance(dtype),
            "{dtype:?} {cfg:?} seq_lens {seq_lens:?} q_lens {q_lens:?}: {dev:?} vs CPU max diff {diff}"
        );
    }
    Ok(())
}

fn matches_reference(dev: &Device) -> Result<()> {
    for dtype in [DType::F32, DType::BF16, DType::F16] {
        let mut rng = StdRng::seed_from_u64(7);
        for _ in 0..12 {
            random_case(&mut rng, dtype, dev)?;
        }
    }
    Ok(())
}
test_device!(matches_reference);

/// Sequence `a` (a decode row) gives the same bits alone, packed among other sequences in any
/// order, and under any number of threads.
fn bit_identical_across_batches(dev: &Device) -> Result<()> {
    for dtype in [DType::F32, DType::BF16] {
        let mut rng = StdRng::seed_from_u64(11);
        let cfg = Config { num_heads: 8, num_kv_heads: 2, head_dim: 64, block_size: 4, num_blocks: 64 };
        // a: decode; b: whole prompt; c: a prompt chunk; d: decode.
        let (seq_lens, q_lens) = ([37, 20, 50, 5], [1, 20, 9, 1]);
        let sc = Scenario::new(&mut rng, cfg, &seq_lens, 31, dtype, dev)?;
        let rows = |s: usize| -> Result<Tensor> {
            let start: usize = q_lens[..s].iter().sum();
            sc.q.narrow(0, start, q_lens[s])
        };
        let alone = run(&sc, &rows(0)?, &[0], &[1], &[37])?;
        let order = [1, 0, 2, 3];
        let q = Tensor::cat(&order.map(rows).into_iter().collect::<Result<Vec<_>>>()?, 0)?;
        let lens = |v: [usize; 4]| order.map(|s| v[s]);
        for threads in [1, 3] {
            let pool =
                rayon::ThreadPoolBuilder::new().num_threads(threads).build().map_err(candle_core::Error::wrap)?;
            let batched = pool.install(|| run(&sc, &q, &order, &lens(q_lens), &lens(seq_lens)))?;
            assert_eq!(bits(&alone)?, bits(&batched.i(20..21)?)?, "{dtype:?}, {threads} threads");
        }
    }
    Ok(())
}
test_device!(bit_identical_across_batches);

/// A prompt gives the same bits prefilled in one chunk or two, and its next decode row matches the
/// last row of a one-shot prefill one token longer.
fn bit_identical_across_chunking(dev: &Device) -> Result<()> {
    for dtype in [DType::F32, DType::BF16] {
        let mut rng = StdRng::seed_from_u64(13);
        let cfg = Config { num_heads: 6, num_kv_heads: 2, head_dim: 64, block_size: 16, num_blocks: 16 };
        // Sequence 0 holds the prompt (46 positions incl. the decoded one); sequence 1 is a
        // bystander decoding alongside the second chunk.
        let sc = Scenario::new(&mut rng, cfg, &[46, 30], 47, dtype, dev)?;
        let prompt = sc.q.i(0..46)?;
        let whole = run(&sc, &prompt.i(0..45)?, &[0], &[45], &[45])?;
        let first = run(&sc, &prompt.i(0..17)?, &[0], &[17], &[17])?;
        let q2 = Tensor::cat(&[&sc.q.i(46..47)?, &prompt.i(17..45)?], 0)?;
        let second = run(&sc, &q2, &[1, 0], &[1, 28], &[30, 45])?.i(1..)?;
        assert_eq!(bits(&whole)?, bits(&Tensor::cat(&[first, second], 0)?)?, "{dtype:?}: chunked prefill");
        let longer = run(&sc, &prompt, &[0], &[46], &[46])?;
        let decode = run(&sc, &prompt.i(45..46)?, &[0], &[1], &[46])?;
        assert_eq!(bits(&longer.i(45..46)?)?, bits(&decode)?, "{dtype:?}: decode vs prefill");
        assert_eq!(bits(&longer.i(..45)?)?, bits(&whole)?, "{dtype:?}: earlier rows ignore later keys");
    }
    Ok(())
}
test_device!(bit_identical_across_chunking);

/// A NaN in one query row of one head makes that (row, head)'s output NaN, on every kernel, and
/// leaves the other rows and heads as they were: a broken activation shows instead of passing as
/// zeros or a plausible value.
fn nan_queries_give_nan_rows(dev: &Device) -> Result<()> {
    let mut rng = StdRng::seed_from_u64(19);
    // One head per kv head (the per-head kernel on CUDA), then four (the grouped one).
    for (num_heads, num_kv_heads) in [(4, 4), (8, 2)] {
        for dtype in [DType::F32, DType::BF16] {
            let cfg = Config { num_heads, num_kv_heads, head_dim: 64, block_size: 4, num_blocks: 32 };
            let (seq_lens, q_lens) = ([40, 9], [1, 9]);
            let sc = Scenario::new(&mut rng, cfg, &seq_lens, 10, dtype, dev)?;
            let clean = run(&sc, &sc.q, &[0, 1], &q_lens, &seq_lens)?;
            let (row, head) = (4, 1);
            let mut q = sc.q.to_dtype(DType::F32)?.to_device(&Device::Cpu)?.to_vec3::<f32>()?;
            q[row][head][7] = f32::NAN;
            let q = Tensor::new(q, &Device::Cpu)?.to_dtype(dtype)?.to_device(dev)?;
            let out = run(&sc, &q, &[0, 1], &q_lens, &seq_lens)?.to_dtype(DType::F32)?.to_vec3::<f32>()?;
            let clean = clean.to_dtype(DType::F32)?.to_vec3::<f32>()?;
            for (r, (got, want)) in out.iter().zip(&clean).enumerate() {
                for (h, (got, want)) in got.iter().zip(want).enumerate() {
                    if (r, h) == (row, head) {
                        assert!(got.iter().all(|x| x.is_nan()), "{dtype:?} {cfg:?}: row {r} head {h}: {got:?}");
                    } else {
                        assert_eq!(got, want, "{dtype:?} {cfg:?}: row {r} head {h} changed");
                    }
                }
            }
        }
    }
    Ok(())
}
test_device!(nan_queries_give_nan_rows);

/// An empty batch and a batch of idle sequences give an empty output.
fn empty_batches(dev: &Device) -> Result<()> {
    let mut rng = StdRng::seed_from_u64(17);
    let cfg = Config { num_heads: 4, num_kv_heads: 2, head_dim: 8, block_size: 4, num_blocks: 8 };
    let sc = Scenario::new(&mut rng, cfg, &[5, 0], 0, DType::F32, dev)?;
    assert_eq!(run(&sc, &sc.q, &[], &[], &[])?.dims(), [0, 4, 8]);
    assert_eq!(run(&sc, &sc.q, &[0, 1], &[0, 0], &[5, 0])?.dims(), [0, 4, 8]);
    Ok(())
}
test_device!(empty_batches);

/// Every malformed argument is an `Err`, never a panic.
fn bad_arguments_are_errors(dev: &Device) -> Result<()> {
    let mut rng = StdRng::seed_from_u64(19);
    let cfg = Config { num_heads: 4, num_kv_heads: 2, head_dim: 8, block_size: 4, num_blocks: 8 };
    let sc = Scenario::new(&mut rng, cfg, &[6, 3], 4, DType::F32, dev)?;
    let (q, k, v) = (&sc.q, &sc.k_cache, &sc.v_cache);
    let bt = sc.block_tables(&[0, 1], dev)?;
    let (cu, sl) = (cu_seqlens(&[3, 1], dev)?, u32s(&[6, 3], dev)?);
    assert!(paged_attention(q, k, v, &bt, &cu, &sl, 1.0).is_ok());

    let t = |data: &[u32]| Tensor::new(data, dev);
    let bad_bt = Tensor::new(&[[0u32, 8, 0], [1, 2, 3]], dev)?;
    let mut cases: Vec<(&str, Result<Tensor>)> = vec![
        ("q rank", paged_attention(&q.flatten(1, 2)?, k, v, &bt, &cu, &sl, 1.0)),
        ("q head_dim", paged_attention(&q.narrow(2, 0, 4)?, k, v, &bt, &cu, &sl, 1.0)),
        ("q dtype", paged_attention(&q.to_dtype(DType::BF16)?, k, v, &bt, &cu, &sl, 1.0)),
        ("heads not a multiple", paged_attention(&q.narrow(1, 0, 3)?, k, v, &bt, &cu, &sl, 1.0)),
        ("cache shapes differ", paged_attention(q, k, &v.narrow(0, 0, 7)?, &bt, &cu, &sl, 1.0)),
        ("cache not contiguous", paged_attention(q, &k.transpose(0, 1)?, v, &bt, &cu, &sl, 1.0)),
        ("cache dtype", paged_attention(q, &k.to_dtype(DType::F64)?, &v.to_dtype(DType::F64)?, &bt, &cu, &sl, 1.0)),
        ("block_tables dtype", paged_attention(q, k, v, &bt.to_dtype(DType::I64)?, &cu, &sl, 1.0)),
        ("block_tables rows", paged_attention(q, k, v, &bt.i(..1)?, &cu, &sl, 1.0)),
        ("cu_seqlens length", paged_attention(q, k, v, &bt, &t(&[0, 4])?, &sl, 1.0)),
        ("seq_lens dtype", paged_attention(q, k, v, &bt, &cu, &sl.to_dtype(DType::F32)?, 1.0)),
    ];
    // Metadata values: always checked on the CPU, on CUDA in debug builds only (see `paged_attention`).
    if dev.is_cpu() || cfg!(debug_assertions) {
        cases.extend([
            ("cu_seqlens end", paged_attention(q, k, v, &bt, &t(&[0, 3, 5])?, &sl, 1.0)),
            ("cu_seqlens start", paged_attention(q, k, v, &bt, &t(&[1, 3, 4])?, &sl, 1.0)),
            ("cu_seqlens decreasing", paged_attention(q, k, v, &bt, &t(&[0, 5, 4])?, &sl, 1.0)),
            ("q_len > seq_len", paged_attention(q, k, v, &bt, &t(&[0, 1, 4])?, &t(&[6, 2])?, 1.0)),
            ("seq_len past table", paged_attention(q, k, v, &bt, &cu, &t(&[13, 3])?, 1.0)),
            ("block out of range", paged_attention(q, k, v, &bad_bt, &cu, &sl, 1.0)),
        ]);
    }
    for (name, result) in cases {
        assert!(result.is_err(), "{name}: expected an error");
    }
    Ok(())
}
test_device!(bad_arguments_are_errors);

/// On the CPU, f32 queries over an f16 or bf16 cache give exactly what they give over an f32 cache
/// holding the same (widened) values, for decodes, prompts and chunks together.
#[test]
fn f32_queries_over_a_half_cache_widen_it_exactly() -> Result<()> {
    let dev = &Device::Cpu;
    for dtype in [DType::F16, DType::BF16] {
        let mut rng = StdRng::seed_from_u64(23);
        let cfg = Config { num_heads: 9, num_kv_heads: 3, head_dim: 64, block_size: 16, num_blocks: 24 };
        let (seq_lens, q_lens) = ([70, 33, 90], [1, 33, 17]);
        let half = Scenario::new(&mut rng, cfg, &seq_lens, 51, dtype, dev)?;
        let mut wide = half.to_device(dev)?;
        wide.k_cache = half.k_cache.to_dtype(DType::F32)?;
        wide.v_cache = half.v_cache.to_dtype(DType::F32)?;
        let q = uniform(&mut rng, &[51, 9, 64], DType::F32, dev)?;
        let got = run(&half, &q, &[0, 1, 2], &q_lens, &seq_lens)?;
        assert_eq!(got.dtype(), DType::F32);
        let want = run(&wide, &q, &[0, 1, 2], &q_lens, &seq_lens)?;
        assert_eq!(bits(&got)?, bits(&want)?, "{dtype:?} cache");
    }
    Ok(())
}
