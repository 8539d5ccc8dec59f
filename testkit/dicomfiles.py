"""Synthetic DICOM files (pydicom) for the tests and the DICOM example in docs/dicom.md.

    python -m testkit.dicomfiles IMAGE OUT.dcm [--phi]   # IMAGE's 8-bit gray pixels as a DX file

`write_dicom` writes one uncompressed file from a numpy array with any header elements given by
keyword; `PHI` is a set of patient identifiers for the privacy tests, chosen so that none of
them occurs in a path, a number or a message by chance.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian, generate_uid

DIGITAL_XRAY = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage - For Presentation

PHI = {
    "PatientName": "Zebulon^Quixotic^Marmaduke",
    "PatientID": "PIDX-731946",
    "PatientBirthDate": "19230817",
    "PatientAddress": "42 Wallaby Way Sydney",
    "OtherPatientIDs": "ALTID-558231",
    "InstitutionName": "Saint Ignatius Kowalczyk Clinic",
    "ReferringPhysicianName": "Drummondville^Hortensia",
    "AccessionNumber": "ACC9988776",
    "StudyDescription": "Xylophonist Zanzibar survey",
    "StudyID": "STUDY-44321",
}


def write_dicom(
    path: Path | str,
    pixels: np.ndarray,
    photometric: str = "MONOCHROME2",
    bits_stored: int | None = None,
    syntax: str = ExplicitVRLittleEndian,
    **elements: Any,
) -> Path:
    """Write `pixels` ((rows, cols), (frames, rows, cols) or (rows, cols, 3); uint8/uint16/int16)
    as a DX file; `elements` (keyword=value) are added or override, None removes one. The SOP
    Instance UID is derived from the path, so a file is the same on every run."""
    path = Path(path)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = syntax
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.SOPClassUID = DIGITAL_XRAY
    ds.Modality = "DX"
    ds.set_pixel_data(pixels, photometric, bits_stored or pixels.dtype.itemsize * 8, generate_instance_uid=False)
    ds.SOPInstanceUID = generate_uid(entropy_srcs=[path.name])
    for keyword, value in elements.items():
        if value is None:
            delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    ds.file_meta.TransferSyntaxUID = syntax  # set_pixel_data resets a compressed one
    ds.file_meta.MediaStorageSOPClassUID = ds.get("SOPClassUID", DIGITAL_XRAY)
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def main(argv: list[str] | None = None) -> None:
    from cxr.data.images import open_image

    parser = argparse.ArgumentParser(
        prog="python -m testkit.dicomfiles", description="Write IMAGE's 8-bit grayscale pixels as a DX DICOM file."
    )
    parser.add_argument("image", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument(
        "--phi", action="store_true", help="fill the header with made-up patient data (testkit.dicomfiles.PHI)"
    )
    args = parser.parse_args(argv)
    pixels = np.asarray(open_image(args.image), np.uint8)
    write_dicom(args.out, pixels, **(PHI if args.phi else {}))
    print(f"wrote {args.out}: {pixels.shape[1]}x{pixels.shape[0]} MONOCHROME2 8-bit DX")


if __name__ == "__main__":
    main()
