"""The painter's textual-inversion embeddings by name (core/embeddings.py): files of each format
made here for the demo model and the tiny SDXL are read, used through `embedding:NAME` and bare
file names in the prompt, negative prompt and layer texts, encode exactly as the vectors spliced
in by hand, and leave the model exactly as before; missing and misfitting ones are clear errors."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from core.collage import CollageError
from core.embeddings import EmbeddingFiles, embedding_tokens, find_uses, read_vectors
from core.generate import generate
from core.progress import GenerationCancelled
from core.tokens import token_spans
from tests.test_generate import two_layer_collage

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SD_FORMATS = ["a1111.pt", "emb_params.pt", "emb_params.safetensors", "a1111.safetensors", "diffusers.bin"]
XL_FORMATS = ["sdxl.safetensors", "sdxl.pt"]


def vectors(widths: dict[str, int], n: int, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {k: torch.randn(n, w, generator=gen) for k, w in widths.items()}


def write(path: Path, fmt: str, parts: dict[str, torch.Tensor]) -> Path:
    """An embedding file in one of the formats painters have (see core/embeddings.py)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    v = parts.get("*")
    if fmt == "a1111.pt":  # as A1111 saves it: a trained parameter plus its notes
        data = {"string_to_token": {"*": torch.tensor(265)}, "string_to_param": {"*": torch.nn.Parameter(v)}}
        torch.save({**data, "name": path.stem, "step": 500, "sd_checkpoint_name": "x"}, path)
    elif fmt == "emb_params.pt":
        torch.save({"emb_params": v}, path)
    elif fmt == "emb_params.safetensors":
        save_file({"emb_params": v}, str(path))
    elif fmt == "a1111.safetensors":  # A1111's names, flattened
        save_file({"string_to_param.*": v}, str(path))
    elif fmt == "diffusers.bin":  # learned_embeds.bin: {token: vector}, one vector as 1-D
        torch.save({"<my-style>": v[0] if len(v) == 1 else v}, path)
    elif fmt == "sdxl.safetensors":
        save_file({"clip_l": parts["clip_l"], "clip_g": parts["clip_g"]}, str(path))
    elif fmt == "sdxl.pt":
        torch.save({"clip_l": parts["clip_l"], "clip_g": parts["clip_g"]}, path)
    else:
        raise ValueError(fmt)
    return path


def widths_of(model) -> dict[str, int]:
    dims = [
        getattr(model.pipeline, s.encoder).get_input_embeddings().weight.shape[1]
        for s in model.family.text_encoders
    ]
    if len(dims) == 1:
        return {"*": dims[0]}
    return {s.embedding_key: d for s, d in zip(model.family.text_encoders, dims, strict=True)}


def text_state(model) -> list:
    out = []
    for slot in model.family.text_encoders:
        tok, enc = getattr(model.pipeline, slot.tokenizer), getattr(model.pipeline, slot.encoder)
        emb = enc.get_input_embeddings()
        out.append((len(tok), tok.get_vocab(), emb, emb.weight.detach().clone()))
    return out


def assert_restored(model, before: list) -> None:
    for (n, vocab, emb, weight), (n2, vocab2, emb2, weight2) in zip(before, text_state(model), strict=True):
        assert n2 == n and vocab2 == vocab and emb2 is emb and torch.equal(weight2, weight)


def encode(model, prompt: str, negative: str | None = None):
    return model.family.encode_prompt(
        model.pipeline, prompt, negative, model.device, negative is not None, (64, 64)
    )


def by_hand(model, prompt: str, parts: dict[str, torch.Tensor]):
    """The encoding with the vectors put in by hand (transformers' own resize on a copy of the
    tokenizers and text encoders): "{emb}" in `prompt` becomes the new tokens."""
    pipe = copy.copy(model.pipeline)  # a shallow copy: the text parts replaced by deep copies below
    n = next(iter(parts.values())).shape[0]
    tokens = [f"<hand{j}>" for j in range(n)]
    for slot in model.family.text_encoders:
        tok = copy.deepcopy(getattr(pipe, slot.tokenizer))
        enc = copy.deepcopy(getattr(pipe, slot.encoder))
        tok.add_tokens(tokens)
        enc.resize_token_embeddings(len(tok))
        ids = tok.convert_tokens_to_ids(tokens)
        with torch.no_grad():
            enc.get_input_embeddings().weight[ids] = parts["*" if "*" in parts else slot.embedding_key]
        setattr(pipe, slot.tokenizer, tok)
        setattr(pipe, slot.encoder, enc)
    return model.family.encode_prompt(
        pipe, prompt.format(emb=" ".join(tokens)), None, model.device, False, (64, 64)
    )


