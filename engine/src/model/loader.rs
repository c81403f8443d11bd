//! Reading a model from disk: a GGUF file or a Hugging Face folder, into one form.
//!
//! Weights are handed out one tensor at a time under their Hugging Face names
//! (`model.layers.3.self_attn.q_proj.weight`), dense, in the dtype and on the device asked for.
//! GGUF's Q/K projections are stored permuted for interleaved RoPE; they are permuted back here so
//! that the model has one RoPE path (the half-split one, as in Hugging Face) for both formats.

use std::collections::HashMap;
use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file;
use candle_core::{DType, Device, Tensor};

use super::config::LlamaConfig;
use crate::error::{EngineError, Result};

/// Where the model comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelFormat {
    /// One `.gguf` file (weights, tokenizer and chat template in its metadata).
    Gguf(PathBuf),
    /// A Hugging Face folder: `config.json`, `*.safetensors`, `tokenizer.json`,
    /// `tokenizer_config.json`.
    HfDir(PathBuf),
}

impl ModelFormat {
    /// Tells the format from the path: a folder is a Hugging Face folder, a file is GGUF.
    pub fn detect(path: &Path) -> Result<Self> {
        if path.is_dir() {
            Ok(Self::HfDir(path.to_path_buf()))
        } else if path.is_file() {
            Ok(Self::Gguf(path.to_path_buf()))
        } else {
            Err(EngineError::Load(format!(
                "model path `{}` does not exist (run `make model` for the default model)",
                path.display()
            )))
        }
    }
}

/// An open model: its hyper-parameters and access to its weights.
pub struct WeightSource {
    config: LlamaConfig,
    inner: Inner,
}

enum Inner {
    Gguf { content: gguf_file::Content, reader: BufReader<File> },
    Safetensors { tensors: HashMap<String, Tensor> },
}

impl std::fmt::Debug for WeightSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WeightSource").field("config", &self.config).finish_non_exhaustive()
    }
}

/// Opens a GGUF file and reads its metadata (not its tensors yet).
pub fn read_gguf(path: &Path) -> Result<(gguf_file::Content, BufReader<File>)> {
    let file = File::open(path).map_err(|e| EngineError::Load(format!("cannot open `{}`: {e}", path.display())))?;
    let mut reader = BufReader::new(file);
    let content = gguf_file::Content::read(&mut reader)
        .map_err(|e| EngineError::Load(format!("`{}` is not a readable GGUF file: {e}", path.display())))?;
    Ok((content, reader))
}

impl WeightSource {
    /// Opens a GGUF file whose metadata was read with [`read_gguf`].
    pub fn gguf(content: gguf_file::Content, reader: BufReader<File>) -> Result<Self> {
        let config = LlamaConfig::from_gguf(&content)?;
        Ok(Self { config, inner: Inner::Gguf { content, reader } })
    }

    /// Opens a Hugging Face folder's `config.json` and `*.safetensors`.
    pub fn hf_dir(dir: &Path) -> Result<Self> {
        let config_path = dir.join("config.json");
        let json = std::fs::read_to_string(&config_path)
            .map_err(|e| EngineError::Load(format!("cannot read `{}`: {e}", config_path.display())))?;
        let config = LlamaConfig::from_hf_json(&json)?;
        let mut files: Vec<PathBuf> = std::fs::read_dir(dir)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
            .collect();
        files.sort();
        if files.is_empty() {
            return Err(EngineError::Load(format!("no *.safetensors file in `{}`", dir.display())));
        }
        let mut tensors = HashMap::new();
        for file in &files {
            let part = candle_core::safetensors::load(file, &Device::Cpu)
                .map_err(|e| EngineError::Load(format!("cannot read `{}`: {e}", file.display())))?;
            tensors.extend(part);
        }
        Ok(Self { config, inner: Inner::Safetensors { tensors } })
    }

    /// The model's hyper-parameters.
    pub fn config(&self) -> &LlamaConfig {
        &self.config
    }

    /// True if the weight exists (e.g. `lm_head.weight` for untied models).
    pub fn contains(&self, hf_name: &str) -> bool {
        match &self.inner {
            Inner::Gguf { content, .. } => gguf_name(hf_name).is_some_and(|n| content.tensor_infos.contains_key(&n)),
            Inner::Safetensors { tensors } => tensors.contains_key(hf_name),
        }
    }

