#!/usr/bin/env python3
"""Greedy generations of the tiny HF LLaVA fixture, for `tests/hf_generate.rs`.

Needs torch, transformers (5.x), peft, tokenizers and Pillow; not run in CI. Run from the
repository root after scripts/make_hf_fixture.py:

    python scripts/make_generate_fixture.py     # writes tests/data/hf/generate.json

For each case it renders the prompt with the template as LLaVA / transformers define it
(written out here, independently of the crate), tokenises it with the `tokenizers`
library, expands `<image>` to the model's image_seq_length tokens as LlavaProcessor does,
preprocesses the image with CLIPImageProcessorPil (`crop`) or LLaVA-1.5's expand2square
then the same processor (`pad`), and runs

    model.generate(input_ids, attention_mask, pixel_values, do_sample=False,
                   max_new_tokens=8)

on tests/data/hf/v5 in float32, with and without the PEFT adapter tests/data/hf/adapter
(peft.PeftModel.from_pretrained). It records the prompt ids (with one `<image>` id, as the
crate tokenises), the generated ids (EOS included when generation stops there), and the
smallest top-1 minus top-2 logit gap over the generated steps: the crate's logits agree
with transformers' to ~2e-5 (tests/hf_model.rs), so a gap well above that means argmax
ties cannot flip a token. Cases whose gap is below MIN_MARGIN are refused.

The model is random, so the generated text is gibberish; cases are chosen so that each
generates several tokens (a case that hits EOS at once would test nothing).
"""
import json
import os
import sys

import torch
from PIL import Image

OUT = os.path.join("tests", "data", "hf")
N_PATCHES = 16
MAX_NEW = 8
MIN_MARGIN = 5e-4
# LLaVA's conv_vicuna_v1.system (llava/conversation.py).
VICUNA_V1_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)

# (name, template, aspect, image, turns ending with the question, adapter, stop id).
# The base model's generations depend little on the prompt (random weights), so the
# base cases are ones whose generations differ from each other; "stop" overrides
# eos_token_id with a token the case generates, so stopping is compared too (this
# random model never generates </s> within MAX_NEW tokens).
CASES = [
    ("hf_crop", "llava-hf", "crop", "image.png", ["What is in the picture?"], False, None),
    ("hf_crop_adapter", "llava-hf", "crop", "image.png", ["What is in the picture?"], True, None),
    ("hf_crop_stop", "llava-hf", "crop", "image.png", ["What is in the picture?"], False, 5),
    ("hf_palette", "llava-hf", "crop", "image/palette.png", ["Three."], False, None),
    ("v1_pad", "vicuna-v1", "pad", "image.png", ["Describe the image."], False, None),
    ("v1_pad_grey", "vicuna-v1", "pad", "image/grey.png", ["In the top left corner."], False, None),
    ("v1_pad_adapter", "vicuna-v1", "pad", "image.png", ["Describe the image."], True, None),
    ("hf_portrait_adapter", "llava-hf", "pad", "image/portrait.png", ["How many objects are there?"], True, None),
    (
        "v1_multiturn_adapter",
        "vicuna-v1",
        "pad",
        "image/portrait.png",
        ["What colour is the shape?", "It is blue.", "And where is it?"],
        True,
        None,
    ),
]


def render(template, turns):
    """The generation prompt: `turns` alternate question, answer, ..., question; the
    image goes first in the first question, as the crate's Template renders it."""
    first = "<image>\n" + turns[0]
    if template == "llava-hf":
        # llava-hf/llava-1.5-7b-hf's chat_template with add_generation_prompt=True.
        s = ""
        for i, t in enumerate([first] + turns[1:]):
            s += ("USER: " + t + " ") if i % 2 == 0 else ("ASSISTANT: " + t + " ")
        return s + "ASSISTANT:"
    # conv_vicuna_v1.get_prompt() with an empty last message: sep " ", sep2 "</s>".
    s = VICUNA_V1_SYSTEM + " "
    for i, t in enumerate([first] + turns[1:]):
        s += ("USER: " + t + " ") if i % 2 == 0 else ("ASSISTANT: " + t + "</s>")
    return s + "ASSISTANT:"


