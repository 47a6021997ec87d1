#!/usr/bin/env python3
"""Builds the text references under tests/data/hf/ that tests/hf_text.rs compares with.

Needs tokenizers and transformers (5.x) and Pillow; not run in CI. Run from the repository
root after scripts/make_hf_fixture.py (it reads that script's tokenizer.json and image.png
and rewrites neither):

    python scripts/make_text_fixture.py

What it writes:
  conversations.json  a small LLaVA-format data set (list of {"id", "image"?,
                      "conversations": [{"from", "value"}...]}, images relative to
                      tests/data/hf/): multi-turn, text-only, <image> after the question,
                      unicode, leading spaces, newlines
  text_refs.json      for each record and each template: the prompt text, its ids and
                      the per-token labels (-100 where no loss), plus decode references

Templates:
  vicuna_v1  LLaVA-1.5's own training format. The prompt is built as
             llava/conversation.py's conv_vicuna_v1.get_prompt() does (SeparatorStyle.TWO,
             sep " ", sep2 "</s>") and labelled as llava/train/train.py's preprocess_v1
             does (haotian-liu/LLaVA at c121f04), re-implemented below from reading it:
             BOS masked; per round (the text between two "</s>") the first
             len(tokenize(instruction)) - 2 tokens masked, where the instruction ends with
             " ASSISTANT: ", and the cursor advanced by len(tokenize(round)) (its BOS stands
             in for the round's "</s>"); all masked if the cursor does not land on the
             sequence length ("tokenization mismatch"). The legacy path: LLaVA-1.5 trained
             with tokenizers 0.12 (< 0.14), so the later "- 1 for rounds after the first"
             correction for non-legacy tokenizers never ran; our tokenizer.json normalises
             each segment between added tokens (Prepend "▁"), which is the legacy behaviour.
             Images: preprocess_multimodal moves <image> to the front of its message
             ("<image>\n" + rest.strip()), and tokenizer_image_token splits on it.
  hf         llava-hf/llava-1.5-7b-hf's chat template (HF_TEMPLATE below; the Hub was not
             reachable, so it is the string that transformers' LLaVA processor tests
             (prepare_processor_dict) and OpenVINO GenAI's chat_template_fallback_map entry
             for "llava-hf/llava-1.5-7b-hf" both carry, character for character),
             through LlavaProcessor.apply_chat_template(tokenize=True,
             return_assistant_tokens_mask=True): BOS from the tokenizer, labels where the
             assistant mask is 1 (tokens overlapping "{answer} "). The processor expands
             <image> to image_seq_length tokens; the reference collapses the run back to one.
             A LLaVA record becomes messages with role user/assistant; the message holding
             <image> gets content [{"type": "image"}, {"type": "text", "text":
             value.replace("<image>", "").strip()}].
"""
import json
import os
import sys

OUT = os.path.join("tests", "data", "hf")
IGNORE = -100

# llava-hf/llava-1.5-7b-hf's chat_template (see the docstring for where it comes from).
HF_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}"
    "{% endif %}{# Render all images first #}{% for content in message['content'] | selectattr('type', "
    "'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}{# Render all text next #}{% if message['role'] "
    "!= 'assistant' %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' '}}{% endfor %}{% else %}{% for content in message['content'] | "
    "selectattr('type', 'equalto', 'text') %}{% generation %}{{ content['text'] + ' '}}{% endgeneration %}"
    "{% endfor %}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

# conv_vicuna_v1 (llava/conversation.py). The system prompt says "user", not "human"
# (the "human" wording is conv_vicuna_v0's and LLaVA-1's).
VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
ROLES = {"human": "USER", "gpt": "ASSISTANT"}

RECORDS = [
    {"id": "single", "image": "image.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat is in the picture?"},
        {"from": "gpt", "value": "A red square on a blue background."}]},
    {"id": 17, "image": "image.png", "conversations": [
        {"from": "human", "value": "What colour is the shape?\n<image>"},
        {"from": "gpt", "value": "It is round and yellow."},
        {"from": "human", "value": "How many objects are there?"},
        {"from": "gpt", "value": "Three."},
        {"from": "human", "value": "Where is it?"},
        {"from": "gpt", "value": "In the top left corner."}]},
    {"id": "text-only", "conversations": [
        {"from": "human", "value": "The quick brown fox jumps over the lazy dog. Is it quick?"},
        {"from": "gpt", "value": "Yes, there are two of them."},
        {"from": "human", "value": "  two  spaces\n\nnew lines"},
        {"from": "gpt", "value": "The answer is no.\n"}]},
    {"id": "unicode", "image": "./image.png", "conversations": [
        {"from": "human", "value": "  Describe the image. <image> Café naïve?"},
        {"from": "gpt", "value": "There is a small green circle — 東京 🚀\ttab"}]},
    {"id": "image-late", "image": "image.png", "conversations": [
        {"from": "human", "value": "Hello?"},
        {"from": "gpt", "value": "Hi."},
        {"from": "human", "value": "<image>Describe it."},
        {"from": "gpt", "value": "It is blue."}]},
]


