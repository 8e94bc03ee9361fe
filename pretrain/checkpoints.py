"""Checkpoint I/O for every stage: safe reading, format detection, one canonical form, writers.

Safety: every read goes through `safe_load`. Torch files are opened with `torch.load(weights_only=True)`,
plain pickles (detectron2 `.pkl`) with a restricted unpickler; both admit only containers, strings,
numbers, tensors and numpy arrays (plus `argparse.Namespace`, the attribute bag DINO/timm store their
`args` in). Anything else is refused, naming the global, unless the caller passes `trust=True`
(`--trust-checkpoint`). `.safetensors` files are parsed directly (they cannot hold code).

Canonical form: `load_backbone` turns any supported layout into a torchvision ResNet state dict
(`conv1`, `bn1`, `layer1.0.conv1`, ...; `fc` only for supervised classifiers) plus the projection head,
if any, kept aside. Every writer (`write_checkpoint`) starts from that form, so a new format is one reader.
Supported layouts (see docs/checkpoints.md for sources): MoCo v1/v2 (ours and facebookresearch/moco),
MoCo v3 ResNet, MMSelfSup/OpenSelfSup, VISSL, torchvision, timm training checkpoints, `module.`-prefixed
DDP dumps (SwAV, DINO, BYOL style) and detectron2 `.pkl` files.
"""
from __future__ import annotations

import argparse
import collections
import io
import json
import os
import pickle
import re
import struct
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pretrain.backbones import build_backbone, infer_arch
from results.records import file_md5

TRUST_FLAG = "--trust-checkpoint"
FORMATS = ("moco", "moco_v3", "mmselfsup", "vissl", "torchvision", "timm", "ddp", "detectron2", "random")
WRITE_FORMATS = ("torchvision", "moco", "detectron2")


class CheckpointError(ValueError):
    """A checkpoint that cannot be (safely) read or used; the message names the file and the problem."""


# ----------------------------------------------------------------------------------------------------
# Atomic writes
# ----------------------------------------------------------------------------------------------------

def _atomic_write(path: str | Path, write: Callable[[io.BufferedWriter], None]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def atomic_save(obj: Any, path: str | Path) -> Path:
    """torch.save to a temp file in the same directory, then rename: a crash never leaves half a file."""
    return _atomic_write(path, lambda f: torch.save(obj, f))


# ----------------------------------------------------------------------------------------------------
# Safe reading
# ----------------------------------------------------------------------------------------------------

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
        f"pass {TRUST_FLAG} (trust=True).")


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


# ----------------------------------------------------------------------------------------------------
# The canonical form
# ----------------------------------------------------------------------------------------------------

_BACKBONE_KEY = re.compile(r"^(conv1|bn1)\.[^.]+$|^layer[1-4]\.\d+\.")
_BUFFER_SUFFIXES = ("running_mean", "running_var", "num_batches_tracked")


@dataclass
class LoadedCheckpoint:
    """A checkpoint in canonical form: torchvision ResNet names, backbone only (+ fc when `has_fc`)."""

    source: str
    format: str
    arch: str
    width: int
    state_dict: dict[str, torch.Tensor]
    has_fc: bool = False
    epoch: int | None = None
    md5: str = ""
    kept: list[str] = field(default_factory=list)       # source key names that made the state dict
    dropped: list[str] = field(default_factory=list)    # source key names left out (heads included)
    head: dict[str, torch.Tensor] = field(default_factory=dict)  # projection head as `fc.*`, kept aside
    key_map: dict[str, str] = field(default_factory=dict)        # source name -> canonical name
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def num_params(self) -> int:
        """Parameters of the canonical state dict (BN running statistics not counted)."""
        return sum(v.numel() for k, v in self.state_dict.items() if not k.endswith(_BUFFER_SUFFIXES))


@dataclass
class _Layout:
    """What a reader found: where the ResNet lives in which flat dict, and how to rename its keys."""

    format: str
    weights: Mapping[str, Any]
    prefix: str = ""
    fc_is_head: bool = True        # `fc` under the prefix is a projection head, not a classifier
    rename: Callable[[str], str] = lambda k: k
    epoch: Any = None
    meta: dict[str, Any] = field(default_factory=dict)
    outside: list[str] = field(default_factory=list)  # other source keys, reported as dropped


