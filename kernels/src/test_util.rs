//! Test helpers: the `test_device!` macro, random tensors, and a naive attention reference.

use candle_core::{DType, Device, IndexOp, Result, Tensor, D};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::Rng;

/// Turns `fn name(device: &Device) -> Result<()>` into the test `name::cpu`, plus `name::cuda`
/// when the `cuda` feature is on.
macro_rules! test_device {
    ($name:ident) => {
        mod $name {
            #[test]
            fn cpu() -> candle_core::Result<()> {
                super::$name(&candle_core::Device::Cpu)
            }

            #[cfg(feature = "cuda")]
            #[test]
            fn cuda() -> candle_core::Result<()> {
                super::$name(&candle_core::Device::new_cuda(0)?)
            }
        }
    };
}
pub(crate) use test_device;

/// A tensor of `shape` with elements uniform in `[-1, 1)`, rounded to `dtype`.
pub(crate) fn uniform(rng: &mut StdRng, dims: &[usize], dtype: DType, dev: &Device) -> Result<Tensor> {
    let n = dims.iter().product();
    let data: Vec<f32> = (0..n).map(|_| rng.random_range(-1.0..1.0)).collect();
    Tensor::from_vec(data, dims, dev)?.to_dtype(dtype)
}

/// Sizes of one attention layer's cache.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Config {
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub block_size: usize,
    pub num_blocks: usize,
}

/// A batch for `paged_attention`: random caches and queries, shuffled block tables.
pub(crate) struct Scenario {
    pub cfg: Config,
    /// `(num_tokens, num_heads, head_dim)`
    pub q: Tensor,
    /// `(num_blocks, block_size, num_kv_heads, head_dim)`
    pub k_cache: Tensor,
    /// `(num_blocks, block_size, num_kv_heads, head_dim)`
    pub v_cache: Tensor,
    /// Each sequence's blocks, in position order.
    pub tables: Vec<Vec<u32>>,
}

impl Scenario {
    /// Random caches for `cfg` and random queries for `num_tokens` rows. `seq_lens` fixes how many
    /// blocks each sequence gets; blocks are handed out in a shuffled order.
    pub fn new(
        rng: &mut StdRng,
        cfg: Config,
        seq_lens: &[usize],
        num_tokens: usize,
        dtype: DType,
        dev: &Device,
    ) -> Result<Self> {
        let mut free: Vec<u32> = (0..cfg.num_blocks as u32).collect();
        free.shuffle(rng);
        let tables = seq_lens.iter().map(|&len| free.split_off(free.len() - len.div_ceil(cfg.block_size))).collect();
        let cache_dims = [cfg.num_blocks, cfg.block_size, cfg.num_kv_heads, cfg.head_dim];
        Ok(Self {
            cfg,
            q: uniform(rng, &[num_tokens, cfg.num_heads, cfg.head_dim], dtype, dev)?,
            k_cache: uniform(rng, &cache_dims, dtype, dev)?,
            v_cache: uniform(rng, &cache_dims, dtype, dev)?,
            tables,
        })
    }

    /// The same scenario with every tensor copied to `dev`.
    pub fn to_device(&self, dev: &Device) -> Result<Self> {
        Ok(Self {
            cfg: self.cfg,
            q: self.q.to_device(dev)?,
            k_cache: self.k_cache.to_device(dev)?,
            v_cache: self.v_cache.to_device(dev)?,
            tables: self.tables.clone(),
        })
    }

    /// The `block_tables` tensor for sequences `seqs`, padded with junk that must never be read.
    pub fn block_tables(&self, seqs: &[usize], dev: &Device) -> Result<Tensor> {
        let width = seqs.iter().map(|&s| self.tables[s].len()).max().unwrap_or(0) + 1;
        let mut data = Vec::with_capacity(seqs.len() * width);
        for &s in seqs {
            data.extend(&self.tables[s]);
            data.extend(std::iter::repeat_n(u32::MAX - 7, width - self.tables[s].len()));
        }
        Tensor::from_vec(data, (seqs.len(), width), dev)
    }
}