    /// The weight named `hf_name` (Hugging Face naming), dense, as `dtype` on `device`.
    pub fn get(&mut self, hf_name: &str, dtype: DType, device: &Device) -> Result<Tensor> {
        let missing = || EngineError::Load(format!("weight `{hf_name}` is missing"));
        let tensor = match &mut self.inner {
            Inner::Gguf { content, reader } => {
                let name = gguf_name(hf_name).ok_or_else(missing)?;
                if !content.tensor_infos.contains_key(&name) {
                    return Err(missing());
                }
                let q = content.tensor(reader, &name, &Device::Cpu)?;
                let dense = q.dequantize(&Device::Cpu)?;
                if hf_name.ends_with("q_proj.weight") {
                    unpermute_rope_rows(&dense, self.config.num_heads)?
                } else if hf_name.ends_with("k_proj.weight") {
                    unpermute_rope_rows(&dense, self.config.num_kv_heads)?
                } else {
                    dense
                }
            }
            Inner::Safetensors { tensors } => tensors.remove(hf_name).ok_or_else(missing)?,
        };
        Ok(tensor.to_dtype(dtype)?.to_device(device)?)
    }
}

/// GGUF stores Q and K rows permuted so that RoPE can rotate adjacent pairs; this undoes it:
/// `[heads, head_dim/2, 2, in] → [heads, 2, head_dim/2, in]`, back to the half-split layout.
fn unpermute_rope_rows(w: &Tensor, heads: usize) -> Result<Tensor> {
    let (out, inp) = w.dims2()?;
    let half = out / heads / 2;
    Ok(w.reshape((heads, half, 2, inp))?.transpose(1, 2)?.contiguous()?.reshape((out, inp))?)
}

/// The GGUF name of a weight given its Hugging Face name.
fn gguf_name(hf_name: &str) -> Option<String> {
    let fixed = match hf_name {
        "model.embed_tokens.weight" => Some("token_embd.weight"),
        "model.norm.weight" => Some("output_norm.weight"),
        "lm_head.weight" => Some("output.weight"),
        _ => None,
    };
    if let Some(n) = fixed {
        return Some(n.to_string());
    }
    let rest = hf_name.strip_prefix("model.layers.")?;
    let (layer, name) = rest.split_once('.')?;
    let suffix = match name {
        "input_layernorm.weight" => "attn_norm.weight",
        "self_attn.q_proj.weight" => "attn_q.weight",
        "self_attn.k_proj.weight" => "attn_k.weight",
        "self_attn.v_proj.weight" => "attn_v.weight",
        "self_attn.o_proj.weight" => "attn_output.weight",
        "post_attention_layernorm.weight" => "ffn_norm.weight",
        "mlp.gate_proj.weight" => "ffn_gate.weight",
        "mlp.up_proj.weight" => "ffn_up.weight",
        "mlp.down_proj.weight" => "ffn_down.weight",
        _ => return None,
    };
    Some(format!("blk.{layer}.{suffix}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gguf_names_map_from_hf_names() {
        assert_eq!(gguf_name("model.layers.12.self_attn.k_proj.weight").as_deref(), Some("blk.12.attn_k.weight"));
        assert_eq!(gguf_name("model.embed_tokens.weight").as_deref(), Some("token_embd.weight"));
        assert_eq!(gguf_name("model.layers.0.mystery.weight"), None);
    }

    #[test]
    fn unpermute_inverts_the_gguf_permutation() -> Result<()> {
        // 2 heads of dim 4, 3 inputs: HF rows 0..8; GGUF's permutation is
        // reshape(heads, 2, hd/2, in).swap(1, 2).
        let hf = Tensor::arange(0f32, 24., &Device::Cpu)?.reshape((8, 3))?;
        let gguf = hf.reshape((2, 2, 2, 3))?.transpose(1, 2)?.contiguous()?.reshape((8, 3))?;
        let back = unpermute_rope_rows(&gguf, 2)?;
        assert_eq!(back.to_vec2::<f32>()?, hf.to_vec2::<f32>()?);
        Ok(())
    }
}
