//! Building a [`Tokenizer`] from a GGUF file's `tokenizer.ggml.*` metadata.

use candle_core::quantized::gguf_file::{Content, Value};
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::decoders::{byte_fallback::ByteFallback, fuse::Fuse, strip::Strip};
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::normalizers::{Prepend, Replace, Sequence as NormalizerSequence};
use tokenizers::pre_tokenizers::sequence::Sequence as PreTokenizerSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::pre_tokenizers::{byte_level::ByteLevel, digits::Digits};
use tokenizers::{AddedToken, DecoderWrapper, NormalizerWrapper, PreTokenizerWrapper, SplitDelimiterBehavior};

use super::{tok_err, Tokenizer};
use crate::Result;

/// GGUF `token_type` values (llama.cpp's `llama_token_type`).
const TYPE_NORMAL: i32 = 1;
const TYPE_UNKNOWN: i32 = 2;
const TYPE_CONTROL: i32 = 3;
const TYPE_USER_DEFINED: i32 = 4;

/// Split regexes of byte-level BPE vocabularies that do not use GPT-2's rule.
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2_SPLIT: &str =
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

impl Tokenizer {
    /// Builds the tokenizer stored in a GGUF file's metadata (`tokenizer.ggml.*`). Control and
    /// unknown tokens become special added tokens (so `<|im_start|>` in a rendered prompt encodes to
    /// its one id and is skipped by `decode(.., true)`); user-defined tokens become plain added tokens.
    pub fn from_gguf(content: &Content) -> Result<Self> {
        let md = &content.metadata;
        let model = gguf_str(md, "tokenizer.ggml.model")?;
        let tokens = gguf_strings(md, "tokenizer.ggml.tokens")?;
        let types = match md.get("tokenizer.ggml.token_type") {
            Some(v) => gguf_array(v, "tokenizer.ggml.token_type", |v| v.to_i32().ok())?,
            None => vec![TYPE_NORMAL; tokens.len()],
        };
        let vocab: Vocab = tokens.iter().enumerate().map(|(i, t)| (t.clone(), i as u32)).collect();
        let (mut inner, default_add_bos) = match model {
            "gpt2" => (byte_level_bpe(md, vocab)?, false),
            "llama" => (sentencepiece_bpe(md, vocab, &tokens, &types)?, true),
            other => {
                return Err(tok_err(format!(
                    "unsupported GGUF tokenizer model `{other}` (supported: `gpt2` byte-level \
                     BPE and `llama` SentencePiece BPE)"
                )))
            }
        };
        let added = |wanted: &[i32], special: bool| {
            let pairs = tokens.iter().zip(&types).filter(|(_, ty)| wanted.contains(ty));
            pairs.map(|(t, _)| AddedToken::from(t.clone(), special).normalized(false)).collect::<Vec<_>>()
        };
        inner.add_special_tokens(added(&[TYPE_CONTROL, TYPE_UNKNOWN], true)).map_err(tok_err)?;
        inner.add_tokens(added(&[TYPE_USER_DEFINED], false)).map_err(tok_err)?;
        let id = |key: &str| md.get(key).and_then(|v| v.to_u32().ok());
        let extra_eog: Vec<u32> =
            ["eot", "eom"].iter().filter_map(|k| id(&format!("tokenizer.ggml.{k}_token_id"))).collect();
        let add_bos = md.get("tokenizer.ggml.add_bos_token").and_then(|v| v.to_bool().ok());
        Ok(Self::assemble(
            inner,
            id("tokenizer.ggml.bos_token_id"),
            id("tokenizer.ggml.eos_token_id"),
            &extra_eog,
            add_bos.unwrap_or(default_add_bos),
        ))
    }
}

type Metadata = std::collections::HashMap<String, Value>;

fn gguf_str<'a>(md: &'a Metadata, key: &str) -> Result<&'a str> {
    let value = md.get(key).ok_or_else(|| tok_err(format!("GGUF metadata lacks `{key}`")))?;
    value.to_string().map(String::as_str).map_err(|_| tok_err(format!("`{key}` is not a string")))
}

fn gguf_array<T>(value: &Value, key: &str, item: impl Fn(&Value) -> Option<T>) -> Result<Vec<T>> {
    let bad = || tok_err(format!("GGUF `{key}` has the wrong type"));
    value.to_vec().map_err(|_| bad())?.iter().map(|v| item(v).ok_or_else(bad)).collect()
}

