#!/usr/bin/env python3
"""References for the shipped tiny model (assets/tiny-pretrained) from transformers.

The built-in task's model is an ordinary LLaVA folder. This script reads it with
transformers' LlavaForConditionalGeneration, AutoTokenizer (its WordLevel
tokenizer.json) and CLIPImageProcessorPil, on records written by
`dualpriv data synthetic`, and stores what `tests/builtin.rs` compares the crate with:
token ids, pixel values, and the logits at every text position.

Needs torch, transformers (5.x) and Pillow; not run in CI. From the repository root:

    cargo build --release
    python scripts/make_tiny_fixture.py      # writes tests/data/tiny/refs.safetensors

Rerun it whenever assets/tiny-pretrained is re-pretrained (the test then says so).
"""
import argparse
import json
import os
import subprocess
import tempfile

import torch
from PIL import Image
from safetensors.torch import save_file
from transformers import AutoTokenizer, LlavaForConditionalGeneration
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

N = 8


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="assets/tiny-pretrained")
    ap.add_argument("--bin", default="target/release/dualpriv")
    ap.add_argument("--out", default="tests/data/tiny/refs.safetensors")
    a = ap.parse_args()

    model, info = LlavaForConditionalGeneration.from_pretrained(
        a.model, output_loading_info=True
    )
    bad = {k: v for k, v in info.items() if v}
    assert not bad, f"transformers did not load the folder cleanly: {bad}"
    model.eval()
    tok = AutoTokenizer.from_pretrained(a.model)
    with open(os.path.join(a.model, "preprocessor_config.json")) as f:
        pc = json.load(f)
    ip = CLIPImageProcessorPil(**{k: v for k, v in pc.items() if k not in
                                  ("image_processor_type", "processor_class")})
    cfg = model.config
    n_img = cfg.image_seq_length

    refs = {}
    with tempfile.TemporaryDirectory() as d:
        subprocess.run([a.bin, "data", "synthetic", "--out", d, "--split", "test",
                        "--examples", str(N), "--seed", "2"], check=True,
                       stdout=subprocess.DEVNULL)
        with open(os.path.join(d, "test.json")) as f:
            records = json.load(f)
        for i, r in enumerate(records):
            q = r["conversations"][0]["value"].replace("<image>", "").strip()
            ans = r["conversations"][1]["value"]
            # transformers' llava-1.5-hf chat template, with the answer.
            text = f"USER: <image>\n{q} ASSISTANT: {ans} "
            ids = tok(text).input_ids
            assert ids[0] == tok.bos_token_id
            pos = ids.index(cfg.image_token_index)
            img = Image.open(os.path.join(d, r["image"]))
            pv = ip(img, return_tensors="pt")["pixel_values"].float()
            expanded = ids[:pos] + [cfg.image_token_index] * n_img + ids[pos + 1:]
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([expanded]),
                               pixel_values=pv).logits[0]
            # Text position j reads row j before the image, the last visual token's
            # row at the image, and row j + n_img - 1 after it (the crate's layout).
            rows = [j if j < pos else j + n_img - 1 for j in range(len(ids))]
            refs[f"input_ids.{i}"] = torch.tensor(ids, dtype=torch.int64)
            refs[f"pixel_values.{i}"] = pv[0].contiguous()
            refs[f"logits.{i}"] = logits[rows].contiguous()
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    save_file(refs, a.out, metadata={"records": str(N), "seed": "2", "split": "test"})
    print(f"wrote {a.out}: {N} records")


if __name__ == "__main__":
    main()
