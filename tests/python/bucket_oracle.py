"""Oracle for aspect-ratio bucketing: musubi-tuner's BucketSelector, transcribed.

Source: kohya-ss/musubi-tuner @ 30c658c, src/musubi_tuner/dataset/bucket.py
(`BucketSelector.__init__`, `BucketSelector.get_bucket_resolution`) and
src/musubi_tuner/dataset/media_utils.py (`divisible_by`). The class body below is a straight
copy of musubi-tuner's (only the architecture -> reso_steps lookup is replaced by the step
itself, 16 for every image architecture but HiDream-O1's 32); nothing here comes from the
likeness code.

Also musubi-tuner's `resize_image_to_bucket` (src/musubi_tuner/dataset/media_utils.py), copied:
resize to cover the bucket (PIL LANCZOS when enlarging, cv2 INTER_AREA when shrinking), then
a centre crop.

Usage:
  bucket_oracle.py --resize IN.png --bucket W H --out OUT.png   musubi-tuner's resize of IN
  bucket_oracle.py --table                      print a table of selections (for the unit test)
  bucket_oracle.py --spec SPEC.json --out OUT   SPEC: {"cases": [{"resolution": [w, h],
        "enable_bucket": b, "no_upscale": b, "reso_steps": 16, "images": [[w, h], ...]}]}
        OUT: {"cases": [{"buckets": [[w, h], ...], "selected": [[w, h], ...]}]}
"""

import argparse
import json
import math

import numpy as np


def divisible_by(num: int, divisor: int) -> int:
    return num - num % divisor


class BucketSelector:
    def __init__(self, resolution, enable_bucket=True, no_upscale=False, reso_steps=16):
        self.resolution = resolution
        self.bucket_area = resolution[0] * resolution[1]
        self.reso_steps = reso_steps

        if not enable_bucket:
            # only define one bucket
            self.bucket_resolutions = [resolution]
            self.no_upscale = False
        else:
            # prepare bucket resolution
            self.no_upscale = no_upscale
            sqrt_size = int(math.sqrt(self.bucket_area))
            min_size = divisible_by(sqrt_size // 2, self.reso_steps)
            self.bucket_resolutions = []
            for w in range(min_size, sqrt_size + self.reso_steps, self.reso_steps):
                h = divisible_by(self.bucket_area // w, self.reso_steps)
                self.bucket_resolutions.append((w, h))
                self.bucket_resolutions.append((h, w))

            self.bucket_resolutions = list(set(self.bucket_resolutions))
            self.bucket_resolutions.sort()

        # calculate aspect ratio to find the nearest resolution
        self.aspect_ratios = np.array([w / h for w, h in self.bucket_resolutions])

    def get_bucket_resolution(self, image_size):
        """
        return the bucket resolution for the given image size, (width, height)
        """
        area = image_size[0] * image_size[1]
        if self.no_upscale and area <= self.bucket_area:
            w, h = image_size
            w = divisible_by(w, self.reso_steps)
            h = divisible_by(h, self.reso_steps)
            return w, h

        aspect_ratio = image_size[0] / image_size[1]
        ar_errors = self.aspect_ratios - aspect_ratio
        bucket_id = np.abs(ar_errors).argmin()
        return self.bucket_resolutions[bucket_id]


def resize_image_to_bucket(image, bucket_reso):
    """
    Resize the image to the bucket resolution.

    bucket_reso: **(width, height)**
    """
    import cv2
    from PIL import Image

    is_pil_image = isinstance(image, Image.Image)
    if is_pil_image:
        image_width, image_height = image.size
    else:
        image_height, image_width = image.shape[:2]

    if bucket_reso == (image_width, image_height):
        return np.array(image) if is_pil_image else image

    bucket_width, bucket_height = bucket_reso

    # resize the image to the bucket resolution to match the short side
    scale_width = bucket_width / image_width
    scale_height = bucket_height / image_height
    scale = max(scale_width, scale_height)
    image_width = int(image_width * scale + 0.5)
    image_height = int(image_height * scale + 0.5)

    if scale > 1:
        image = Image.fromarray(image) if not is_pil_image else image
        image = image.resize((image_width, image_height), Image.LANCZOS)
        image = np.array(image)
    else:
        image = np.array(image) if is_pil_image else image
        image = cv2.resize(image, (image_width, image_height), interpolation=cv2.INTER_AREA)

    # crop the image to the bucket resolution
    crop_left = (image_width - bucket_width) // 2
    crop_top = (image_height - bucket_height) // 2
    image = image[crop_top : crop_top + bucket_height, crop_left : crop_left + bucket_width]
    return image


TABLE = [
    ((960, 544), False, [(1920, 1080), (1080, 1920), (1000, 1000), (640, 480), (300, 2000), (4000, 3000), (123, 457)]),
    ((1024, 1024), False, [(1024, 1024), (1920, 1080), (512, 768), (3000, 1000)]),
    ((1024, 1024), True, [(500, 333), (2000, 1500)]),
    ((512, 512), False, [(37, 91)]),
    ((64, 64), False, [(100, 70)]),
]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--table", action="store_true")
    ap.add_argument("--spec")
    ap.add_argument("--out")
    ap.add_argument("--resize")
    ap.add_argument("--bucket", nargs=2, type=int)
    a = ap.parse_args()
    if a.resize:
        from PIL import Image

        img = Image.open(a.resize).convert("RGB")  # musubi-tuner keeps RGB images as opened
        out = resize_image_to_bucket(img, tuple(a.bucket))
        Image.fromarray(out).save(a.out)
        return
    if a.table:
        for reso, no_up, images in TABLE:
            s = BucketSelector(reso, True, no_up, 16)
            print(f"resolution {reso} no_upscale={no_up}: {len(s.bucket_resolutions)} buckets, "
                  f"first {s.bucket_resolutions[0]}, last {s.bucket_resolutions[-1]}")
            if len(s.bucket_resolutions) <= 8:
                print(f"  buckets {s.bucket_resolutions}")
            for im in images:
                print(f"  {im} -> {tuple(int(v) for v in s.get_bucket_resolution(im))}")
        return
    spec = json.load(open(a.spec))
    out = []
    for c in spec["cases"]:
        s = BucketSelector(tuple(c["resolution"]), c["enable_bucket"], c["no_upscale"], c.get("reso_steps", 16))
        out.append({
            "buckets": [[int(w), int(h)] for w, h in s.bucket_resolutions],
            "selected": [[int(v) for v in s.get_bucket_resolution(tuple(im))] for im in c["images"]],
        })
    with open(a.out, "w") as f:
        json.dump({"cases": out}, f)


if __name__ == "__main__":
    main()