def vicuna_prompt(turns):
    """conv_vicuna_v1.get_prompt() with the turns appended (SeparatorStyle.TWO)."""
    seps = [" ", "</s>"]
    ret = VICUNA_SYSTEM + seps[0]
    for i, (role, msg) in enumerate(turns):
        ret += role + ": " + msg + seps[i % 2] if msg else role + ":"
    return ret


def move_image_first(value):
    """preprocess_multimodal: <image> to the front of its message."""
    if "<image>" in value:
        value = "<image>\n" + value.replace("<image>", "").strip()
        value = value.strip()
    return value


def tokenizer_image_token(tok, text, image_id):
    """mm_utils.tokenizer_image_token: chunks between <image> tokenised with BOS, the BOS of
    every chunk but the first dropped, the image index between them."""
    chunks = [tok.encode(c).ids for c in text.split("<image>")]
    ids, offset = [], 0
    if chunks and chunks[0] and chunks[0][0] == tok.token_to_id("<s>"):
        offset = 1
        ids.append(chunks[0][0])
    # The separator is offset + 1 image ids so that slicing every piece by offset
    # leaves one.
    pieces = []
    for k, c in enumerate(chunks):
        if k > 0:
            pieces.append([image_id] * (offset + 1))
        pieces.append(c)
    for piece in pieces:
        ids.extend(piece[offset:])
    return ids


def vicuna_labels(tok, rec, image_id):
    has_image = "image" in rec
    turns = [(ROLES[t["from"]], move_image_first(t["value"]) if has_image else t["value"])
             for t in rec["conversations"]]
    prompt = vicuna_prompt(turns)
    enc = (lambda s: tokenizer_image_token(tok, s, image_id)) if has_image else (lambda s: tok.encode(s).ids)
    input_ids = enc(prompt)
    # With <image> an added token, the whole-prompt tokenisation must agree.
    assert input_ids == tok.encode(prompt).ids, rec["id"]
    target = list(input_ids)
    total_len = len(target)
    sep = " " + ROLES["gpt"] + ": "
    cur = 1
    target[:cur] = [IGNORE] * cur
    for rou in prompt.split("</s>"):
        if rou == "":
            break
        parts = rou.split(sep)
        if len(parts) != 2:
            break
        parts[0] += sep
        round_len = len(enc(rou))
        instruction_len = len(enc(parts[0])) - 2
        for k in range(cur, min(cur + instruction_len, total_len)):
            target[k] = IGNORE
        cur += round_len
    for k in range(cur, total_len):
        target[k] = IGNORE
    assert cur == total_len, ("tokenization mismatch", rec["id"], cur, total_len)
    return prompt, input_ids, target


def hf_messages(rec, with_last_answer=True, image=None):
    msgs = []
    for t in rec["conversations"]:
        role = "user" if t["from"] == "human" else "assistant"
        if "<image>" in t["value"]:
            content = [{"type": "image", **({"image": image} if image is not None else {})},
                       {"type": "text", "text": t["value"].replace("<image>", "").strip()}]
        else:
            content = [{"type": "text", "text": t["value"]}]
        msgs.append({"role": role, "content": content})
    return msgs if with_last_answer else msgs[:-1]


def hf_labels(processor, rec, image_id):
    msgs = hf_messages(rec, image=make_pil())
    prompt = processor.apply_chat_template(msgs, tokenize=False)
    out = processor.apply_chat_template(
        msgs, tokenize=True, return_dict=True, return_assistant_tokens_mask=True,
    )
    ids, mask = list(out["input_ids"][0]), list(out["assistant_masks"][0])
    assert len(ids) == len(mask)
    n_image = sum(i == image_id for i in ids)
    assert n_image == (16 if "image" in rec else 0), (rec["id"], n_image)  # (56 / 14)^2 + 1 - 1
    assert ("pixel_values" in out) == ("image" in rec)
    # Collapse the processor's expansion of <image> back to one placeholder.
    keep = [k for k in range(len(ids)) if not (ids[k] == image_id and k > 0 and ids[k - 1] == image_id)]
    ids, mask = [ids[k] for k in keep], [mask[k] for k in keep]
    assert ids[0] == processor.tokenizer.bos_token_id
    assert ids == processor.tokenizer(prompt)["input_ids"], rec["id"]
    labels = [i if m else IGNORE for i, m in zip(ids, mask)]
    return prompt, ids, labels


