"""The digest of what travels: the same on the site that sends a record and on the server that receives it."""

from __future__ import annotations

import hashlib
from typing import Any


def payload_digest(record: Any) -> str:
    """SHA-256 over an ArrayRecord's tensors in name order (name, dtype, shape and the serialized bytes)."""
    digest = hashlib.sha256()
    for name in sorted(record.keys()):
        array = record[name]
        digest.update(f"{name}\0{array.dtype}\0{list(array.shape)}\0".encode())
        digest.update(array.data)
    return digest.hexdigest()


def payload_bytes(record: Any) -> int:
    """Bytes of the serialized tensors in an ArrayRecord, as they travel."""
    return sum(len(array.data) for array in record.values())




def model_fingerprint(model: Any) -> str:
    """SHA-256 over a model's state (names, dtypes, shapes, bytes): which base model a run was built on."""
    import torch

    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        flat = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}\0{flat.dtype}\0{list(tensor.shape)}\0".encode())
        digest.update(flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b"")
    return digest.hexdigest()