def _sub(obj: Any, key: str) -> Mapping | None:
    value = obj.get(key) if isinstance(obj, Mapping) else None
    return value if isinstance(value, Mapping) else None


def _names(obj: Mapping | None, prefix: str = "") -> list[str]:
    return [prefix + str(k) for k in obj] if obj else []


def _with_prefix(sd: Mapping, *prefixes: str) -> str | None:
    return next((p for p in prefixes if f"{p}conv1.weight" in sd), None)


def _read_detectron2(obj: Any) -> _Layout | None:
    model = _sub(obj, "model") if _sub(obj, "model") is not None else obj
    if not isinstance(model, Mapping):
        return None
    if "stem.conv1.weight" not in model:
        if any(k in model for k in ("conv1_w", "res_conv1_bn_s", "res2_0_branch2a_w")):
            raise ValueError("Caffe2/Detectron1-named weights (e.g. 'res2_0_branch2a_w', MSRA's R-50.pkl) are "
                             "not supported: they use BGR 0-255 input and frozen BN, not a torchvision ResNet")
        return None
    author = obj.get("__author__") if isinstance(obj, Mapping) else None
    return _Layout("detectron2", model, fc_is_head=(author == "MOCO"), rename=_d2_to_tv, meta={"author": author})


def _read_vissl(obj: Any) -> _Layout | None:
    classy = _sub(obj, "classy_state_dict")
    if classy is None:
        return None
    model = _sub(_sub(classy, "base_model"), "model")
    trunk = _sub(model, "trunk")
    if trunk is None:
        raise ValueError("VISSL checkpoint without classy_state_dict.base_model.model.trunk")
    phase = obj.get("train_phase_idx")
    return _Layout("vissl", trunk, prefix=_with_prefix(trunk, "_feature_blocks.", "") or "_feature_blocks.",
                   epoch=phase + 1 if isinstance(phase, int) else None,
                   outside=_names(_sub(model, "heads"), "heads."))


def _read_moco(obj: Any) -> _Layout | None:
    sd = _sub(obj, "state_dict")
    prefix = _with_prefix(sd or {}, "module.encoder_q.", "encoder_q.")
    if prefix is None:
        return None
    fc = [k for k in sd if k.startswith(prefix + "fc.")]
    version = "v2" if any(k.startswith(prefix + "fc.0.") for k in fc) else "v1" if fc else "unknown"
    config = obj.get("config") if isinstance(obj.get("config"), Mapping) else {}
    return _Layout("moco", sd, prefix=prefix, epoch=obj.get("epoch"),
                   meta={"moco_version": version, "stored_arch": obj.get("arch"), "config": dict(config)})


def _read_moco_v3(obj: Any) -> _Layout | None:
    sd = _sub(obj, "state_dict")
    prefix = _with_prefix(sd or {}, "module.base_encoder.", "base_encoder.")
    if prefix is None:
        return None
    return _Layout("moco_v3", sd, prefix=prefix, epoch=obj.get("epoch"), meta={"stored_arch": obj.get("arch")})


def _read_mmselfsup(obj: Any) -> _Layout | None:
    sd = _sub(obj, "state_dict")
    if sd is None or "backbone.conv1.weight" not in sd:
        return None
    meta = _sub(obj, "meta") or {}
    return _Layout("mmselfsup", sd, prefix="backbone.", epoch=meta.get("epoch"))


def _read_timm(obj: Any) -> _Layout | None:
    sd = _sub(obj, "state_dict")
    if sd is None or "arch" not in obj or not ({"version", "args"} & set(obj)) or "conv1.weight" not in sd:
        return None
    return _Layout("timm", sd, fc_is_head=False, epoch=obj.get("epoch"), meta={"stored_arch": obj.get("arch")},
                   outside=_names(_sub(obj, "state_dict_ema"), "state_dict_ema."))


def _read_torchvision(obj: Any) -> _Layout | None:
    for wrapper in (None, "state_dict", "model", "model_state_dict"):
        sd = obj if wrapper is None else _sub(obj, wrapper)
        if sd is not None and "conv1.weight" in sd and "layer1.0.conv1.weight" in sd:
            return _Layout("torchvision", sd, fc_is_head=False, meta={"wrapper": wrapper})
    return None


