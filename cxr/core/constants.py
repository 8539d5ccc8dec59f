"""Names every module agrees on: classes, splits and resize modes (said once, here)."""

from __future__ import annotations

# Class folders of the archive; index = label (0 normal, 1 pneumonia = the positive class).
CLASSES = ("NORMAL", "PNEUMONIA")
NEGATIVE, POSITIVE = CLASSES
# Folders of the official split, and our splits after `split` carved validation out of train.
OFFICIAL_SPLITS = ("train", "test")
SPLITS = ("train", "val", "test")
# squash: stretch to a square (the seed's); pad: keep the aspect ratio, black borders.
RESIZE_MODES = ("squash", "pad")
# Labels `cxr predict` gives besides the classes: not a pediatric frontal chest X-ray (cxr.evaluation.gate's
# gate), and too close to the threshold to answer (inside the refer band: refer to a radiologist).
OUT_OF_DISTRIBUTION = "OUT_OF_DISTRIBUTION"
UNCERTAIN = "UNCERTAIN"
# Name of the averaging layer of a test-time-augmentation model (cxr.model.robust.tta_model); Grad-CAM
# explains such a model through its identity view.
TTA_OUTPUT = "tta_mean"
