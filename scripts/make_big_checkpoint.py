#!/usr/bin/env python3
"""Writes a large random transformers LLaVA checkpoint for measuring the loader's peak
host memory (`dualpriv inspect --model DIR`, README "HF LLaVA-1.5 checkpoints").

Not run in CI and not committed output: the folder is several GB. Needs torch and
transformers 5.x. Usage:

    python scripts/make_big_checkpoint.py OUT_DIR [--llm tinyllama|llava-7b] [--shard 2GB]

`tinyllama` (default): CLIP ViT-L/14-336 + a Llama with TinyLlama-1.1B's sizes
(2048 hidden, 22 layers, 4 KV heads, vocab 32064), about 1.4B parameters, 2.8 GB in
BF16 on disk and 5.6 GB once converted to f32. `llava-7b` writes llava-1.5-7b's
shape (7.1B parameters, 14 GB BF16, 28 GB in f32). Weights are drawn by transformers'
own init directly in BF16 (no f32 copy is ever made) and saved sharded
(`save_pretrained(max_shard_size=...)`), in transformers 5's key layout.
"""
import argparse
import json
import os
import time

import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

LLMS = {
    # TinyLlama/TinyLlama-1.1B-Chat-v1.0's config.json, vocabulary widened to llava's 32064.
    "tinyllama": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                      num_attention_heads=32, num_key_value_heads=4),
    # lmsys/vicuna-7b-v1.5, as in llava-hf/llava-1.5-7b-hf.
    "llava-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                     num_attention_heads=32, num_key_value_heads=32),
}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--llm", choices=sorted(LLMS), default="tinyllama")
    ap.add_argument("--shard", default="2GB", help="max_shard_size for save_pretrained")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    torch.manual_seed(args.seed)
    vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                              num_attention_heads=16, image_size=336, patch_size=14,
                              projection_dim=768)
    text = LlamaConfig(vocab_size=32064, rms_norm_eps=1e-5, max_position_embeddings=4096,
                       **LLMS[args.llm])
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_index=32000,
                      vision_feature_layer=-2, vision_feature_select_strategy="default",
                      projector_hidden_act="gelu")
    t0 = time.time()
    torch.set_default_dtype(torch.bfloat16)  # init straight in bf16: no f32 copy
    model = LlavaForConditionalGeneration(cfg).eval()
    n = sum(p.numel() for p in model.parameters())
    print(f"built {n / 1e9:.3f}B parameters in {time.time() - t0:.0f} s", flush=True)
    t0 = time.time()
    model.save_pretrained(args.out, max_shard_size=args.shard)
    print(f"saved to {args.out} in {time.time() - t0:.0f} s", flush=True)
    with open(os.path.join(args.out, "PARAMS.json"), "w") as f:
        json.dump({"parameters": n, "llm": args.llm}, f)


if __name__ == "__main__":
    main()
