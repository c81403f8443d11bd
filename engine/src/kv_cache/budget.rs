//! How many bytes the KV pools get: `kv_cache_memory` when given; otherwise 1 GiB on the CPU and,
//! on CUDA, vLLM's `--gpu-memory-utilization` rule, measured once the weights are loaded:
//!
//! ```text
//! kv bytes = utilization × total − (total − free) − activation reserve
//! ```
//!
//! `total − free` is everything already on the GPU (weights, the CUDA context, other processes),
//! and the reserve is what one step may allocate on top ([`activation_reserve`]).

use std::fmt;

use crate::model::LlamaConfig;
use crate::scheduler::SchedulerConfig;

/// Bytes of one GiB, for messages.
const GIB: f64 = (1u64 << 30) as f64;

/// A fixed part of the activation reserve: cuBLAS workspaces, kernel modules loaded on first use,
/// the quantized matmul's scratch buffers (its stream-k fix-up buffer alone is 16 MiB) and
/// allocator slack.
pub const FIXED_RESERVE: usize = 512 << 20;

/// A GPU's memory as the driver reports it (`cuMemGetInfo`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GpuMemory {
    /// Bytes not allocated by anyone.
    pub free: usize,
    /// Bytes on the device.
    pub total: usize,
}

/// Where the KV cache's size came from, and the size.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum KvBudget {
    /// `kv_cache_memory`, as given.
    Given(usize),
    /// The CPU's default.
    CpuDefault(usize),
    /// What `utilization` of the GPU leaves (see the module docs).
    Gpu {
        /// `gpu_memory_utilization`.
        utilization: f32,
        /// The GPU's memory when it was measured.
        memory: GpuMemory,
        /// The activation reserve.
        reserve: usize,
        /// The KV cache's bytes: what is left, 0 when nothing is.
        bytes: usize,
    },
}

impl KvBudget {
    /// The rule for a GPU with `memory` (measured after the weights were loaded).
    pub fn gpu(memory: GpuMemory, utilization: f32, reserve: usize) -> Self {
        // To millionths, so that 0.9 is 0.9 and not f32's 0.89999998 (2 KiB short on 80 GiB).
        let share = (f64::from(utilization) * 1e6).round() / 1e6;
        let limit = (share * memory.total as f64) as usize;
        let in_use = memory.total.saturating_sub(memory.free);
        let bytes = limit.saturating_sub(in_use).saturating_sub(reserve);
        Self::Gpu { utilization, memory, reserve, bytes }
    }

    /// The KV cache's bytes.
    pub fn bytes(&self) -> usize {
        match *self {
            Self::Given(b) | Self::CpuDefault(b) => b,
            Self::Gpu { bytes, .. } => bytes,
        }
    }
}

impl fmt::Display for KvBudget {
    /// Where the size came from, for the log and for the error when it holds no block.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Self::Given(b) => write!(f, "{b} bytes set by `kv_cache_memory`"),
            Self::CpuDefault(b) => write!(f, "the CPU default of {b} bytes"),
            Self::Gpu { utilization, memory, reserve, bytes } => write!(
                f,
                "{bytes} bytes ({:.2} GiB): `gpu_memory_utilization` {utilization} of {:.2} GiB, less {:.2} GiB \
                 already in use and a {:.2} GiB activation reserve",
                bytes as f64 / GIB,
                memory.total as f64 / GIB,
                memory.total.saturating_sub(memory.free) as f64 / GIB,
                reserve as f64 / GIB
            ),
        }
    }
}

/// An estimate of the most one step allocates besides the weights and the KV pools, in bytes, for
/// activations of `dtype_size` bytes: a step runs at most `max_batch_tokens` tokens and samples
/// at most `min(max_num_seqs, max_batch_tokens)` rows.
///
/// Per token, the tensors alive at once inside a layer, in elements: the residual, its sum and
/// the normed input (3 × hidden); the fused QKV output and the rotated Q, K, V
/// (2 × (heads + 2 kv_heads) × head_dim); the attention output (heads × head_dim); gate-up, the
/// activation and candle's two SwiGLU temporaries (5 × intermediate). That count is doubled for
/// what it misses (casts, contiguous copies, quantized activations). Per sampled row, 16 bytes per
/// vocabulary entry: the logits in the dtype and in f32, and the device argmax's temporaries.
/// Plus [`FIXED_RESERVE`].
pub fn activation_reserve(model: &LlamaConfig, vocab: usize, scheduler: &SchedulerConfig, dtype_size: usize) -> usize {
    let tokens = scheduler.max_batch_tokens;
    let sampled = scheduler.max_num_seqs.min(tokens);
    step_bytes(model, vocab, tokens, sampled, dtype_size) + FIXED_RESERVE
}

