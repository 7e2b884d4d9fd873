"""Check an image file's header before ITK reads it, and name what is wrong with it.

ITK refuses some broken headers with a line from deep inside its readers ("0 0 1", "fread got only 441514
4-sized things") and reads others silently as something else: a NIfTI ``pixdim`` of 0 becomes a 1 mm voxel (with a
warning printed straight to the terminal), a truncated NIfTI is padded with zeros. :func:`check_file` parses the
header of NRRD (``.nrrd``, ``.nhdr``), NIfTI-1/2 (``.nii``, ``.nii.gz``, ``.hdr``/``.img``) and MetaImage
(``.mha``, ``.mhd``) files itself and raises :class:`InputError` naming the header field or the file:

* an invalid voxel size (0, not finite) or origin, a singular or non-finite direction;
* a data file that is missing, or holds less voxel data than the header announces (a truncated file);

and returns notes on what is valid but unusual: a negative voxel size, which ITK reads as a mirrored axis.
:func:`explain_read_error` turns ITK's own message into the cause when ITK refuses a file anyway. Other formats
(and DICOM folders) are left to ITK and :mod:`.dicom_series`.
"""

from __future__ import annotations

import gzip
import math
import os
import re
import struct
import zlib
from pathlib import Path

import numpy as np

from ..errors import InputError

#: Bytes per voxel of NRRD types (teem's names and their synonyms).
NRRD_TYPE_BYTES = {
    **dict.fromkeys(("signed char", "int8", "int8_t", "uchar", "unsigned char", "uint8", "uint8_t"), 1),
    **dict.fromkeys(("short", "short int", "signed short", "signed short int", "int16", "int16_t", "ushort",
                     "unsigned short", "unsigned short int", "uint16", "uint16_t"), 2),
    **dict.fromkeys(("int", "signed int", "int32", "int32_t", "uint", "unsigned int", "uint32", "uint32_t",
                     "float"), 4),
    **dict.fromkeys(("longlong", "long long", "long long int", "signed long long", "signed long long int", "int64",
                     "int64_t", "ulonglong", "unsigned long long", "unsigned long long int", "uint64", "uint64_t",
                     "double"), 8),
}
#: Bytes per voxel of MetaImage element types.
META_TYPE_BYTES = {"MET_CHAR": 1, "MET_UCHAR": 1, "MET_SHORT": 2, "MET_USHORT": 2, "MET_INT": 4, "MET_UINT": 4,
                   "MET_LONG": 4, "MET_ULONG": 4, "MET_LONG_LONG": 8, "MET_ULONG_LONG": 8, "MET_FLOAT": 4,
                   "MET_DOUBLE": 8}
#: A direction matrix whose |determinant| is below this share of the product of its column lengths is singular.
SINGULAR = 1e-6
FIX_HEADER = ("correct this field of the header (or export the image again from its source, e.g. with 3D Slicer "
              "or dcm2niix)")
FIX_TRUNCATED = "copy or download the file again (the copy is incomplete), or export it again from its source"
#: Metadata key under which :func:`image_io.read_image_file` keeps the notes on a header (one per line).
NOTES_KEY = "MultimodalPrealign.header_notes"


def _name(path: Path) -> str:
    return f"'{path}'"


def _finite(values) -> bool:
    return all(math.isfinite(v) for v in values)


def _fmt(value: float) -> str:
    return "nan" if math.isnan(value) else f"{value:g}"


def _singular_axes(columns: np.ndarray) -> str:
    """Which axes make a direction singular: 'axes 0 and 1 are parallel', 'axis 2 has length 0', ..."""
    lengths = np.linalg.norm(columns, axis=0)
    for axis, length in enumerate(lengths):
        if length == 0:
            return f"axis {axis} has length 0"
    unit = columns / lengths
    for a in range(columns.shape[1]):
        for b in range(a + 1, columns.shape[1]):
            if abs(float(unit[:, a] @ unit[:, b])) > 0.9999:
                return f"axes {a} and {b} are parallel"
    return "the axes lie in one plane"


