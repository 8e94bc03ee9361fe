"""Safe reading of untrusted checkpoint files: no code in a file runs unless the caller trusts it.

Torch files are opened with `torch.load(weights_only=True)`, plain pickles (detectron2 `.pkl`) with a
restricted unpickler; both admit only containers, strings, numbers, tensors and numpy arrays (plus
`argparse.Namespace`, the attribute bag DINO/timm store their `args` in). Anything else is refused, naming
the global, unless the caller passes `trust=True` (`--trust-checkpoint`). `.safetensors` files are parsed
directly (format: huggingface/safetensors README); they cannot hold code.
"""
from __future__ import annotations

import argparse
import collections
import io
import json
import pickle
import re
import struct
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mocobench.core.errors import CheckpointError

TRUST_FLAG = "--trust-checkpoint"


def _numpy_globals() -> dict[str, Any]:
    """The numpy names an array/scalar pickle refers to, under numpy 2 (`numpy._core`) and 1.x spellings."""
    core = np._core if hasattr(np, "_core") else np.core
    out = {"numpy.ndarray": np.ndarray, "numpy.dtype": np.dtype}
    for mod, name in (("multiarray", "_reconstruct"), ("multiarray", "scalar"), ("numeric", "_frombuffer")):
        obj = getattr(getattr(core, mod), name, None)
        if obj is not None:
            out[f"numpy._core.{mod}.{name}"] = out[f"numpy.core.{mod}.{name}"] = obj
    for name in dir(np.dtypes):  # dtype classes (numpy>=1.25); object arrays are not data
        if name.endswith("DType") and name != "ObjectDType":
            out[f"numpy.dtypes.{name}"] = getattr(np.dtypes, name)
    return out


def _latin1_encode(text: str, encoding: str = "utf-8", errors: str = "strict") -> bytes:
    """How protocol-2 pickles spell bytes (`_codecs.encode(str, "latin1")`); no other codec is admitted."""
    if encoding not in ("latin1", "latin-1") or not isinstance(text, str):
        raise pickle.UnpicklingError(f"GLOBAL _codecs.encode with encoding {encoding!r}")
    return text.encode("latin1", errors)


SAFE_GLOBALS: dict[str, Any] = {**_numpy_globals(), "argparse.Namespace": argparse.Namespace,
                                "collections.OrderedDict": collections.OrderedDict}
_PICKLE_ONLY_GLOBALS = {"_codecs.encode": _latin1_encode}  # torch's weights_only unpickler admits it itself


def _refusal(path: Path, names: list[str]) -> CheckpointError:
    listed = ", ".join(sorted(set(names))) or "an unknown global"
    return CheckpointError(
        f"{path}: refusing to load: the file needs {listed}, which safe (weights-only) loading does not "
        f"admit because unpickling it can run arbitrary code. Only if you trust where this file came from, "
        f"make a weights-only copy that every command reads: `mocobench convert --to moco {path} OUT {TRUST_FLAG}`.")


class _RestrictedUnpickler(pickle.Unpickler):
    """Admits only builtin containers/scalars and numpy arrays (the content of a detectron2 .pkl)."""

    def find_class(self, module: str, name: str) -> Any:
        key = f"{module}.{name}"
        if key in SAFE_GLOBALS or key in _PICKLE_ONLY_GLOBALS:
            return SAFE_GLOBALS.get(key) or _PICKLE_ONLY_GLOBALS[key]
        raise pickle.UnpicklingError(f"GLOBAL {key}")


_TORCH_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # first object of a pre-1.6 (non-zip) torch.save file


def _read_pickle(path: Path, trust: bool) -> Any:
    with open(path, "rb") as f:
        data = f.read()
    if trust:
        return pickle.loads(data, encoding="latin1")
    try:
        return _RestrictedUnpickler(io.BytesIO(data), encoding="latin1").load()
    except pickle.UnpicklingError as e:
        match = re.match(r"GLOBAL (\S+)", str(e))
        if match:
            raise _refusal(path, [match.group(1)]) from None
        raise CheckpointError(f"{path}: truncated or corrupt pickle ({e})") from None
    except (EOFError, ValueError, TypeError, IndexError, AttributeError, MemoryError) as e:
        raise CheckpointError(f"{path}: truncated or corrupt pickle ({type(e).__name__}: {e})") from None


