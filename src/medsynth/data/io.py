"""Read and write images as MONAI ``MetaTensor``s that keep their geometry.

Arrays are channel-first: ``(C, H, W)`` for 2D, ``(C, X, Y, Z)`` for 3D, in the file's
voxel order. ``MetaTensor.affine`` (4x4) maps voxel indices to world millimetres in
RAS (NIfTI convention), so a NIfTI in and a NIfTI out share world coordinates.

Readers are nibabel (NIfTI), pydicom (DICOM series folders: :mod:`medsynth.data.dicom`;
single DICOM files through MONAI's ``PydicomReader``), SimpleITK (NRRD/MHA/MHD), imageio
(PNG/TIFF/JPEG/BMP) and NumPy (NPY/NPZ). Before voxels are read, a header's claimed size is compared with
the file and with :func:`max_voxels` (``--max-voxels``), and a ``.nii.gz`` is expanded no further than its
header claims (:func:`check_claimed_size`). Colour pictures become grey by luminance
(ITU-R BT.601), alpha dropped, unless ``keep_color``; ``meta["colour"]`` says what was done, so
that a caller can say it once per dataset. Every failure becomes one
:class:`~medsynth.errors.BadInputError` naming the file.
"""

from __future__ import annotations

import gzip
import io
import os
import re
import zipfile
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from medsynth.data.dicom import AFFINE_TOLERANCE  # defined beside the DICOM reader, the lowest reader, which needs it too
from medsynth.errors import BadInputError, MedsynthError, NonFiniteOutputError
from medsynth.runs import atomic_write_bytes

NIFTI_SUFFIXES = (".nii.gz", ".nii")
ITK_SUFFIXES = (".nrrd", ".nhdr", ".mha", ".mhd")
PICTURE_SUFFIXES = (".png", ".tif", ".tiff", ".jpg", ".jpeg", ".bmp")
NUMPY_SUFFIXES = (".npy", ".npz")
DICOM_SUFFIXES = (".dcm",)
if TYPE_CHECKING:  # torch and MONAI load only when an image is read: `medsynth phantom` starts without them
    import torch
    from monai.data import MetaTensor

READABLE_SUFFIXES = NIFTI_SUFFIXES + ITK_SUFFIXES + PICTURE_SUFFIXES + NUMPY_SUFFIXES + DICOM_SUFFIXES

# ITK and DICOM store world coordinates in LPS; NIfTI/MONAI use RAS. The one conversion:
# ``LPS_TO_RAS @ affine_lps`` (it is its own inverse).
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def lps_to_ras(affine: np.ndarray) -> np.ndarray:
    """A 4x4 voxel-to-LPS affine (ITK, DICOM) as voxel-to-RAS (NIfTI, MONAI), or back."""
    return LPS_TO_RAS @ np.asarray(affine, dtype=np.float64)


def itk_affine(direction: Sequence[float], spacing: Sequence[float], origin: Sequence[float]) -> np.ndarray:
    """The 4x4 voxel-to-RAS affine of an ITK header (direction cosines row-major, spacing, origin; all LPS)."""
    dim = len(spacing)
    affine = np.eye(4)
    affine[:dim, :dim] = np.asarray(direction, dtype=np.float64).reshape(dim, dim) @ np.diag(spacing)
    affine[:dim, 3] = origin
    return lps_to_ras(affine)


def suffix_of(path: str | Path) -> str:
    """The lower-case extension, treating ``.nii.gz`` as one suffix."""
    name = Path(path).name.lower()
    for suffix in NIFTI_SUFFIXES:
        if name.endswith(suffix):
            return suffix
    return Path(name).suffix