# --- syntax ---------------------------------------------------------------------------------------
def test_names_are_found_as_comfyui_and_a1111_write_them(tmp_path):
    files = EmbeddingFiles(
        {"style.pt": tmp_path / "a", "sub/neg.safetensors": tmp_path / "b", "Fancy.bin": tmp_path / "c"}
    )

    def names(text: str) -> list[tuple[str, str]]:
        uses, problems = find_uses(text, files, "prompt")
        assert problems == []
        return [(text[u.start : u.end], u.name) for u in uses]

    assert names("a cat, embedding:style") == [("embedding:style", "style.pt")]
    assert names("embedding:style.pt, embedding:sub/neg") == [
        ("embedding:style.pt", "style.pt"),
        ("embedding:sub/neg", "sub/neg.safetensors"),
    ]
    assert names("embedding:sub\\neg.safetensors") == [
        ("embedding:sub\\neg.safetensors", "sub/neg.safetensors")
    ]
    assert names("(embedding:style:1.2) cat") == [("embedding:style", "style.pt")]
    # A1111: a whole word equal to a file's name without folders and extension, case-sensitive.
    assert names("neg. (Fancy:1.3), neg") == [
        ("neg", "sub/neg.safetensors"),
        ("Fancy", "Fancy.bin"),
        ("neg", "sub/neg.safetensors"),
    ]
    assert names("fancy stylish styles negative style-ish sub/neg") == []
    assert names("a stylish style") == [("style", "style.pt")]

    uses, problems = find_uses("a cat, embedding:nope and embedding:style", files, "layers[1].text")
    assert [u.name for u in uses] == ["style.pt"]
    assert problems == [
        "layers[1].text: no embedding 'nope' in the model folders (which have: Fancy.bin, style.pt, sub/neg.safetensors)"
    ]
    assert find_uses("embedding:style", EmbeddingFiles(), "negative_prompt")[1] == [
        "negative_prompt: no embedding 'style': there are no embeddings (they are found in the model folders, --models-dir)"
    ]


@pytest.mark.parametrize("fmt", SD_FORMATS + XL_FORMATS)
@pytest.mark.parametrize("n", [1, 3])
def test_each_file_format_is_read(tmp_path, fmt, n):
    widths = {"clip_l": 32, "clip_g": 48} if fmt.startswith("sdxl") else {"*": 32}
    parts = vectors(widths, n, seed=n)
    read = read_vectors(write(tmp_path / f"e.{fmt.split('.')[-1]}", fmt, parts), "e")
    assert read.keys() == parts.keys() and all(torch.equal(read[k], parts[k]) for k in parts)


def test_files_that_are_no_embedding_are_clear_errors(tmp_path):
    from core.embeddings import EmbeddingError

    save_file({"a": torch.zeros(2, 4), "b": torch.zeros(2, 4)}, str(tmp_path / "two.safetensors"))
    with pytest.raises(
        EmbeddingError, match="embedding 'two': not a textual-inversion embedding of a known format"
    ):
        read_vectors(tmp_path / "two.safetensors", "two")
    (tmp_path / "junk.pt").write_bytes(b"not a pickle")
    with pytest.raises(EmbeddingError, match="embedding 'junk' cannot be read"):
        read_vectors(tmp_path / "junk.pt", "junk")


# --- the demo model (SD 1.x) ----------------------------------------------------------------------
@pytest.mark.parametrize("fmt", SD_FORMATS)
def test_encoding_equals_the_vectors_put_in_by_hand(demo_pipeline, tmp_path, fmt):
    model = demo_pipeline
    parts = vectors(widths_of(model), 2, seed=1)
    files = EmbeddingFiles({"style.x": write(tmp_path / f"style.{fmt}", fmt, parts)})
    before = text_state(model)
    with embedding_tokens(model, [("prompt", "a photo of embedding:style.x cat")], files) as words:
        ours = encode(model, words.texts[0])
    assert_restored(model, before)
    expected = by_hand(model, "a photo of {emb} cat", parts)
    assert torch.allclose(ours.cond, expected.cond, atol=1e-6)
    assert not torch.allclose(ours.cond, encode(model, "a photo of cat").cond, atol=1e-3)


