#!/usr/bin/env python3
"""Real photos for `coca bench data`, and the PIL baseline it is compared with.

    scripts/bench_photos.py crops SRC_DIR OUT_DIR [--count 512]
        Cuts web-sized crops (500x375, JPEG quality 90) out of the photos in
        SRC_DIR (e.g. Debian's mate-backgrounds, /usr/share/backgrounds/mate/nature)
        into OUT_DIR/photo/, an imagefolder for `coca data import`.

    scripts/bench_photos.py tars OUT_DIR [--per-tar 64]
        The crops as WebDataset tars in OUT_DIR/tars/ ({key}.jpg and a
        caption {key}.txt per sample, --per-tar samples each), as
        img2dataset writes them: `coca bench data` reads them in place, and
        `coca data import --format webdataset` makes the same samples Arrow.

    scripts/bench_photos.py pil OUT_DIR [--image-size 224] [--seconds 10]
        The per-core rate of open_clip's training transform done with PIL:
        decode, RandomResizedCrop(scale 0.9-1, bicubic), to float, normalise
        (numpy stands in for torch's ToTensor/Normalize), on one process.

Needs Pillow and numpy (pip install pillow numpy).
"""
import argparse
import glob
import math
import os
import random
import time

import numpy as np
from PIL import Image

MEAN = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
STD = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)


def crops(src, out, count):
    photos = sorted(glob.glob(os.path.join(src, "*.jpg")))
    if not photos:
        raise SystemExit(f"{src}: no .jpg photos")
    os.makedirs(os.path.join(out, "photo"), exist_ok=True)
    rng = random.Random(0)
    per_photo = math.ceil(count / len(photos))
    written = 0
    for path in photos:
        image = Image.open(path).convert("RGB")
        for _ in range(per_photo):
            if written == count:
                break
            side = rng.uniform(0.2, 0.6)
            w, h = int(image.width * side), int(image.width * side * 0.75)
            x, y = rng.randrange(0, image.width - w), rng.randrange(0, max(1, image.height - h))
            crop = image.crop((x, y, x + w, y + h)).resize((500, 375), Image.BICUBIC)
            crop.save(os.path.join(out, "photo", f"{written:05}.jpg"), quality=90)
            written += 1
    print(f"{out}/photo: {written} JPEGs")


def tars(out, per_tar):
    import io
    import tarfile

    files = sorted(glob.glob(os.path.join(out, "photo", "*.jpg")))
    os.makedirs(os.path.join(out, "tars"), exist_ok=True)
    count = 0
    for start in range(0, len(files), per_tar):
        with tarfile.open(os.path.join(out, "tars", f"{count:05}.tar"), "w", format=tarfile.USTAR_FORMAT) as tar:
            for path in files[start : start + per_tar]:
                key = os.path.splitext(os.path.basename(path))[0]
                caption = f"a nature photo, crop {key}".encode()
                for name, data in [(f"{key}.jpg", open(path, "rb").read()), (f"{key}.txt", caption)]:
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        count += 1
    print(f"{out}/tars: {count} tars of up to {per_tar} samples ({{00000..{count - 1:05}}}.tar)")


def random_resized_crop(image, size, rng):
    area = image.width * image.height
    for _ in range(10):
        target = area * rng.uniform(0.9, 1.0)
        ratio = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
        w, h = int(round(math.sqrt(target * ratio))), int(round(math.sqrt(target / ratio)))
        if 0 < w <= image.width and 0 < h <= image.height:
            x, y = rng.randint(0, image.width - w), rng.randint(0, image.height - h)
            return image.resize((size, size), Image.BICUBIC, box=(x, y, x + w, y + h))
    return image.resize((size, size), Image.BICUBIC)


def pil(out, size, seconds):
    files = sorted(glob.glob(os.path.join(out, "photo", "*.jpg")))
    data = [open(f, "rb").read() for f in files]
    rng = random.Random(0)
    import io

    done, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        for blob in data:
            image = Image.open(io.BytesIO(blob)).convert("RGB")
            pixels = np.asarray(random_resized_crop(image, size, rng), dtype=np.float32) / 255.0
            _ = ((pixels - MEAN) / STD).transpose(2, 0, 1).copy()
            done += 1
    elapsed = time.perf_counter() - started
    print(f"pil: {done} samples at {size}px in {elapsed:.2f} s: {done / elapsed:.1f} samples/s per core (1 process)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=["crops", "tars", "pil"])
    parser.add_argument("paths", nargs="+")
    parser.add_argument("--count", type=int, default=512)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--per-tar", type=int, default=64)
    args = parser.parse_args()
    if args.mode == "crops":
        crops(args.paths[0], args.paths[1], args.count)
    elif args.mode == "tars":
        tars(args.paths[0], args.per_tar)
    else:
        pil(args.paths[0], args.image_size, args.seconds)
