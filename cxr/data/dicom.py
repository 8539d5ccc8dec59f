"""DICOM → the image `cxr.data.images.open_image` gives for any other file; no patient data leaves.

    python -m cxr.data.images FILE.dcm SIZE     # DICOM goes through the one image path like a PNG

`cxr.data.images.open_image` hands a file here when it has the 'DICM' marker (or a .dcm name). A
single-frame CR or DX image becomes 8-bit grayscale the way a radiology viewer shows it: the
Modality LUT (rescale slope/intercept or a LUT), then the first VOI LUT or window
(centre/width; LINEAR, LINEAR_EXACT or SIGMOID) scaled from its output range to 0–255, and
MONOCHROME1 inverted. With no VOI in the file an 8-bit image is used as stored (like an 8-bit
PNG) and a wider one is stretched over its own range (like a 16-bit PNG). RGB and YBR images
become RGB and then gray through `to_grayscale`, as a colour PNG does. Compressed pixel data
decodes through pydicom's plugins (RLE built in; JPEG baseline and JPEG 2000 via Pillow; JPEG
lossless, JPEG-LS and HTJ2K need pylibjpeg or gdcm).

Privacy: a DICOM header holds names, IDs, birth dates. Every message raised here names the file
path and at most the SOP Instance UID (checked to be a well-formed UID), never a header value;
pydicom's own exceptions, warnings and log lines (which can quote values) are replaced or
silenced, so nothing from the header reaches stdout, stderr or an output file.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import BinaryIO

import numpy as np
import pydicom
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_modality_lut, apply_windowing, get_decoder
from pydicom.pixels.decoders.base import Decoder
from pydicom.uid import UID

from cxr.data.pixels import ImageError, check_pixels, scale_to_uint8

# Chest radiographs: Computed and Digital Radiography. Anything else (CT, MR, secondary
# capture 'OT' of unknown origin, ...) is refused: the model has never seen it.
MODALITIES = ("CR", "DX")
MONOCHROME = ("MONOCHROME1", "MONOCHROME2")
COLOUR = ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT")  # pydicom hands all as RGB
KNOWN_PHOTOMETRIC = frozenset(
    ("PALETTE COLOR", "HSV", "ARGB", "CMYK", "YBR_PARTIAL_422", "YBR_PARTIAL_420")
)  # refused, named
# DICOM's defined Modality terms (PS3.3 C.7.3.1.1.1): only these are ever quoted in a message
# (the photometric terms likewise), so a header holding something else there cannot leak it.
KNOWN_MODALITIES = frozenset(
    "ANN AR ASMT AU BDUS BI BMD CFM CT CTPROTOCOL DMS DOC ECG EEG EMG EOG EPS ES FID GM HC HD IO IOL IVOCT IVUS KER KO "
    "LEN LS MG MR M3D NM OAM OCT OP OPM OPT OPTBSV OPTENF OPV OSS OT PA PLAN POS PR PT PX REG RESP RF RG RTDOSE "
    "RTIMAGE RTINTENT RTPLAN RTRAD RTRECORD RTSEGANN RTSTRUCT RWV SC SEG SM SMR SR SRF STAIN TEXTUREMAP TG US VA XA "
    "XAPROTOCOL XC".split()
)

# Never validate (a failed check warns with the value) and never pass pydicom's log lines on.
pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
logging.getLogger("pydicom").propagate = False


def read_dicom(f: BinaryIO, path: Path) -> Image.Image:
    """One open DICOM file → an 'L' (grayscale) or 'RGB' image; `ImageError` naming only the path
    (and SOP Instance UID) for anything else."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            ds = pydicom.dcmread(f)
        except InvalidDicomError:
            raise ImageError(f"{path}: not a DICOM file (no 'DICM' marker at byte 128)") from None
        except Exception as exc:  # pydicom's messages can quote header values: name the kind only
            raise ImageError(
                f"{path}: cannot read the DICOM header ({type(exc).__name__}); the file is damaged or not DICOM"
            ) from None
        where = f"{path}{uid_note(ds)}"
        try:
            check_usable(ds, where)
            arr = ds.pixel_array
            return to_image(arr, ds)
        except ImageError:
            raise
        except Exception as exc:
            raise ImageError(
                f"{where}: cannot decode the DICOM pixel data ({type(exc).__name__}); the file is damaged or unusual"
            ) from None


def uid_note(ds: Dataset) -> str:
    """' (SOP Instance UID …)' when the file has a well-formed one (digits and dots only), else ''."""
    uid = ds.get("SOPInstanceUID") or ds.get("file_meta", Dataset()).get("MediaStorageSOPInstanceUID")
    return f" (SOP Instance UID {uid})" if isinstance(uid, str) and UID(uid).is_valid else ""