/// `(num_seqs + 1,)` U32 prefix sums of `q_lens`.
pub(crate) fn cu_seqlens(q_lens: &[usize], dev: &Device) -> Result<Tensor> {
    let mut cu = vec![0u32];
    for &n in q_lens {
        cu.push(cu[cu.len() - 1] + n as u32);
    }
    Tensor::new(cu, dev)
}

/// `(n,)` U32.
pub(crate) fn u32s(v: &[usize], dev: &Device) -> Result<Tensor> {
    Tensor::new(v.iter().map(|&x| x as u32).collect::<Vec<_>>(), dev)
}

/// Naive attention in f32 with candle ops: gathers each sequence's keys and values into contiguous
/// tensors, then `softmax(scale * q kᵀ + causal mask) v`. `q` rows are packed by `q_lens`; the
/// result is `(num_tokens, num_heads, head_dim)` f32.
pub(crate) fn reference(
    sc: &Scenario,
    q: &Tensor,
    seqs: &[usize],
    q_lens: &[usize],
    seq_lens: &[usize],
    scale: f32,
) -> Result<Tensor> {
    let Config { num_heads, num_kv_heads, head_dim, block_size, .. } = sc.cfg;
    let group = num_heads / num_kv_heads;
    // (num_slots, num_kv_heads, head_dim)
    let k_slots = sc.k_cache.to_dtype(DType::F32)?.flatten(0, 1)?;
    let v_slots = sc.v_cache.to_dtype(DType::F32)?.flatten(0, 1)?;
    let q = q.to_dtype(DType::F32)?;
    let (mut outs, mut row) = (Vec::new(), 0);
    for ((&s, &q_len), &seq_len) in seqs.iter().zip(q_lens).zip(seq_lens) {
        if q_len == 0 {
            continue;
        }
        let slots: Vec<u32> =
            (0..seq_len).map(|p| sc.tables[s][p / block_size] * block_size as u32 + (p % block_size) as u32).collect();
        let slots = Tensor::new(slots, q.device())?;
        // (num_heads, seq_len, head_dim): kv heads repeated for GQA
        let expand = |t: &Tensor| -> Result<Tensor> {
            let t = t.index_select(&slots, 0)?.transpose(0, 1)?; // (num_kv_heads, seq_len, head_dim)
            t.unsqueeze(1)?.expand((num_kv_heads, group, seq_len, head_dim))?.reshape((num_heads, seq_len, head_dim))
        };
        let (k, v) = (expand(&k_slots)?, expand(&v_slots)?);
        let qs = q.i(row..row + q_len)?.transpose(0, 1)?.contiguous()?; // (num_heads, q_len, head_dim)
        let scores = (qs.matmul(&k.t()?.contiguous()?)? * scale as f64)?; // (num_heads, q_len, seq_len)
        let mask: Vec<f32> = (0..q_len)
            .flat_map(|j| (0..seq_len).map(move |p| if p <= seq_len - q_len + j { 0.0 } else { f32::NEG_INFINITY }))
            .collect();
        let scores = scores.broadcast_add(&Tensor::from_vec(mask, (q_len, seq_len), q.device())?)?;
        let e = scores.broadcast_sub(&scores.max_keepdim(D::Minus1)?)?.exp()?;
        let p = e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?;
        outs.push(p.matmul(&v.contiguous()?)?.transpose(0, 1)?); // (q_len, num_heads, head_dim)
        row += q_len;
    }
    if outs.is_empty() {
        return Tensor::zeros((0, num_heads, head_dim), DType::F32, q.device());
    }
    Tensor::cat(&outs, 0)
}

/// Largest absolute difference between two tensors of one shape, compared in f32.
pub(crate) fn max_abs_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
    let d = (a.to_dtype(DType::F32)? - b.to_dtype(DType::F32)?)?.abs()?;
    if d.elem_count() == 0 {
        return Ok(0.0);
    }
    d.flatten_all()?.max(0)?.to_scalar::<f32>()
}

/// The bit patterns of a tensor's elements, for exact comparisons in any float dtype.
pub(crate) fn bits(t: &Tensor) -> Result<Vec<u32>> {
    Ok(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?.into_iter().map(f32::to_bits).collect())
}