def test_an_embedding_changes_the_image_by_either_name_and_the_model_is_restored(demo_pipeline, tmp_path):
    model = demo_pipeline
    files = EmbeddingFiles(
        {"moody.pt": write(tmp_path / "moody.pt", "a1111.pt", vectors(widths_of(model), 2, 3))}
    )
    before = text_state(model)
    plain = generate(model, two_layer_collage(steps=3)).images[0].image
    named = generate(
        model,
        two_layer_collage(steps=3, prompt="a red box next to a green leaf, embedding:moody"),
        embeddings=files,
    )
    bare = generate(
        model, two_layer_collage(steps=3, prompt="a red box next to a green leaf, moody"), embeddings=files
    )
    assert not np.array_equal(named.images[0].image, plain)
    assert np.array_equal(named.images[0].image, bare.images[0].image)
    assert named.prompt == "a red box next to a green leaf, embedding:moody"  # as written
    # A bare word is only an embedding when one has that name.
    unnamed = generate(model, two_layer_collage(steps=3, prompt="a red box next to a green leaf, moody"))
    assert not np.array_equal(unnamed.images[0].image, bare.images[0].image)
    # In the negative prompt too.
    negative = generate(model, two_layer_collage(steps=3, negative_prompt="moody"), embeddings=files)
    assert not np.array_equal(negative.images[0].image, plain)
    assert_restored(model, before)
    assert np.array_equal(generate(model, two_layer_collage(steps=3)).images[0].image, plain)


def test_a_layer_text_naming_an_embedding_matches_its_words_in_the_prompt(demo_pipeline, tmp_path):
    model = demo_pipeline
    files = EmbeddingFiles(
        {
            "shiny.safetensors": write(
                tmp_path / "shiny.safetensors", "emb_params.safetensors", vectors(widths_of(model), 3, 4)
            )
        }
    )
    prompt = "a embedding:shiny red box next to a green leaf"
    fields = [
        ("prompt", prompt),
        ("layers[0].text", "embedding:shiny red box"),
        ("layers[1].text", "green leaf"),
    ]
    with embedding_tokens(model, fields, files) as words:
        spans = token_spans(model.pipeline.tokenizer, words.texts[0], words.texts[1:])
        ids = model.pipeline.tokenizer(spans.prompt)["input_ids"]
        placeholder_ids = model.pipeline.tokenizer.convert_tokens_to_ids(
            [f"<collage-emb0v{j}>" for j in range(3)]
        )
    assert spans.prompt == words.texts[0]  # found in the prompt, not appended
    positions = [p for p, i in enumerate(ids) if i in placeholder_ids]
    assert len(positions) == 3 and set(positions) <= set(spans.spans[0])
    assert [ids[p] for p in spans.spans[0]][:3] == placeholder_ids
    assert not set(positions) & set(spans.spans[1])
    # And a whole generation with it runs, the layer's words steered.
    collage = two_layer_collage(steps=2, prompt=prompt)
    collage.layers[0].text = "embedding:shiny red box"
    assert generate(model, collage, embeddings=files).prompt == prompt


def test_missing_and_misfitting_embeddings_are_clear_errors(demo_pipeline, library_files, tmp_path):
    model = demo_pipeline
    files = EmbeddingFiles(
        {
            "ok.pt": write(tmp_path / "ok.pt", "a1111.pt", vectors(widths_of(model), 1, 5)),
            "sd15.pt": library_files["emb-sd1.pt"],  # 768 wide
            "xl.safetensors": write(
                tmp_path / "xl.safetensors", "sdxl.safetensors", vectors({"clip_l": 32, "clip_g": 48}, 1, 6)
            ),
        }
    )
    before = text_state(model)
    collage = two_layer_collage(steps=2, prompt="a red box, embedding:nope", negative_prompt="embedding:ok")
    collage.layers[1].text = "green leaf embedding:gone"
    with pytest.raises(CollageError) as error:
        generate(model, collage, embeddings=files)
    assert [p.split(" in the model folders")[0] for p in error.value.problems] == [
        "prompt: no embedding 'nope'",
        "layers[1].text: no embedding 'gone'",
    ]
    with pytest.raises(CollageError) as error:
        generate(model, two_layer_collage(steps=2, negative_prompt="sd15, embedding:xl"), embeddings=files)
    assert error.value.problems == [
        "negative_prompt: embedding 'sd15.pt' does not fit this Stable Diffusion 1.x model (text encoder 32 wide):"
        " its vectors are 768 wide, as for Stable Diffusion 1.x",
        "negative_prompt: embedding 'xl.safetensors' does not fit this Stable Diffusion 1.x model (text encoder 32"
        " wide): it has clip_l 32 + clip_g 48 (an SDXL embedding)",
    ]
    assert_restored(model, before)