def nifti_header(path: str | Path) -> tuple[tuple[int, ...], np.ndarray]:
    """The full shape and the 4x4 affine (float64, nibabel's ``image.affine``) of a NIfTI file, without its voxels:
    the one header reader of the package.

    Raises:
        BadInputError: a missing file or an unreadable header (names the file and what nibabel raised).
    """
    import nibabel as nib

    path = Path(path)
    if not path.is_file():
        raise BadInputError(path, "file not found")
    try:
        image = nib.load(str(path))
        return tuple(int(n) for n in image.shape), np.asarray(image.affine, dtype=np.float64)
    except Exception as exc:  # nibabel fails differently on each corrupt header
        raise BadInputError(path, f"cannot read NIfTI header ({type(exc).__name__}: "
                                  f"{str(exc).splitlines()[0] if str(exc) else 'corrupt'})") from None


def spacing_of(affine: np.ndarray | torch.Tensor) -> np.ndarray:
    """Voxel spacing (mm) along each array axis, from a 4x4 (or 3x3 for 2D) affine."""
    affine = np.asarray(affine, dtype=np.float64)
    n = affine.shape[0] - 1
    return np.linalg.norm(affine[:n, :n], axis=0)


# -- bounded reading: a header's claimed size is checked before anything is allocated ----------------

MAX_VOXELS_VARIABLE = "MEDSYNTH_MAX_VOXELS"  # set by the CLI's global --max-voxels
DEFAULT_MAX_VOXELS = 2**31  # 8 GiB as float32: above any CT or MRI volume (a 1024^2 x 2000 CT is 2.1e9)


def max_voxels() -> int:
    """The most voxels (all axes, channels and frames included) one image file may claim: ``MEDSYNTH_MAX_VOXELS``
    (the CLI's ``--max-voxels``), else :data:`DEFAULT_MAX_VOXELS`.

    Raises:
        MedsynthError: the variable is not a positive whole number.
    """
    text = os.environ.get(MAX_VOXELS_VARIABLE, "").strip()
    if not text:
        return DEFAULT_MAX_VOXELS
    value = voxel_count(text)
    if value is None:
        raise MedsynthError(f"{MAX_VOXELS_VARIABLE}={text!r} (--max-voxels): not a positive whole number of voxels")
    return value


def voxel_count(text: str) -> int | None:
    """``text`` as a positive whole number of voxels, else None (the one parser of ``--max-voxels``)."""
    try:
        value = int(text)
    except ValueError:
        return None
    return value if value >= 1 else None


def _claim(shape: Sequence[int], itemsize: int) -> str:
    """``512x512x30000 voxels (31.5 GB)``: what a header claims, for the messages."""
    return f"{'x'.join(str(int(n)) for n in shape)} voxels ({int(np.prod(shape, dtype=np.float64)) * itemsize / 1e9:.3g} GB)"


def check_claimed_size(path: str | Path, shape: Sequence[int], itemsize: int, available: int | None = None,
                       needed_extra: int = 0) -> int:
    """Refuse a header whose claimed array is larger than :func:`max_voxels`, or than the bytes the file holds.

    Args:
        path: the file (named in the message).
        shape: the array shape the header claims (every axis).
        itemsize: bytes per voxel.
        available: bytes the file holds for the header and the data (``None``: not known, e.g. compressed).
        needed_extra: bytes before the data (header, extensions).

    Returns:
        The claimed data bytes.

    Raises:
        BadInputError: naming the file, the claimed shape and size, and the file's length or the bound.
    """
    voxels = int(np.prod([int(n) for n in shape], dtype=np.float64))
    if any(int(n) < 0 for n in shape):
        raise BadInputError(path, f"header claims a negative size {tuple(int(n) for n in shape)}")
    claimed = voxels * int(itemsize)
    if available is not None and available < needed_extra + claimed:
        raise BadInputError(path, f"header claims {_claim(shape, itemsize)} but the file holds {available} bytes (truncated or corrupt)")
    bound = max_voxels()
    if voxels > bound:
        raise BadInputError(path, f"header claims {_claim(shape, itemsize)}, more than the bound of {bound} voxels "
                                  f"(raise it with --max-voxels or {MAX_VOXELS_VARIABLE})")
    return claimed