fn gguf_strings(md: &Metadata, key: &str) -> Result<Vec<String>> {
    let value = md.get(key).ok_or_else(|| tok_err(format!("GGUF metadata lacks `{key}`")))?;
    gguf_array(value, key, |v| v.to_string().ok().cloned())
}

/// GPT-2 style byte-level BPE; the split rule depends on `tokenizer.ggml.pre`.
fn byte_level_bpe(md: &Metadata, vocab: Vocab) -> Result<tokenizers::Tokenizer> {
    let merges = gguf_strings(md, "tokenizer.ggml.merges")?
        .iter()
        .map(|m| m.split_once(' ').map(|(a, b)| (a.to_string(), b.to_string())))
        .collect::<Option<Vec<_>>>()
        .ok_or_else(|| tok_err("a GGUF merge is not of the form `left right`"))?;
    let pre = gguf_str(md, "tokenizer.ggml.pre").unwrap_or("default");
    let is_llama3 = matches!(pre, "llama3" | "llama-bpe");
    let bpe = BPE::builder().vocab_and_merges(vocab, merges).ignore_merges(is_llama3);
    let bytes = ByteLevel::new(false, true, true);
    let split_then_bytes = |regex: &str| -> Result<PreTokenizerWrapper> {
        let split = Split::new(SplitPattern::Regex(regex.to_string()), SplitDelimiterBehavior::Isolated, false);
        let seq = vec![split.map_err(tok_err)?.into(), bytes.use_regex(false).into()];
        Ok(PreTokenizerSequence::new(seq).into())
    };
    let pre_tokenizer: PreTokenizerWrapper = match pre {
        "smollm" | "starcoder" | "refact" | "codeshell" => {
            let seq = vec![Digits::new(true).into(), bytes.into()];
            PreTokenizerSequence::new(seq).into()
        }
        _ if is_llama3 => split_then_bytes(LLAMA3_SPLIT)?,
        "qwen2" => split_then_bytes(QWEN2_SPLIT)?,
        "gpt2" | "default" => bytes.into(),
        other => {
            tracing::warn!("unknown `tokenizer.ggml.pre` `{other}`; using GPT-2's split rule");
            bytes.into()
        }
    };
    let mut tokenizer = tokenizers::Tokenizer::new(bpe.build().map_err(tok_err)?);
    tokenizer.with_pre_tokenizer(Some(pre_tokenizer)).with_decoder(Some(bytes));
    Ok(tokenizer)
}

