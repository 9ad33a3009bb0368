"""safetensors files read and written one tensor at a time, so that memory holds a tensor, not a file.

:class:`TensorFile` parses a file's header itself (checked: a header that runs past the file, offsets that
overlap, leave holes or disagree with a tensor's dtype and shape are refused) and reads one tensor with a
plain ``seek`` + ``readinto`` into a buffer of that tensor's size: no memory map, whose touched pages
would count toward the process's resident memory until the file is closed. :class:`TensorWriter` writes
the header first (every tensor's name, dtype and shape are known before any is computed), then each
tensor's bytes as it comes, in the header's order: the file is what ``safetensors.torch.save_file`` would
write for the same tensors (``from_pretrained`` and ``safe_open`` read it), without ever holding them all.
Nothing here unpickles. Little-endian machines only, as safetensors itself (x86, ARM).
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

from cpt.errors import CptError

_MAX_HEADER = 100 * 2**20  # safetensors' own limit on the JSON header
# safetensors header dtype -> (torch dtype name, bytes per element)
DTYPES = {"F64": ("float64", 8), "F32": ("float32", 4), "F16": ("float16", 2), "BF16": ("bfloat16", 2),
          "I64": ("int64", 8), "I32": ("int32", 4), "I16": ("int16", 2), "I8": ("int8", 1), "U8": ("uint8", 1),
          "BOOL": ("bool", 1)}
_CODES = {name: code for code, (name, _) in DTYPES.items()}


class TensorFile:
    """One safetensors file: its tensors' names, dtypes (header codes: ``F32``, ``BF16``, ...) and shapes
    from the header, and :meth:`read` of one tensor at a time. A context manager (closes the file)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.entries: dict[str, tuple[str, tuple[int, ...], int, int]] = {}  # name -> (dtype, shape, start, end)
        self.metadata: dict[str, str] = {}
        try:
            self._file = open(self.path, "rb")  # noqa: SIM115 (closed by close() / __exit__)
        except OSError as e:
            raise CptError(f"{self.path}: cannot be read ({e.strerror or e})") from None
        try:
            self._parse()
        except CptError:
            self._file.close()
            raise

    def _bad(self, why: str) -> CptError:
        return CptError(f"{self.path}: not a readable safetensors file ({why})")

    def _parse(self) -> None:
        size = self.path.stat().st_size
        head = self._file.read(8)
        if len(head) < 8:
            raise self._bad("shorter than its 8-byte header length")
        (n,) = struct.unpack("<Q", head)
        if n > min(_MAX_HEADER, size - 8):
            raise self._bad(f"a header of {n} bytes in a file of {size}")
        try:
            header = json.loads(self._file.read(n))
        except ValueError as e:
            raise self._bad(f"its header is not JSON: {e}") from None
        if not isinstance(header, dict):
            raise self._bad("its header is not a JSON object")
        self.data_start = 8 + n
        self.metadata = header.pop("__metadata__", None) or {}
        spans = []
        for name, e in header.items():
            try:
                code, shape, (start, end) = e["dtype"], tuple(int(d) for d in e["shape"]), e["data_offsets"]
                width = DTYPES[code][1]
            except (KeyError, TypeError, ValueError):
                raise self._bad(f"tensor {name}: dtype, shape or data_offsets missing or unknown") from None
            numel = 1
            for d in shape:
                numel *= d
            if min(shape, default=0) < 0 or not 0 <= start <= end or end - start != numel * width:
                raise self._bad(f"tensor {name}: data_offsets {[start, end]} do not hold {code} {list(shape)}")
            self.entries[name] = (code, shape, start, end)
            spans.append((start, end))
        spans.sort()
        covered = 0
        for start, end in spans:
            if start != covered:
                raise self._bad(f"its tensors' bytes overlap or leave a hole at byte {covered}")
            covered = end
        if self.data_start + covered != size:
            raise self._bad(f"{size - self.data_start} bytes of data where its header describes {covered} "
                            f"(cut short or damaged)")

    def keys(self) -> list[str]:
        return list(self.entries)

    def dtype(self, name: str) -> str:
        return self.entries[name][0]

    def shape(self, name: str) -> tuple[int, ...]:
        return self.entries[name][1]

    def read(self, name: str):
        """The tensor ``name``, read into memory of its own (nothing else of the file is held)."""
        import torch

        code, shape, start, end = self.entries[name]
        buf = bytearray(end - start)
        self._file.seek(self.data_start + start)
        if self._file.readinto(buf) != len(buf):
            raise self._bad(f"tensor {name}: the file ends inside it")
        dtype = getattr(torch, DTYPES[code][0])
        if not buf:
            return torch.empty(shape, dtype=dtype)
        return torch.frombuffer(buf, dtype=dtype).reshape(shape)

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> TensorFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class TensorWriter:
    """Write a safetensors file whose tensors (``specs``: name, torch dtype, shape, in file order) are
    given one at a time by :meth:`write`, in that order; :meth:`close` (or leaving the ``with`` block
    without an error) checks that all came. The caller writes into a temporary dir (as cpt.merge does):
    a file left by an error is incomplete."""

    def __init__(self, dest: str | Path, specs: list[tuple[str, Any, tuple[int, ...]]],
                 metadata: dict[str, str] | None = None) -> None:
        header: dict[str, Any] = {"__metadata__": dict(metadata or {"format": "pt"})}
        offset = 0
        self.specs = []
        for name, dtype, shape in specs:
            code = _CODES[str(dtype).removeprefix("torch.")]
            numel = 1
            for d in shape:
                numel *= d
            size = numel * DTYPES[code][1]
            header[name] = {"dtype": code, "shape": list(shape), "data_offsets": [offset, offset + size]}
            self.specs.append((name, dtype, tuple(shape)))
            offset += size
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the tensors' bytes start 8-aligned, as safetensors writes them
        self._file = open(dest, "wb")  # noqa: SIM115 (closed by close())
        self._file.write(struct.pack("<Q", len(raw)) + raw)
        self._next = 0
        self.bytes = offset

    def write(self, name: str, tensor) -> None:
        expected, dtype, shape = self.specs[self._next]
        if name != expected or tensor.dtype != dtype or tuple(tensor.shape) != shape:
            raise CptError(f"internal: tensor {name} {tensor.dtype} {list(tensor.shape)} written where {expected} "
                           f"{dtype} {list(shape)} is due")
        if tensor.numel():
            self._file.write(tensor.detach().contiguous().reshape(-1).view(_byte_dtype()).numpy().data)
        self._next += 1

    def close(self) -> None:
        self._file.close()
        if self._next != len(self.specs):
            raise CptError(f"internal: {len(self.specs) - self._next} tensors of {len(self.specs)} never written")

    def __enter__(self) -> TensorWriter:
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is None:
            self.close()
        else:  # the error that stopped the writing is the one to report
            self._file.close()


def _byte_dtype():
    import torch

    return torch.uint8
