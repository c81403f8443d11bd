#!/usr/bin/env python3
"""Writes a Llama model in Hugging Face format (config.json + *.safetensors, f32/f16/bf16) as a GGUF
file, with the tokenizer and chat template of another GGUF whose vocabulary it shares.

    gguf-from-hf.py HF_DIR TOKENIZER_GGUF OUT_GGUF [--type q4_1|q8_0|f32]
    gguf-from-hf.py --tokenizer-only TOKENIZER_GGUF OUT_GGUF   # the tokenizer fields alone (~2 MB)

Projections are stored as --type (default q4_1, the default model's), the embedding as q8_0 (f32
with --type f32), norms as f32; q/k rows are permuted to GGUF's rope order, as llama.cpp's converter
does. Used by the GPU proof (scripts/gpu-proof.sh) to run the quantized CUDA path on a model that
is too large to carry; needs numpy and the `gguf` package only.
"""
import argparse
import json
import os
import struct
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import gguf
from gguf import GGMLQuantizationType as Q


def read_safetensors(path):
    """Every tensor of one safetensors file, as float32 arrays."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        data = f.read()
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, end = info["data_offsets"]
        raw = data[start:end]
        kind = info["dtype"]
        if kind == "F32":
            a = np.frombuffer(raw, dtype="<f4")
        elif kind == "F16":
            a = np.frombuffer(raw, dtype="<f2").astype(np.float32)
        elif kind == "BF16":
            a = (np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16).view(np.float32)
        else:
            sys.exit(f"{path}: tensor {name} has dtype {kind}; only F32, F16 and BF16 are read")
        out[name] = a.reshape(info["shape"])
    return out


def rope_permute(w, n_head):
    """Hugging Face's half-split rope rows to GGUF's interleaved pairs, head by head."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


LAYER = {
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def gguf_name(hf):
    if hf == "model.embed_tokens.weight":
        return "token_embd.weight"
    if hf == "model.norm.weight":
        return "output_norm.weight"
    if hf == "lm_head.weight":
        return "output.weight"
    parts = hf.split(".")
    if parts[:2] == ["model", "layers"] and parts[-1] == "weight":
        return f"blk.{parts[2]}.{LAYER['.'.join(parts[3:-1])]}.weight"
    sys.exit(f"no GGUF name for tensor {hf}")


def copy_tokenizer(w, path):
    """The tokenizer and chat template, copied field by field from the GGUF that has them."""
    src = gguf.GGUFReader(path)
    for key, field in src.fields.items():
        if not key.startswith("tokenizer."):
            continue
        kind = field.types[0]
        if kind == gguf.GGUFValueType.ARRAY:
            w.add_key_value(key, field.contents(), kind, sub_type=field.types[-1])
        else:
            w.add_key_value(key, field.contents(), kind)


def finish(w):
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokenizer-only", action="store_true")
    ap.add_argument("paths", nargs="+", help="HF_DIR TOKENIZER_GGUF OUT_GGUF, or TOKENIZER_GGUF OUT_GGUF")
    ap.add_argument("--type", default="q4_1", choices=["q4_1", "q8_0", "f32"])
    args = ap.parse_args()
    if args.tokenizer_only:
        if len(args.paths) != 2:
            ap.error("--tokenizer-only takes TOKENIZER_GGUF OUT_GGUF")
        w = gguf.GGUFWriter(args.paths[1], "llama")
        copy_tokenizer(w, args.paths[0])
        finish(w)
        return
    if len(args.paths) != 3:
        ap.error("expected HF_DIR TOKENIZER_GGUF OUT_GGUF")
    args.hf_dir, args.tokenizer_gguf, args.out = args.paths
    cfg = json.load(open(os.path.join(args.hf_dir, "config.json")))
    tensors = {}
    for f in sorted(os.listdir(args.hf_dir)):
        if f.endswith(".safetensors"):
            tensors.update(read_safetensors(os.path.join(args.hf_dir, f)))
    if cfg.get("tie_word_embeddings"):
        tensors.pop("lm_head.weight", None)

    n_head = cfg["num_attention_heads"]
    n_kv = cfg.get("num_key_value_heads", n_head)
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // n_head
    w = gguf.GGUFWriter(args.out, "llama")
    w.add_name("llama-from-hf")
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(cfg.get("max_position_embeddings", 4096))
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_rope_dimension_count(head_dim)
    rope = cfg.get("rope_parameters") or {}
    w.add_rope_freq_base(float(cfg.get("rope_theta") or rope.get("rope_theta") or 10000.0))
    w.add_layer_norm_rms_eps(float(cfg.get("rms_norm_eps", 1e-5)))
    w.add_vocab_size(cfg["vocab_size"])

    copy_tokenizer(w, args.tokenizer_gguf)

    proj = {"q4_1": Q.Q4_1, "q8_0": Q.Q8_0, "f32": Q.F32}[args.type]

    def encode(item):
        hf, a = item
        if hf.endswith("q_proj.weight"):
            a = rope_permute(a, n_head)
        elif hf.endswith("k_proj.weight"):
            a = rope_permute(a, n_kv)
        if a.ndim == 1:
            qtype = Q.F32
        elif hf == "model.embed_tokens.weight" and proj != Q.F32:
            qtype = Q.Q8_0
        else:
            qtype = proj
        a = np.ascontiguousarray(a, dtype=np.float32)
        return gguf_name(hf), (a if qtype == Q.F32 else gguf.quants.quantize(a, qtype)), qtype

    with ThreadPoolExecutor(os.cpu_count()) as pool:
        encoded = list(pool.map(encode, sorted(tensors.items())))
    for name, data, qtype in encoded:
        w.add_tensor(name, data, raw_dtype=None if qtype == Q.F32 else qtype)
    finish(w)
    size = os.path.getsize(args.out)
    print(f"{args.out}: {len(encoded)} tensors, {size / 1e6:.1f} MB ({args.type} projections)")


if __name__ == "__main__":
    main()
