#!/usr/bin/env python3
"""Makes tests/fixtures/open_clip/: what open_clip itself computes, for the
import test (tests/open_clip.rs), which runs without PyTorch.

    pip install open_clip_torch==3.3.0 safetensors
    python3 scripts/make_openclip_fixture.py [--photos /usr/share/backgrounds/mate/nature]

Writes:
    config.json          a small CoCa configuration of open_clip's (its own
                         shapes, none of coca's presets): the model JSON
                         `coca import open-clip --config` reads
    open_clip.safetensors  its state dict (every tensor random, biases and
                         norms included)
    photo-*.jpg/png      three real photos, small crops of different shapes
    expected.safetensors open_clip's eval transform of each photo, the token
                         ids fed to the model, and its outputs: image and text
                         features, logit scale, captioning logits, the CoCa
                         loss (contrastive weight 1, captioning weight 2)
    captions.json        captions (emoji, accents, punctuation, HTML
                         entities, curly quotes, long texts) and the ids
                         open_clip's tokenizer gives them (context 76)
"""
import argparse
import json
import os

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file

import open_clip
from open_clip.loss import CoCaLoss

OUT = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "open_clip")

CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {
        "image_size": 32,
        "layers": 2,
        "width": 48,
        "head_width": 16,
        "patch_size": 8,
        "attentional_pool": True,
        "attn_pooler_heads": 4,
        "attn_pooler_queries": 9,
        "output_tokens": True,
    },
    "text_cfg": {
        "context_length": 12,
        "vocab_size": 64,
        "width": 32,
        "heads": 2,
        "layers": 2,
        "embed_cls": True,
        "output_tokens": True,
    },
    "multimodal_cfg": {
        "context_length": 12,
        "vocab_size": 64,
        "width": 32,
        "heads": 2,
        "layers": 2,
        "attn_pooler_heads": 2,
    },
    "custom_text": True,
}

# Ids in the fixture model's 64-token vocabulary: start 1, end 2, pad 0
# (open_clip's pad id), of several lengths; the last fills the context.
TOKENS = [
    [1, 17, 33, 5, 2, 0, 0, 0, 0, 0, 0, 0],
    [1, 40, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0],
    [1, 9, 9, 61, 12, 50, 3, 27, 44, 8, 19, 2],
]

CAPTIONS = [
    "A photo of a cat.",
    "  Two   dogs\tplaying in the\nsnow!  ",
    "Crème brûlée, façade, naïve café — Ångström & Øresund",
    "an emoji party 🎉🐱👍🏽 with flags 🇫🇷 and hearts ❤️",
    "“Curly quotes” and ‘single’ ones, plus it's, we'll, they're, I'd, you've",
    "HTML entities: &amp; &lt;tag&gt; &quot;quoted&quot; &#39;apos&#39; &amp;amp;",
    "UPPER case, MiXeD CaSe, numbers 1234567 and 3.14159, prices $9.99, 50% off!!!",
    "punctuation... (parens) [brackets] {braces} <angles> a/b\\c #hash @at ~tilde ^caret |pipe",
    "日本語のキャプション、中文标题, 한국어 설명, русский текст, ελληνικά",
    "ﬁne ligatures and ｆｕｌｌｗｉｄｔｈ letters",
    " ".join(["a very long caption that goes on and on"] * 12),
    "",
]


def randomize(model, generator):
    """Sets every parameter from `generator`: open_clip's own init leaves
    the decoder's text_projection uninitialised (torch.empty), and its zero
    biases and unit norms would not test that those map."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if name == "logit_scale":
                param.copy_(torch.tensor(2.9))
            elif param.dim() == 1 and ("ln" in name or "norm" in name) and name.endswith("weight"):
                param.copy_(1.0 + 0.1 * noise)
            elif param.dim() == 1:
                param.copy_(0.1 * noise)
            else:
                fan_in = param.numel() // param.shape[0]
                param.copy_(noise / fan_in ** 0.5)


def photos(source, out):
    """Three crops of real photos: landscape JPEG, portrait JPEG, square PNG."""
    names = sorted(f for f in os.listdir(source) if f.lower().endswith(".jpg"))[:3]
    shapes = [((120, 80), "photo-0.jpg"), ((60, 90), "photo-1.jpg"), ((48, 48), "photo-2.png")]
    paths = []
    for name, (size, file) in zip(names, shapes):
        image = Image.open(os.path.join(source, name)).convert("RGB")
        image.thumbnail((4 * size[0], 4 * size[1]))
        image = image.resize(size, Image.BICUBIC)
        path = os.path.join(out, file)
        if file.endswith(".jpg"):
            image.save(path, quality=85)
        else:
            image.save(path)
        paths.append(path)
    return paths


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--photos", default="/usr/share/backgrounds/mate/nature")
    parser.add_argument("--out", default=OUT)
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(1)

    with open(os.path.join(args.out, "config.json"), "w") as f:
        json.dump(CONFIG, f, indent=4)
    open_clip.add_model_config(args.out)  # the file's stem names the model: "config"
    model, _, preprocess = open_clip.create_model_and_transforms("config")
    model.eval()
    randomize(model, generator)
    state = {name: tensor.contiguous() for name, tensor in model.state_dict().items()}
    save_file(state, os.path.join(args.out, "open_clip.safetensors"))

    paths = photos(args.photos, args.out)
    pixels = torch.stack([preprocess(Image.open(p)) for p in paths])
    tokens = torch.tensor(TOKENS, dtype=torch.long)
    with torch.no_grad():
        out = model(pixels, tokens)
        loss = CoCaLoss(caption_loss_weight=2.0, clip_loss_weight=1.0, pad_id=0)
        contrastive, caption = loss(**out, output_dict=False)
    expected = {
        "pixels": pixels.float(),
        "tokens": tokens,
        "image_features": out["image_features"].float(),
        "text_features": out["text_features"].float(),
        "logits": out["logits"].float(),
        "logit_scale": out["logit_scale"].reshape(1).float(),
        "loss_contrastive": contrastive.reshape(1).float(),
        "loss_captioning": (caption / 2.0).reshape(1).float(),
        "loss_total": (contrastive + caption).reshape(1).float(),
    }
    save_file({k: v.contiguous() for k, v in expected.items()}, os.path.join(args.out, "expected.safetensors"))

    tokenizer = open_clip.get_tokenizer("coca_ViT-B-32")
    ids = tokenizer(CAPTIONS)
    with open(os.path.join(args.out, "captions.json"), "w") as f:
        rows = [json.dumps({"text": t, "ids": row.tolist()}, ensure_ascii=False) for t, row in zip(CAPTIONS, ids)]
        f.write('{"context_length": %d, "captions": [\n%s\n]}\n' % (ids.shape[1], ",\n".join(rows)))
    total = sum(os.path.getsize(os.path.join(args.out, f)) for f in os.listdir(args.out))
    print(f"wrote {args.out}: {total} bytes; open_clip {open_clip.__version__}, torch {torch.__version__}")


if __name__ == "__main__":
    main()
