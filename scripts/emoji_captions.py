#!/usr/bin/env python3
"""Captions for the npm package emoji-datasource-twitter, as a JSONL file
that `coca data import --format captions` reads: one line per 64 px Twitter
PNG (skin-tone variations included), captioned from its name, category and
subcategory, like noisy alt-text.

    scripts/emoji_captions.py node_modules/emoji-datasource-twitter emoji.jsonl
"""
import json
import os
import sys

TONES = {
    "1F3FB": "light",
    "1F3FC": "medium-light",
    "1F3FD": "medium",
    "1F3FE": "medium-dark",
    "1F3FF": "dark",
}


def tone_words(key):
    tones = [TONES.get(part, part) for part in key.split("-")]
    return " and ".join(dict.fromkeys(tones)) + " skin tone"


def main(package, out):
    images = os.path.join(os.path.abspath(package), "img", "twitter", "64")
    with open(os.path.join(package, "emoji.json"), encoding="utf-8") as f:
        emoji = json.load(f)
    lines = []
    for entry in sorted(emoji, key=lambda e: e["sort_order"]):
        name = (entry.get("name") or entry["short_name"].replace("_", " ")).lower()
        where = f'{entry["subcategory"].replace("-", " ")}, {entry["category"].lower()}'
        variants = [(entry, f"a {name} emoji ({where})")]
        for key, variation in sorted((entry.get("skin_variations") or {}).items()):
            variants.append((variation, f"a {name} emoji with {tone_words(key)} ({where})"))
        for item, caption in variants:
            path = os.path.join(images, item["image"])
            if item.get("has_img_twitter") and os.path.exists(path):
                lines.append(json.dumps({"image": path, "caption": caption}))
    with open(out, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    print(f"{out}: {len(lines)} captions")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2])
