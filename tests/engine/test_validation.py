"""ltdet.engine.validation: model detections to LVIS result records."""

import torch

from ltdet.data import label_to_cat_id_table
from ltdet.engine.validation import to_lvis_results


def test_detections_to_lvis_results():
    lut = label_to_cat_id_table([7, 3, 11])
    assert lut.tolist() == [-1, 7, 3, 11]
    dets = [
        {
            "image_id": 5,
            "boxes": torch.tensor([[10.0, 20.0, 40.0, 60.0], [0.0, 0.0, 1.5, 2.5]]),
            "scores": torch.tensor([0.9, 0.25]),
            "category_ids": lut[torch.tensor([3, 1])],
        },
        {
            "image_id": 6,
            "boxes": torch.zeros(0, 4),
            "scores": torch.zeros(0),
            "category_ids": torch.zeros(0, dtype=torch.long),
        },
    ]
    res = to_lvis_results(dets)
    assert res == [
        {"image_id": 5, "category_id": 11, "bbox": [10.0, 20.0, 30.0, 40.0], "score": 0.9},
        {"image_id": 5, "category_id": 7, "bbox": [0.0, 0.0, 1.5, 2.5], "score": 0.25},
    ]
    assert to_lvis_results([]) == []
