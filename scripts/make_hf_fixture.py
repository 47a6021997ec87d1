#!/usr/bin/env python3
"""Builds the tiny HF LLaVA fixture under tests/data/hf/ that `cargo test` compares with.

Needs torch, transformers (5.x), peft, tokenizers and Pillow; not run in CI. Run from the
repository root:

    python scripts/make_hf_fixture.py            # writes tests/data/hf/
    python scripts/make_hf_fixture.py --check-export DIR
        # loads a PEFT adapter exported by `dualpriv export --peft DIR` with
        # peft.PeftModel.from_pretrained on the fixture model and compares its logits
        # with DIR/../logits.f32 if present (prints the max abs difference)

What it writes (all small):
  tokenizer.json          BPE in the Llama-2 layout (Prepend/Replace normaliser, byte
                          fallback, `<s>` template) with the added tokens <image>, <pad>
  prompts.json            prompts and their ids from the `tokenizers` library (and
                          transformers' PreTrainedTokenizerFast, asserted equal)
  image.png               a 75x50 RGB image (non-square, noisy, so resampling matters)
  preprocessor_config.json, processor_config.json   as llava-hf ships them, scaled down
  hub/, v5/, sharded/, memory/  each also holds tokenizer.json,
                          preprocessor_config.json and processor_config.json, as a
                          Hub model folder does
  hub/                    config.json (partial sub-configs, as on the Hub) + F32
                          model.safetensors in the Hub key layout
                          (vision_tower.vision_model.*, language_model.model.*, ...)
  v5/                     transformers' own save_pretrained (full config), stored BF16
  sharded/                the Hub layout in 3 F16 shards + model.safetensors.index.json
  memory/                 the in-memory key layout (model.vision_tower.*, lm_head.weight)
  adapter/                a PEFT LoRA adapter (r=4, regex target_modules) with non-zero B
                          (peft's generated README.md is removed)
  refs.safetensors        pixel_values (crop and pad modes), input_ids, vision hidden
                          states at layer -2, image features, logits, adapter logits

Weights are random but every norm, bias and the class/position embeddings are
perturbed away from their init, so a port that ignores one of them fails. They are
rounded so that F32, BF16 and F16 hold the same values: one set of references serves
every layout.
"""
import argparse
import json
import os
import shutil
import sys

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file

OUT = os.path.join("tests", "data", "hf")
IMAGE_SIZE, PATCH = 56, 14
N_PATCHES = (IMAGE_SIZE // PATCH) ** 2
# OpenAI CLIP's normalisation, as in llava-hf/llava-1.5-7b-hf/preprocessor_config.json.
MEAN = [0.48145466, 0.4578275, 0.40821073]
STD = [0.26862954, 0.26130258, 0.27577711]
SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
CORPUS = [
    "USER: What is in the picture? ASSISTANT: A red square on a blue background.",
    "USER: Describe the image. ASSISTANT: There is a small green circle.",
    SYSTEM,
    "The quick brown fox jumps over the lazy dog. What colour is the shape?",
    "It is round and yellow. The answer is no. Yes, there are two of them.",
    "How many objects are there? Three. Where is it? In the top left corner.",
]
PROMPTS = [
    "USER: <image>\nWhat is in the picture? ASSISTANT: A red square.</s>",
    SYSTEM + " USER: <image>\nDescribe it. ASSISTANT: It is blue.</s>USER: And the shape? "
    "ASSISTANT: Round.</s>",
    "Café naïve — 東京 🚀 tab\there",
    "  two  spaces\n\nnew lines <image>at the end",
    "",
]


def build_tokenizer(path):
    """A byte-fallback BPE in the exact layout of Llama-2's tokenizer.json."""
    from tokenizers import Tokenizer, decoders, models, normalizers, processors, trainers
    from tokenizers import AddedToken

    # Train merges on normalised text (spaces as U+2581), then lay the vocabulary
    # out as Llama does: <unk> <s> </s>, the 256 byte tokens, then the pieces.
    norm = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    scratch = Tokenizer(models.BPE(unk_token="<unk>"))
    scratch.normalizer = norm
    trainer = trainers.BpeTrainer(vocab_size=260, special_tokens=[], show_progress=False)
    scratch.train_from_iterator(CORPUS, trainer)
    trained = json.loads(scratch.to_str())["model"]
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for piece, _ in sorted(trained["vocab"].items(), key=lambda kv: kv[1]):
        if piece not in vocab:
            vocab[piece] = len(vocab)
    merges = trained["merges"]
    tok = Tokenizer(
        models.BPE(
            vocab=vocab,
            merges=[tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in merges],
            unk_token="<unk>",
            fuse_unk=True,
            byte_fallback=True,
        )
    )
    tok.normalizer = norm
    tok.pre_tokenizer = None
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tok.add_special_tokens(
        [AddedToken(t, normalized=False, special=True) for t in ["<unk>", "<s>", "</s>"]]
    )
    tok.add_tokens([AddedToken("<image>", normalized=False, special=True)])
    tok.add_tokens([AddedToken("<pad>", normalized=False, special=True)])
    tok.save(path)
    return Tokenizer.from_file(path)


def make_image(path):
    rng = np.random.default_rng(7)
    h, w = 50, 75
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 3.0, yy * 4.0, (xx + yy) * 2.0], -1)
    img = np.clip(base + rng.normal(0, 40, (h, w, 3)), 0, 255).astype(np.uint8)
    Image.fromarray(img, "RGB").save(path)


