"""Build a second labelled 28x28 greyscale image set offline: letters A-J rendered from the
system's fonts (the notMNIST idea), as PNG folders `OUT/{train,test}/<letter>/*.png`.

Fashion-MNIST is the only labelled image set this machine has; recipes tuned on it alone could fit
clothes. This set differs in kind (strokes, not silhouettes; fonts from geometric sans to script),
and has the hidden check set's shape (9k train / 1k test PNG folders, sub-folders = classes), so
every recipe choice in bench/RESULTS.md is confirmed on both.

    apt-get install fonts-urw-base35 fonts-liberation2 fonts-freefont-ttf fonts-noto-core \
        fonts-crosextra-carlito fonts-crosextra-caladea fonts-cantarell fonts-texgyre \
        fonts-ebgaramond fonts-linuxlibertine fonts-roboto fonts-comic-neue fonts-dejavu-extra \
        fonts-open-sans fonts-lato fonts-inconsolata
    python bench/make_glyphs.py /tmp/glyphs --train 9000 --test 1000

Each image: a random font (fonts are split between train and test, so test letters come from
typefaces never seen in training), size, sub-pixel position, rotation (+-12 deg), shear, and stroke
weight (dilate/erode); seeded, so the same command gives the same files.
"""

from __future__ import annotations

import argparse
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

CLASSES = "ABCDEFGHIJ"
SKIP = ("symbol", "dingbat", "awesome", "math", "emoji", "music", "ornament", "d050000l", "standardsymbols")


def system_fonts(classes: str = CLASSES) -> list[str]:
    out = subprocess.run(["fc-list", "--format", "%{file}\n"], capture_output=True, text=True, check=True)
    files = sorted(
        {f for f in out.stdout.splitlines() if f.lower().endswith((".ttf", ".otf", ".t1", ".pfb"))}
    )
    return [f for f in files if not any(s in f.lower() for s in SKIP) and _renders_letters(f, classes)]


def _renders_letters(path: str, classes: str = CLASSES) -> bool:
    """A font whose glyphs of `classes` are distinct and non-empty (drops fonts that map them to boxes)."""
    try:
        font = ImageFont.truetype(path, 20)
    except OSError:
        return False
    shapes = set()
    for letter in classes:
        image = Image.new("L", (28, 28))
        ImageDraw.Draw(image).text((14, 14), letter, fill=255, font=font, anchor="mm")
        pixels = np.asarray(image)
        if pixels.sum() < 255 * 10:
            return False
        shapes.add(pixels.tobytes())
    return len(shapes) == len(classes)


def render(letter: str, font_path: str, rng: random.Random) -> Image.Image:
    big = 112  # draw at 4x, transform, then downsample with antialiasing (like MNIST's own pipeline)
    font = ImageFont.truetype(font_path, int(big * rng.uniform(0.55, 0.8)))
    image = Image.new("L", (big, big))
    ImageDraw.Draw(image).text((big / 2, big / 2), letter, fill=255, font=font, anchor="mm")
    weight = rng.choice((None, None, "thin", "bold"))
    if weight == "bold":
        image = image.filter(ImageFilter.MaxFilter(5))
    elif weight == "thin":
        image = image.filter(ImageFilter.MinFilter(3))
    shear = rng.uniform(-0.2, 0.2)
    image = image.transform(
        image.size, Image.Transform.AFFINE, (1, shear, -shear * big / 2, 0, 1, 0), Image.BILINEAR
    )
    image = image.rotate(rng.uniform(-12, 12), resample=Image.BILINEAR)
    box = image.getbbox()
    if box is not None:  # centre of mass jitter instead of exact centring
        dx = big / 2 - (box[0] + box[2]) / 2 + rng.uniform(-8, 8)
        dy = big / 2 - (box[1] + box[3]) / 2 + rng.uniform(-8, 8)
        image = image.transform(image.size, Image.Transform.AFFINE, (1, 0, -dx, 0, 1, -dy), Image.BILINEAR)
    return image.resize((28, 28), Image.LANCZOS)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--train", type=int, default=9000)
    parser.add_argument("--test", type=int, default=1000)
    parser.add_argument(
        "--test-fonts", type=float, default=0.2, help="fraction of fonts kept for the test split"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--classes", default=CLASSES, help="the characters, one class each (e.g. 0123456789: a digits set)"
    )
    args = parser.parse_args(argv)
    fonts = system_fonts(args.classes)
    if len(fonts) < 10:
        print(
            f"error: only {len(fonts)} usable fonts; install the packages in this script's docstring",
            file=sys.stderr,
        )
        return 1
    rng = random.Random(args.seed)
    rng.shuffle(fonts)
    n_test = max(2, int(len(fonts) * args.test_fonts))
    splits = {"test": (fonts[:n_test], args.test), "train": (fonts[n_test:], args.train)}
    for split, (split_fonts, count) in splits.items():
        for i in range(count):
            letter = args.classes[i % len(args.classes)]
            folder = args.out / split / letter
            folder.mkdir(parents=True, exist_ok=True)
            render(letter, rng.choice(split_fonts), rng).save(folder / f"{i:05d}.png")
    print(
        f"{len(fonts)} fonts ({n_test} test-only); {args.train} train + {args.test} test images in {args.out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
