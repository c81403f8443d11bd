//! The Llama forward pass over packed (unpadded) tokens and a paged KV cache.
//!
//! Llama: Touvron et al., "LLaMA: Open and Efficient Foundation Language Models" (2023), and the
//! Hugging Face `modeling_llama.py` reference. Pre-norm decoder layers (RMSNorm), rotary position
//! embeddings (half-split layout), grouped-query attention, SwiGLU MLP.
//!
//! All the step's new tokens, from every sequence, form one `[num_tokens, hidden]` matrix, so each
//! projection is one matmul per layer per step. Attention reads and writes the paged cache through
//! `sluice_kernels`. Every row is computed by the same kernels whatever the batch (see
//! [`Linear`]), which makes greedy output independent of the batch's composition.

use candle_core::{DType, Device, Tensor};

use sluice_kernels::gemv::{self, Epilogue};

use super::config::LlamaConfig;
use super::cpu_weights::{CpuActivations, CpuWeights};
use super::linear::Linear;
use super::loader::WeightSource;
use super::normed::{NormedLinear, RmsNorm};
use super::ops;
use crate::error::{EngineError, Result};

/// Metadata for one step's packed tokens, as device tensors. Built by the `ModelRunner`.
#[derive(Debug)]
pub struct StepInput {
    /// `[num_tokens]` u32: the tokens, sequence after sequence.
    pub token_ids: Tensor,
    /// `[num_tokens]` u32: each token's position in its sequence.
    pub positions: Tensor,
    /// `[num_tokens]` u32: the cache slot each token's K/V is written to.
    pub slot_mapping: Tensor,
    /// `[num_seqs, max_blocks]` u32: each sequence's block table, padded.
    pub block_tables: Tensor,
    /// `[num_seqs + 1]` u32: sequence `s` owns rows `cu_seqlens_q[s] .. cu_seqlens_q[s + 1]`.
    pub cu_seqlens_q: Tensor,
    /// `[num_seqs]` u32: each sequence's context length after this step.
    pub seq_lens: Tensor,
    /// `[num_sampled]` u32: the rows whose logits are wanted (each sampling sequence's last row).
    pub sample_rows: Tensor,
    /// Whether `sample_rows` is every row in order (`0..num_tokens`, as in a decode step whose
    /// sequences all sample): the forward then takes the final norm and the LM head over the rows
    /// as they are, without gathering them.
    pub every_row_sampled: bool,
}

/// One layer's K and V pools, `[num_blocks, block_size, num_kv_heads, head_dim]` each.
#[derive(Debug)]
pub struct LayerCache {
    /// Keys.
    pub k: Tensor,
    /// Values.
    pub v: Tensor,
}

#[derive(Debug)]
struct Layer {
    // The input norm and [hidden] → [(heads + 2 * kv_heads) * head_dim]
    qkv: NormedLinear,
    o: Linear,
    // The post-attention norm and [hidden] → [2 * intermediate]: gate, then up
    gate_up: NormedLinear,
    down: Linear,
}

/// How to load a model's weights.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// Activation, KV cache and (off the CPU) weight dtype.
    pub dtype: DType,
    /// Where the weights live.
    pub device: Device,
    /// On the CPU with f32 activations: how the projection weights are stored for the packed
    /// kernels.
    pub cpu_weights: CpuWeights,
    /// On the CPU: whether int8 and int4 weights meet f32 or int8 activations.
    pub cpu_activations: CpuActivations,
    /// Keep GGUF-quantized projections as they are stored, on candle's `QMatMul`, wherever candle
    /// has kernels for their type (see [`Linear`]). The engine sets it on CUDA unless
    /// `GpuWeights::Dense` is asked for; on the CPU it works too (tests compare it there), but
    /// candle's quantized CPU matmul is slower than the packed kernels.
    pub quantized_matmul: bool,
    /// Off the CPU (or with `gpu_layout`): whether dense projections of up to [`gemv::MAX_ROWS`] rows run on
    /// `sluice_kernels::gemv` rather than cuBLAS. The engine sets it from `EngineConfig::gemv` once
    /// [`check_gemv`](super::check_gemv) has passed on the device.
    pub gemv: bool,
    /// On the CPU: load and run the model as on a GPU (weights as stored, `gemv` and its fused
    /// norms and epilogues when `gemv` is set, the fused RoPE/cache op, the residual add deferred
    /// to the next norm and fused with it), on the ops' CPU bodies. Slow; it exists so that tests can run the GPU
    /// path's structure with the real model where there is no GPU. Ignored off the CPU.
    pub gpu_layout: bool,
}

