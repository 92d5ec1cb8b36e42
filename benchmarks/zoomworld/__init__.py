"""ZoomWorld: a synthetic zoom task with ground truth for every region (see generator.py)."""
from .generator import COLOURS, Plate, Sample, make_sample, make_scene, split, train_stream
from .scoring import box_hit, exact_match, normalize, score

__all__ = ["COLOURS", "Plate", "Sample", "box_hit", "exact_match", "make_sample", "make_scene", "normalize", "score",
           "split", "train_stream"]
