"""IDX, the file format of the MNIST family, read with numpy.

Layout: a 4-byte magic (0, 0, dtype code, number of dims), one big-endian uint32 per dim, then
the values row-major and big-endian. Gzip is recognised by its magic bytes rather than by the
name, so `.gz` and plain files both load whatever they are called.
"""

from __future__ import annotations

import gzip
import math
import struct
import zlib
from pathlib import Path

import numpy as np

from archnet.errors import ArchnetError

__all__ = ["IDX_DTYPES", "read_idx"]

#: IDX dtype code -> numpy dtype (big-endian, as stored).
IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_GZIP_MAGIC = b"\x1f\x8b"
_FIX = "download or reinstall it"


def _payload(path: Path) -> bytes:
    """The file's bytes, decompressed when it is gzip."""
    try:
        data = path.read_bytes()
        return gzip.decompress(data) if data[:2] == _GZIP_MAGIC else data
    except (OSError, EOFError, zlib.error) as e:  # truncated gzip: EOFError; bad CRC: OSError
        raise ArchnetError(
            f"IDX file {path} is truncated or corrupt ({type(e).__name__}: {e}); {_FIX}"
        ) from None


def read_idx(path: str | Path) -> np.ndarray:
    """The array an IDX file holds, in native byte order; a size its header does not promise is an error."""
    path = Path(path)
    data = _payload(path)
    if len(data) < 4 or data[:2] != b"\0\0" or data[2] not in IDX_DTYPES:
        raise ArchnetError(
            f"{path} is not an IDX file (starts with {data[:4].hex() or 'nothing'}, expected "
            f"00 00, a dtype code and a dim count); {_FIX}"
        )
    ndim = data[3]
    start = 4 + 4 * ndim
    if len(data) < start:
        raise ArchnetError(f"IDX file {path} is truncated inside its header; {_FIX}")
    dims = struct.unpack(f">{ndim}I", data[4:start])
    dtype = np.dtype(IDX_DTYPES[data[2]])
    count = math.prod(dims)
    want, have = count * dtype.itemsize, len(data) - start
    if have != want:
        state = "truncated" if have < want else "corrupt (longer than its header says)"
        raise ArchnetError(
            f"IDX file {path} is {state}: shape {dims} needs {want} bytes of data, it holds "
            f"{have}; {_FIX}"
        )
    arr = np.frombuffer(data, dtype=dtype, count=count, offset=start).reshape(dims)
    return arr.astype(dtype.newbyteorder("="))  # a writable copy, so torch can share it