def check_usable(ds: Dataset, where: str) -> None:
    """Refuse, before decoding, what is not one CR/DX image with 8–16-bit pixels decodable here."""
    if "PixelData" not in ds:
        sop = UID(str(ds.get("SOPClassUID", "")))
        kind = f" ({sop.name})" if sop.is_valid and sop.name != str(sop) else ""
        raise ImageError(f"{where}: not an image{kind}; cxr reads single-frame CR and DX radiographs")
    modality = str(ds.get("Modality", "")).strip()
    if modality not in MODALITIES:
        what = (
            f"modality {modality}"
            if modality in KNOWN_MODALITIES
            else "no Modality"
            if not modality
            else "an unknown modality"
        )
        raise ImageError(f"{where}: {what} is not a chest radiograph; cxr reads {' and '.join(MODALITIES)} only")
    frames = int(ds.get("NumberOfFrames") or 1)
    if frames > 1:
        raise ImageError(f"{where}: {frames} frames; cxr reads single-frame images only (export the frame you want)")
    photometric = str(ds.get("PhotometricInterpretation", ""))
    if photometric not in MONOCHROME + COLOUR:
        what = photometric if photometric in KNOWN_PHOTOMETRIC else "missing" if not photometric else "unknown"
        raise ImageError(
            f"{where}: photometric interpretation {what} is not supported; use {', '.join(MONOCHROME)} or RGB"
        )
    bits = ds.get("BitsAllocated")
    if bits not in (8, 16) or (photometric in COLOUR and bits != 8):
        raise ImageError(f"{where}: {bits}-bit pixels are not supported; cxr reads 8 to 16 bits (colour: 8)")
    check_pixels(where, int(ds.get("Columns") or 0), int(ds.get("Rows") or 0))
    syntax = ds.file_meta.get("TransferSyntaxUID")
    if syntax is None:
        raise ImageError(f"{where}: no Transfer Syntax UID in the file meta information; the file is damaged")
    try:
        decoder = get_decoder(syntax)
    except NotImplementedError:
        named = f" {syntax}" if UID(syntax).is_valid else ""
        raise ImageError(
            f"{where}: transfer syntax{named} is not one pydicom decodes; convert the file to an uncompressed one"
        ) from None
    if not decoder.is_available:
        raise ImageError(
            f"{where}: pixel data compressed as {syntax.name} ({syntax}) "
            f"needs a decoder that is not installed; {install_hint(decoder)}"
        )


def install_hint(decoder: Decoder) -> str:
    """'pip install …' for the pylibjpeg plugin that decodes it (else the other options pydicom names)."""
    needs = decoder.missing_dependencies  # e.g. 'pylibjpeg - requires pylibjpeg>=2.0 and pylibjpeg-libjpeg>=2.1'
    pylibjpeg = [n.split(" requires ", 1)[1] for n in needs if n.startswith("pylibjpeg") and " requires " in n]
    if pylibjpeg:
        return "pip install " + " ".join(f"'{p}'" for p in pylibjpeg[0].split(" and "))
    return "install one of: " + "; ".join(needs)


def apply_lut(values: np.ndarray, item: Dataset, ds: Dataset) -> tuple[np.ndarray, int, int]:
    """A VOI LUT (PS3.3 C.11.2.1.1) → (its output, 0, its largest output value).

    Not pydicom's `apply_voi`: in 3.0.2 it indexes through an array of the LUT's output type, so
    an 8-bit LUT with more than 256 entries (common: 4096 × 8 bit) wraps its input around.
    """
    entries, first, bits = (int(v) for v in item.LUTDescriptor)
    data = item.LUTData
    if isinstance(data, bytes):  # OW: 16-bit words in the file's byte order
        table = np.frombuffer(data, "<u2" if ds.file_meta.TransferSyntaxUID.is_little_endian else ">u2")
    else:
        table = np.atleast_1d(np.asarray(data))  # US: the values (one value reads as a plain int)
    index = np.clip(np.rint(values) - first, 0, (entries or 65536) - 1).astype(np.int64)
    return table[index], 0, 2**bits - 1


def to_image(arr: np.ndarray, ds: Dataset) -> Image.Image:
    """Decoded pixels → 'RGB' (colour) or 'L': Modality LUT, VOI LUT or window, MONOCHROME1 inverted."""
    if ds.PhotometricInterpretation in COLOUR:
        return Image.fromarray(np.ascontiguousarray(arr, np.uint8), mode="RGB")
    values = apply_modality_lut(arr, ds)
    voi_lut = ds.VOILUTSequence[0] if ds.get("VOILUTSequence") else Dataset()
    if "LUTDescriptor" in voi_lut and "LUTData" in voi_lut:
        gray = scale_to_uint8(*apply_lut(values, voi_lut, ds))
    elif "WindowCenter" in ds and "WindowWidth" in ds:
        # The window's output range (pydicom's, from the stored bits and rescale) is where it sends −∞ and +∞.
        lo, hi = apply_windowing(np.array([-np.inf, np.inf]), ds)
        gray = scale_to_uint8(apply_windowing(values, ds), lo, hi)
    elif int(ds.BitsStored) <= 8 and values.min() >= 0 and values.max() <= 255:
        gray = scale_to_uint8(values, 0, 255)  # already 8-bit: as stored, like an 8-bit PNG
    else:
        gray = scale_to_uint8(values, float(values.min()), float(values.max()))  # like a 16-bit PNG
    if ds.PhotometricInterpretation == "MONOCHROME1":  # 0 is white
        gray = 255 - gray
    return Image.fromarray(gray, mode="L")
