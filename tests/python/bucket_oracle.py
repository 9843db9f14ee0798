"""Oracle for aspect-ratio bucketing: musubi-tuner's BucketSelector, transcribed.

Source: kohya-ss/musubi-tuner @ 30c658c, src/musubi_tuner/dataset/bucket.py
(`BucketSelector.__init__`, `BucketSelector.get_bucket_resolution`) and
src/musubi_tuner/dataset/media_utils.py (`divisible_by`). The class body below is a straight
copy of musubi-tuner's (only the architecture -> reso_steps lookup is replaced by the step
itself, 16 for every image architecture but HiDream-O1's 32); nothing here comes from the
likeness code.

Also `BucketSelector.calculate_bucket_resolution` (bucket.py:123-165, the size of a control image
under a dataset's `control_resolution`), copied with the same lookup replaced by the step, and
musubi-tuner's control sizing of image_video_dataset.py:448-479 (`control_size` below, written
out from that code; musubi-tuner is not pip-installed here, so these lines are its own, re-typed).

Also musubi-tuner's `resize_image_to_bucket` (src/musubi_tuner/dataset/media_utils.py), copied:
resize to cover the bucket (PIL LANCZOS when enlarging, cv2 INTER_AREA when shrinking), then
a centre crop.

Usage:
  bucket_oracle.py --resize IN.png --bucket W H --out OUT.png   musubi-tuner's resize of IN
  bucket_oracle.py --table                      print a table of selections (for the unit test)
  bucket_oracle.py --spec SPEC.json --out OUT   SPEC: {"cases": [{"resolution": [w, h],
        "enable_bucket": b, "no_upscale": b, "reso_steps": 16, "images": [[w, h], ...]}],
        "controls": [{"size": [w, h], "bucket": [w, h], "control_resolution": [w, h] | null,
        "no_resize_control": b}]}
        OUT: {"cases": [{"buckets": [[w, h], ...], "selected": [[w, h], ...]}],
              "controls": [[w, h], ...]}   (the size each control is resized to)
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


def calculate_bucket_resolution(image_size, resolution, reso_steps=16):
    """
    Get the bucket resolution for the given image size, resolution and resolution steps.
    Return (width, height).
    """
    max_area = resolution[0] * resolution[1]
    width, height = image_size
    aspect_ratio = width / height
    bucket_width = int(math.sqrt(max_area * aspect_ratio))
    bucket_height = int(math.sqrt(max_area / aspect_ratio))
    bucket_width = divisible_by(bucket_width, reso_steps)
    bucket_height = divisible_by(bucket_height, reso_steps)

    # find appropriate resolutions
    best_resolution = None
    best_aspect_ratio_diff = float("inf")
    for i in range(-2, 3):
        w = bucket_width + i * reso_steps
        h = divisible_by(max_area // w, reso_steps)
        current_aspect_ratio_diff = abs((w / h) - aspect_ratio)
        if current_aspect_ratio_diff < best_aspect_ratio_diff:
            best_aspect_ratio_diff = current_aspect_ratio_diff
            best_resolution = (w, h)

    if best_resolution is not None:
        return best_resolution

    return bucket_width, bucket_height


def control_size(size, bucket_reso, control_resolution, no_resize_control, reso_steps=16):
    """The (width, height) musubi-tuner resizes one control image of `size` to
    (image_video_dataset.py:448-479, `fetch_and_resize`)."""
    if no_resize_control:
        width, height = size
        if control_resolution is not None:
            # use control resolution as maximum
            max_width, max_height = control_resolution
            if width * height > max_width * max_height:
                width, height = calculate_bucket_resolution(size, control_resolution, reso_steps)
        else:
            width = width - (width % reso_steps)
            height = height - (height % reso_steps)
        return width, height
    if control_resolution is not None:
        return calculate_bucket_resolution(size, control_resolution, reso_steps)
    return tuple(bucket_reso)


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

# (image size, control_resolution) for calculate_bucket_resolution at step 16.
CONTROL_TABLE = [
    ((1000, 700), (1024, 1024)),
    ((500, 500), (1024, 1024)),
    ((400, 800), (1024, 1024)),
    ((1920, 1080), (1024, 1024)),
    ((123, 457), (512, 512)),
    ((3000, 1000), (768, 768)),
    ((1000, 700), (960, 544)),
    ((64, 64), (64, 64)),
    ((4000, 100), (512, 512)),
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
        print("calculate_bucket_resolution(image, control_resolution), step 16:")
        for im, reso in CONTROL_TABLE:
            print(f"  {im}, {reso} -> {calculate_bucket_resolution(im, reso, 16)}")
        return
    spec = json.load(open(a.spec))
    out = []
    for c in spec["cases"]:
        s = BucketSelector(tuple(c["resolution"]), c["enable_bucket"], c["no_upscale"], c.get("reso_steps", 16))
        out.append({
            "buckets": [[int(w), int(h)] for w, h in s.bucket_resolutions],
            "selected": [[int(v) for v in s.get_bucket_resolution(tuple(im))] for im in c["images"]],
        })
    controls = [
        [int(v) for v in control_size(tuple(c["size"]), tuple(c["bucket"]),
                                      tuple(c["control_resolution"]) if c.get("control_resolution") else None,
                                      c.get("no_resize_control", False), c.get("reso_steps", 16))]
        for c in spec.get("controls", [])
    ]
    with open(a.out, "w") as f:
        json.dump({"cases": out, "controls": controls}, f)


if __name__ == "__main__":
    main()