_PREFERRED = ("", "backbone.", "encoder.", "online_encoder.", "online_network.", "encoder_q.", "base_encoder.",
              "student.", "net.", "model.", "trunk.")


def _rank(prefix: str) -> int:
    bare = prefix[len("module."):] if prefix.startswith("module.") else prefix
    return _PREFERRED.index(bare) if bare in _PREFERRED else len(_PREFERRED)


def _read_ddp(obj: Any) -> _Layout | None:
    """`module.`-prefixed dumps: SwAV (module.conv1, module.projection_head), DINO (student/teacher with
    module.backbone., module.head.), BYOL-style online/target networks. The ResNet is the prefix P with
    both P+conv1.weight and P+layer1.0.conv1.weight; DINO's teacher is used, as DINO's eval scripts do."""
    meta, outside, dino = {}, [], False
    sd = _sub(obj, "state_dict")
    if _sub(obj, "teacher") is not None and _sub(obj, "student") is not None:
        sd, dino, meta = _sub(obj, "teacher"), True, {"dino_checkpoint_key": "teacher"}
        outside = _names(_sub(obj, "student"), "student.")
    elif sd is None:
        sd = obj
    if not dino and not any(str(k).startswith("module.") for k in sd):
        return None
    found = [str(k)[: -len("conv1.weight")] for k in sd if str(k).endswith("conv1.weight")]
    candidates = sorted((p for p in found if f"{p}layer1.0.conv1.weight" in sd and (dino or p.startswith("module."))),
                        key=_rank)
    if not candidates:
        return None
    if len(candidates) > 1 and _rank(candidates[0]) == _rank(candidates[1]):
        raise ValueError(f"several ResNets in one state dict ({', '.join(candidates)}) and no rule to pick one; "
                         f"extract the one you want into a plain torchvision state dict first")
    return _Layout("ddp", sd, prefix=candidates[0], fc_is_head=False, epoch=obj.get("epoch"), meta=meta,
                   outside=outside)


_READERS = (_read_detectron2, _read_vissl, _read_moco, _read_moco_v3, _read_mmselfsup, _read_timm,
            _read_torchvision, _read_ddp)


def _tensor_names(obj: Any, prefix: str = "", limit: int = 8) -> list[str]:
    """A sample of dotted paths to tensors/arrays anywhere in a nested checkpoint."""
    out: list[str] = []
    if isinstance(obj, Mapping):
        for k, v in obj.items():
            if isinstance(v, (torch.Tensor, np.ndarray)):
                out.append(f"{prefix}{k}")
            elif isinstance(v, Mapping):
                out += _tensor_names(v, f"{prefix}{k}.", limit - len(out))
            if len(out) >= limit:
                break
    return out[:limit]


def _as_tensor(value: Any) -> torch.Tensor | None:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, (np.ndarray, np.generic)) and value.dtype != object:
        return torch.from_numpy(np.array(value, copy=True))
    return None


def _is_classifier(fc: Mapping[str, torch.Tensor]) -> bool:
    return set(fc) in ({"fc.weight", "fc.bias"}, {"fc.weight"}) and fc["fc.weight"].ndim == 2


def parse_random_spec(spec: str) -> tuple[str, int] | None:
    """`random:ARCH[:WIDTH]` -> (arch, width); None when `spec` is not a random-init spec."""
    if not isinstance(spec, str) or not (spec == "random" or spec.startswith("random:")):
        return None
    parts = spec.split(":")
    if len(parts) not in (2, 3) or not parts[1]:
        raise CheckpointError(f"{spec!r}: a random-init checkpoint spec needs an arch: random:ARCH[:WIDTH], "
                              f"e.g. random:resnet50 or random:resnet18_small:16")
    try:
        width = int(parts[2]) if len(parts) == 3 else 64
    except ValueError:
        raise CheckpointError(f"{spec!r}: WIDTH must be an integer (random:ARCH[:WIDTH])") from None
    return parts[1], width


