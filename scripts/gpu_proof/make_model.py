"""Step 2a of the GPU proof: a Llama with Llama-3.2-1B's shape, random bf16 weights and the default
model's vocabulary, in Hugging Face format; and the prompts the later steps decode.

    python3 make_model.py MODEL_DIR TOKENIZER_DIR PROMPTS_JSONL
"""
import json
import os
import random
import shutil
import sys

import torch
from tokenizers import Tokenizer
from transformers import LlamaConfig, LlamaForCausalLM

model_dir, tok_dir, prompts_path = sys.argv[1:4]
tok = Tokenizer.from_file(os.path.join(tok_dir, "tokenizer.json"))
# Llama-3.2-1B's shape (no rope scaling) with the SmolLM2 vocabulary.
config = LlamaConfig(vocab_size=tok.get_vocab_size(), hidden_size=2048, intermediate_size=8192,
                     num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8, head_dim=64,
                     rope_theta=10000.0, rms_norm_eps=1e-5, max_position_embeddings=4096,
                     tie_word_embeddings=True)
torch.manual_seed(0)
with torch.device("cuda"):
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    # RMS norm weights are initialised to 1; a trained model's are not, and the CUDA path folds them
    # into the projections that follow: draw them from [0.5, 1.5) so that the fold is exercised.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
model.save_pretrained(model_dir, safe_serialization=True)
# The keys our loader reads, at top level whatever this transformers version writes.
path = os.path.join(model_dir, "config.json")
cfg = json.load(open(path))
cfg.update(rope_theta=10000.0, rms_norm_eps=1e-5, max_position_embeddings=4096, head_dim=64,
           tie_word_embeddings=True, architectures=["LlamaForCausalLM"])
cfg.pop("rope_scaling", None)
json.dump(cfg, open(path, "w"), indent=1)
for f in ("tokenizer.json", "tokenizer_config.json"):
    shutil.copy(os.path.join(tok_dir, f), model_dir)
# Text prompts, and random ids long enough to span many KV blocks and a chunked prefill (> 512).
rng = random.Random(0)
texts = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a land far away,"]
prompts = [tok.encode(t).ids for t in texts]
prompts += [[rng.randrange(config.vocab_size) for _ in range(n)] for n in (37, 300, 700)]
with open(prompts_path, "w") as f:
    for p in prompts:
        f.write(json.dumps(p) + "\n")
print(f"model: {sum(p.numel() for p in model.parameters()) / 1e9:.3f} B parameters in {model_dir}")
print("config.json:", json.dumps(cfg))