def _check_direction(columns: np.ndarray, field: str, path: Path, what: str) -> None:
    """InputError when the direction (3 columns) is non-finite or singular."""
    if not np.all(np.isfinite(columns)):
        raise InputError(f"The {what} file {_name(path)} has an invalid header field '{field}' (it holds "
                         f"{', '.join(_fmt(v) for v in columns.T.ravel() if not math.isfinite(v))})", FIX_HEADER)
    lengths = np.linalg.norm(columns, axis=0)
    determinant = abs(float(np.linalg.det(columns))) if columns.shape == (3, 3) else 1.0
    if np.any(lengths == 0) or determinant < SINGULAR * float(np.prod(lengths)):
        raise InputError(f"The {what} file {_name(path)} has an invalid header field '{field}': the direction is "
                         f"singular ({_singular_axes(columns)}), so voxels have no position", FIX_HEADER)


def _check_spacing(values: list[float], field: str, path: Path, what: str, label=None) -> list[str]:
    """InputError for a zero or non-finite voxel size; notes for a negative one (read as a mirrored axis)."""
    notes = []
    for axis, value in enumerate(values):
        name = label(axis) if label else f"{field}: axis {axis}"
        if not math.isfinite(value) or value == 0:
            raise InputError(f"The {what} file {_name(path)} has an invalid header field: {name} is "
                             f"{_fmt(value)} (a voxel size must be a positive number of mm)", FIX_HEADER)
        if value < 0:
            notes.append(f"{name} is {value:g} (negative): ITK reads this axis mirrored; if the result looks "
                         "mirrored, check the signs of the voxel size and direction in the header")
    return notes


def _check_size(path: Path, what: str, available: int, expected: int, data_name: str, unit: str = "") -> None:
    if expected > 0 and available < expected:
        share = 100.0 * max(available, 0) / expected
        raise InputError(f"The {what} file {_name(path)} is truncated: {data_name} holds {max(available, 0)} of the "
                         f"{expected} bytes{unit} its header announces ({share:.0f}%)", FIX_TRUNCATED)


def _missing_data_file(path: Path, what: str, data_file: Path, field: str) -> InputError:
    return InputError(f"The data file '{data_file.name}' of the {what} file {_name(path)} (named in its header "
                      f"field '{field}') is missing", f"put '{data_file.name}' next to '{path.name}' (in "
                      f"'{data_file.parent}'), or correct the '{field}' field")


# ------------------------------------------------------------------------------------------------ NRRD
def _nrrd_header(path: Path) -> tuple[dict, int] | None:
    """(fields with lower-case names, header length in bytes) of a NRRD file, None when it is not NRRD."""
    fields: dict[str, str] = {}
    with open(path, "rb") as handle:
        magic = handle.readline(64)
        if not magic.startswith(b"NRRD"):
            return None
        offset = len(magic)
        for _ in range(10_000):
            line = handle.readline(1 << 16)
            offset += len(line)
            text = line.decode("latin-1").rstrip("\r\n")
            if not line or not text:
                break
            if text.startswith("#") or ":=" in text:
                continue
            key, separator, value = text.partition(":")
            if separator:
                fields[key.strip().lower()] = value.strip()
                if key.strip().lower() in ("data file", "datafile") and value.strip().upper().startswith("LIST"):
                    break  # the file names follow, one per line
    return fields, offset


def _vectors(text: str) -> list[list[float] | None]:
    """NRRD vectors '(1,0,0) none (0,1,0)' -> [[1, 0, 0], None, [0, 1, 0]] (unparsable numbers -> nan)."""
    out: list[list[float] | None] = []
    for token in re.findall(r"\([^)]*\)|none", text, flags=re.I):
        if token.lower() == "none":
            out.append(None)
            continue
        values = []
        for part in token.strip("()").split(","):
            try:
                values.append(float(part))
            except ValueError:
                values.append(float("nan"))
        out.append(values)
    return out


def _floats(text: str) -> list[float]:
    values = []
    for part in text.split():
        try:
            values.append(float(part))
        except ValueError:
            values.append(float("nan"))
    return values