def random_model(arch: str, width: int = 64, num_classes: int = 1000) -> tuple[nn.Module, LoadedCheckpoint]:
    """A randomly initialised backbone (torch's global RNG; seed it first), described like a checkpoint."""
    try:
        model = build_backbone(arch, num_classes, width)
    except ValueError as e:
        raise CheckpointError(f"random:{arch}:{width}: {e}") from None
    sd = {k: v for k, v in model.state_dict().items() if not k.startswith("fc.")}
    info = LoadedCheckpoint(source=f"random:{arch}:{width}", format="random", arch=arch, width=width,
                            state_dict=sd, kept=list(sd), key_map={k: k for k in sd})
    return model, info


def load_backbone(path: str | Path, trust: bool = False) -> LoadedCheckpoint:
    """Read any supported checkpoint into the canonical torchvision form (see module docstring).

    `path` may also be `random:ARCH[:WIDTH]` for a random-init baseline.
    """
    spec = parse_random_spec(str(path))
    if spec is not None:
        return random_model(*spec)[1]
    path = Path(path)
    obj = safe_load(path, trust=trust)
    if not isinstance(obj, Mapping) or not obj:
        raise CheckpointError(f"{path}: not a checkpoint: expected a dict of weights, got "
                              f"{'an empty dict' if isinstance(obj, Mapping) else type(obj).__name__}")
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(obj.get(key), Mapping) and not obj[key]:
            raise CheckpointError(f"{path}: the checkpoint's {key!r} is an empty state dict")
    try:
        layout = next((found for read in _READERS if (found := read(obj)) is not None), None)
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from None
    if layout is None:
        raise CheckpointError(
            f"{path}: unknown checkpoint format. Top-level keys: {sorted(map(str, obj))[:20]}; sample of "
            f"parameter names: {_tensor_names(obj) or 'none found'}. Supported: MoCo v1/v2/v3, MMSelfSup, "
            f"VISSL, torchvision, timm, module.-prefixed DDP (SwAV/DINO/BYOL), detectron2 .pkl")
    return _canonicalise(path, layout)


def _canonicalise(path: Path, layout: _Layout) -> LoadedCheckpoint:
    state, fc, kept, dropped, key_map = {}, {}, [], list(), {}
    for src, value in layout.weights.items():
        src = str(src)
        name = layout.rename(src[len(layout.prefix):]) if src.startswith(layout.prefix) else None
        tensor = _as_tensor(value)
        if name is None or tensor is None:
            dropped.append(src)
        elif _BACKBONE_KEY.match(name):
            state[name], key_map[src] = tensor, name
            kept.append(src)
        elif name.startswith("fc."):
            fc[name], key_map[src] = tensor, name
        else:
            dropped.append(src)
    has_fc = not layout.fc_is_head and _is_classifier(fc)
    fc_src = [s for s, n in key_map.items() if n.startswith("fc.")]
    if has_fc:
        state.update(fc)
        kept += fc_src
        head = {}
    else:
        head = fc
        dropped += fc_src
    if not state:
        raise CheckpointError(f"{path}: {layout.format} checkpoint with an empty backbone state dict "
                              f"(no ResNet weights under {layout.prefix or 'the top level'!r})")
    try:
        arch, width = infer_arch(state)
    except ValueError as e:
        raise CheckpointError(f"{path}: {layout.format} checkpoint, but the weights are not a torchvision "
                              f"ResNet: {e}; sample of names: {list(state)[:6]}") from None
    epoch = layout.epoch if isinstance(layout.epoch, int) and not isinstance(layout.epoch, bool) else None
    return LoadedCheckpoint(source=str(path), format=layout.format, arch=arch, width=width, state_dict=state,
                            has_fc=has_fc, epoch=epoch, md5=file_md5(path), kept=kept,
                            dropped=dropped + layout.outside, head=head, key_map=key_map,
                            meta={"prefix": layout.prefix, **layout.meta})


# ----------------------------------------------------------------------------------------------------
# Building a model from a checkpoint
# ----------------------------------------------------------------------------------------------------