def test_the_model_is_restored_after_cancel_while_encoding(demo_pipeline, tmp_path):
    import threading

    model = demo_pipeline
    files = EmbeddingFiles({"s.pt": write(tmp_path / "s.pt", "a1111.pt", vectors(widths_of(model), 2, 7))})
    before = text_state(model)
    cancel = threading.Event()

    def progress(p):
        if p.phase == "encoding":  # the placeholder tokens are in the model now
            assert len(model.pipeline.tokenizer) == before[0][0] + 2
            cancel.set()

    with pytest.raises(GenerationCancelled):
        generate(
            model,
            two_layer_collage(prompt="embedding:s box"),
            embeddings=files,
            progress=progress,
            cancel=cancel,
        )
    assert_restored(model, before)


# --- the tiny SDXL ----------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", XL_FORMATS)
def test_sdxl_embedding_encodes_as_by_hand_and_changes_the_image(tiny_sdxl, tmp_path, fmt):
    model = tiny_sdxl
    parts = vectors(widths_of(model), 2, seed=8)
    files = EmbeddingFiles({"xl/look.safetensors": write(tmp_path / f"look.{fmt}", fmt, parts)})
    before = text_state(model)
    with embedding_tokens(model, [("prompt", "a photo of embedding:xl/look cat")], files) as words:
        ours = encode(model, words.texts[0])
    expected = by_hand(model, "a photo of {emb} cat", parts)
    assert torch.allclose(ours.cond, expected.cond, atol=1e-5)
    assert torch.allclose(ours.added["text_embeds"], expected.added["text_embeds"], atol=1e-5)
    assert_restored(model, before)

    plain = generate(model, two_layer_collage(steps=2, width=64, height=64)).images[0].image
    styled = generate(model, two_layer_collage(steps=2, prompt="a red box, look"), embeddings=files)
    assert not np.array_equal(styled.images[0].image, plain)
    assert_restored(model, before)


def test_an_sd_embedding_on_sdxl_is_a_clear_error(tiny_sdxl, tmp_path):
    model = tiny_sdxl
    files = EmbeddingFiles({"sd.pt": write(tmp_path / "sd.pt", "a1111.pt", vectors({"*": 32}, 2, 9))})
    before = text_state(model)
    with pytest.raises(CollageError) as error:
        generate(model, two_layer_collage(steps=2, prompt="embedding:sd box"), embeddings=files)
    assert error.value.problems == [
        "prompt: embedding 'sd.pt' does not fit this Stable Diffusion XL model (text encoders 32 + 48 wide:"
        " clip_l, clip_g): its vectors are 32 wide"
    ]
    assert_restored(model, before)


# --- the CLI and the bridge -----------------------------------------------------------------------
def test_cli_uses_the_embeddings_of_models_dir(demo_pipeline, tmp_path, capsys):
    from PIL import Image

    from core.cli import main
    from tests.test_cli import small_psd

    doc = small_psd(tmp_path / "scene.psd")
    models = tmp_path / "models"
    write(
        models / "embeddings" / "styles" / "ink.safetensors",
        "emb_params.safetensors",
        vectors({"*": 32}, 2, 10),
    )

    def run(name: str, prompt: str) -> np.ndarray:
        out = tmp_path / f"{name}.png"
        args = [
            "generate",
            str(doc),
            "-o",
            str(out),
            "--steps",
            "3",
            "--models-dir",
            str(models),
            "--prompt",
            prompt,
        ]
        assert main(args) == 0, capsys.readouterr().err
        return np.asarray(Image.open(out))

    plain = run("plain", "a red ball and a blue box")
    named = run("named", "a red ball and a blue box, embedding:styles/ink")
    bare = run("bare", "a red ball and a blue box, ink")
    assert not np.array_equal(named, plain) and np.array_equal(named, bare)

    capsys.readouterr()
    out = tmp_path / "refused.png"
    args = [
        "generate",
        str(doc),
        "-o",
        str(out),
        "--models-dir",
        str(models),
        "--negative-prompt",
        "embedding:ink2",
    ]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert (
        "negative_prompt: no embedding 'ink2' in the model folders (which have: styles/ink.safetensors)"
        in err
    )
    assert "loading model" not in err and not out.exists()  # refused before the model is loaded