def _check_nrrd(path: Path, what: str) -> list[str]:
    parsed = _nrrd_header(path)
    if parsed is None:
        return []
    fields, header_bytes = parsed
    notes: list[str] = []
    try:
        sizes = [int(v) for v in fields.get("sizes", "").split()]
    except ValueError:
        raise InputError(f"The {what} file {_name(path)} has an invalid header field 'sizes' "
                         f"({fields.get('sizes')!r})", FIX_HEADER) from None
    if "spacings" in fields:
        spacings = _floats(fields["spacings"])
        spatial = [s for s in spacings if not math.isnan(s)] if len(spacings) > 3 else spacings
        notes += _check_spacing(spatial, "spacings", path, what)
    if "space directions" in fields:
        vectors = [v for v in _vectors(fields["space directions"]) if v is not None]
        if vectors:
            columns = np.asarray(vectors, dtype=float).T
            _check_direction(columns, "space directions", path, what)
    if "space origin" in fields:
        origin = (_vectors(fields["space origin"]) or [[float("nan")]])[0] or []
        if not _finite(origin):
            raise InputError(f"The {what} file {_name(path)} has an invalid header field 'space origin' "
                             f"({fields['space origin']})", FIX_HEADER)
    _check_nrrd_data(path, what, fields, sizes, header_bytes)
    return notes


def _check_nrrd_data(path: Path, what: str, fields: dict, sizes: list[int], header_bytes: int) -> None:
    field = "data file" if "data file" in fields else "datafile"
    data_file = fields.get(field, "").split()
    encoding = fields.get("encoding", "raw").lower()
    per_voxel = NRRD_TYPE_BYTES.get(fields.get("type", "").lower())
    expected = int(np.prod(sizes)) * per_voxel if per_voxel and sizes else 0
    try:
        skip = int(fields.get("byte skip", fields.get("byteskip", "0")))
    except ValueError:
        skip = 0
    line_skip = fields.get("line skip", fields.get("lineskip", "0")).strip() not in ("", "0")
    if data_file:
        name = data_file[0]
        if name.upper() == "LIST" or "%" in name:
            return
        target = Path(name) if Path(name).is_absolute() else path.parent / name
        if not target.is_file():
            raise _missing_data_file(path, what, target, field)
        available, data_name = target.stat().st_size - max(skip, 0), f"its data file '{target.name}'"
    else:
        available, data_name = path.stat().st_size - header_bytes - max(skip, 0), "it"
    if encoding == "raw" and skip >= 0 and not line_skip:
        _check_size(path, what, available, expected, data_name)


# ------------------------------------------------------------------------------------------------ NIfTI
def _open_nifti(path: Path):
    return gzip.open(path, "rb") if path.name.lower().endswith(".gz") else open(path, "rb")


def _nifti_header(path: Path) -> dict | None:
    """The geometry fields of a NIfTI-1 or NIfTI-2 header (None: not NIfTI or unreadable)."""
    try:
        with _open_nifti(path) as handle:
            raw = handle.read(540)
    except (OSError, EOFError, zlib.error):
        return None
    if len(raw) < 348:
        return None
    for endian in ("<", ">"):
        size = struct.unpack(endian + "i", raw[:4])[0]
        if size == 348:
            dim = struct.unpack(endian + "8h", raw[40:56])
            return {"version": 1, "dim": dim, "datatype_bits": struct.unpack(endian + "h", raw[72:74])[0],
                    "pixdim": struct.unpack(endian + "8f", raw[76:108]),
                    "vox_offset": struct.unpack(endian + "f", raw[108:112])[0],
                    "qform_code": struct.unpack(endian + "h", raw[252:254])[0],
                    "sform_code": struct.unpack(endian + "h", raw[254:256])[0],
                    "srow": [struct.unpack(endian + "4f", raw[280 + 16 * i:296 + 16 * i]) for i in range(3)],
                    "magic": raw[344:348]}
        if size == 540 and len(raw) >= 540:
            return {"version": 2, "dim": struct.unpack(endian + "8q", raw[16:80]),
                    "datatype_bits": struct.unpack(endian + "h", raw[14:16])[0],
                    "pixdim": struct.unpack(endian + "8d", raw[104:168]),
                    "vox_offset": struct.unpack(endian + "q", raw[168:176])[0],
                    "qform_code": struct.unpack(endian + "i", raw[344:348])[0],
                    "sform_code": struct.unpack(endian + "i", raw[348:352])[0],
                    "srow": [struct.unpack(endian + "4d", raw[400 + 32 * i:432 + 32 * i]) for i in range(3)],
                    "magic": raw[4:8]}
    return None


