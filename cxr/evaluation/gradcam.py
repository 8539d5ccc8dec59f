"""Grad-CAM heatmaps of a model's last convolution block, and overlays / grids of them.

    cxr predict IMAGE... --gradcam DIR      # writes DIR/<stem>_gradcam.png per image (cxr/serving/cli.py)

Grad-CAM (Selvaraju et al. 2017): weight each channel of the last convolutional feature map by
the mean gradient of the score with respect to it, sum, keep the positive part, upsample to the
input size. The score is P(pneumonia) by default, so the map shows what pushed the model
towards pneumonia (an all-zero map means nothing did); target="normal" explains P(normal).

The target is found automatically, also inside a nested backbone model (the transfer
variants): the model is split into "input → backbone input", the backbone (recursively) and
"backbone output → prediction", and the pieces are run eagerly under one gradient tape.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from cxr.core.constants import TTA_OUTPUT
from cxr.core.errors import CxrError
from cxr.core.io import atomic_path

ALPHA = 0.4  # heatmap weight in overlays: the anatomy must stay readable underneath
TARGETS = ("pneumonia", "normal")
COLORMAP = "jet"

# fn(x float32 (N,S,S,1)) -> (feature map (N,h,w,c), P(pneumonia) (N,1))
ConvAndOutput = Callable[[Any], tuple[Any, Any]]


def _is_model(layer: Any) -> bool:
    import keras

    return isinstance(layer, keras.Model)


def _is_conv(layer: Any) -> bool:
    import keras

    conv = (
        keras.layers.Conv2D,
        keras.layers.DepthwiseConv2D,
        keras.layers.SeparableConv2D,
        keras.layers.Conv2DTranspose,
    )
    return isinstance(layer, conv) or (_is_model(layer) and any(_is_conv(sub) for sub in layer.layers))


def _graph(model: Any) -> Any:
    """The functional graph of `model`: a Sequential keeps it in a private `_functional`."""
    import keras

    graph = getattr(model, "_functional", None) if isinstance(model, keras.Sequential) else model
    if graph is None or not getattr(graph, "inputs", None):
        raise CxrError(f"model '{model.name}' has no defined input; build it on keras.Input(...) first")
    return graph


def _node_tensors(graph: Any, layer: Any) -> tuple[list[Any], list[Any]]:
    """The symbolic tensors into and out of `layer` in `graph`.

    `layer.output` is not enough: a loaded Sequential calls each layer on several graphs, and a
    nested model's `.output` is its own inner tensor. Keras has no public lookup for this.
    """
    in_graph = {id(node) for nodes in graph._nodes_by_depth.values() for node in nodes}
    nodes = [node for node in layer._inbound_nodes if id(node) in in_graph]
    if len(nodes) != 1:
        raise CxrError(
            f"layer '{layer.name}' is called {len(nodes)} times in model '{graph.name}'; Grad-CAM needs it called once"
        )
    return list(nodes[0].input_tensors), list(nodes[0].output_tensors)


def _is_feature_map(tensor: Any) -> bool:
    shape = tuple(tensor.shape)
    return len(shape) == 4 and all(s is None or s > 1 for s in shape[1:3])


def conv_and_output(model: Any) -> ConvAndOutput:
    """A function giving the last convolution block's output and the prediction, for Grad-CAM.

    Raises CxrError for a model without convolutions (the dense variant).
    """
    import keras

    graph = _graph(model)
    layers = list(model.layers)
    for i in range(len(layers) - 1, -1, -1):
        layer = layers[i]
        if not any(_is_conv(earlier) for earlier in layers[: i + 1]):
            break
        inputs, outputs = _node_tensors(graph, layer)
        if len(outputs) != 1:
            continue
        if _is_feature_map(outputs[0]):
            both = keras.Model(graph.inputs, [outputs[0], graph.outputs[0]])
            return lambda x: tuple(both(x, training=False))
        if _is_model(layer) and _is_conv(layer):
            # The backbone pools inside: split the outer model around it and recurse.
            inner = conv_and_output(layer)
            pre = None if inputs[0] is graph.inputs[0] else keras.Model(graph.inputs, inputs[0])
            post = None if outputs[0] is graph.outputs[0] else keras.Model(outputs[0], graph.outputs[0])

            # returned at once, so the loop never rebinds these; defaults make that explicit
            def run(x: Any, pre: Any = pre, inner: Any = inner, post: Any = post) -> tuple[Any, Any]:
                h = x if pre is None else pre(x, training=False)
                conv, out = inner(h)
                return conv, (out if post is None else post(out, training=False))

            return run
    raise CxrError(
        f"model '{model.name}' has no convolution layer; Grad-CAM needs a convolutional variant (not the dense one)"
    )


def explained_model(model: Any) -> Any:
    """The model Grad-CAM explains: a test-time-augmentation model (cxr.model.robust.tta_model) through
    its identity view, the member model (the other views' maps sit in cropped coordinates)."""
    if model.layers and model.layers[-1].name == TTA_OUTPUT:
        return next(layer for layer in model.layers if _is_model(layer))
    return model


class GradCam:
    """Grad-CAM for one model; build once, call per image (the gradient graph is reused)."""

    def __init__(self, model: Any):
        self.model = model
        self._fn = conv_and_output(explained_model(model))

    def __call__(self, x: np.ndarray, target: str = "pneumonia") -> np.ndarray:
        """Heatmap float32 (S, S) in [0, 1] for one image x (1, S, S, 1) or (S, S, 1) of raw pixels.

        target: "pneumonia" (evidence for P(pneumonia)) or "normal" (for 1 - P(pneumonia)).
        """
        import tensorflow as tf

        if target not in TARGETS:
            raise ValueError(f"target must be one of {', '.join(TARGETS)}, got {target!r}")
        x = np.asarray(x)
        if x.ndim == 3:
            x = x[None]
        if x.ndim != 4 or x.shape[0] != 1 or x.shape[-1] != 1:
            raise ValueError(f"expected one image shaped (1, S, S, 1), got {x.shape}")
        xt = tf.convert_to_tensor(x, tf.float32)
        with tf.GradientTape() as tape:
            # Watching the input records every op, frozen backbones included.
            tape.watch(xt)
            conv, out = self._fn(xt)
            p = tf.cast(tf.reshape(out, (-1,))[0], tf.float32)
            score = p if target == "pneumonia" else 1.0 - p
        grads = tape.gradient(score, conv)
        if grads is None:
            raise CxrError(f"model '{self.model.name}': the prediction does not depend on the Grad-CAM feature map")
        conv = tf.cast(conv, tf.float32)[0].numpy().astype(np.float64)
        weights = tf.cast(grads, tf.float32)[0].numpy().astype(np.float64).mean(axis=(0, 1))
        cam = np.maximum(conv @ weights, 0.0)
        return _upsample(cam, x.shape[1], x.shape[2])


def _upsample(cam: np.ndarray, height: int, width: int) -> np.ndarray:
    """Resize bilinearly to the input size and scale to [0, 1] (all zeros if nothing is positive)."""
    img = Image.fromarray(cam.astype(np.float32)).resize((width, height), Image.Resampling.BILINEAR)
    up = np.maximum(np.asarray(img, dtype=np.float32), 0.0)
    peak = float(up.max())
    return (up / peak if peak > 1e-12 else np.zeros_like(up)).astype(np.float32)


def gradcam(model: Any, x: np.ndarray, target: str = "pneumonia") -> np.ndarray:
    """Heatmap (S, S) in [0, 1] for one image (1, S, S, 1); use `GradCam` for many images."""
    return GradCam(model)(x, target)


def overlay(gray_uint8: np.ndarray, heatmap: np.ndarray, alpha: float = ALPHA) -> np.ndarray:
    """Blend a 'jet'-coloured heatmap over a grayscale image → RGB uint8 (S, S, 3)."""
    from matplotlib import colormaps

    gray = np.asarray(gray_uint8)
    if gray.ndim == 3 and gray.shape[-1] == 1:
        gray = gray[..., 0]
    heat = np.asarray(heatmap, dtype=np.float64)
    if gray.ndim != 2 or heat.shape != gray.shape:
        raise ValueError(
            f"expected a grayscale image and a heatmap of the same (S, S) shape, got {gray.shape} and {heat.shape}"
        )
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    colour = colormaps[COLORMAP](np.clip(heat, 0.0, 1.0))[..., :3] * 255.0
    base = np.repeat(gray[..., None].astype(np.float64), 3, axis=-1)
    return np.round((1.0 - alpha) * base + alpha * colour).astype(np.uint8)


def write_overlay(path: Path | str, rgb: np.ndarray) -> None:
    """Save an RGB uint8 overlay as PNG, atomically."""
    with atomic_path(path) as tmp:
        Image.fromarray(np.ascontiguousarray(rgb, dtype=np.uint8)).save(tmp, format="PNG")


def gradcam_grid(
    model: Any,
    images: Sequence[np.ndarray],
    titles: Sequence[str],
    out_png: Path | str,
    ncols: int | None = None,
    targets: Sequence[str] | None = None,
) -> Path:
    """Draw Grad-CAM overlays of `images` (uint8 (S, S, 1) each) in a titled grid; write `out_png`.

    `ncols` defaults to up to 4 per row (e.g. 3 per row, one row per TP/FP/TN/FN outcome).
    `targets` per image: "pneumonia" (default) or "normal", e.g. the predicted class.
    """
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend

    if len(images) == 0:
        raise ValueError("gradcam_grid needs at least one image")
    if len(titles) != len(images):
        raise ValueError(f"got {len(images)} images but {len(titles)} titles")
    targets = ["pneumonia"] * len(images) if targets is None else list(targets)
    if len(targets) != len(images):
        raise ValueError(f"got {len(images)} images but {len(targets)} targets")
    ncols = min(4, len(images)) if ncols is None else ncols
    if ncols <= 0:
        raise ValueError(f"ncols must be positive, got {ncols}")
    nrows = -(-len(images) // ncols)
    cam = GradCam(model)
    fig = Figure(figsize=(2.6 * ncols, 2.8 * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, img, title, target in zip(axes.flat, images, titles, targets):
        img = np.asarray(img)
        ax.imshow(overlay(img, cam(img, target)))
        ax.set_title(title, fontsize=8)
    out_png = Path(out_png)
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    return out_png