def _shape_report(state: Mapping[str, torch.Tensor], model: nn.Module, arch: str, width: int) -> str | None:
    """None when `state` fits `model` (fc and BN counters may be missing), else which keys/shapes differ."""
    target = model.state_dict()
    shapes = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(target[k].shape)}"
              for k, v in state.items() if k in target and tuple(v.shape) != tuple(target[k].shape)]
    unexpected = [k for k in state if k not in target]
    missing = [k for k in target if k not in state and not k.startswith("fc.")
               and not k.endswith("num_batches_tracked")]
    if not (shapes or unexpected or missing):
        return None
    parts = [f"architecture mismatch with {arch} (width {width})"]
    for label, items in (("shapes differ", shapes), ("keys not in the model", unexpected),
                         ("model keys missing from the checkpoint", missing)):
        if items:
            parts.append(f"{label} ({len(items)}): " + "; ".join(items[:8]) + (" ..." if len(items) > 8 else ""))
    return ". ".join(parts)


def build_model(path: str | Path, trust: bool = False, num_classes: int | None = None,
                arch: str | None = None, width: int | None = None) -> tuple[nn.Module, LoadedCheckpoint]:
    """A torchvision ResNet with the checkpoint's backbone loaded, as main_lincls.py of
    facebookresearch/moco does: the only keys allowed to be missing are fc.weight/fc.bias (plus BN
    `num_batches_tracked` counters some formats omit). Without a usable classifier in the checkpoint
    the fc is re-initialised N(0, 0.01), bias 0. `arch`/`width` override the inferred ones."""
    spec = parse_random_spec(str(path))
    if spec is not None:
        return random_model(arch or spec[0], width or spec[1], num_classes or 1000)
    ckpt = load_backbone(path, trust=trust)
    arch, width = arch or ckpt.arch, width or ckpt.width
    state = dict(ckpt.state_dict)
    if ckpt.has_fc and num_classes is None:
        num_classes = int(state["fc.weight"].shape[0])
    try:
        model = build_backbone(arch, num_classes or 1000, width)
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from None
    if ckpt.has_fc and tuple(state["fc.weight"].shape) != tuple(model.fc.weight.shape):
        state = {k: v for k, v in state.items() if not k.startswith("fc.")}  # new task: new classifier
    problem = _shape_report(state, model, arch, width)
    if problem:
        raise CheckpointError(f"{path}: {problem}")
    msg = model.load_state_dict(state, strict=False)
    missing = {k for k in msg.missing_keys if not k.endswith("num_batches_tracked")}
    assert missing <= {"fc.weight", "fc.bias"} and not msg.unexpected_keys, (missing, msg.unexpected_keys)
    if "fc.weight" in missing:
        nn.init.normal_(model.fc.weight, mean=0.0, std=0.01)
        nn.init.zeros_(model.fc.bias)
    return model, ckpt


# ----------------------------------------------------------------------------------------------------
# detectron2 names (facebookresearch/moco detection/convert-pretrain-to-detectron2.py,
# detectron2 tools/convert-torchvision-to-d2.py)
# ----------------------------------------------------------------------------------------------------

def _tv_to_d2(name: str) -> str:
    """torchvision -> detectron2: no `layer` => `stem.` prefix; layerN->res{N+1}; bnK->convK.norm;
    downsample.0->shortcut, downsample.1->shortcut.norm."""
    if "layer" not in name:
        name = "stem." + name
    name = re.sub(r"layer([1-4])", lambda m: f"res{int(m.group(1)) + 1}", name)
    name = re.sub(r"bn([1-3])", r"conv\1.norm", name)
    return name.replace("downsample.0", "shortcut").replace("downsample.1", "shortcut.norm")


def _d2_to_tv(name: str) -> str:
    """The inverse of `_tv_to_d2`."""
    name = name[len("stem."):] if name.startswith("stem.") else name
    name = re.sub(r"\bres([2-5])\b", lambda m: f"layer{int(m.group(1)) - 1}", name)
    name = name.replace("shortcut.norm", "downsample.1").replace("shortcut", "downsample.0")
    return re.sub(r"conv([1-3])\.norm", r"bn\1", name)


def to_detectron2(state_dict: Mapping[str, torch.Tensor], author: str = "mocobench") -> dict:
    """The detectron2 pickle payload {"model": {d2 name: numpy array}, "__author__", "matching_heuristics"}."""
    model = {}
    for name, value in state_dict.items():
        tensor = value.detach().cpu()
        model[_tv_to_d2(name)] = (tensor.float() if tensor.dtype == torch.bfloat16 else tensor).numpy()
    return {"model": model, "__author__": author, "matching_heuristics": True}