def _gzip_length(path: Path, stop_after: int) -> int:
    """Uncompressed bytes in a gzip file, counted up to ``stop_after``; a cut stream ends the count (no error)."""
    total = 0
    decompressor = zlib.decompressobj(16 + zlib.MAX_WBITS)
    with open(path, "rb") as handle:
        while total < stop_after:
            chunk = handle.read(1 << 20)
            if not chunk:
                break
            try:
                total += len(decompressor.decompress(chunk))
                while decompressor.eof and decompressor.unused_data:  # a file of several gzip members
                    rest = decompressor.unused_data
                    decompressor = zlib.decompressobj(16 + zlib.MAX_WBITS)
                    total += len(decompressor.decompress(rest))
            except zlib.error:
                break
    return total


def _check_nifti(path: Path, what: str) -> list[str]:
    header = _nifti_header(path)
    if header is None:
        return []
    ndim = max(1, min(int(header["dim"][0]), 7))
    spatial = min(ndim, 3)
    pixdim = [float(v) for v in header["pixdim"][1:1 + spatial]]
    notes = _check_spacing(pixdim, "pixdim", path, what, label=lambda axis: f"pixdim[{axis + 1}]")
    if header["sform_code"] > 0:
        rows = np.asarray([r[:3] for r in header["srow"]], dtype=float)
        offsets = [r[3] for r in header["srow"]]
        _check_direction(rows, "srow_x/srow_y/srow_z (sform)", path, what)
        if not _finite(offsets):
            raise InputError(f"The {what} file {_name(path)} has an invalid header field 'srow' (sform): its "
                             "offset is not a number", FIX_HEADER)
    voxels = int(np.prod([max(int(v), 1) for v in header["dim"][1:1 + ndim]]))
    data_bytes = voxels * max(int(header["datatype_bits"]), 0) // 8
    name = path.name.lower()
    if name.endswith(".hdr"):
        image_file = path.with_suffix(".img")
        if not image_file.is_file():
            raise _missing_data_file(path, what, image_file, "the .img file beside the .hdr")
        _check_size(path, what, image_file.stat().st_size - int(header["vox_offset"]), data_bytes,
                    f"its data file '{image_file.name}'")
        return notes
    expected = int(header["vox_offset"]) + data_bytes
    if name.endswith(".gz"):
        _check_size(path, what, _gzip_length(path, expected), expected, "it", " (uncompressed)")
    else:
        _check_size(path, what, path.stat().st_size, expected, "it")
    return notes


# ------------------------------------------------------------------------------------------------ MetaImage
def _meta_header(path: Path) -> tuple[dict, int] | None:
    """(fields, header length in bytes) of a MetaImage header; None when it is not one."""
    fields: dict[str, str] = {}
    offset = 0
    with open(path, "rb") as handle:
        for _ in range(1000):
            line = handle.readline(1 << 16)
            if not line:
                break
            offset += len(line)
            key, separator, value = line.decode("latin-1").strip().partition("=")
            if not separator:
                return None if not fields else (fields, offset)
            fields[key.strip()] = value.strip()
            if key.strip() == "ElementDataFile":
                break
    return (fields, offset) if "ElementDataFile" in fields or "NDims" in fields else None


def _check_meta(path: Path, what: str) -> list[str]:
    parsed = _meta_header(path)
    if parsed is None:
        return []
    fields, header_bytes = parsed
    notes: list[str] = []
    for key in ("ElementSpacing", "ElementSize"):
        if key in fields:
            notes += _check_spacing(_floats(fields[key]), key, path, what)
            break
    for key in ("TransformMatrix", "Rotation", "Orientation"):
        if key in fields:
            values = _floats(fields[key])
            n = int(round(math.sqrt(len(values)))) if values else 0
            if n * n == len(values) and n:
                # MetaImage stores the matrix row by row as ITK's direction transposed: columns are axes
                _check_direction(np.asarray(values, dtype=float).reshape(n, n).T, key, path, what)
            break
    for key in ("Offset", "Position", "Origin"):
        if key in fields and not _finite(_floats(fields[key])):
            raise InputError(f"The {what} file {_name(path)} has an invalid header field '{key}' ({fields[key]})",
                             FIX_HEADER)
    try:
        sizes = [int(v) for v in fields.get("DimSize", "").split()]
        channels = int(fields.get("ElementNumberOfChannels", "1"))
    except ValueError:
        return notes
    expected = int(np.prod(sizes)) * channels * META_TYPE_BYTES.get(fields.get("ElementType", ""), 0) if sizes else 0
    compressed = fields.get("CompressedData", "False").strip().lower() == "true"
    data_file = fields.get("ElementDataFile", "LOCAL").split()
    name = data_file[0] if data_file else "LOCAL"
    if name.upper() == "LOCAL":
        if not compressed:
            _check_size(path, what, path.stat().st_size - header_bytes, expected, "it")
        return notes
    if name.upper() == "LIST" or "%" in name or len(data_file) > 1:
        return notes
    target = Path(name) if Path(name).is_absolute() else path.parent / name
    if not target.is_file():
        raise _missing_data_file(path, what, target, "ElementDataFile")
    if not compressed:
        _check_size(path, what, target.stat().st_size, expected, f"its data file '{target.name}'")
    return notes