/// One step's activations for `tokens` tokens and logits for `sampled` rows, as counted above.
fn step_bytes(model: &LlamaConfig, vocab: usize, tokens: usize, sampled: usize, dtype_size: usize) -> usize {
    let (h, kv, d) = (model.num_heads, model.num_kv_heads, model.head_dim);
    let per_token = 3 * model.hidden_size + 2 * (h + 2 * kv) * d + h * d + 5 * model.intermediate_size;
    2 * tokens * per_token * dtype_size + sampled * vocab * 16
}

/// What decode steps replayed as CUDA graphs hold besides [`activation_reserve`]: the buffer their
/// logits land in, and a decode step of `max_batch` rows' activations and logits in the graphs'
/// own memory pool (graph memory is set apart from the memory eager steps reuse).
pub fn graph_reserve(model: &LlamaConfig, vocab: usize, max_batch: usize, dtype_size: usize) -> usize {
    max_batch * vocab * 4 + step_bytes(model, vocab, max_batch, max_batch, dtype_size)
}

/// Free and total memory of `device`'s GPU, measured after all queued work has finished (so that
/// the weights just uploaded are counted); `None` on the CPU.
#[cfg(feature = "cuda")]
pub fn gpu_memory(device: &candle_core::Device) -> crate::error::Result<Option<GpuMemory>> {
    use crate::error::EngineError;
    let candle_core::Device::Cuda(cuda) = device else { return Ok(None) };
    device.synchronize()?;
    let (free, total) = cuda
        .cuda_stream()
        .context()
        .mem_get_info()
        .map_err(|e| EngineError::Load(format!("cannot read the GPU's free memory: {e}")))?;
    Ok(Some(GpuMemory { free, total }))
}

/// Without the `cuda` feature there is no GPU to measure.
#[cfg(not(feature = "cuda"))]
pub fn gpu_memory(_device: &candle_core::Device) -> crate::error::Result<Option<GpuMemory>> {
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: usize = 1 << 30;

    fn smollm2() -> LlamaConfig {
        LlamaConfig {
            vocab_size: 49152,
            hidden_size: 576,
            intermediate_size: 1536,
            num_layers: 30,
            num_heads: 9,
            num_kv_heads: 3,
            head_dim: 64,
            rope_theta: 100000.0,
            rope_scaling: None,
            rms_norm_eps: 1e-5,
            max_position_embeddings: 8192,
            tie_word_embeddings: true,
        }
    }

    #[test]
    fn the_gpu_rule_takes_what_is_used_and_the_reserve_from_the_share() {
        let memory = GpuMemory { free: 70 * GIB, total: 80 * GIB };
        let b = KvBudget::gpu(memory, 0.9, GIB);
        // 72 GiB allowed, 10 in use, 1 reserved.
        assert_eq!(b.bytes(), 61 * GIB);
        let text = b.to_string();
        assert!(text.contains("61.00 GiB") && text.contains("10.00 GiB already in use"), "{text}");
        assert_eq!(KvBudget::gpu(memory, 1.0, 0).bytes(), 70 * GIB, "all of it: exactly the free memory");
    }

    #[test]
    fn an_overfull_gpu_leaves_nothing_rather_than_wrapping() {
        let busy = GpuMemory { free: 4 * GIB, total: 80 * GIB };
        assert_eq!(KvBudget::gpu(busy, 0.9, GIB).bytes(), 0, "76 GiB in use is over 72");
        let tight = GpuMemory { free: 9 * GIB, total: 80 * GIB };
        assert_eq!(KvBudget::gpu(tight, 0.9, 2 * GIB).bytes(), 0, "1 GiB left, 2 reserved");
        let odd = GpuMemory { free: 90 * GIB, total: 80 * GIB };
        assert_eq!(KvBudget::gpu(odd, 0.5, 0).bytes(), 40 * GIB, "free above total counts as nothing in use");
    }

    #[test]
    fn the_reserve_follows_the_documented_count() {
        let c = smollm2();
        let s = SchedulerConfig::default(); // 512 tokens, 128 sequences
        let per_token = 3 * 576 + 2 * (9 + 6) * 64 + 9 * 64 + 5 * 1536; // 11_904 elements
        let want = 2 * 512 * per_token * 2 + 128 * 49152 * 16 + FIXED_RESERVE;
        assert_eq!(activation_reserve(&c, 49152, &s, 2), want);
        // About 0.64 GiB in bf16 for the default model; more tokens a step, more reserve.
        assert!((want as f64 / GIB as f64 - 0.62).abs() < 0.05, "{want}");
        let wide = SchedulerConfig { max_batch_tokens: 4096, ..s.clone() };
        assert!(activation_reserve(&c, 49152, &wide, 2) > want);
        // Sampled rows never exceed the step's tokens.
        let few = SchedulerConfig { max_batch_tokens: 8, ..s };
        assert_eq!(activation_reserve(&c, 100, &few, 4), 2 * 8 * per_token * 4 + 8 * 100 * 16 + FIXED_RESERVE);
    }

    #[test]
    fn the_cpu_has_no_gpu_memory() {
        assert_eq!(gpu_memory(&candle_core::Device::Cpu).unwrap(), None);
    }
}