def _nifti_header(path: Path, first: bytes):
    """The NIfTI-1 or -2 header in a file's first bytes (its ``sizeof_hdr``, either byte order, says which)."""
    import nibabel as nib

    for klass in (nib.Nifti1Header, nib.Nifti2Header):
        size = klass.sizeof_hdr
        if len(first) >= size and size in (int.from_bytes(first[:4], "little"), int.from_bytes(first[:4], "big")):
            return klass(binaryblock=first[:size], check=False)
    raise BadInputError(path, f"not a NIfTI file (no NIfTI-1/2 header in its first {len(first)} bytes)")


def _gunzip_bounded(path: Path, limit: int) -> bytes:
    """The decompressed bytes of a gzip file, at most ``limit`` (the header's claim): a gzip bomb stops there.

    Our own loop: nibabel and gzip.decompress expand a whole member whatever it claims. The gzip ISIZE
    trailer (size mod 2**32, last member only) is no bound to trust, so the stream itself is capped.
    """
    chunks, total = [], 0
    with gzip.open(path, "rb") as stream:
        while total < limit:
            chunk = stream.read(min(1 << 24, limit - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
    return b"".join(chunks)


def check_finite(array: np.ndarray, path: str | Path) -> None:
    """Refuse arrays holding NaN or Inf, naming the file and how many voxels."""
    if np.issubdtype(array.dtype, np.floating):
        bad = ~np.isfinite(array)
        if bad.any():
            raise BadInputError(path, f"{int(bad.sum())} voxel(s) are NaN or Inf")


def check_finite_output(array: np.ndarray | torch.Tensor, path: str | Path) -> None:
    """The guard every image, field and control-grid writer calls before making its file: refuse
    (:class:`~medsynth.errors.NonFiniteOutputError`, naming ``path`` and how many values) an array holding
    NaN or infinity, so no command writes one; the command adds the setting most likely at fault."""
    values = array.detach().cpu().numpy() if hasattr(array, "detach") else np.asarray(array)
    if np.issubdtype(values.dtype, np.floating) or np.issubdtype(values.dtype, np.complexfloating):
        finite = np.isfinite(values)
        if not finite.all():
            raise NonFiniteOutputError(path, int(finite.size - np.count_nonzero(finite)), int(finite.size))


def load_image(path: str | Path, dtype: np.dtype | type = np.float32, key: str = "image", *,
               series: str | None = None, keep_color: bool = False) -> MetaTensor:
    """Read an image file (or DICOM series folder) into a channel-first ``MetaTensor``.

    Args:
        path: NIfTI, NRRD/MHA/MHD, DICOM series folder or file, PNG/TIFF/JPEG/BMP, NPY or NPZ.
            An NPZ may hold ``key`` (else ``image``, else its first array) and ``affine``. A 4D NIfTI,
            and a DICOM folder of one series per phase, read as ``(T, X, Y, Z)``, phases in order.
        dtype: array type of the result (``np.int64`` for label maps).
        key: the NPZ array to read (a prepared case holds ``image``, ``label`` and ``flow``).
        series: for a DICOM folder holding several series, the ``SeriesInstanceUID`` or
            ``SeriesDescription`` of the one to read (see :mod:`medsynth.data.dicom`).
        keep_color: colour pictures keep their R, G, B channels (``C = 3``, alpha dropped)
            instead of becoming grey by luminance (``0.299 R + 0.587 G + 0.114 B``).

    Returns:
        ``MetaTensor`` of shape ``(C, *spatial)`` with a 4x4 ``affine`` (identity for
        pictures and plain NumPy files), ``meta["filename_or_obj"]`` and, for a colour
        picture, ``meta["colour"]`` (what was done, e.g. ``"RGBA -> grey (BT.601 luminance), alpha dropped"``).

    Raises:
        BadInputError: missing, unsupported, corrupt or truncated file, NaN/Inf voxels, or a
            DICOM folder with several series (and no ``series``) or irregular slices.
    """
    path = Path(path)
    if not path.exists():
        raise BadInputError(path, "file not found")
    suffix = suffix_of(path)
    if not path.is_dir() and suffix not in READABLE_SUFFIXES:
        raise BadInputError(path, f"unsupported file type '{suffix or path.name}' (readable: {', '.join(READABLE_SUFFIXES)})")
    colour = None
    try:
        if path.is_dir():
            from medsynth.data.dicom import read_series

            array, affine = read_series(path, series)
            affine = lps_to_ras(affine)
        elif suffix in DICOM_SUFFIXES:
            array, affine = _read_dicom(path)
        elif suffix in NIFTI_SUFFIXES:
            array, affine = _read_nifti(path)
        elif suffix in ITK_SUFFIXES:
            array, affine = _read_itk(path)
        elif suffix in PICTURE_SUFFIXES:
            array, affine, colour = _read_picture(path, scale=np.issubdtype(dtype, np.floating), keep_color=keep_color)
        else:
            array, affine = _read_numpy(path, key)
    except BadInputError:
        raise
    except Exception as exc:  # every reader fails differently on corrupt files
        raise BadInputError(path, f"cannot read image ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else 'corrupt or truncated'})") from None
    if array.size == 0:
        raise BadInputError(path, "image is empty")
    check_finite(array, path)
    if np.issubdtype(dtype, np.integer) and np.issubdtype(array.dtype, np.floating) and not np.array_equal(array, np.round(array)):
        raise BadInputError(path, "holds non-integer values where integers (a label map) are expected")
    import torch
    from monai.data import MetaTensor

    tensor = MetaTensor(torch.as_tensor(np.ascontiguousarray(array).astype(dtype)), affine=torch.as_tensor(affine, dtype=torch.float64))
    tensor.meta["filename_or_obj"] = str(path)
    if colour is not None:
        tensor.meta["colour"] = colour
    return tensor


def load_phase(path: str | Path, phase: int) -> MetaTensor:
    """Phase ``phase`` ``(1, X, Y, Z)`` of a 4D scan: a 4D NIfTI ``(X, Y, Z, T)`` or a DICOM folder of one
    series per phase (:func:`medsynth.data.dicom.read_phase_series`), as :func:`load_image` reads both
    (``(T, X, Y, Z)``, phases in order). The one 4D loader: the last two scans read are kept (keyed by path,
    size and modification time), so the phases of a scan cost one read. The result shares memory with the
    kept scan: change a copy, not it.

    Raises:
        BadInputError: as :func:`load_image`, or no phase ``phase`` in the scan (naming it and its count).
    """
    path = Path(path)
    stat = path.stat() if path.exists() else None
    scan = _load_scan(str(path), (stat.st_mtime_ns, stat.st_size) if stat else None)
    if not 0 <= phase < scan.shape[0]:
        raise BadInputError(path, f"has {scan.shape[0]} phase(s), no phase {phase}")
    return scan[phase : phase + 1]


@lru_cache(maxsize=2)  # a subject's phases (register --data, prepare's phase cases) are read from one load
def _load_scan(path: str, stamp: tuple[int, int] | None) -> MetaTensor:
    return load_image(path)


def _read_nifti(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """The array and affine of a NIfTI file, its claimed size checked first (:func:`check_claimed_size`);
    a ``.nii.gz`` is decompressed at most to that size, then read from memory."""
    import nibabel as nib

    compressed = suffix_of(path) == ".nii.gz"
    with (gzip.open(path, "rb") if compressed else open(path, "rb")) as stream:
        first = stream.read(nib.Nifti2Header.sizeof_hdr)
    header = _nifti_header(path, first)
    offset = max(int(header.get_data_offset()), header.sizeof_hdr + 4)  # a single file's data starts after the extension flag
    shape = header.get_data_shape()
    claimed = check_claimed_size(path, shape, header.get_data_dtype().itemsize,
                                 None if compressed else path.stat().st_size, offset)
    if compressed:
        data = _gunzip_bounded(path, offset + claimed)
        if len(data) < offset + claimed:
            raise BadInputError(path, f"header claims {_claim(shape, header.get_data_dtype().itemsize)} but the file expands to "
                                      f"{len(data)} bytes (truncated or corrupt)")
        # The voxels as nibabel's ArrayProxy reads them (Fortran order, the header's byte order and scaling), without a copy.
        from nibabel.volumeutils import apply_read_scaling

        raw = np.ndarray(shape, dtype=header.get_data_dtype(), buffer=data, offset=offset, order="F")
        slope, inter = header.get_slope_inter()
        array = apply_read_scaling(raw, 1.0 if slope is None else slope, 0.0 if inter is None else inter)
        affine = header.get_best_affine()  # what nibabel's image.affine is
    else:
        image = nib.load(str(path))
        array, affine = np.asarray(image.dataobj), image.affine
    if array.ndim == 5 and array.shape[3] == 1:  # NIfTI vector images are (X, Y, Z, 1, C)
        # Z = 1 is a 2D vector image, as ITK writes and reads them (the NIfTI standard has no 2D vectors).
        array = array[:, :, 0, 0, :] if array.shape[2] == 1 else array[:, :, :, 0, :]
        return np.moveaxis(array, -1, 0), affine
    array = np.moveaxis(array, -1, 0) if array.ndim == 4 else array[None]
    return array, affine


def _read_itk(path: Path) -> tuple[np.ndarray, np.ndarray]:
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()  # the header only: its claimed size is checked before the voxels are read
    shape = (*reader.GetSize(), reader.GetNumberOfComponents())
    probe = sitk.Image([1] * reader.GetDimension(), reader.GetPixelID(), reader.GetNumberOfComponents())  # one voxel: its type's size
    check_claimed_size(path, shape, sitk.GetArrayViewFromImage(probe).dtype.itemsize)
    return _from_sitk(reader.Execute())


def _from_sitk(image) -> tuple[np.ndarray, np.ndarray]:
    import SimpleITK as sitk

    array = sitk.GetArrayFromImage(image)  # (Z, Y, X[, C])
    dim = image.GetDimension()
    if image.GetNumberOfComponentsPerPixel() > 1:
        array = np.moveaxis(array, -1, 0)
    else:
        array = array[None]
    array = np.transpose(array, (0, *range(dim, 0, -1)))  # -> (C, X, Y, Z)
    return array, itk_affine(image.GetDirection(), image.GetSpacing(), image.GetOrigin())


def _read_dicom(path: Path) -> tuple[np.ndarray, np.ndarray]:
    from monai.data import PydicomReader

    reader = PydicomReader(affine_lps_to_ras=True)
    array, meta = reader.get_data(reader.read(str(path)))
    array = np.asarray(array)
    array = array[None] if array.ndim in (2, 3) else np.moveaxis(array, -1, 0)
    return array, np.asarray(meta["affine"], dtype=np.float64)


# ITU-R BT.601 luma weights of R, G, B (what PIL's convert("L") and OpenCV's COLOR_RGB2GRAY use).
LUMINANCE_WEIGHTS = (0.299, 0.587, 0.114)


def _read_picture(path: Path, scale: bool, keep_color: bool = False) -> tuple[np.ndarray, np.ndarray, str | None]:
    """``(C, H, W)`` float32, the identity affine, and what was done to a colour picture (else ``None``)."""
    import imageio.v3 as iio

    properties = iio.improps(path)  # the header: the claimed size is checked before decoding
    check_claimed_size(path, properties.shape, properties.dtype.itemsize)
    array = np.asarray(iio.imread(path))
    # Integer pictures read as floats are scaled to [0, 1] by their type's range (8-bit: /255);
    # read as integers (label maps) they keep their values.
    divisor = float(np.iinfo(array.dtype).max) if scale and np.issubdtype(array.dtype, np.integer) else 1.0
    colour = None
    if array.ndim == 3 and array.shape[-1] in (2, 3, 4):  # (H, W, C): grey+alpha, RGB or RGBA
        mode = {2: "grey+alpha", 3: "RGB", 4: "RGBA"}[array.shape[-1]]
        alpha = ", alpha dropped" if array.shape[-1] in (2, 4) else ""
        rgb = array[..., :3] if array.shape[-1] >= 3 else array[..., :1]
        if keep_color and rgb.shape[-1] == 3:
            array, colour = np.moveaxis(rgb, -1, 0), f"{mode} -> RGB channels{alpha}" if alpha else None
        elif rgb.shape[-1] == 1 or (rgb == rgb[..., :1]).all():  # grey stored as colour: exact, nothing lost
            array, colour = rgb[None, ..., 0], f"{mode} -> grey{alpha}" if alpha else None
        else:
            array = (rgb.astype(np.float64) @ np.asarray(LUMINANCE_WEIGHTS))[None]
            colour = f"{mode} -> grey (BT.601 luminance){alpha}"
    elif array.ndim == 2:
        array = array[None]
    if array.ndim != 3:
        raise BadInputError(path, f"expected a 2D picture, got shape {array.shape}")
    return array.astype(np.float32) / divisor, np.eye(4), colour


def check_npy_size(path: str | Path, stream, available: int) -> None:
    """Refuse an NPY array (at the start of ``stream``) whose header claims more than ``available`` bytes or
    :func:`max_voxels`, before NumPy allocates it; a pickled (object) array is refused as such.

    Raises:
        BadInputError: naming ``path``.
    """
    try:
        version = np.lib.format.read_magic(stream)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, dtype = read_header(stream)
    except ValueError as exc:
        raise BadInputError(path, f"not a NumPy array file ({str(exc).splitlines()[0] if str(exc) else 'bad header'})") from None
    if dtype.hasobject:
        raise BadInputError(path, "holds Python objects (a pickle): refused, never unpickled")
    check_claimed_size(path, shape, dtype.itemsize, available, stream.tell())


def check_npz_sizes(path: str | Path) -> None:
    """:func:`check_npy_size` on every array of an NPZ archive (zipfile expands a member no further than the size it
    declares, which is checked against the array's header), before NumPy allocates any."""
    with zipfile.ZipFile(path) as archive:
        for info in archive.infolist():
            with archive.open(info) as member:
                check_npy_size(f"{path}[{info.filename}]", member, info.file_size)


def _read_numpy(path: Path, key: str) -> tuple[np.ndarray, np.ndarray]:
    if suffix_of(path) == ".npz":
        check_npz_sizes(path)
        with np.load(path, allow_pickle=False) as data:
            keys = [k for k in data.keys() if k != "affine"]
            if not keys:
                raise BadInputError(path, "NPZ holds no image array")
            array = data[next((k for k in (key, "image") if k in keys), keys[0])]
            affine = data["affine"] if "affine" in data else np.eye(4)
    else:
        with open(path, "rb") as stream:
            check_npy_size(path, stream, path.stat().st_size)
        array, affine = np.load(path, allow_pickle=False), np.eye(4)
    if array.ndim not in (2, 3, 4):
        raise BadInputError(path, f"expected a 2D or 3D array (optionally channel-first), got shape {array.shape}")
    return (array[None] if array.ndim in (2, 3) and not _looks_channel_first(array) else array), affine


def _looks_channel_first(array: np.ndarray) -> bool:
    # A 3-D NumPy array is a volume unless its first axis is a small channel axis (e.g. a 2D flow (2, H, W)).
    return array.ndim == 3 and array.shape[0] <= 4 and min(array.shape[1:]) > 4


def natural_key(name: str) -> list:
    """Sort key that orders the numbers in names by value: ``image_2`` before ``image_10`` (case-insensitive)."""
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", name)]


def save_image(image: torch.Tensor | np.ndarray, path: str | Path, affine: np.ndarray | torch.Tensor | None = None,
               series: bool = False) -> Path:
    """Write a channel-first image ``(C, *spatial)``, keeping its affine, atomically.

    NIfTI files get ``affine`` (or the ``MetaTensor``'s own); more than one channel is
    written as a NIfTI vector image ``(X, Y, Z, 1, C)`` (2D: ``(X, Y, 1, 1, C)``, as ITK
    writes them), which :func:`load_image` reads back as ``(C, *spatial)``; with ``series``
    the first axis is time instead: a 4D scan ``(X, Y, Z, T)`` (a 4D CT, a cine series). PNG files take
    one-channel 2D images with float values in [0, 1] (clipped) or integer values. NPY files
    hold the raw array; NPZ files the array and the affine. The bytes are made in memory and
    written through :func:`medsynth.runs.atomic_write_bytes`: a kill leaves no half file.

    Raises:
        NonFiniteOutputError: the image or affine holds NaN or infinity (:func:`check_finite_output`);
            nothing is written.
    """
    path = Path(path)
    if affine is None:
        affine = getattr(image, "affine", None)  # a MetaTensor carries its own
        affine = np.eye(4) if affine is None else affine
    affine = np.asarray(affine.detach().cpu() if hasattr(affine, "detach") else affine, dtype=np.float64)
    array = image.detach().cpu().numpy() if hasattr(image, "detach") else np.asarray(image)
    check_finite_output(array, path)
    check_finite_output(affine, path)
    suffix = suffix_of(path)
    if suffix in NIFTI_SUFFIXES:
        data = _nifti_bytes(array, affine, series)
        # nibabel's own gzip level (1); mtime 0 makes equal images equal files.
        data = gzip.compress(data, compresslevel=1, mtime=0) if suffix == ".nii.gz" else data
    elif suffix in PICTURE_SUFFIXES:
        import imageio.v3 as iio

        picture = array[0] if array.ndim == 3 else array
        if np.issubdtype(picture.dtype, np.floating):
            picture = (np.clip(picture, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
        data = iio.imwrite("<bytes>", picture, extension=suffix)
    elif suffix in NUMPY_SUFFIXES:
        buffer = io.BytesIO()
        if suffix == ".npy":
            np.save(buffer, array)
        else:
            np.savez_compressed(buffer, image=array, affine=affine)
        data = buffer.getvalue()
    else:
        raise BadInputError(path, f"cannot write file type '{suffix}'")
    atomic_write_bytes(path, data)
    return path


def _nifti_bytes(array: np.ndarray, affine: np.ndarray, series: bool = False) -> bytes:
    """An uncompressed NIfTI-1 file of a channel-first array (vector image for several channels,
    a time series ``(*spatial, T)`` with ``series``)."""
    import nibabel as nib

    header = nib.Nifti1Header()
    if series:
        data = np.moveaxis(array, 0, -1)
    elif array.shape[0] == 1:
        data = array[0]
    else:
        spatial = np.moveaxis(array, 0, -1)  # (*spatial, C)
        data = spatial[:, :, None, None, :] if array.ndim == 3 else spatial[..., None, :]
        header.set_intent("vector")
    return nib.Nifti1Image(data, affine, header=header).to_bytes()


def check_same_grid(image_shape: tuple[int, ...], image_affine: np.ndarray, other_shape: tuple[int, ...],
                    other_affine: np.ndarray, other: Path, image: Path) -> None:
    """Refuse a label or flow whose spatial shape or affine (to 1e-4 mm) differs from its image's.

    Raises:
        BadInputError: naming ``other``.
    """
    if tuple(other_shape) != tuple(image_shape):
        raise BadInputError(other, f"shape {tuple(other_shape)} differs from its image {image.name} {tuple(image_shape)}")
    difference = float(np.abs(np.asarray(other_affine) - np.asarray(image_affine)).max())
    if difference > AFFINE_TOLERANCE:
        raise BadInputError(other, f"affine differs from its image {image.name} (by up to {difference:.3g} mm)")
