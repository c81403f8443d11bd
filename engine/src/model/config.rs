//! `LlamaConfig`: the architecture hyper-parameters, read from GGUF metadata or `config.json`.

use candle_core::quantized::gguf_file;
use serde::Deserialize;

use crate::error::{EngineError, Result};

/// Llama-family hyper-parameters (Llama 2/3, SmolLM2, TinyLlama, Mistral without sliding window).
#[derive(Debug, Clone, PartialEq)]
pub struct LlamaConfig {
    /// Vocabulary rows of the embedding and the LM head.
    pub vocab_size: usize,
    /// Model width.
    pub hidden_size: usize,
    /// MLP inner width.
    pub intermediate_size: usize,
    /// Decoder layers.
    pub num_layers: usize,
    /// Query heads.
    pub num_heads: usize,
    /// Key/value heads (grouped-query attention when fewer than `num_heads`).
    pub num_kv_heads: usize,
    /// Width of one head.
    pub head_dim: usize,
    /// RoPE base frequency.
    pub rope_theta: f32,
    /// Llama 3 RoPE scaling, when the model uses it.
    pub rope_scaling: Option<Llama3RopeScaling>,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f64,
    /// Longest context the model was trained for.
    pub max_position_embeddings: usize,
    /// The LM head reuses the token embedding.
    pub tie_word_embeddings: bool,
}

/// Llama 3.1's frequency-dependent RoPE scaling.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
pub struct Llama3RopeScaling {
    /// Overall stretch of low frequencies.
    pub factor: f32,
    /// Wavelength boundary (as a fraction of the original context) below which no scaling applies.
    pub low_freq_factor: f32,
    /// Wavelength boundary above which full scaling applies.
    pub high_freq_factor: f32,
    /// Context length the model was pre-trained with.
    pub original_max_position_embeddings: usize,
}

fn meta<'a>(content: &'a gguf_file::Content, key: &str) -> Result<&'a gguf_file::Value> {
    content.metadata.get(key).ok_or_else(|| EngineError::Load(format!("GGUF metadata has no `{key}`")))
}

fn meta_usize(content: &gguf_file::Content, key: &str) -> Result<usize> {
    let v = meta(content, key)?;
    v.to_u64()
        .map(|v| v as usize)
        .or_else(|_| v.to_u32().map(|v| v as usize))
        .or_else(|_| v.to_i32().map(|v| v as usize))
        .map_err(|e| EngineError::Load(format!("GGUF `{key}`: {e}")))
}

fn meta_f32(content: &gguf_file::Content, key: &str) -> Result<f32> {
    meta(content, key)?.to_f32().map_err(|e| EngineError::Load(format!("GGUF `{key}`: {e}")))
}

impl LlamaConfig {
    /// Reads the `llama.*` metadata of a GGUF file.
    pub fn from_gguf(content: &gguf_file::Content) -> Result<Self> {
        let arch = meta(content, "general.architecture")?
            .to_string()
            .map_err(|e| EngineError::Load(format!("GGUF `general.architecture`: {e}")))?;
        if arch != "llama" {
            return Err(EngineError::Load(format!(
                "architecture `{arch}` is not supported (only the Llama family: llama, SmolLM2, TinyLlama, Mistral)"
            )));
        }
        let hidden_size = meta_usize(content, "llama.embedding_length")?;
        let num_heads = meta_usize(content, "llama.attention.head_count")?;
        let num_kv_heads = meta_usize(content, "llama.attention.head_count_kv").unwrap_or(num_heads);
        let head_dim = meta_usize(content, "llama.rope.dimension_count").unwrap_or(hidden_size / num_heads.max(1));
        let vocab_size = match meta_usize(content, "llama.vocab_size") {
            Ok(v) => v,
            Err(_) => meta(content, "tokenizer.ggml.tokens")?.to_vec().map(|v| v.len()).unwrap_or(0),
        };
        let config = Self {
            vocab_size,
            hidden_size,
            intermediate_size: meta_usize(content, "llama.feed_forward_length")?,
            num_layers: meta_usize(content, "llama.block_count")?,
            num_heads,
            num_kv_heads,
            head_dim,
            rope_theta: meta_f32(content, "llama.rope.freq_base").unwrap_or(10_000.0),
            rope_scaling: None,
            rms_norm_eps: meta_f32(content, "llama.attention.layer_norm_rms_epsilon").unwrap_or(1e-5) as f64,
            max_position_embeddings: meta_usize(content, "llama.context_length").unwrap_or(4096),
            tie_word_embeddings: !content.tensor_infos.contains_key("output.weight"),
        };
        config.validate()?;
        Ok(config)
    }

