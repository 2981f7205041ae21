"""The painter's own textual-inversion embeddings, used in prompts by name.

Syntax (in the prompt, the negative prompt and layer texts):

- ComfyUI's ``embedding:NAME``: NAME is the embedding's name in the model folders (its path under
  the embeddings folder, sub-folders included, with ``/``), with or without the file's extension
  (without it, ``.safetensors``, ``.pt``, ``.bin`` are tried in that order, as ComfyUI does). The
  name ends at white space or at one of ``,:()[]`` (so ``(embedding:foo:1.2)`` reads ``foo``).
  A name no embedding has is an error naming the field.
- A1111's bare name: a whole word (bounded by white space, ``,:;()[]{}|`` or a sentence's ``.!?``)
  equal to an embedding file's name without its folders and extension, case-sensitive. A word
  that is no embedding's name is just a word.

Each use becomes one placeholder token per vector of the embedding (`added_tokens` puts them in
every tokenizer and text encoder of the family) for as long as the prompt is tokenized and
encoded; afterwards the model is exactly as before, also on error or cancel. Equal texts expand to
equal placeholder words, so a layer text naming an embedding still matches its words in the
prompt and its token span covers the placeholders.

Files: A1111's ``.pt`` (``string_to_param`` {"*": (n, D)}; read with ``weights_only=True``),
``.safetensors`` with ``emb_params`` (SD 1.x/2.x) or ``clip_l`` + ``clip_g`` (SDXL), and diffusers'
``learned_embeds`` ({token: (D,) or (n, D)}) in any of the suffixes. Each part's width must be its
text encoder's width (an SD 1.5 embedding on an SDXL model is an error naming both).
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .collage import CollageError
from .families import SD1, SD2, ModelFamily

PREFIX = "embedding:"
#: Tried in this order after a name given without its extension (ComfyUI's order).
NAME_SUFFIXES = (".safetensors", ".pt", ".bin")
_SINGLE = "*"  # the key of a one-encoder embedding's vectors (string_to_param's own key)
_PLACEHOLDER = "<collage-emb{use}v{vector}>"  # 'm' is not hex: never an appearance token
_NAME_CHARS = r"[^\s,:()\[\]]+"
_BOUNDARY_BEFORE = r"(?<![^\s,:;()\[\]{}|])"
_BOUNDARY_AFTER = r"(?![^\s,:;.!?()\[\]{}|])"


class EmbeddingError(ValueError):
    """An embedding file that cannot be used; the message names the embedding."""


@dataclass(frozen=True)
class EmbeddingFiles:
    """The embeddings a job may use: name (path under the embeddings folder, e.g. ``style/foo.pt``)
    → file. A job gets it as `generate(embeddings=...)`; the CLI and the bridge build it from the
    model folders (`from_library`)."""

    files: Mapping[str, Path] = field(default_factory=dict)

    @classmethod
    def from_library(cls, library) -> EmbeddingFiles:
        """The usable embeddings of a `core.model_library.ModelLibrary` (or None: no embeddings)."""
        if library is None:
            return cls({})
        from .weight_files import EMBEDDING

        return cls({e.name: e.path for e in library.entries(EMBEDDING) if e.usable})

    def find(self, name: str) -> str | None:
        """The name of the embedding `embedding:NAME` means (ComfyUI's lookup), or None."""
        name = name.replace("\\", "/")
        for candidate in (name, *(name + s for s in NAME_SUFFIXES)):
            if candidate in self.files:
                return candidate
        return None

    def bare_names(self) -> dict[str, str]:
        """A1111's word for each embedding (its file name without folders and extension) → its
        name; of two files with one stem, the first by name."""
        words: dict[str, str] = {}
        for name in sorted(self.files):
            words.setdefault(Path(name).stem, name)
        return words


@dataclass(frozen=True)
class EmbeddingUse:
    """One use of an embedding in a text: its characters [start, end) and the embedding's name."""

    start: int
    end: int
    name: str


def find_uses(text: str, embeddings: EmbeddingFiles, where: str) -> tuple[list[EmbeddingUse], list[str]]:
    """The embedding uses in `text` (in order) and the problems ("where: ...") of names not found."""
    bare = embeddings.bare_names()
    alternatives = [rf"{re.escape(PREFIX)}(?P<named>{_NAME_CHARS})"]
    if bare:
        words = "|".join(re.escape(w) for w in sorted(bare, key=len, reverse=True))
        alternatives.append(rf"{_BOUNDARY_BEFORE}(?P<bare>{words}){_BOUNDARY_AFTER}")
    uses, problems = [], []
    for m in re.finditer("|".join(alternatives), text):
        if m["named"] is None:
            uses.append(EmbeddingUse(m.start(), m.end(), bare[m["bare"]]))
            continue
        found = embeddings.find(m["named"])
        if found is None:
            problems.append(f"{where}: {_not_found(m['named'], embeddings)}")
        else:
            uses.append(EmbeddingUse(m.start(), m.end(), found))
    return uses, problems


def _not_found(name: str, embeddings: EmbeddingFiles) -> str:
    if not embeddings.files:
        return f"no embedding {name!r}: there are no embeddings (they are found in the model folders, --models-dir)"
    names = sorted(embeddings.files)
    shown = ", ".join(names[:20]) + (f", … ({len(names)} in all)" if len(names) > 20 else "")
    return f"no embedding {name!r} in the model folders (which have: {shown})"


def embedding_problems(texts: list[tuple[str, str]], embeddings: EmbeddingFiles) -> list[str]:
    """Problems of `embedding:NAME` uses naming no embedding, for (field, text) pairs; files are
    not read (what a request can be checked for before its job runs)."""
    return [p for where, text in texts for p in find_uses(text, embeddings, where)[1]]


# --- files ----------------------------------------------------------------------------------------
def read_vectors(path: Path, name: str) -> dict[str, torch.Tensor]:
    """An embedding file's vectors: {"*": (n, D)} for one text encoder, or {"clip_l": (n, 768),
    "clip_g": (n, 1280)} for SDXL (float32). Raises `EmbeddingError`."""
    label = f"embedding {name!r}"
    try:
        if Path(path).suffix.lower() == ".safetensors":
            from safetensors.torch import load_file

            data = load_file(str(path))
        else:
            data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch and safetensors raise many types for damaged files
        raise EmbeddingError(f"{label} cannot be read: {e}") from e
    vectors = _vectors_of(data, label)
    for key, t in vectors.items():
        if t.ndim == 1:
            t = t[None]
        if t.ndim != 2 or t.shape[0] < 1 or not t.is_floating_point():
            raise EmbeddingError(f"{label}: {key} is not a list of vectors (shape {tuple(t.shape)})")
        vectors[key] = t.detach().float()
    return vectors


def _vectors_of(data: object, label: str) -> dict[str, torch.Tensor]:
    if not isinstance(data, dict):
        raise EmbeddingError(f"{label}: not a textual-inversion embedding (it holds {type(data).__name__})")
    if "clip_l" in data or "clip_g" in data:
        missing = [k for k in ("clip_l", "clip_g") if not isinstance(data.get(k), torch.Tensor)]
        if missing:
            raise EmbeddingError(f"{label}: an SDXL embedding needs clip_l and clip_g, it lacks {missing}")
        return {"clip_l": data["clip_l"], "clip_g": data["clip_g"]}
    if isinstance(data.get("emb_params"), torch.Tensor):
        return {_SINGLE: data["emb_params"]}
    params = data.get("string_to_param")
    if isinstance(params, dict):  # A1111's .pt
        candidates = dict(params)
    else:  # flattened (a .safetensors of A1111's names), or diffusers' {token: vector}
        candidates = {k: v for k, v in data.items() if isinstance(v, torch.Tensor)}
        flat = {k: v for k, v in candidates.items() if k.startswith("string_to_param.")}
        candidates = flat or candidates
    tensors = [v for v in candidates.values() if isinstance(v, torch.Tensor)]
    if len(tensors) != 1:
        raise EmbeddingError(
            f"{label}: not a textual-inversion embedding of a known format "
            f"(expected one tensor of vectors, found {len(tensors)})"
        )
    return {_SINGLE: tensors[0]}


def embedding_rows(
    vectors: dict[str, torch.Tensor], family: ModelFamily, dims: list[int], name: str
) -> torch.Tensor:
    """(n, sum(dims)): each vector's parts for the family's text encoders side by side, as
    `added_tokens` takes them. Raises `EmbeddingError` when the embedding does not fit."""
    slots = family.text_encoders
    widths = " + ".join(str(d) for d in dims)
    model = f"this {family.label} model (text encoder{'s' if len(dims) > 1 else ''} {widths} wide"
    model += f": {', '.join(s.embedding_key for s in slots)})" if len(slots) > 1 else ")"
    if _SINGLE in vectors:
        width = vectors[_SINGLE].shape[1]
        made_for = {SD1.context_dim: SD1, SD2.context_dim: SD2}.get(width)
        what = f"its vectors are {width} wide" + (f", as for {made_for.label}" if made_for else "")
        if len(slots) != 1 or width != dims[0]:
            raise EmbeddingError(f"embedding {name!r} does not fit {model}: {what}")
        return vectors[_SINGLE]
    keys = [s.embedding_key for s in slots]
    if set(keys) != set(vectors):
        found = " + ".join(f"{k} {v.shape[1]}" for k, v in vectors.items())
        raise EmbeddingError(f"embedding {name!r} does not fit {model}: it has {found} (an SDXL embedding)")
    parts = [vectors[k] for k in keys]
    for key, part, d in zip(keys, parts, dims, strict=True):
        if part.shape[1] != d:
            raise EmbeddingError(
                f"embedding {name!r} does not fit {model}: its {key} is {part.shape[1]} wide"
            )
    if len({p.shape[0] for p in parts}) != 1:
        counts = ", ".join(f"{k} {p.shape[0]}" for k, p in zip(keys, parts, strict=True))
        raise EmbeddingError(f"embedding {name!r}: its parts have different numbers of vectors ({counts})")
    return torch.cat(parts, dim=1)


# --- a job's texts --------------------------------------------------------------------------------
@dataclass
class ExpandedTexts:
    """A job's texts with each embedding use replaced by its placeholder words."""

    texts: list[str]  # in the order given
    placeholders: dict[str, str] = field(default_factory=dict)  # placeholder words -> as written

    def original(self, text: str) -> str:
        """`text` with placeholder words written back as the user wrote them (for display)."""
        for words, written in sorted(self.placeholders.items(), key=lambda kv: -len(kv[0])):
            text = text.replace(words, written)
        return text


@contextlib.contextmanager
def embedding_tokens(
    model, texts: list[tuple[str, str]], embeddings: EmbeddingFiles | None
) -> Iterator[ExpandedTexts]:
    """The (field, text) pairs with their embedding uses expanded, the placeholder tokens in the
    model's tokenizers and text encoders for one ``with`` block (restored on exit, also on error).

    Raises `CollageError` ("field: ...") for a name no embedding has and for a file that cannot be
    read or does not fit the model, before the model is touched."""
    embeddings = embeddings or EmbeddingFiles()
    found = [find_uses(text, embeddings, where) for where, text in texts]
    problems = [p for _uses, ps in found for p in ps]
    if problems:
        raise CollageError(problems)
    names = list(dict.fromkeys(u.name for uses, _ in found for u in uses))
    if not names:
        yield ExpandedTexts([text for _where, text in texts])
        return
    from .inversion.splice import added_tokens, slot_dims

    pipe, family = model.pipeline, model.family
    dims = slot_dims(pipe, family)
    rows: dict[str, torch.Tensor] = {}
    first_field: dict[str, str] = {}  # problems of a file are reported at its first use
    for (where, _text), (uses, _problems) in zip(texts, found, strict=True):
        for u in uses:
            first_field.setdefault(u.name, where)
    for name in names:
        try:
            rows[name] = embedding_rows(read_vectors(embeddings.files[name], name), family, dims, name)
        except EmbeddingError as e:
            problems.append(f"{first_field[name]}: {e}")
    if problems:
        raise CollageError(problems)
    vocabulary = pipe.tokenizer.get_vocab()
    tokens = {
        name: [_PLACEHOLDER.format(use=i, vector=j) for j in range(len(rows[name]))]
        for i, name in enumerate(names)
    }
    clash = [t for ts in tokens.values() for t in ts if t in vocabulary]
    if clash:
        raise RuntimeError(f"placeholder tokens already in the vocabulary: {clash}")
    words = {name: " ".join(ts) for name, ts in tokens.items()}
    expanded = ExpandedTexts(
        [_replace(text, uses, words) for (_w, text), (uses, _p) in zip(texts, found, strict=True)]
    )
    for (_w, text), (uses, _p) in zip(texts, found, strict=True):
        for u in uses:
            expanded.placeholders.setdefault(words[u.name], text[u.start : u.end])
    all_tokens = [t for name in names for t in tokens[name]]
    with added_tokens(pipe, all_tokens, torch.cat([rows[n] for n in names]), family):
        yield expanded


def _replace(text: str, uses: list[EmbeddingUse], words: dict[str, str]) -> str:
    pieces, cursor = [], 0
    for u in uses:
        pieces += [text[cursor : u.start], words[u.name]]
        cursor = u.end
    pieces.append(text[cursor:])
    return "".join(pieces)