_PIL = None


def make_pil():
    global _PIL
    if _PIL is None:
        from PIL import Image

        _PIL = Image.open(os.path.join(OUT, "image.png")).convert("RGB")
    return _PIL


def span_labels(tok, prompt, answers_at):
    """Labels by character spans (for the report only): a token is a label iff it
    overlaps an answer or its "</s>"."""
    enc = tok.encode(prompt)
    return [i if any(s < e2 and e > s2 for (s2, e2) in answers_at) else IGNORE
            for i, (s, e) in zip(enc.ids, enc.offsets)]


def main():
    from tokenizers import Tokenizer
    from transformers import CLIPImageProcessorPil, LlavaProcessor, PreTrainedTokenizerFast

    tok_path = os.path.join(OUT, "tokenizer.json")
    tok = Tokenizer.from_file(tok_path)
    image_id = tok.token_to_id("<image>")
    fast = PreTrainedTokenizerFast(tokenizer_file=tok_path, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", pad_token="<pad>")
    pcfg = json.load(open(os.path.join(OUT, "preprocessor_config.json")))
    ip = CLIPImageProcessorPil(size=pcfg["size"], crop_size=pcfg["crop_size"],
                               image_mean=pcfg["image_mean"], image_std=pcfg["image_std"],
                               resample=pcfg["resample"])
    proc_cfg = json.load(open(os.path.join(OUT, "processor_config.json")))
    processor = LlavaProcessor(image_processor=ip, tokenizer=fast, chat_template=HF_TEMPLATE,
                               patch_size=proc_cfg["patch_size"],
                               vision_feature_select_strategy=proc_cfg["vision_feature_select_strategy"],
                               num_additional_image_tokens=proc_cfg["num_additional_image_tokens"])

    with open(os.path.join(OUT, "conversations.json"), "w") as f:
        json.dump(RECORDS, f, indent=1, ensure_ascii=False)

    refs = {"image_token_id": image_id, "pad_token_id": tok.token_to_id("<pad>"),
            "vicuna_v1": [], "hf": [], "generation": [], "decode": []}
    for rec in RECORDS:
        prompt, ids, labels = vicuna_labels(tok, rec, image_id)
        refs["vicuna_v1"].append({"id": str(rec["id"]), "prompt": prompt, "input_ids": ids,
                                  "labels": labels})
        # How far preprocess_v1's token-count heuristic is from character spans with this
        # BPE (its merges absorb the space after "ASSISTANT:"); informational.
        answers, pos = [], 0
        for t in rec["conversations"]:
            if t["from"] == "gpt":
                v = t["value"] + "</s>"
                at = prompt.index(v, pos)
                answers.append((at, at + len(v)))
                pos = at + len(v)
        spans = span_labels(tok, prompt, answers)
        diff = sum((a == IGNORE) != (b == IGNORE) for a, b in zip(labels, spans))
        prompt_h, ids_h, labels_h = hf_labels(processor, rec, image_id)
        refs["hf"].append({"id": str(rec["id"]), "prompt": prompt_h, "input_ids": ids_h,
                           "labels": labels_h})
        print(f"{rec['id']}: vicuna_v1 {len(ids)} tokens, {sum(l != IGNORE for l in labels)} labels "
              f"({diff} differ from char spans); hf {len(ids_h)} tokens, "
              f"{sum(l != IGNORE for l in labels_h)} labels")

    # Generation prompts: every turn but the last answer, then the assistant's header.
    for rec in RECORDS:
        has_image = "image" in rec
        turns = [(ROLES[t["from"]], move_image_first(t["value"]) if has_image else t["value"])
                 for t in rec["conversations"][:-1]]
        v = vicuna_prompt(turns + [(ROLES["gpt"], None)])
        h = processor.apply_chat_template(hf_messages(rec, with_last_answer=False),
                                          add_generation_prompt=True, tokenize=False)
        refs["generation"].append({"id": str(rec["id"]), "vicuna_v1": v, "hf": h})

    prompts = json.load(open(os.path.join(OUT, "prompts.json")))["prompts"]
    for p in prompts:
        ids = p["ids"]
        for cut in sorted({0, min(3, len(ids)), len(ids) // 2}):
            part = ids[cut:]
            refs["decode"].append({
                "ids": part,
                "skip_special": tok.decode(part, skip_special_tokens=True),
                "keep_special": tok.decode(part, skip_special_tokens=False),
            })
            assert fast.decode(part, skip_special_tokens=True) == refs["decode"][-1]["skip_special"]

    with open(os.path.join(OUT, "text_refs.json"), "w") as f:
        json.dump(refs, f, indent=1, ensure_ascii=False)
    print(f"wrote {OUT}/conversations.json and {OUT}/text_refs.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
