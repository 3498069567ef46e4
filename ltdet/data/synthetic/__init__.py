"""A small long-tailed detection data set in LVIS v1 format, generated from a seed.

Why it exists: a new user (and the test suite) must be able to run the whole pipeline - train,
evaluate, split AP by frequency group - on a laptop CPU in minutes, without downloading LVIS.

What it is. Each class is a (shape, colour, texture) triple, e.g. ``red_striped_star``: shapes
that a small detector can tell apart (circle, square, triangle, star, cross, ring, ...), eight
saturated colours, four textures (solid, stripes, dots, checker). Objects of several classes
are drawn on cluttered backgrounds (colour gradients, random lines, muted irregular blobs that
belong to no class, pixel noise), at varied scales and rotations, partially occluding each other.

The long tail. Class ``k`` (rank 1 = most frequent) appears on
``image_count_k = max(1, round(max_images_per_class * k ** -zipf_exponent))`` training images
(Zipf's law in the rank), so with the defaults the LVIS frequency groups all exist
(r: 1-10 training images, c: 11-100, f: > 100; Gupta et al., CVPR 2019, sec. 3). The
validation split is balanced instead: every class has ``val_instances_per_class`` instances,
so AP on a rare class is measured on as many boxes as on a frequent one.

LVIS annotation fields. ``categories`` carry ``frequency``, ``image_count`` and
``instance_count`` counted on the *training* split (identical in both jsons, as in LVIS v1).
Every image lists ``neg_category_ids`` (a random subset of the classes absent from it: verified
absent) and ``not_exhaustive_category_ids``: with probability ``not_exhaustive_prob`` an
(image, class) pair gets one more instance drawn but not annotated, and the class is listed
there - exactly LVIS's meaning of the flag. Boxes are ``xywh`` tight boxes of the whole (amodal)
shape; ``segmentation`` the outer contour of the shape's pixels; ``area`` their count.

Layout under ``root``::

    train.json, val.json, images/train/000001.jpg, images/val/001201.jpg, .synthetic_complete.json

Generation is deterministic: the class table and the per-split layout come from one seeded
generator, each image is drawn from its own generator seeded by ``(seed, image id)``; JPEGs are
written by OpenCV. ``make_synthetic_lvis`` is idempotent: a marker written last records the
parameters, and a second call with the same parameters returns at once.

Modules: ``shapes`` (the class vocabulary and unit outlines), ``layout`` (class table, Zipf
counts, which labels go on which image), ``drawing`` (one image and its annotations),
``writer`` (parameters, json records, files, the marker).
"""

from .layout import zipf_image_counts
from .shapes import COLORS, SHAPES, TEXTURES
from .writer import FORMAT_VERSION, MARKER_NAME, make_synthetic_lvis

__all__ = [
    "COLORS",
    "FORMAT_VERSION",
    "MARKER_NAME",
    "SHAPES",
    "TEXTURES",
    "make_synthetic_lvis",
    "zipf_image_counts",
]
