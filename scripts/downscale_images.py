"""Copy a data folder (the layout of ../shared/data) with every image larger than MAX_SIDE px per
side downscaled to fit MAX_SIDE x MAX_SIDE (aspect kept; default 224, the size nano's tower sees;
448 for `vision.image_size=448`), other files as they are. Used to make the datasets small enough
to send to a GPU machine (docs/RESULTS.md).

    python scripts/downscale_images.py ../shared/data DATA [MAX_SIDE]
"""

from __future__ import annotations

import os
import shutil
import sys

from PIL import Image

def downscale_tree(src: str, dst: str, max_side: int = 224) -> int:
    """Mirror `src` into `dst`; returns how many images were downscaled."""
    count = 0
    for root, _, files in os.walk(src):
        out = os.path.join(dst, os.path.relpath(root, src))
        os.makedirs(out, exist_ok=True)
        for name in files:
            source, target = os.path.join(root, name), os.path.join(out, name)
            if name.lower().endswith((".jpg", ".jpeg", ".png")):
                with Image.open(source) as image:
                    if max(image.size) > max_side:
                        image.thumbnail((max_side, max_side), Image.BICUBIC)
                        jpeg = name.lower().endswith((".jpg", ".jpeg"))
                        image.save(target, **({"quality": 95} if jpeg else {}))
                        count += 1
                        continue
            shutil.copy2(source, target)
    return count


if __name__ == "__main__":
    if len(sys.argv) not in (3, 4):
        sys.exit(__doc__)
    side = int(sys.argv[3]) if len(sys.argv) == 4 else 224
    print(f"downscaled {downscale_tree(sys.argv[1], sys.argv[2], side)} images into {sys.argv[2]} (at most {side} px)")