/// SentencePiece BPE: a merge `(l, r)` exists when `l + r` is a normal piece, ranked by its score.
fn sentencepiece_bpe(md: &Metadata, vocab: Vocab, tokens: &[String], types: &[i32]) -> Result<tokenizers::Tokenizer> {
    let scores = match md.get("tokenizer.ggml.scores") {
        Some(v) => gguf_array(v, "tokenizer.ggml.scores", |v| v.to_f32().ok())?,
        None => vec![0.0; tokens.len()],
    };
    let mut ranked = Vec::new();
    for (id, piece) in tokens.iter().enumerate() {
        if types.get(id) != Some(&TYPE_NORMAL) {
            continue;
        }
        for (at, _) in piece.char_indices().skip(1) {
            let (l, r) = piece.split_at(at);
            if let (Some(&li), Some(&ri)) = (vocab.get(l), vocab.get(r)) {
                ranked.push((scores.get(id).copied().unwrap_or(0.0), id, li, ri, l, r));
            }
        }
    }
    ranked.sort_by(|a, b| b.0.total_cmp(&a.0).then((a.1, a.2, a.3).cmp(&(b.1, b.2, b.3))));
    let merges = ranked.iter().map(|&(.., l, r)| (l.to_string(), r.to_string())).collect();
    let mut bpe = BPE::builder().vocab_and_merges(vocab, merges).byte_fallback(true).fuse_unk(true);
    if let Some(unk) = md.get("tokenizer.ggml.unknown_token_id").and_then(|v| v.to_u32().ok()) {
        if let Some(text) = tokens.get(unk as usize) {
            bpe = bpe.unk_token(text.clone());
        }
    }
    let prefix = md.get("tokenizer.ggml.add_space_prefix").and_then(|v| v.to_bool().ok());
    let add_space_prefix = prefix.unwrap_or(true);
    let mut normalizers: Vec<NormalizerWrapper> = vec![Replace::new(" ", "▁").map_err(tok_err)?.into()];
    let mut decoders: Vec<DecoderWrapper> =
        vec![Replace::new("▁", " ").map_err(tok_err)?.into(), ByteFallback::new().into(), Fuse::new().into()];
    if add_space_prefix {
        normalizers.insert(0, Prepend::new("▁".to_string()).into());
        decoders.push(Strip::new(' ', 1, 0).into());
    }
    let mut tokenizer = tokenizers::Tokenizer::new(bpe.build().map_err(tok_err)?);
    tokenizer
        .with_normalizer(Some(NormalizerSequence::new(normalizers)))
        .map_err(tok_err)?
        .with_decoder(Some(DecoderSequence::new(decoders)));
    Ok(tokenizer)
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use candle_core::quantized::gguf_file::VersionedMagic;

    use super::super::tests::{stream, tokens};
    use super::super::IncrementalDetokenizer;
    use super::*;

    fn content(metadata: Vec<(&str, Value)>) -> Content {
        Content {
            magic: VersionedMagic::GgufV3,
            metadata: metadata.into_iter().map(|(k, v)| (k.to_string(), v)).collect(),
            tensor_infos: HashMap::new(),
            tensor_data_offset: 0,
        }
    }

    fn strings(items: &[&str]) -> Value {
        Value::Array(items.iter().map(|s| Value::String(s.to_string())).collect())
    }

    #[test]
    fn byte_level_split_rules_compile() {
        let alphabet: Vec<String> = ByteLevel::alphabet().into_iter().map(String::from).collect();
        let pieces: Vec<&str> = alphabet.iter().map(String::as_str).collect();
        for pre in ["llama-bpe", "qwen2", "gpt2", "unknown-pre"] {
            let gguf = content(vec![
                ("tokenizer.ggml.model", Value::String("gpt2".into())),
                ("tokenizer.ggml.pre", Value::String(pre.into())),
                ("tokenizer.ggml.tokens", strings(&pieces)),
                ("tokenizer.ggml.merges", strings(&[])),
            ]);
            let tok = Tokenizer::from_gguf(&gguf).unwrap();
            let text = "Hi there, 12345 héllo\n\n  x";
            assert_eq!(tok.decode(&tok.encode(text, true).unwrap(), false).unwrap(), text, "{pre}");
        }
    }

    #[test]
    fn unsupported_model_type_is_named() {
        let gguf = content(vec![
            ("tokenizer.ggml.model", Value::String("bert".into())),
            ("tokenizer.ggml.tokens", strings(&["[PAD]"])),
        ]);
        let err = Tokenizer::from_gguf(&gguf).unwrap_err().to_string();
        assert!(err.contains("unsupported GGUF tokenizer model `bert`"), "{err}");
    }

    #[test]
    fn sentencepiece_vocabulary() {
        let pieces = [
            "<unk>", "<s>", "</s>", "<0x21>", "▁", "h", "e", "l", "o", "w", "r", "d", "▁h", "ll", "▁he", "llo",
            "▁hello", "▁w", "or", "▁wor", "ld", "▁world",
        ];
        let types = pieces.iter().map(|p| match *p {
            "<unk>" => 2,
            "<s>" | "</s>" => 3,
            "<0x21>" => 6,
            _ => 1,
        });
        let gguf = content(vec![
            ("tokenizer.ggml.model", Value::String("llama".into())),
            ("tokenizer.ggml.tokens", strings(&pieces)),
            ("tokenizer.ggml.token_type", Value::Array(types.map(Value::I32).collect())),
            ("tokenizer.ggml.scores", Value::Array((0..pieces.len()).map(|i| Value::F32(-(i as f32))).collect())),
            ("tokenizer.ggml.unknown_token_id", Value::U32(0)),
            ("tokenizer.ggml.bos_token_id", Value::U32(1)),
            ("tokenizer.ggml.eos_token_id", Value::U32(2)),
        ]);
        let tok = Tokenizer::from_gguf(&gguf).unwrap();
        assert_eq!(tokens(&tok, "hello world!"), ["<s>", "▁hello", "▁world", "<0x21>"]);
        let ids = tok.encode("hello world!", false).unwrap();
        assert_eq!(tok.decode(&ids, true).unwrap(), "hello world!");
        assert_eq!(stream(&tok, IncrementalDetokenizer::new(), &ids), "hello world!");
        let tail = IncrementalDetokenizer::with_prompt_tail(&tok, &ids[..1]);
        assert_eq!(stream(&tok, tail, &ids[1..]), " world!");
        assert_eq!(tok.eos_token_ids(), &[2]);
    }
}