/// A loaded Llama-family model.
#[derive(Debug)]
pub struct Llama {
    config: LlamaConfig,
    embed: Tensor, // [vocab, hidden]
    layers: Vec<Layer>,
    // The final norm and the LM head.
    head: NormedLinear,
    // `[hidden]` ones in `dtype`: the weight of a norm whose own weight is folded into its
    // projection, at batches `gemv_norm` does not take.
    unit: Tensor,
    cos: Tensor, // [max_positions, head_dim / 2]
    sin: Tensor, // [max_positions, head_dim / 2]
    dtype: DType,
    device: Device,
    // The GPU path's ops and structure (on CUDA, or asked for by `LoadOptions::gpu_layout`).
    gpu_path: bool,
    // Whether the GPU path rotates q and k and stores k and v in one launch a layer past two rows
    // (`qkv_rope_cache`, checked at load on CUDA), rather than `qkv_rope` and `reshape_and_cache`.
    // (At one or two rows on the GEMV, `gemv_norm_qkv_cache` does it, checked with the GEMV.)
    fused_cache: bool,
}

impl Llama {
    /// Loads every weight from `source` as `dtype` on `device`; `progress(done, total)` is called
    /// after each layer.
    pub fn load(source: &mut WeightSource, options: &LoadOptions, progress: &dyn Fn(usize, usize)) -> Result<Self> {
        let (dtype, device) = (options.dtype, &options.device);
        let config = source.config().clone();
        let eps = config.rms_norm_eps as f32;
        let gpu_path = device.is_cuda() || (device.is_cpu() && options.gpu_layout);
        let norm = |weight: Tensor| RmsNorm { weight, eps, fused_add: gpu_path };
        let embed = source.get("model.embed_tokens.weight", dtype, device)?;
        let mut layers = Vec::with_capacity(config.num_layers);
        for i in 0..config.num_layers {
            let name = |part: &str| format!("model.layers.{i}.{part}.weight");
            let names = |parts: &[&str]| parts.iter().map(|p| name(p)).collect::<Vec<_>>();
            let attn_norm = norm(source.get(&name("input_layernorm"), dtype, device)?);
            let qkv =
                Linear::load(source, &names(&["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]), options)?;
            let o = Linear::load(source, &names(&["self_attn.o_proj"]), options)?;
            let mlp_norm = norm(source.get(&name("post_attention_layernorm"), dtype, device)?);
            let gate_up = Linear::load(source, &names(&["mlp.gate_proj", "mlp.up_proj"]), options)?;
            let layer = Layer {
                qkv: NormedLinear::new(attn_norm, qkv, options.gemv)?,
                o,
                gate_up: NormedLinear::new(mlp_norm, gate_up, options.gemv)?,
                down: Linear::load(source, &names(&["mlp.down_proj"]), options)?,
            };
            layers.push(layer);
            progress(i + 1, config.num_layers);
        }
        let final_norm = norm(source.get("model.norm.weight", dtype, device)?);
        let head = if !config.tie_word_embeddings && source.contains("lm_head.weight") {
            "lm_head.weight"
        } else {
            "model.embed_tokens.weight"
        };
        let head = NormedLinear::new(final_norm, Linear::load(source, &[head.to_string()], options)?, options.gemv)?;
        let unit = Tensor::ones(config.hidden_size, dtype, device)?;
        let (cos, sin) = rope_tables(&config, dtype, device)?;
        let heads = (config.num_heads, config.num_kv_heads, config.head_dim);
        let fused_cache = gpu_path
            && config.head_dim.is_multiple_of(2)
            && (device.is_cpu() || super::check_qkv_rope_cache(device, dtype, heads));
        Ok(Self { config, embed, layers, head, unit, cos, sin, dtype, device: device.clone(), gpu_path, fused_cache })
    }

    /// The hyper-parameters.
    pub fn config(&self) -> &LlamaConfig {
        &self.config
    }

    /// The activations' dtype (also the KV cache's).
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The device the weights live on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Allocates a zeroed KV cache of `num_blocks` blocks of `block_size` tokens of `dtype` for every
    /// layer. A cache dtype other than the model's works on the CPU with f32 activations (keys and
    /// values are rounded to it as they are written; attention widens them back exactly).
    pub fn allocate_cache(&self, num_blocks: usize, block_size: usize, dtype: DType) -> Result<Vec<LayerCache>> {
        let shape = (num_blocks, block_size, self.config.num_kv_heads, self.config.head_dim);
        (0..self.config.num_layers)
            .map(|_| {
                Ok(LayerCache {
                    k: Tensor::zeros(shape, dtype, &self.device)?,
                    v: Tensor::zeros(shape, dtype, &self.device)?,
                })
            })
            .collect()
    }

    /// Runs one step: writes the new tokens' K/V into `cache` and returns the f32 logits of the
    /// rows in `input.sample_rows`, `[num_sampled, vocab]`.
    pub fn forward(&self, input: &StepInput, cache: &[LayerCache]) -> Result<Tensor> {
        let c = &self.config;
        let n = input.token_ids.dim(0)?;
        let (h, kv, d) = (c.num_heads, c.num_kv_heads, c.head_dim);
        let scale = 1.0 / (d as f32).sqrt();
        // On the GPU path one launch per layer rotates q and k and stores k and v in the cache
        // (`qkv_rope_cache`, which gathers the tables itself; at one or two rows on the GEMV, the
        // projection's own launch does it); elsewhere the tables' rows are gathered once per step
        // (when first needed) for `ops::qkv_rope` and `reshape_and_cache`.
        let fused_cache = self.fused_cache;
        let mut tables: Option<(Tensor, Tensor)> = None; // [n, d/2] each

        let mut x = self.embed.index_select(&input.token_ids, 0)?; // [n, hidden]

        // The last layer's MLP output, still to be added to `x`: on the GPU path the add is fused
        // with the next RMS norm (the next layer's, or the final one on the sampled rows only).
        let mut pending: Option<Tensor> = None;
        for (layer, lc) in self.layers.iter().zip(cache) {
            let cache_dtypes = [lc.k.dtype(), lc.v.dtype()] == [self.dtype; 2];
            let fused = fused_cache && cache_dtypes;
            // The one-launch QKV path has its own start-up check (with the GEMV's).
            let one_launch = self.gpu_path && d.is_multiple_of(2) && cache_dtypes;
            let cache = gemv::QkvCache {
                cos: &self.cos,
                sin: &self.sin,
                positions: &input.positions,
                key_cache: &lc.k,
                value_cache: &lc.v,
                slot_mapping: &input.slot_mapping,
                heads: h,
                kv_heads: kv,
                head_dim: d,
            };
            // At one or two rows on the GEMV, the norm, the projection, RoPE and the cache writes
            // are one launch; otherwise the projection, then (on the GPU path, if it passed its
            // check) `qkv_rope_cache`.
            let fused_q = if one_launch { layer.qkv.forward_qkv_cache(&mut x, &mut pending, &cache)? } else { None };
            let q = match fused_q {
                Some(q) => q,
                None => {
                    // [n, (h + 2kv) * d]
                    let qkv = layer.qkv.forward(&mut x, pending.take(), &self.unit, Epilogue::Store)?;
                    if fused && qkv.dtype() == self.dtype {
                        sluice_kernels::fused::qkv_rope_cache(
                            &qkv,
                            &self.cos,
                            &self.sin,
                            &input.positions,
                            &lc.k,
                            &lc.v,
                            &input.slot_mapping,
                            (h, kv, d),
                        )?
                    } else {
                        if tables.is_none() {
                            let gather = |t: &Tensor| t.index_select(&input.positions, 0);
                            tables = Some((gather(&self.cos)?, gather(&self.sin)?));
                        }
                        let Some((cos, sin)) = tables.as_ref() else {
                            return Err(EngineError::Model("the rotary tables' rows were not gathered".into()));
                        };
                        let (q, k, v) = ops::qkv_rope(&qkv, cos, sin, (h, kv, d))?; // [n, h | kv, d]
                        let (k, v) = (k.to_dtype(lc.k.dtype())?, v.to_dtype(lc.v.dtype())?);
                        sluice_kernels::reshape_and_cache(&k, &v, &lc.k, &lc.v, &input.slot_mapping)?;
                        q
                    }
                }
            };
            let attn = sluice_kernels::paged_attention(
                &q,
                &lc.k,
                &lc.v,
                &input.block_tables,
                &input.cu_seqlens_q,
                &input.seq_lens,
                scale,
            )?; // [n, h, d]
            let attn_out = layer.o.forward(&attn.reshape((n, h * d))?)?;
            // [n, intermediate]: silu(gate) * up
            let act = layer.gate_up.forward(&mut x, Some(attn_out), &self.unit, Epilogue::Swiglu)?;
            let mlp_out = layer.down.forward(&act)?;
            if self.gpu_path {
                pending = Some(mlp_out);
            } else {
                x = ops::add(&x, &mlp_out)?;
            }
        }
        // [num_sampled, hidden]
        let (mut last, pending) = if input.every_row_sampled {
            (x, pending)
        } else {
            let gather = |t: &Tensor| t.index_select(&input.sample_rows, 0);
            (gather(&x)?, pending.as_ref().map(gather).transpose()?)
        };
        let logits = self.head.forward(&mut last, pending, &self.unit, Epilogue::Store)?; // [num_sampled, vocab]
        Ok(logits.to_dtype(DType::F32)?)
    }

    /// Bytes of all projection weights (what a decode step reads), embedding excluded.
    pub fn projection_bytes(&self) -> usize {
        let layers: usize = self
            .layers
            .iter()
            .map(|l| {
                l.qkv.linear.weight_bytes()
                    + l.o.weight_bytes()
                    + l.gate_up.linear.weight_bytes()
                    + l.down.weight_bytes()
            })
            .sum();
        layers + self.head.linear.weight_bytes()
    }

    /// The vocabulary size (logits' width).
    pub fn vocab_size(&self) -> usize {
        self.embed.dim(0).unwrap_or(self.config.vocab_size)
    }
}

/// RoPE cos/sin tables, `[max_positions, head_dim / 2]` each.
fn rope_tables(c: &LlamaConfig, dtype: DType, device: &Device) -> Result<(Tensor, Tensor)> {
    let inv_freq = c.rope_inv_freq();
    let half = inv_freq.len();
    let inv_freq = Tensor::from_vec(inv_freq, (1, half), &Device::Cpu)?;
    let positions =
        Tensor::arange(0u32, c.max_position_embeddings as u32, &Device::Cpu)?.to_dtype(DType::F32)?.unsqueeze(1)?;
    let freqs = positions.broadcast_mul(&inv_freq)?; // [max_positions, d/2]
    let cos = freqs.cos()?.to_dtype(dtype)?.to_device(device)?;
    let sin = freqs.sin()?.to_dtype(dtype)?.to_device(device)?;
    Ok((cos, sin))
}

#[cfg(test)]
pub(in crate::model) mod tests {
    use super::*;

    pub(in crate::model) fn random(rows: usize, cols: usize, seed: u64) -> Result<Tensor> {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let data: Vec<f32> = (0..rows * cols).map(|_| rng.random_range(-1.0f32..1.0)).collect();
        Ok(Tensor::from_vec(data, (rows, cols), &Device::Cpu)?)
    }

    pub(in crate::model) fn max_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
        Ok((a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?)
    }
}