def from_detectron2(payload: Mapping) -> dict[str, torch.Tensor]:
    """A detectron2 payload (or bare {d2 name: array} dict) back to torchvision names, all keys."""
    model = payload.get("model", payload) if isinstance(payload, Mapping) else None
    if not isinstance(model, Mapping):
        raise CheckpointError("detectron2 payload without a 'model' dict of arrays")
    out = {}
    for name, value in model.items():
        tensor = _as_tensor(value)
        if tensor is None:
            raise CheckpointError(f"detectron2 payload: {name!r} is {type(value).__name__}, not an array")
        out[_d2_to_tv(str(name))] = tensor
    return out


# ----------------------------------------------------------------------------------------------------
# Writers
# ----------------------------------------------------------------------------------------------------

def write_checkpoint(state_dict: Mapping[str, torch.Tensor], fmt: str, path: str | Path, arch: str | None = None,
                     width: int | None = None, head: Mapping[str, torch.Tensor] | None = None,
                     epoch: int | None = None, author: str = "mocobench", source_format: str | None = None) -> Path:
    """Write a canonical (torchvision-named) state dict as `fmt`:

    - torchvision: the plain state dict (what torchvision's load_state_dict and MMDetection's
      `init_cfg=dict(type='Pretrained', checkpoint=...)` read); `head` is not written.
    - moco: our/official MoCo layout, weights under `module.encoder_q.` (head as `encoder_q.fc.*`),
      with `epoch`, `arch` and a `config` dict; it has no key encoder or queue (not resumable).
    - detectron2: the pickle of `to_detectron2(state_dict + head)`, as the official MoCo script writes.
    """
    if fmt not in WRITE_FORMATS:
        raise CheckpointError(f"unknown output format {fmt!r}; choose one of {', '.join(WRITE_FORMATS)}")
    state = {k: v.detach().cpu() for k, v in state_dict.items()}
    head = {k: v.detach().cpu() for k, v in (head or {}).items()}
    if arch is None or width is None:
        guessed = infer_arch(state)
        arch, width = arch or guessed[0], width or guessed[1]
    if fmt == "torchvision":
        return atomic_save(state, path)
    if fmt == "detectron2":
        payload = to_detectron2({**state, **head}, author=author)
        return _atomic_write(path, lambda f: pickle.dump(payload, f, protocol=pickle.HIGHEST_PROTOCOL))
    full = {**state, **head}
    linears = [v for k, v in full.items() if k.startswith("fc.") and k.endswith("weight") and v.ndim == 2]
    config = {"arch": arch, "width": width, "mlp": any(k.startswith("fc.0.") for k in full),
              "moco_dim": int(linears[-1].shape[0]) if linears else None, "converted_from": source_format}
    obj = {"epoch": int(epoch or 0), "arch": arch, "config": config,
           "state_dict": {f"module.encoder_q.{k}": v for k, v in full.items()}}
    return atomic_save(obj, path)


_D2_AUTHOR = {"moco": "MOCO", "torchvision": "torchvision"}  # what the official converters write


def convert(src: str | Path, fmt: str, out: str | Path, trust: bool = False) -> LoadedCheckpoint:
    """Read `src` (any supported format) and write it as `fmt`; returns what was read."""
    if fmt not in WRITE_FORMATS:
        raise CheckpointError(f"unknown output format {fmt!r}; choose one of {', '.join(WRITE_FORMATS)}")
    if fmt == "detectron2" and not str(out).endswith(".pkl"):
        raise CheckpointError(f"{out}: detectron2 reads pickled weights only from files ending in .pkl")
    if parse_random_spec(str(src)) is None and Path(src).resolve() == Path(out).resolve():
        raise CheckpointError(f"{out}: output would overwrite the input checkpoint")
    ckpt = load_backbone(src, trust=trust)
    write_checkpoint(ckpt.state_dict, fmt, out, arch=ckpt.arch, width=ckpt.width, head=ckpt.head,
                     epoch=ckpt.epoch, author=_D2_AUTHOR.get(ckpt.format, "mocobench"), source_format=ckpt.format)
    return ckpt
