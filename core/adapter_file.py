"""Reading and writing adapter files: safetensors only, atomic writes, errors that name the file.

Pickle-based files (.ckpt, .pt, .bin) can run code when loaded, so adapters are read from safetensors
only; ``torch.load(weights_only=True)`` is the one other loader allowed by the project and is not needed
for any adapter format this pack reads.
"""
from __future__ import annotations

import json
import os
import struct
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file


class AdapterFileError(ValueError):
    """An adapter file is missing, unreadable or holds values that cannot be used."""


def read_safetensors(path: str | os.PathLike,
                     suffix: str = ".safetensors") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Load every tensor and the metadata of a safetensors file, refusing anything else.

    ``suffix``: the file name's expected ending (the pack's training-state files are safetensors under their own
    suffix, which keeps them out of ComfyUI's LoRA lists). Raises AdapterFileError naming the file (and the key,
    for non-finite values) when the file is missing, not safetensors, truncated or corrupt, or holds NaN /
    infinite values.
    """
    path = Path(path)
    if not path.is_file():
        raise AdapterFileError(f"adapter file not found: {path}")
    if path.suffix.lower() != suffix:
        raise AdapterFileError(
            f"{path.name}: only .safetensors adapter files are loaded (pickle formats such as "
            f"{path.suffix or 'this one'} can run code); convert it to safetensors first")
    metadata = _read_header_metadata(path)
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, RuntimeError) as error:
        raise AdapterFileError(f"{path.name}: not a readable safetensors file (truncated or corrupt?): {error}") from error
    if not tensors:
        raise AdapterFileError(f"{path.name}: the file holds no tensors")
    check_finite(tensors, path.name)
    return tensors, metadata


def check_finite(tensors: dict[str, torch.Tensor], owner: str) -> None:
    """Raise AdapterFileError naming ``owner`` and the key when a floating-point tensor holds NaN or infinite values."""
    for key, tensor in tensors.items():
        # a finite sum (one read, no mask) proves every value finite; only a non-finite sum needs the exact check
        # (huge finite values can overflow the sum)
        if tensor.is_floating_point() and not torch.isfinite(tensor.sum()) \
                and not torch.isfinite(tensor).all():
            raise AdapterFileError(f"{owner}: tensor '{key}' contains NaN or infinite values")


def _read_header_metadata(path: Path) -> dict[str, str]:
    """The __metadata__ block of a safetensors header, validating the header on the way."""
    size = path.stat().st_size
    with open(path, "rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            raise AdapterFileError(f"{path.name}: not a safetensors file ({size} bytes, no header)")
        (header_len,) = struct.unpack("<Q", head)
        if header_len <= 0 or 8 + header_len > size:
            if head[:1] == b"\x80" and 2 <= head[1] <= 5 or head[:4] == b"PK\x03\x04":  # pickle / torch.save zip
                raise AdapterFileError(f"{path.name}: a pickle or torch.save file renamed .safetensors; pickle files can "
                                       f"run code when loaded and are never loaded here: convert it to safetensors")
            raise AdapterFileError(
                f"{path.name}: not a safetensors file or truncated (header says {header_len} bytes, file has {size})")
        try:
            header = json.loads(handle.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise AdapterFileError(f"{path.name}: not a safetensors file (header is not JSON: {error})") from error
    if not isinstance(header, dict):
        raise AdapterFileError(f"{path.name}: not a safetensors file (header is not a JSON object)")
    try:
        data_end = max((int(entry["data_offsets"][1]) for key, entry in header.items()
                        if key != "__metadata__" and isinstance(entry, dict) and "data_offsets" in entry), default=0)
    except (TypeError, ValueError, IndexError, KeyError) as error:
        raise AdapterFileError(f"{path.name}: malformed safetensors header (a tensor's data_offsets is not a pair of "
                               f"numbers: {error})") from error
    if 8 + header_len + data_end > size:
        raise AdapterFileError(f"{path.name}: truncated: the header describes {data_end} bytes of tensor data, "
                               f"the file holds {size - 8 - header_len}")
    metadata = header.get("__metadata__") or {}
    if not isinstance(metadata, dict):
        raise AdapterFileError(f"{path.name}: malformed safetensors header (__metadata__ is not a JSON object)")
    return {str(k): str(v) for k, v in metadata.items()}


def write_safetensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str],
                      overwrite: bool = False) -> Path:
    """Write atomically: a temporary file in the same folder, then a rename. Never half-written.

    Refuses to replace an existing file unless ``overwrite`` is true.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists; choose another name or allow overwriting")
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    os.close(handle)
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, temporary,
                  metadata={str(k): str(v) for k, v in metadata.items()})
        os.chmod(temporary, 0o644)  # mkstemp makes it private (0600); saved models are ordinary readable files
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


def path_inside(root: str | os.PathLike, subfolder: str, filename: str, suffix: str = ".safetensors") -> Path:
    """root/subfolder/filename<suffix>, refusing names that are empty, absolute or escape root."""
    if not filename or not filename.strip():
        raise ValueError("filename is empty")
    for label, part in (("subfolder", subfolder), ("filename", filename)):
        if part and (os.path.isabs(part) or ".." in Path(part).parts or "\x00" in part):
            raise ValueError(f"{label} {part!r} must be a relative name inside the folder (no '..', no absolute path)")
    name = filename if filename.endswith(suffix) else filename + suffix
    if len(Path(name).name.encode()) > 255:
        raise ValueError(f"filename is too long ({len(Path(name).name.encode())} bytes with {suffix}; at most 255)")
    # abspath, not resolve: a model file or subfolder that the user symlinked into the folder is still inside it
    # ('..' and absolute names are refused above); resolving would follow the link out and refuse it.
    root_path = Path(os.path.abspath(root))
    target = Path(os.path.abspath(root_path / (subfolder or "") / name))
    if root_path not in target.parents:
        raise ValueError(f"{subfolder}/{name} would be written outside {root_path}")
    return target
