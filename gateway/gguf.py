"""Reading what a GGUF file says about itself: architecture, name, quantization, context size, mmproj.

A small, dependency-free reader of the GGUF header (spec: llama.cpp's docs/gguf.md). It reads
only the metadata key/values, little-endian, GGUF versions 2 and 3, and stops before the tensor
infos. It never loads the file: it reads in small chunks, seeks past fixed-size arrays, walks
string arrays (tokenizer vocabularies) without building them, keeps only the few values it
needs, and refuses metadata larger than MAX_METADATA_BYTES.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
MAX_METADATA_BYTES = 64 * 2**20  # large vocabularies take ~10 MB; anything past this is not a sane header
MAX_KV_COUNT = 1_000_000
MAX_STRING_BYTES = 16 * 2**20
_CHUNK = 256 * 1024

# GGUFValueType -> struct format, for the fixed-size scalar types.
_STRING, _ARRAY = 8, 9
_SCALARS: dict[int, struct.Struct] = {
    0: struct.Struct("<B"), 1: struct.Struct("<b"),   # uint8, int8
    2: struct.Struct("<H"), 3: struct.Struct("<h"),   # uint16, int16
    4: struct.Struct("<I"), 5: struct.Struct("<i"),   # uint32, int32
    6: struct.Struct("<f"), 7: struct.Struct("<B"),   # float32, bool (one byte)
    10: struct.Struct("<Q"), 11: struct.Struct("<q"),  # uint64, int64
    12: struct.Struct("<d"),                           # float64
}
_U32, _U64 = _SCALARS[4], _SCALARS[10]

# `general.file_type` (llama.cpp's LlamaFileType) -> the names llama-quantize and model files use.
FILE_TYPES: dict[int, str] = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1",
    10: "Q2_K", 11: "Q3_K_S", 12: "Q3_K_M", 13: "Q3_K_L", 14: "Q4_K_S", 15: "Q4_K_M",
    16: "Q5_K_S", 17: "Q5_K_M", 18: "Q6_K", 19: "IQ2_XXS", 20: "IQ2_XS", 21: "Q2_K_S",
    22: "IQ3_XS", 23: "IQ3_XXS", 24: "IQ1_S", 25: "IQ4_NL", 26: "IQ3_S", 27: "IQ3_M",
    28: "IQ2_S", 29: "IQ2_M", 30: "IQ4_XS", 31: "IQ1_M", 32: "BF16", 36: "TQ1_0", 37: "TQ2_0",
    38: "MXFP4_MOE", 39: "NVFP4", 40: "Q1_0", 41: "Q2_0",
}

_WANTED = ("general.architecture", "general.name", "general.file_type", "general.type")
_WANTED_SUFFIXES = (".context_length", ".embedding_length")

Value = int | float | bool | str


@dataclass(frozen=True)
class GGUFInfo:
    path: Path
    size_bytes: int
    version: int
    tensor_count: int
    kv_count: int
    architecture: str | None
    name: str | None
    file_type: int | None  # raw `general.file_type`
    quantization: str | None  # FILE_TYPES name of file_type, None when absent or unknown
    context_length: int | None
    embedding_length: int | None
    is_mmproj: bool
    metadata_bytes: int  # where the metadata ends (the tensor infos start) in the file
    bytes_read: int  # what reading it actually read from disk


class _Reader:
    """Buffered little-endian reads from the start of a file, bounded by a byte limit."""

    def __init__(self, f: BinaryIO, file_size: int, limit: int) -> None:
        self.f, self.file_size, self.limit = f, file_size, min(file_size, limit)
        self.buf, self.pos, self.buf_start, self.bytes_read = b"", 0, 0, 0

    def tell(self) -> int:
        return self.buf_start + self.pos

    def _check_end(self, end: int) -> None:
        if end > self.file_size:
            raise ValueError(f"truncated GGUF file: metadata runs past the end of the file ({self.file_size} bytes)")
        if end > self.limit:
            raise ValueError(f"GGUF metadata is larger than {self.limit // 2**20} MiB; refusing to read it")

    def _need(self, n: int) -> None:
        if len(self.buf) - self.pos >= n:
            return
        self._check_end(self.tell() + n)
        rest = self.buf[self.pos:]
        more = self.f.read(max(n - len(rest), _CHUNK))
        self.bytes_read += len(more)
        self.buf_start, self.buf, self.pos = self.tell(), rest + more, 0
        if len(self.buf) < n:
            raise ValueError("truncated GGUF file")

    def unpack(self, fmt: struct.Struct) -> int | float:
        self._need(fmt.size)
        (value,) = fmt.unpack_from(self.buf, self.pos)
        self.pos += fmt.size
        return value  # type: ignore[no-any-return]

    def u32(self) -> int:
        return int(self.unpack(_U32))

    def u64(self) -> int:
        return int(self.unpack(_U64))

    def skip(self, n: int) -> None:
        if len(self.buf) - self.pos >= n:
            self.pos += n
            return
        target = self.tell() + n
        self._check_end(target)
        self.f.seek(target)
        self.buf, self.pos, self.buf_start = b"", 0, target

    def string(self) -> str:
        n = self.u64()
        if n > MAX_STRING_BYTES:
            raise ValueError(f"GGUF string of {n} bytes is implausibly long")
        self._need(n)
        raw = self.buf[self.pos:self.pos + n]
        self.pos += n
        return raw.decode("utf-8", errors="replace")

    def skip_string(self) -> None:
        self.skip(self.u64())

    def skip_strings(self, count: int) -> None:
        """Skip `count` strings; the hot loop for vocabularies, so it walks the buffer directly."""
        unpack = _U64.unpack_from
        while count:
            buf, pos, end = self.buf, self.pos, len(self.buf)
            while count and pos + 8 <= end:
                (n,) = unpack(buf, pos)
                if pos + 8 + n > end:
                    break
                pos += 8 + n
                count -= 1
            self.pos = pos
            if count:  # the next string straddles the buffer's end
                self.skip_string()
                count -= 1

    def value(self, vtype: int) -> Value:
        if vtype == _STRING:
            return self.string()
        fmt = _SCALARS.get(vtype)
        if fmt is None:
            raise ValueError(f"unknown GGUF value type {vtype}")
        value = self.unpack(fmt)
        return bool(value) if vtype == 7 else value

    def skip_value(self, vtype: int) -> None:
        if vtype == _STRING:
            self.skip_string()
        elif vtype == _ARRAY:
            elem, count = self.u32(), self.u64()
            if elem == _STRING:
                self.skip_strings(count)
            elif elem == _ARRAY:
                for _ in range(count):
                    self.skip_value(_ARRAY)
            elif elem in _SCALARS:
                self.skip(count * _SCALARS[elem].size)
            else:
                raise ValueError(f"unknown GGUF array element type {elem}")
        elif vtype in _SCALARS:
            self.skip(_SCALARS[vtype].size)
        else:
            raise ValueError(f"unknown GGUF value type {vtype}")


def read_gguf_info(path: str | os.PathLike[str], max_metadata_bytes: int = MAX_METADATA_BYTES) -> GGUFInfo:
    """What the GGUF header of `path` says. ValueError for non-GGUF, unsupported or truncated files."""
    path = Path(path)
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        r = _Reader(f, size, max_metadata_bytes)
        r._need(4)
        if r.buf[:4] != GGUF_MAGIC:
            raise ValueError(f"{path.name} is not a GGUF file (no GGUF magic)")
        r.skip(4)
        version = r.u32()
        if version not in SUPPORTED_VERSIONS:
            raise ValueError(f"unsupported GGUF version {version} (this reader knows 2 and 3)")
        tensor_count, kv_count = r.u64(), r.u64()
        if kv_count > MAX_KV_COUNT:
            raise ValueError(f"implausible GGUF metadata count {kv_count}")
        kept: dict[str, Value] = {}
        has_clip_keys = False
        for _ in range(kv_count):
            key, vtype = r.string(), r.u32()
            has_clip_keys = has_clip_keys or key.startswith("clip.")
            if vtype != _ARRAY and (key in _WANTED or key.endswith(_WANTED_SUFFIXES)):
                kept[key] = r.value(vtype)
            else:
                r.skip_value(vtype)
        metadata_bytes = r.tell()

    def text(key: str) -> str | None:
        value = kept.get(key)
        return value if isinstance(value, str) else None

    def integer(key: str) -> int | None:
        value = kept.get(key)
        return value if isinstance(value, int) and not isinstance(value, bool) else None

    arch = text("general.architecture")
    file_type = integer("general.file_type")
    return GGUFInfo(
        path=path, size_bytes=size, version=version, tensor_count=tensor_count, kv_count=kv_count,
        architecture=arch, name=text("general.name"), file_type=file_type,
        quantization=FILE_TYPES.get(file_type) if file_type is not None else None,
        context_length=integer(f"{arch}.context_length") if arch else None,
        embedding_length=integer(f"{arch}.embedding_length") if arch else None,
        is_mmproj=arch == "clip" or has_clip_keys or text("general.type") == "mmproj",
        metadata_bytes=metadata_bytes, bytes_read=r.bytes_read,
    )
