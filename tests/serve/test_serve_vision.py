"""Images on /v1/chat/completions: OpenAI `image_url` content parts against the real server (uvicorn on 127.0.0.1)
on the tiny XComposer2 checkpoint, driven with the `openai` SDK; bad images and a text-only model give 400s naming
the part."""
from __future__ import annotations

import base64
import io

import openai
import pytest

from puyu.config import EngineConfig, GenerationConfig
from puyu.engine.pipeline import Pipeline
from puyu.serve.api_server import create_app
from puyu.testing import ServerThread, random_image

MODEL = "tiny-xcomposer2"


def _png(seed: int, size=(40, 30)) -> bytes:
    buf = io.BytesIO()
    random_image(seed, size).save(buf, format="PNG")
    return buf.getvalue()


def _data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def _ask(url: str, text: str = "What is in the picture?") -> list[dict]:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                         {"type": "text", "text": text}]}]


@pytest.fixture(scope="module")
def media_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("media")
    (d / "a.png").write_bytes(_png(1))
    outside = tmp_path_factory.mktemp("outside")
    (outside / "secret.png").write_bytes(_png(2))
    (d / "link.png").symlink_to(outside / "secret.png")
    return d


@pytest.fixture(scope="module")
def engine(xcomposer2_checkpoint):
    from puyu.engine import AsyncEngine

    eng = AsyncEngine(xcomposer2_checkpoint, EngineConfig(dtype="float32", session_len=512, cache_max_entry_count=128,
                                                          cache_block_seq_len=16))
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def client(engine, media_dir):
    with ServerThread(create_app(engine, model_name=MODEL, allowed_local_media_path=media_dir)) as srv:
        yield openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def _direct(engine, image_bytes: bytes, text: str, n: int):
    """The same question through the pipeline (a (text, image) pair), for the expected reply."""
    from PIL import Image

    pipe = Pipeline(engine)
    return pipe((text, Image.open(io.BytesIO(image_bytes))), GenerationConfig(max_new_tokens=n, ignore_eos=True))


def test_image_url_data_matches_pipeline_and_counts_image_tokens(client, engine):
    png = _png(1)
    reply = client.chat.completions.create(model=MODEL, messages=_ask(_data_url(png)), max_tokens=8,
                                           temperature=0, extra_body={"ignore_eos": True})
    expected = _direct(engine, png, "What is in the picture?", 8)
    assert reply.choices[0].message.content == expected.text
    assert reply.usage.prompt_tokens == expected.input_token_len
    assert reply.usage.prompt_tokens > 16  # the 16 image tokens are counted
    other = client.chat.completions.create(model=MODEL, messages=_ask(_data_url(_png(3))), max_tokens=8,
                                           temperature=0, extra_body={"ignore_eos": True})
    assert other.choices[0].message.content != reply.choices[0].message.content


def test_streamed_reply_with_local_file(client, media_dir):
    whole = client.chat.completions.create(model=MODEL, messages=_ask(_data_url(_png(1))), max_tokens=6,
                                           temperature=0)
    stream = client.chat.completions.create(model=MODEL, messages=_ask(str(media_dir / "a.png")), max_tokens=6,
                                            temperature=0, stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text == whole.choices[0].message.content
    by_url = client.chat.completions.create(model=MODEL, messages=_ask((media_dir / "a.png").as_uri()),
                                            max_tokens=6, temperature=0)
    assert by_url.choices[0].message.content == text


def _error(client, messages) -> openai.BadRequestError:
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=messages, max_tokens=4)
    return info.value


@pytest.mark.parametrize("url, param, words", [
    ("https://example.com/cat.png", "messages[0].content[0].image_url", "remote image URLs are not fetched"),
    ("data:image/png;base64," + base64.b64encode(b"hello, not a picture").decode(),
     "messages[0].content[0].image_url", "not an image"),
    ("data:image/png;base64," + base64.b64encode(_png(4)[:200]).decode(),
     "messages[0].content[0].image_url", "truncated"),
    ("data:text/plain;base64,aGVsbG8=", "messages[0].content[0].image_url", "not an image"),
    ("/etc/passwd", "messages[0].content[0].image_url", "outside the allowed media folder"),
])
def test_bad_images_are_400_naming_the_part(client, url, param, words):
    err = _error(client, _ask(url))
    assert err.body["param"] == param and words in err.body["message"]


def test_link_out_of_the_media_folder_is_refused(client, media_dir):
    err = _error(client, _ask(str(media_dir / "link.png")))
    assert "outside the allowed media folder" in err.body["message"]


def test_image_over_the_size_limit(client, monkeypatch):
    from puyu.engine import multimodal

    monkeypatch.setattr(multimodal, "MAX_IMAGE_PIXELS", 100)
    err = _error(client, _ask(_data_url(_png(5))))
    assert "over the limit" in err.body["message"] and err.body["param"] == "messages[0].content[0].image_url"


def test_marker_count_mismatch(client):
    err = _error(client, _ask(_data_url(_png(1)), "<ImageHere> and <ImageHere>"))
    assert "2 <ImageHere> markers for 1 images" in err.body["message"]


def test_text_only_model_has_no_vision(internlm2_checkpoint):
    from puyu.engine import AsyncEngine

    with AsyncEngine(internlm2_checkpoint, EngineConfig(session_len=256, cache_max_entry_count=64)) as eng:
        with ServerThread(create_app(eng, model_name="text")) as srv:
            c = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=60)
            with pytest.raises(openai.BadRequestError) as info:
                c.chat.completions.create(model="text", messages=_ask(_data_url(_png(1))), max_tokens=4)
    assert "has no vision" in info.value.body["message"]
    assert info.value.body["param"] == "messages[0].content[0]"


def test_local_paths_refused_without_the_option(engine, media_dir):
    with ServerThread(create_app(engine, model_name=MODEL)) as srv:
        c = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=60)
        with pytest.raises(openai.BadRequestError) as info:
            c.chat.completions.create(model=MODEL, messages=_ask(str(media_dir / "a.png")), max_tokens=4)
    assert "--allowed-local-media-path" in info.value.body["message"]
