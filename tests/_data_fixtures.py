"""Tiny LVIS / COCO json data sets with real JPEGs (written by cv2) for the data-layer tests."""
import json
import os

import cv2
import numpy as np

# Non-contiguous, unsorted category ids: labels must follow sorted ids (3 -> 1, 7 -> 2, 11 -> 3).
CAT_IDS = [11, 3, 7]
SIZES = [(64, 48), (48, 64), (80, 40), (40, 40)]  # (width, height) per image, cycled


def _write_images(folder, n, seed=0):
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    names = []
    for i in range(n):
        w, h = SIZES[i % len(SIZES)]
        img = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
        img[:, : w // 2] = (0, 0, 255)  # BGR red on the left half: checks BGR -> RGB
        name = f"{i + 1:012d}.jpg"
        assert cv2.imwrite(os.path.join(folder, name), img)
        names.append(name)
    return names


def _annotations(n_images, crowd=False):
    """Two boxes per image (none on the last image); ids 100+."""
    anns, k = [], 100
    for i in range(n_images - 1):
        w, h = SIZES[i % len(SIZES)]
        for j in range(2):
            cat = CAT_IDS[(i + j) % len(CAT_IDS)]
            anns.append({"id": k, "image_id": i + 1, "category_id": cat,
                         "bbox": [2.0 + j, 3.0, w / 2.0, h / 3.0], "area": w * h / 6.0,
                         "iscrowd": 0})
            k += 1
    if crowd:
        anns.append({"id": k, "image_id": 1, "category_id": CAT_IDS[0],
                     "bbox": [0.0, 0.0, 10.0, 10.0], "area": 100.0, "iscrowd": 1})
    return anns


def make_lvis(root, n_images=6, write=True):
    """LVIS v1 layout: image_root/train2017/<name>, images carry coco_url only."""
    root = str(root)
    os.makedirs(root, exist_ok=True)
    names = _write_images(os.path.join(root, "train2017"), n_images) if write else [
        f"{i + 1:012d}.jpg" for i in range(n_images)]
    images = [{"id": i + 1, "width": SIZES[i % 4][0], "height": SIZES[i % 4][1],
               "coco_url": f"http://images.cocodataset.org/train2017/{names[i]}",
               "neg_category_ids": [CAT_IDS[2]], "not_exhaustive_category_ids": []}
              for i in range(n_images)]
    cats = [{"id": c, "name": f"class_{c}", "frequency": "r", "synset": f"s{c}",
             "image_count": 0, "instance_count": 0} for c in CAT_IDS]
    data = {"images": images, "annotations": _annotations(n_images), "categories": cats,
            "info": {}, "licenses": []}
    path = os.path.join(root, "lvis_train.json")
    with open(path, "w") as f:
        json.dump(data, f)
    return path, root, data


def make_coco(root, n_images=6, write=True):
    """COCO layout: image_root/<file_name>, one crowd annotation on image 1."""
    root = str(root)
    os.makedirs(root, exist_ok=True)
    img_dir = os.path.join(root, "images")
    names = _write_images(img_dir, n_images) if write else [f"{i + 1:012d}.jpg"
                                                             for i in range(n_images)]
    images = [{"id": i + 1, "width": SIZES[i % 4][0], "height": SIZES[i % 4][1],
               "file_name": names[i]} for i in range(n_images)]
    cats = [{"id": c, "name": f"class_{c}", "supercategory": "x"} for c in CAT_IDS]
    data = {"images": images, "annotations": _annotations(n_images, crowd=True),
            "categories": cats}
    path = os.path.join(root, "coco_train.json")
    with open(path, "w") as f:
        json.dump(data, f)
    return path, img_dir, data
