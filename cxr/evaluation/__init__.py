"""Judging a trained model: metrics, stress shifts, the out-of-distribution gate, Grad-CAM, the report."""