def _read_torch(path: Path, trust: bool, is_zip: bool) -> Any:
    if trust:
        loader = lambda: torch.load(path, map_location="cpu", weights_only=False)  # noqa: E731
    else:
        safe = [(obj, name) for name, obj in SAFE_GLOBALS.items()]
        def loader():
            with torch.serialization.safe_globals(safe):
                return torch.load(path, map_location="cpu", weights_only=True)
    try:
        return loader()
    except pickle.UnpicklingError as e:
        if trust:
            raise CheckpointError(f"{path}: corrupt torch checkpoint ({e})") from None
        names = re.findall(r"GLOBAL (\S+?)(?: |\.?$|\n)", str(e)) or re.findall(r"got <class '([^']+)'>", str(e))
        if is_zip:
            try:
                names += [n for n in torch.serialization.get_unsafe_globals_in_checkpoint(path)
                          if n not in SAFE_GLOBALS]
            except Exception:  # noqa: BLE001 - the name list is only a courtesy
                pass
        raise _refusal(path, names) from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, KeyError, ValueError, AttributeError,
            struct.error) as e:
        raise CheckpointError(f"{path}: truncated or corrupt torch checkpoint "
                              f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None


_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
              "U8": torch.uint8, "BOOL": torch.bool}


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """The safetensors layout: u64 little-endian header size, JSON header, raw little-endian bytes."""
    data = path.read_bytes()
    try:
        (size,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8:8 + size])
        body = memoryview(data)[8 + size:]
        out = {}
        for name, info in header.items():
            if name == "__metadata__":
                continue
            dtype, shape, (start, end) = _ST_DTYPES[info["dtype"]], info["shape"], info["data_offsets"]
            if not 0 <= start <= end <= len(body):
                raise ValueError(f"tensor {name!r} lies outside the file")
            raw = bytearray(body[start:end])
            out[name] = (torch.frombuffer(raw, dtype=dtype) if raw else torch.empty(0, dtype=dtype)).reshape(shape)
        return out
    except (struct.error, ValueError, KeyError, TypeError, RuntimeError) as e:
        raise CheckpointError(f"{path}: truncated or corrupt safetensors file ({type(e).__name__}: {e})") from None


def safe_load(path: str | Path, trust: bool = False) -> Any:
    """Read any checkpoint file (torch zip or legacy, pickle, safetensors) without running its code.

    Unless `trust` is set, a file that needs a global outside the allowlist raises CheckpointError
    naming the global and the `--trust-checkpoint` opt-in; damaged or non-checkpoint files raise too.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file" + (" (it is a directory)" if path.is_dir() else ""))
    with open(path, "rb") as f:
        head = f.read(16)
    if not head:
        raise CheckpointError(f"{path}: empty file, not a checkpoint")
    if head[:4] == b"PK\x03\x04":  # torch.save's zip container (>= 1.6)
        return _read_torch(path, trust, is_zip=True)
    if head[:1] == b"\x80":  # a pickle: detectron2 .pkl, or a legacy torch.save whose first object is magic
        try:
            with open(path, "rb") as f:
                first = _RestrictedUnpickler(f, encoding="latin1").load()
        except Exception:  # noqa: BLE001 - the full read below reports what is wrong
            first = None
        if isinstance(first, int) and first == _TORCH_LEGACY_MAGIC:
            return _read_torch(path, trust, is_zip=False)
        return _read_pickle(path, trust)
    if path.suffix == ".safetensors" or (len(head) > 8 and head[8:9] == b"{"):
        return _read_safetensors(path)
    raise CheckpointError(f"{path}: not a checkpoint (unrecognised header {head[:8]!r}; expected a torch.save "
                          f"file, a pickle (.pkl) or a .safetensors file)")