@pytest.mark.asyncio
async def test_the_bridge_resolves_library_embeddings_by_name(
    aiohttp_client, demo_pipeline, tiny_sdxl_dir, library_files, tmp_path
):
    from bridge_server import testing as T
    from bridge_server.app import create_app
    from bridge_server.config import BridgeConfig
    from krita_plugin.collage_diffusion import wire

    folder = tmp_path / "models" / "embeddings"
    write(folder / "glow.pt", "a1111.pt", vectors({"*": 32}, 2, 11))
    (folder / "sd15-neg.pt").write_bytes(library_files["emb-sd1.pt"].read_bytes())
    config = BridgeConfig(
        data_dir=tmp_path / "bridge",
        preview_interval=0.0,
        models_dirs=(tmp_path / "models",),
        allowed_models=(str(tiny_sdxl_dir),),
    )
    client = await aiohttp_client(create_app(config))
    info = wire.InfoResponse.from_dict(await (await client.get(wire.ROUTE_INFO)).json())
    assert [e.name for e in info.embeddings] == ["glow.pt", "sd15-neg.pt"]

    async def png(request) -> bytes:
        r = await T.submit(client, request)
        assert r.status == 202, await r.text()
        done = await T.wait_done(client, (await r.json())["id"])
        assert done.state == wire.DONE, (done.error, done.problems)
        return await (await client.get(done.results[0].url)).read()

    plain = await png(T.small_request(steps=3))
    glowing = await png(
        T.small_request(steps=3, prompt="a bento box with salmon sushi and ginger, embedding:glow")
    )
    assert glowing != plain
    assert (
        await png(T.small_request(steps=3, prompt="a bento box with salmon sushi and ginger, glow"))
        == glowing
    )
    assert await png(T.small_request(steps=3)) == plain  # the model is as before

    request = T.small_request(negative_prompt="embedding:nope")
    request.layers[1].text = "embedding:glow.pt ginger embedding:other"
    r = await T.submit(client, request)
    problems = (await r.json())["problems"]
    assert r.status == 422 and [p.split(" in the model folders")[0] for p in problems] == [
        "negative_prompt: no embedding 'nope'",
        "layers[1].text: no embedding 'other'",
    ]
    r = await T.submit(client, T.small_request(model=str(tiny_sdxl_dir), negative_prompt="sd15-neg"))
    assert r.status == 422 and (await r.json())["problems"] == [
        "negative_prompt: embedding 'sd15-neg.pt' was made for Stable Diffusion 1.x, not for the model of this job (sdxl)"
    ]
    # A file added while the bridge runs can be named at once.
    write(folder / "new" / "late.safetensors", "emb_params.safetensors", vectors({"*": 32}, 1, 12))
    assert await png(T.small_request(steps=3, prompt="salmon sushi and ginger, embedding:new/late")) != plain


def test_an_embedding_inside_emphasis_is_weighted(demo_pipeline, tmp_path):
    """`(embedding:NAME:1.3)` (ComfyUI's way of weighting one): the name ends at ':', the
    placeholder tokens take the weight, and 1.0 is the same as no brackets."""
    model = demo_pipeline
    files = EmbeddingFiles(
        {"moody.pt": write(tmp_path / "moody.pt", "a1111.pt", vectors(widths_of(model), 2, 3))}
    )

    def image(prompt: str) -> np.ndarray:
        return generate(model, two_layer_collage(steps=2, prompt=prompt), embeddings=files).images[0].image

    plain = image("a red box next to a green leaf, embedding:moody")
    assert np.array_equal(image("a red box next to a green leaf, (embedding:moody:1.0)"), plain)
    assert not np.array_equal(image("a red box next to a green leaf, (embedding:moody:1.4)"), plain)


def test_the_layer_stack_fill_uses_the_jobs_embeddings(demo_pipeline, tmp_path):
    """The background fill (core/layer_stack.py) encodes the job's texts again: it must get the
    same embeddings, or a prompt naming one could not be filled."""
    from core.layer_stack import stack_results

    model = demo_pipeline
    files = EmbeddingFiles(
        {"moody.pt": write(tmp_path / "moody.pt", "a1111.pt", vectors(widths_of(model), 2, 3))}
    )
    collage = two_layer_collage(steps=2, prompt="a red box next to a green leaf, embedding:moody")
    result = generate(model, collage, embeddings=files)
    size = (collage.width, collage.height)
    stacked = stack_results(model, collage, result, size, embeddings=files)
    assert len(stacked.stacks) == 1
    with pytest.raises(CollageError, match="moody"):
        stack_results(model, collage, result, size)
