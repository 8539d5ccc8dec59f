"""Stage `export@<variant>`: the model on LiteRT, for `cxr predict` and `cxr serve` without TensorFlow.

    python stages/export.py VARIANT     # (dvc repro export@VARIANT) → models/VARIANT.tflite, .tflite.json,
                                        #   metrics/VARIANT_export.json

The exported model gives the probability and the OOD gate's features in one pass (cxr.serving.export);
the threshold, size and resize mode stay in the sidecar, the gate and refer band in
models/VARIANT.ood.npz, both read by the runtime as by Keras. Parity is checked on every
validation and test image before anything is written: probabilities within `export.tolerance` (1e-4) of Keras and
the same class at the threshold (a probability within the tolerance of the threshold may flip:
counted as `borderline_class_flips`); the share of final labels (gate included) that agree is
recorded (no test label is read).
"""

from __future__ import annotations

import numpy as np

from cxr.core import params as cxr_params
from cxr.core import paths
from cxr.core.errors import run_main
from cxr.core.io import write_json
from cxr.core.stage import stage_args
from cxr.data.cache import cache_dir, load_split
from cxr.serving.export import export_litert, write_export
from cxr.serving.inference import load_model


def main() -> int:
    name = stage_args(__doc__, variant="a name under params.yaml variants, or <v>_cv").variant
    params = cxr_params.load()
    params.model_variant(name)
    model_path = paths.model_path(name)
    loaded = load_model(model_path, runtime="keras")
    folder = cache_dir(paths.PROCESSED, loaded.image_size)
    x = np.concatenate([load_split(folder, s).x for s in ("val", "test")])
    blob, record, parity = export_litert(loaded, x, params.export.tolerance)
    write_export(model_path, blob, record)
    write_json(paths.metrics_path(name, "export"), parity)
    print(
        f"export@{name}: {parity['size_mb']} MB, max |dp| "
        f"{parity['max_abs_probability_diff']:.1e} on {parity['n_images']} val+test images, "
        f"final labels (with the gate) agree on {parity['label_agreement']:.1%}"
    )
    return 0


if __name__ == "__main__":
    run_main(main)
