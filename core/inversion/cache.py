"""The embedding cache on disk and its file format: one ``<key>.safetensors`` per embedding, in
the single-tensor format diffusers' ``load_textual_inversion`` (and A1111 / ComfyUI) read."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import time
import uuid
from pathlib import Path

import torch

from ..paths import cache_dir
from .recipe import RECIPE_VERSION, InversionResult

log = logging.getLogger(__name__)

#: Default size limit of the embedding cache. One SD1.5 embedding is about 4 KB, so this holds
#: thousands; least-recently-used files go first.
DEFAULT_CACHE_BYTES = 64 * 1024 * 1024


class CorruptEmbedding(ValueError):
    pass


class InversionCache:
    """Embeddings on disk, ``<folder>/<key>.safetensors``, least-recently-used out past `max_bytes`.

    Each file holds one tensor ``{token: float32 (1, D)}`` (what diffusers'
    ``load_textual_inversion`` reads) and metadata: token, text, model, settings, a checksum of
    the tensor. A file that cannot be read or does not match is reported, deleted and retrained.
    Files are written to a temporary name and renamed, so readers never see half a file. Use
    (a hit) refreshes a file's modification time, which is what eviction orders by.
    """

    def __init__(self, folder: str | os.PathLike[str] | None = None, max_bytes: int = DEFAULT_CACHE_BYTES):
        self.folder = Path(folder) if folder is not None else cache_dir() / "embeddings"
        self.max_bytes = int(max_bytes)

    def path(self, key: str) -> Path:
        return self.folder / f"{key}.safetensors"

    def get(
        self, key: str, dim: int | None = None, parts: tuple[tuple[str, int], ...] = ()
    ) -> InversionResult | None:
        """The cached embedding, or None (missing, or damaged: then it is deleted with a warning).
        `dim` is the expected width; `parts` the expected multi-encoder layout (SDXL)."""
        path = self.path(key)
        if not path.is_file():
            return None
        try:
            result = read_embedding(path, dim, parts)
        except CorruptEmbedding as e:
            log.warning("appearance cache: %s is damaged (%s); deleting it and training again", path, e)
            with contextlib.suppress(OSError):
                path.unlink()
            return None
        with contextlib.suppress(OSError):
            os.utime(path)  # mark as recently used
        return result

    def put(self, key: str, result: InversionResult, metadata: dict[str, str] | None = None) -> Path:
        """Write atomically, then evict least-recently-used files past the size limit."""
        from safetensors.torch import save

        self.folder.mkdir(parents=True, exist_ok=True)
        vector = result.embedding.detach().float().cpu().reshape(1, -1).contiguous()
        meta = {
            **(metadata or {}),
            "token": result.token,
            "checksum": _checksum(vector),
            "recipe": str(RECIPE_VERSION),
        }
        if result.parts:  # one tensor per text encoder, as SDXL embeddings are shared (clip_l, clip_g)
            widths = [d for _k, d in result.parts]
            pieces = torch.split(vector, widths, dim=-1)
            tensors = {k: t.contiguous() for (k, _d), t in zip(result.parts, pieces, strict=True)}
        else:
            tensors = {result.token: vector}
        data = save(tensors, metadata=meta)
        path = self.path(key)
        tmp = self.folder / f".{key}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            with contextlib.suppress(OSError):
                tmp.unlink()
        self.evict(keep=path)
        return path

    def entries(self) -> list[tuple[Path, int, float]]:
        """(path, size, last use) of every cached embedding."""
        out = []
        for p in self.folder.glob("*.safetensors"):
            with contextlib.suppress(OSError):
                st = p.stat()
                out.append((p, st.st_size, st.st_mtime))
        return out

    def evict(self, keep: Path | None = None) -> list[Path]:
        """Delete least-recently-used files until the cache fits `max_bytes`; returns them."""
        now = time.time()
        for tmp in self.folder.glob(".*.tmp"):  # left behind by a crash mid-write
            with contextlib.suppress(OSError):
                if now - tmp.stat().st_mtime > 3600:
                    tmp.unlink()
        entries = sorted(self.entries(), key=lambda e: e[2])
        total = sum(size for _p, size, _t in entries)
        removed = []
        for path, size, _t in entries:
            if total <= self.max_bytes:
                break
            if keep is not None and path == keep:
                continue
            with contextlib.suppress(OSError):
                path.unlink()
                total -= size
                removed.append(path)
        return removed


def _checksum(vector: torch.Tensor) -> str:
    return hashlib.sha256(vector.float().contiguous().numpy().tobytes()).hexdigest()


def read_embedding(
    path: str | os.PathLike[str], dim: int | None = None, parts: tuple[tuple[str, int], ...] = ()
) -> InversionResult:
    """Read and verify one embedding file; raises `CorruptEmbedding` if anything is off.
    With `parts` (SDXL: clip_l, clip_g) the file must hold one tensor per text encoder."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
            meta = f.metadata() or {}
            if parts:
                missing = [k for k, _d in parts if k not in keys]
                if missing or len(keys) != len(parts):
                    raise CorruptEmbedding(f"expected tensors {[k for k, _ in parts]}, found {keys}")
                pieces = [f.get_tensor(k).float().reshape(1, -1) for k, _d in parts]
                for (k, d), piece in zip(parts, pieces, strict=True):
                    if piece.shape[1] != d:
                        raise CorruptEmbedding(f"{k} has width {piece.shape[1]}, its text encoder's is {d}")
                tensor = torch.cat(pieces, dim=1)
                token = meta.get("token", "")
            elif len(keys) != 1:
                raise CorruptEmbedding(f"expected one tensor, found {len(keys)}")
            else:
                token = keys[0]
                tensor = f.get_tensor(token).clone()  # not a view of the (memory-mapped) file
    except CorruptEmbedding:
        raise
    except Exception as e:  # safetensors raises its own error types for damaged files
        raise CorruptEmbedding(f"unreadable: {e}") from e
    vector = tensor.float().reshape(-1) if tensor.dim() == 2 and tensor.shape[0] == 1 else None
    if tensor.dim() == 1:
        vector = tensor.float()
    if vector is None:
        raise CorruptEmbedding(f"unexpected tensor shape {tuple(tensor.shape)}")
    if dim is not None and vector.numel() != dim:
        raise CorruptEmbedding(f"embedding size {vector.numel()}, the text encoder's is {dim}")
    if not torch.isfinite(vector).all():
        raise CorruptEmbedding("non-finite values")
    if meta.get("token", token) != token:
        raise CorruptEmbedding("token in metadata does not match the tensor's name")
    if "checksum" in meta and meta["checksum"] != _checksum(vector.reshape(1, -1)):
        raise CorruptEmbedding("checksum mismatch")
    return InversionResult(token=token, embedding=vector.contiguous(), losses=[], parts=tuple(parts))
