"""Test helpers: DICOM files made from real photos with pydicom (16-bit, rescale and window tags,
MONOCHROME1 or 2), so the pixels are a photo's and the header is a scanner's."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def write_dicom(
    path: Path,
    values: np.ndarray,
    *,
    monochrome1: bool = False,
    slope: float = 1.0,
    intercept: float = 0.0,
    window: tuple[float, float] | None = None,
    tags: dict[str, str] | None = None,
    pixels: bool = True,
    syntax: str | None = None,
) -> Path:
    """A single-frame 16-bit DICOM of stored ``values`` (uint16, H x W) with the given header."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = syntax or ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "CT"
    ds.PatientName = "Test^Person"
    for k, v in (tags or {}).items():
        setattr(ds, k, v)
    ds.Rows, ds.Columns = values.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME1" if monochrome1 else "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.RescaleSlope, ds.RescaleIntercept = str(slope), str(intercept)
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = str(window[0]), str(window[1])
    if pixels and syntax:  # a compressed syntax: the pixels as one encapsulated JPEG frame
        import io

        from pydicom.encaps import encapsulate

        buf = io.BytesIO()
        Image.fromarray(values.astype(np.uint8)).save(buf, "JPEG")
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
        ds.PixelData = encapsulate([buf.getvalue()])
        ds["PixelData"].VR = "OB"
    elif pixels:
        ds.PixelData = values.astype("<u2").tobytes()
    ds.save_as(str(path), enforce_file_format=True)
    return path


def photo_as_dicom(photo: Path, path: Path, *, monochrome1: bool, tags=None) -> Path:
    """A photo's grey values stored as a CT would: 16-bit, slope 2 and intercept -1024 (so the
    real values are 2*stored - 1024), its grey range exactly inside the file's window, and
    MONOCHROME1 stored inverted (so the image seen is the photo's either way)."""
    grey = np.asarray(Image.open(photo).convert("L"), dtype=np.float64)
    if monochrome1:
        grey = 255 - grey
    real = grey * 4 - 300  # the photo's 0..255 as -300..720 "HU"
    stored = np.round((real + 1024) / 2).astype(np.uint16)
    return write_dicom(path, stored, monochrome1=monochrome1, slope=2.0, intercept=-1024.0,
                       window=(210.0, 1020.0), tags=tags)  # fmt: skip