# ------------------------------------------------------------------------------------------------ public
def check_file(path: str | os.PathLike, what: str = "image") -> list[str]:
    """Check the header of an image file before it is read; InputError names an invalid field or missing data.

    Returns notes on valid but unusual headers (e.g. a negative voxel size). Formats other than NRRD, NIfTI and
    MetaImage are not checked here (ITK reads them). ``what`` names the file in messages ("moving image").
    """
    path = Path(path)
    lower = path.name.lower()
    try:
        if lower.endswith((".nrrd", ".nhdr")):
            return _check_nrrd(path, what)
        if lower.endswith((".nii", ".nii.gz", ".hdr")):
            return _check_nifti(path, what)
        if lower.endswith((".mha", ".mhd")):
            return _check_meta(path, what)
    except OSError:
        return []  # unreadable: ITK's reader reports it
    return []


#: (pattern in ITK's message, cause, fix); ``{field}`` is filled from the pattern's first group when it has one.
_ITK_CAUSES = (
    (r"fread got only|expected \d+ bytes but received|data not read completely|unexpected end of file|"
     r"gzread|premature end|Read: Error reading.*(gzip|zlib)", "is truncated: it holds less voxel data than its "
     "header announces", FIX_TRUNCATED),
    (r"couldn't open \"?([^\"]+?)\"? \(data file|Cannot open data file|cannot open data file",
     "names a data file that cannot be opened{field}", "put the data file next to the header, or correct the "
     "header's data file field"),
    (r"Zero-valued spacing|spacing \(0\) invalid|_nrrdFieldCheck_spacings", "has an invalid voxel size (0) in its "
     "header", FIX_HEADER),
    (r"Bad direction, determinant is 0", "has an invalid header: its direction is singular (voxels have no "
     "position)", FIX_HEADER),
    (r"_nrrd(?:ReadNrrdParse|FieldCheck|SpaceVectorParse)_?([a-z_]*)", "has an invalid NRRD header field{field}",
     FIX_HEADER),
)


def explain_read_error(path: str | os.PathLike, message: str, what: str = "image",
                       recognised: bool = True) -> InputError:
    """An InputError naming the cause of ITK's read error ``message`` (truncated file, missing data file, invalid
    header field); a generic one ("cannot read ... as an image") when the cause is not recognised.

    ``recognised``: the file is of a format we know (by its header or suffix), so the fix is to repair the file
    rather than to give another format.
    """
    path = Path(path)
    for pattern, cause, fix in _ITK_CAUSES:
        match = re.search(pattern, message, flags=re.I | re.S)
        if match:
            group = match.group(1) if match.groups() and match.group(1) else ""
            field = f" ('{group.replace('_', ' ').strip()}')" if group.strip(" _") else ""
            return InputError(f"The {what} file {_name(path)} {cause.format(field=field)}", fix)
    lines = [line.strip() for line in message.strip().splitlines() if line.strip()]
    detail = lines[-1][:120] if lines else "unknown reason"
    if recognised:
        return InputError(f"Cannot read the {what} file {_name(path)} as an image ({detail})",
                          "check that the file is complete and not damaged (export it again from its source)")
    return InputError(f"Cannot read the {what} file {_name(path)} as an image ({detail})",
                      "give a NRRD, NIfTI, MHA/MHD file or a DICOM series folder")


def recognised(path: str | os.PathLike) -> bool:
    """True when the file starts like a NRRD, NIfTI or MetaImage header (whatever ITK then makes of it)."""
    path = Path(path)
    try:
        return _nrrd_header(path) is not None or _nifti_header(path) is not None or _meta_header(path) is not None
    except (OSError, UnicodeDecodeError):
        return False
