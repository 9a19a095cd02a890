"""Copy a data folder (the layout of ../shared/data) with every image larger than 224 px per side
downscaled to fit 224 x 224 (aspect kept; the vision tower sees 224 px anyway), other files as they are.
Used to make the datasets small enough to send to a GPU machine (docs/RESULTS.md).

    python scripts/downscale_images.py ../shared/data DATA
"""

from __future__ import annotations

import os
import shutil
import sys

from PIL import Image

MAX_SIDE = 224


def downscale_tree(src: str, dst: str) -> int:
    """Mirror `src` into `dst`; returns how many images were downscaled."""
    count = 0
    for root, _, files in os.walk(src):
        out = os.path.join(dst, os.path.relpath(root, src))
        os.makedirs(out, exist_ok=True)
        for name in files:
            source, target = os.path.join(root, name), os.path.join(out, name)
            if name.lower().endswith((".jpg", ".jpeg", ".png")):
                with Image.open(source) as image:
                    if max(image.size) > MAX_SIDE:
                        image.thumbnail((MAX_SIDE, MAX_SIDE), Image.BICUBIC)
                        jpeg = name.lower().endswith((".jpg", ".jpeg"))
                        image.save(target, **({"quality": 95} if jpeg else {}))
                        count += 1
                        continue
            shutil.copy2(source, target)
    return count


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    print(f"downscaled {downscale_tree(sys.argv[1], sys.argv[2])} images into {sys.argv[2]}")