def expand2square(img, color):
    """LLaVA-1.5's `pad` aspect mode (llava/mm_utils.py: expand2square)."""
    w, h = img.size
    if w == h:
        return img
    side = max(w, h)
    out = Image.new(img.mode, (side, side), color)
    out.paste(img, ((side - w) // 2, 0) if w < h else (0, (side - h) // 2))
    return out


def main():
    from peft import PeftModel
    from tokenizers import Tokenizer
    from transformers import CLIPImageProcessorPil, LlavaForConditionalGeneration

    proc_cfg = json.load(open(os.path.join(OUT, "preprocessor_config.json")))
    size = proc_cfg["crop_size"]["height"]
    ip = CLIPImageProcessorPil(
        size={"shortest_edge": size},
        crop_size={"height": size, "width": size},
        image_mean=proc_cfg["image_mean"],
        image_std=proc_cfg["image_std"],
        resample=3,
    )
    tok = Tokenizer.from_file(os.path.join(OUT, "tokenizer.json"))
    image_id = tok.token_to_id("<image>")
    base = LlavaForConditionalGeneration.from_pretrained(os.path.join(OUT, "v5"), dtype=torch.float32).eval()
    eos = base.generation_config.eos_token_id
    peft = PeftModel.from_pretrained(
        LlavaForConditionalGeneration.from_pretrained(os.path.join(OUT, "v5"), dtype=torch.float32),
        os.path.join(OUT, "adapter"),
    ).eval()

    out = []
    for name, template, aspect, image, turns, adapter, stop in CASES:
        prompt = render(template, turns)
        ids = tok.encode(prompt).ids
        assert ids.count(image_id) == 1, (name, ids)
        at = ids.index(image_id)
        model_ids = ids[:at] + [image_id] * N_PATCHES + ids[at + 1:]
        img = Image.open(os.path.join(OUT, image)).convert("RGB")
        if aspect == "pad":
            img = expand2square(img, tuple(int(x * 255) for x in proc_cfg["image_mean"]))
        pixel_values = ip(img, return_tensors="pt")["pixel_values"].float()
        model = peft if adapter else base
        x = torch.tensor([model_ids])
        with torch.no_grad():
            g = model.generate(
                input_ids=x,
                attention_mask=torch.ones_like(x),
                pixel_values=pixel_values,
                do_sample=False,
                max_new_tokens=MAX_NEW,
                output_logits=True,
                **({"eos_token_id": stop} if stop is not None else {}),
                return_dict_in_generate=True,
            )
        new = g.sequences[0, x.shape[1]:].tolist()
        margin = min(
            (lambda top: (top[0] - top[1]).item())(torch.topk(step[0], 2).values) for step in g.logits
        )
        print(f"{name}: {len(new)} tokens {new}, min top-1 - top-2 gap {margin:.2e}, text {tok.decode(new)!r}")
        if stop is not None and new[-1] != stop:
            sys.exit(f"{name} does not stop at {stop}")
        if len(new) < 3:
            sys.exit(f"{name} generates only {len(new)} tokens; pick another prompt")
        if margin < MIN_MARGIN:
            sys.exit(f"{name}: argmax gap {margin:.1e} < {MIN_MARGIN}; pick another prompt")
        out.append({
            "name": name,
            "template": template,
            "aspect": aspect,
            "image": image,
            "turns": turns,
            "adapter": adapter,
            "stop_id": stop if stop is not None else eos,
            "prompt": prompt,
            "prompt_ids": ids,
            "generated_ids": new,
            "text": tok.decode(new, skip_special_tokens=True),
            "min_margin": margin,
        })
    doc = {
        "max_new_tokens": MAX_NEW,
        "eos_token_id": eos,
        "model": "v5",
        "cases": out,
    }
    with open(os.path.join(OUT, "generate.json"), "w") as f:
        json.dump(doc, f, indent=1, ensure_ascii=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
