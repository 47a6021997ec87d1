#!/usr/bin/env python3
"""Text-only references for the committed HF fixture, and the transformers check of a
merged export. Needs torch, transformers (5.x) and tokenizers; not run in CI. Run from
the repository root:

    python scripts/make_textonly_fixture.py
        # writes tests/data/hf/textonly_refs.safetensors from the committed fixture
        # (tests/data/hf/hub, tokenizer.json); regenerates nothing else
    python scripts/make_textonly_fixture.py --check-merged DIR
        # loads DIR (written by `dualpriv export --merged DIR`) with
        # LlavaForConditionalGeneration.from_pretrained, fails on missing or unexpected
        # keys, and compares its logits with DIR/../merged_logits.f32 (the crate's,
        # written by `cargo test --test hf_merge -- --ignored merged_for_transformers_check`)

textonly_refs.safetensors:
  input_ids   [1, T] I32   a LLaVA conversation without an image, tokenised with BOS
  logits      [1, T, V] F32 LlavaForConditionalGeneration(input_ids=...).logits: no
              pixel_values, so the model is its language model alone
"""
import argparse
import os
import sys

import numpy as np
import torch
from safetensors.torch import load_file, save_file

OUT = os.path.join("tests", "data", "hf")
# The vicuna_v1-style turns of a ShareGPT record (no <image>).
TEXT_ONLY = "USER: Write a haiku about rain. ASSISTANT: Grey clouds, soft drumming.</s>"
N_PATCHES = 16  # (56 / 14)^2, the fixture's image tokens


def load(folder):
    from transformers import LlavaForConditionalGeneration

    model, info = LlavaForConditionalGeneration.from_pretrained(
        folder, dtype=torch.float32, output_loading_info=True
    )
    return model.eval(), info


def text_only_ids():
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(os.path.join(OUT, "tokenizer.json"))
    return tok.encode(TEXT_ONLY).ids


def write_refs():
    model, _ = load(os.path.join(OUT, "hub"))
    ids = torch.tensor([text_only_ids()], dtype=torch.long)
    assert 519 not in ids[0].tolist(), "a text-only prompt has no <image>"
    with torch.no_grad():
        logits = model(input_ids=ids).logits.float().contiguous()
    path = os.path.join(OUT, "textonly_refs.safetensors")
    save_file({"input_ids": ids.to(torch.int32), "logits": logits}, path)
    print(f"wrote {path}: {ids.shape[1]} tokens, logits {tuple(logits.shape)}")


def check_merged(folder):
    model, info = load(folder)
    bad = {k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
    if bad:
        print(f"{folder}: loading reported {bad}")
        return 1
    refs = load_file(os.path.join(OUT, "refs.safetensors"))
    with torch.no_grad():
        out = model(
            input_ids=refs["model_input_ids"].long(), pixel_values=refs["pixel_values"]
        ).logits[0]
    ids = refs["input_ids"].long().tolist()
    p = ids.index(519)
    # The crate writes one row per text position; see make_hf_fixture.py --check-export.
    rows = [j if j < p else j + N_PATCHES - 1 for j in range(len(ids))]
    got = out[rows]
    want_path = os.path.join(os.path.dirname(os.path.abspath(folder)), "merged_logits.f32")
    print(f"transformers loaded {folder} with no missing or unexpected keys")
    if os.path.exists(want_path):
        want = torch.from_numpy(np.fromfile(want_path, dtype=np.float32)).view_as(got)
        d = (got - want).abs().max().item()
        print(f"max |transformers(merged) - dualpriv(base + LoRA)| = {d:.3e}")
        return 0 if d < 1e-4 else 1
    return 0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--check-merged", metavar="DIR")
    args = ap.parse_args()
    if args.check_merged:
        return check_merged(args.check_merged)
    write_refs()
    return 0


if __name__ == "__main__":
    sys.exit(main())