    /// Reads a Hugging Face `config.json`.
    pub fn from_hf_json(json: &str) -> Result<Self> {
        let hf: HfConfig = serde_json::from_str(json).map_err(|e| EngineError::Load(format!("config.json: {e}")))?;
        if let Some(arch) = hf.architectures.as_ref().and_then(|a| a.first()) {
            if !matches!(arch.as_str(), "LlamaForCausalLM" | "MistralForCausalLM") {
                return Err(EngineError::Load(format!("architecture `{arch}` is not supported (Llama family only)")));
            }
        }
        if hf.sliding_window.is_some_and(|w| w < hf.max_position_embeddings) {
            return Err(EngineError::Load("sliding-window attention is not supported".into()));
        }
        let num_kv_heads = hf.num_key_value_heads.unwrap_or(hf.num_attention_heads);
        let rope_scaling = match hf.rope_scaling {
            Some(s) if s.rope_type.as_deref() == Some("llama3") => Some(Llama3RopeScaling {
                factor: s.factor.unwrap_or(1.0),
                low_freq_factor: s.low_freq_factor.unwrap_or(1.0),
                high_freq_factor: s.high_freq_factor.unwrap_or(4.0),
                original_max_position_embeddings: s.original_max_position_embeddings.unwrap_or(8192),
            }),
            Some(s) if s.rope_type.as_deref().is_some_and(|t| t != "default") => {
                return Err(EngineError::Load(format!("rope scaling `{:?}` is not supported", s.rope_type)));
            }
            _ => None,
        };
        let config = Self {
            vocab_size: hf.vocab_size,
            hidden_size: hf.hidden_size,
            intermediate_size: hf.intermediate_size,
            num_layers: hf.num_hidden_layers,
            num_heads: hf.num_attention_heads,
            num_kv_heads,
            head_dim: hf.head_dim.unwrap_or(hf.hidden_size / hf.num_attention_heads.max(1)),
            rope_theta: hf.rope_theta,
            rope_scaling,
            rms_norm_eps: hf.rms_norm_eps,
            max_position_embeddings: hf.max_position_embeddings,
            tie_word_embeddings: hf.tie_word_embeddings,
        };
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<()> {
        let ok = self.num_heads > 0
            && self.num_kv_heads > 0
            && self.num_heads.is_multiple_of(self.num_kv_heads)
            && self.head_dim.is_multiple_of(2)
            && self.head_dim > 0
            && self.vocab_size > 0
            && self.num_layers > 0;
        if ok {
            Ok(())
        } else {
            Err(EngineError::Load(format!("inconsistent model hyper-parameters: {self:?}")))
        }
    }

    /// Bytes of K and V for one token across all layers, at `dtype_size` bytes per element.
    pub fn kv_bytes_per_token(&self, dtype_size: usize) -> usize {
        2 * self.num_layers * self.num_kv_heads * self.head_dim * dtype_size
    }

    /// RoPE inverse frequencies, `[head_dim / 2]`, with Llama 3 scaling applied when configured.
    pub fn rope_inv_freq(&self) -> Vec<f32> {
        let d = self.head_dim as f32;
        let base: Vec<f32> = (0..self.head_dim / 2).map(|i| 1.0 / self.rope_theta.powf(2.0 * i as f32 / d)).collect();
        let Some(s) = self.rope_scaling else {
            return base;
        };
        let old = s.original_max_position_embeddings as f32;
        let low_wavelen = old / s.low_freq_factor;
        let high_wavelen = old / s.high_freq_factor;
        base.into_iter()
            .map(|f| {
                let wavelen = 2.0 * std::f32::consts::PI / f;
                if wavelen < high_wavelen {
                    f
                } else if wavelen > low_wavelen {
                    f / s.factor
                } else {
                    let smooth = (old / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor);
                    (1.0 - smooth) * f / s.factor + smooth * f
                }
            })
            .collect()
    }
}

#[derive(Debug, Deserialize)]
struct HfRopeScaling {
    #[serde(alias = "type")]
    rope_type: Option<String>,
    factor: Option<f32>,
    low_freq_factor: Option<f32>,
    high_freq_factor: Option<f32>,
    original_max_position_embeddings: Option<usize>,
}

fn default_rope_theta() -> f32 {
    10_000.0
}
fn default_eps() -> f64 {
    1e-5
}
fn default_max_pos() -> usize {
    4096
}

#[derive(Debug, Deserialize)]
struct HfConfig {
    architectures: Option<Vec<String>>,
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    #[serde(default = "default_rope_theta")]
    rope_theta: f32,
    rope_scaling: Option<HfRopeScaling>,
    #[serde(default = "default_eps")]
    rms_norm_eps: f64,
    #[serde(default = "default_max_pos")]
    max_position_embeddings: usize,
    #[serde(default)]
    tie_word_embeddings: bool,
    sliding_window: Option<usize>,
}