def expand2square(img, color):
    """LLaVA-1.5's `pad` aspect mode (llava/mm_utils.py: expand2square)."""
    w, h = img.size
    if w == h:
        return img
    side = max(w, h)
    out = Image.new(img.mode, (side, side), color)
    out.paste(img, ((side - w) // 2, 0) if w < h else (0, (side - h) // 2))
    return out


def round_shared(t):
    """Rounds to values F32, BF16 and F16 all hold exactly (bf16 mantissa, f16 range)."""
    t = t.to(torch.bfloat16).to(torch.float32)
    t[t.abs() < 2.0**-14] = 0.0
    assert torch.equal(t.to(torch.float16).to(torch.float32), t)
    return t


def hub_key(k):
    """State-dict key (in-memory layout) to the Hub layout llava-hf checkpoints use."""
    if k.startswith("model.vision_tower."):
        return "vision_tower.vision_model." + k[len("model.vision_tower."):]
    if k.startswith("model.multi_modal_projector."):
        return k[len("model."):]
    if k.startswith("model.language_model."):
        return "language_model.model." + k[len("model.language_model."):]
    if k == "lm_head.weight":
        return "language_model.lm_head.weight"
    raise KeyError(k)


def v5_key(k):
    """State-dict key to the layout transformers 5 writes with save_pretrained."""
    if k.startswith("model.vision_tower."):
        return "vision_tower." + k[len("model.vision_tower."):]
    return hub_key(k)


def save_layout(sd, folder, key, dtype, config, shards=1):
    os.makedirs(folder, exist_ok=True)
    tensors = {key(k): v.to(dtype).contiguous() for k, v in sd.items()}
    names = sorted(tensors)
    if shards == 1:
        save_file(tensors, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
    else:
        parts = np.array_split(np.arange(len(names)), shards)
        weight_map = {}
        for i, idx in enumerate(parts):
            fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
            chunk = {names[j]: tensors[names[j]] for j in idx}
            save_file(chunk, os.path.join(folder, fname), metadata={"format": "pt"})
            weight_map.update({n: fname for n in chunk})
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f, indent=2)


def check_export(folder):
    from peft import PeftModel
    from transformers import LlavaForConditionalGeneration

    base = LlavaForConditionalGeneration.from_pretrained(os.path.join(OUT, "v5"), dtype=torch.float32)
    model = PeftModel.from_pretrained(base, folder).eval()
    from safetensors.torch import load_file

    refs = load_file(os.path.join(OUT, "refs.safetensors"))
    with torch.no_grad():
        out = model(
            input_ids=refs["model_input_ids"].long(), pixel_values=refs["pixel_values"]
        ).logits
    want_path = os.path.join(folder, "logits.f32")
    print(f"peft loaded {folder}: logits shape {tuple(out.shape)}")
    if os.path.exists(want_path):
        # dualpriv writes one row per text position: the <image> position reads the
        # last image row of the expanded sequence, later text rows shift by V - 1.
        ids = refs["input_ids"].long().tolist()
        p = ids.index(_image_id(refs))
        rows = [j if j < p else j + N_PATCHES - 1 for j in range(len(ids))]
        got = out[0, rows]
        want = torch.from_numpy(np.fromfile(want_path, dtype=np.float32)).view_as(got)
        print(f"max |peft - dualpriv| = {(got - want).abs().max().item():.3e}")
    return 0


def _image_id(refs):
    """The <image> id: the token repeated N_PATCHES times in the model's input."""
    vals, counts = torch.unique(refs["model_input_ids"][0], return_counts=True)
    return int(vals[counts == N_PATCHES][0])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--check-export", metavar="DIR")
    args = ap.parse_args()
    if args.check_export:
        return check_export(args.check_export)

    from peft import LoraConfig, get_peft_model
    from transformers import (
        CLIPImageProcessorPil,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        PreTrainedTokenizerFast,
    )

    # Only this script's outputs: other scripts keep fixtures in the same folder.
    for d in ["hub", "v5", "sharded", "memory", "adapter"]:
        shutil.rmtree(os.path.join(OUT, d), ignore_errors=True)
    os.makedirs(OUT, exist_ok=True)
    tok = build_tokenizer(os.path.join(OUT, "tokenizer.json"))
    image_id = tok.token_to_id("<image>")
    pad_id = tok.token_to_id("<pad>")
    vocab = tok.get_vocab_size()

    # Token ids: the tokenizers library and transformers' fast tokenizer must agree.
    fast = PreTrainedTokenizerFast(tokenizer_file=os.path.join(OUT, "tokenizer.json"))
    prompts = []
    for p in PROMPTS:
        ids = tok.encode(p).ids
        assert fast(p)["input_ids"] == ids, (p, fast(p)["input_ids"], ids)
        prompts.append({"text": p, "ids": ids})
    with open(os.path.join(OUT, "prompts.json"), "w") as f:
        json.dump({"image_token_id": image_id, "pad_token_id": pad_id, "prompts": prompts}, f,
                  indent=1, ensure_ascii=False)

    # Images: the slow (Pillow) CLIP processor, crop mode and LLaVA's pad mode.
    make_image(os.path.join(OUT, "image.png"))
    proc_cfg = {
        "crop_size": {"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        "do_center_crop": True,
        "do_convert_rgb": True,
        "do_normalize": True,
        "do_rescale": True,
        "do_resize": True,
        "image_mean": MEAN,
        "image_processor_type": "CLIPImageProcessor",
        "image_std": STD,
        "processor_class": "LlavaProcessor",
        "resample": 3,
        "rescale_factor": 1 / 255,
        "size": {"shortest_edge": IMAGE_SIZE},
    }
    with open(os.path.join(OUT, "preprocessor_config.json"), "w") as f:
        json.dump(proc_cfg, f, indent=2)
    with open(os.path.join(OUT, "processor_config.json"), "w") as f:
        json.dump({"image_token": "<image>", "num_additional_image_tokens": 1,
                   "patch_size": PATCH, "processor_class": "LlavaProcessor",
                   "vision_feature_select_strategy": "default"}, f, indent=2)
    ip = CLIPImageProcessorPil(
        size={"shortest_edge": IMAGE_SIZE},
        crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        image_mean=MEAN,
        image_std=STD,
        resample=3,
    )
    img = Image.open(os.path.join(OUT, "image.png"))
    pixel_values = ip(img, return_tensors="pt")["pixel_values"].float()
    pad_color = tuple(int(x * 255) for x in MEAN)
    pixel_values_pad = ip(expand2square(img.convert("RGB"), pad_color), return_tensors="pt")[
        "pixel_values"
    ].float()

    # The model: small, GQA, every default that the loader must fill in exercised.
    torch.manual_seed(0)
    vc = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                          num_attention_heads=2, image_size=IMAGE_SIZE, patch_size=PATCH,
                          projection_dim=32)
    tc = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, vocab_size=vocab,
                     rms_norm_eps=1e-5, max_position_embeddings=256, pad_token_id=pad_id)
    cfg = LlavaConfig(vision_config=vc, text_config=tc, image_token_index=image_id,
                      image_seq_length=N_PATCHES, pad_token_id=pad_id)
    model = LlavaForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith(".bias"):
                p.add_(0.1 * torch.randn_like(p))
            if "class_embedding" in name or "position_embedding" in name:
                p.copy_(0.5 * torch.randn_like(p))
            if "embed_tokens" in name or "lm_head" in name or "patch_embedding" in name:
                p.copy_(0.2 * torch.randn_like(p))
            if "multi_modal_projector.linear_" in name and name.endswith("weight"):
                # Pre-activations of several units, so the exact GELU and its tanh
                # approximation give measurably different features.
                p.mul_(12.0)
            p.copy_(round_shared(p.detach().clone()))
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        h = model.model.vision_tower(pixel_values, output_hidden_states=True).hidden_states[-2][:, 1:]
        proj = model.model.multi_modal_projector
        pre = proj.linear_1(h)
        exact = proj.linear_2(torch.nn.functional.gelu(pre))
        tanh = proj.linear_2(torch.nn.functional.gelu(pre, approximate="tanh"))
        gap = (exact - tanh).abs().max().item()
    assert gap > 5e-4, f"the fixture cannot tell the exact GELU from tanh ({gap:.1e})"
    print(f"projector pre-activations up to {pre.abs().max().item():.2f}; exact vs tanh GELU features differ by {gap:.2e}")

    # Layouts.
    model.save_pretrained(os.path.join(OUT, "v5"))
    full = json.load(open(os.path.join(OUT, "v5", "config.json")))
    os.remove(os.path.join(OUT, "v5", "model.safetensors"))
    save_layout(sd, os.path.join(OUT, "v5"), v5_key, torch.bfloat16, full)
    # The Hub's config is partial: sub-configs name only what differs from the
    # defaults (llava-hf/llava-1.5-7b-hf/config.json), text_config uses rope_theta.
    hub_cfg = {
        "architectures": ["LlavaForConditionalGeneration"],
        "ignore_index": -100,
        "image_token_index": image_id,
        "model_type": "llava",
        "pad_token_id": pad_id,
        "projector_hidden_act": "gelu",
        "text_config": {
            "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256,
            "model_type": "llama", "rms_norm_eps": 1e-05, "torch_dtype": "float16",
            "vocab_size": vocab, "rope_theta": 10000.0,
        },
        "torch_dtype": "float16",
        "vision_config": {
            "hidden_size": 32, "image_size": IMAGE_SIZE, "intermediate_size": 64,
            "model_type": "clip_vision_model", "num_attention_heads": 2,
            "num_hidden_layers": 3, "patch_size": PATCH, "projection_dim": 32,
            "vocab_size": 32000,
        },
        "vocab_size": vocab,
    }
    save_layout(sd, os.path.join(OUT, "hub"), hub_key, torch.float32, hub_cfg)
    save_layout(sd, os.path.join(OUT, "sharded"), hub_key, torch.float16, hub_cfg, shards=3)
    save_layout(sd, os.path.join(OUT, "memory"), lambda k: k, torch.float32, full)
    for layout in ["hub", "v5", "sharded", "memory"]:
        # A model folder as the Hub ships it holds its tokenizer and processor too.
        for f in ["tokenizer.json", "preprocessor_config.json", "processor_config.json"]:
            shutil.copy(os.path.join(OUT, f), os.path.join(OUT, layout, f))
    for layout in ["hub", "sharded", "v5"]:
        # Each layout must load in transformers to the same weights.
        m = LlavaForConditionalGeneration.from_pretrained(os.path.join(OUT, layout), dtype=torch.float32)
        for k, v in m.state_dict().items():
            assert torch.equal(v, sd[k]), (layout, k)

    # References.
    first = prompts[0]["ids"]
    at = first.index(image_id)
    model_ids = first[:at] + [image_id] * N_PATCHES + first[at + 1:]
    ids_t = torch.tensor([model_ids])
    with torch.no_grad():
        vis = model.model.vision_tower(pixel_values, output_hidden_states=True)
        hidden_m2 = vis.hidden_states[-2]
        feats = model.model.get_image_features(pixel_values=pixel_values)
        feats = feats.pooler_output if hasattr(feats, "pooler_output") else feats
        feats = torch.cat(list(feats), 0) if isinstance(feats, (list, tuple)) else feats
        logits = model(input_ids=ids_t, pixel_values=pixel_values).logits
        text_ids = torch.tensor([prompts[2]["ids"]])
        text_logits = model(input_ids=text_ids).logits

    lcfg = LoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.0, bias="none", task_type="CAUSAL_LM",
        target_modules=r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)",
    )
    peft_model = get_peft_model(model, lcfg)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(round_shared(0.3 * torch.randn_like(p)))
    peft_model.save_pretrained(os.path.join(OUT, "adapter"))
    os.remove(os.path.join(OUT, "adapter", "README.md"))
    with torch.no_grad():
        adapter_logits = peft_model(input_ids=ids_t, pixel_values=pixel_values).logits

    refs = {
        "pixel_values": pixel_values.contiguous(),
        "pixel_values_pad": pixel_values_pad.contiguous(),
        "input_ids": torch.tensor(first, dtype=torch.int32),
        "model_input_ids": ids_t.to(torch.int32),
        "vision_hidden_m2": hidden_m2.contiguous(),
        "image_features": feats.reshape(1, N_PATCHES, -1).contiguous(),
        "logits": logits.contiguous(),
        "text_input_ids": text_ids.to(torch.int32),
        "text_logits": text_logits.contiguous(),
        "adapter_logits": adapter_logits.contiguous(),
    }
    save_file(refs, os.path.join(OUT, "refs.safetensors"))
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(OUT) for f in fs)
    print(f"{OUT} now holds {size / 1e6:.2f} MB; vocab {vocab}, <image> = {image_id}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
