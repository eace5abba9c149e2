"""Hub ids as users type them ("org/name", --revision): the Hugging Face cache first, a download of the files
mmlm reads when the network allows, HF_HUB_OFFLINE respected, one line when none of that finds the model.

The cache is filled by huggingface_hub's own snapshot_download/hf_hub_download from a local HTTP server that
answers the Hub's routes (fixtures_hub.FakeHub), so its layout is the one huggingface_hub writes."""

import json
import os
import subprocess
import sys
from pathlib import Path

import huggingface_hub
import pytest
import torch
from PIL import Image
from skimage import data

import mmlm
from fixtures_hub import go_offline, serve_hub
from fixtures_models import write_tiny_clip
from fixtures_vlm import write_tiny_llava, write_tiny_llava_processor_save
from mmlm.checkpoints.hub import MODEL_FILES, resolve_folder
from mmlm.cli import main
from mmlm.errors import InputError

TEXTS = ["a cat", "a cup of coffee", "an astronaut"]
texts = [arg for text in TEXTS for arg in ("--text", text)]
SRC = Path(__file__).resolve().parents[1] / "src"


def photos():
    return [Image.fromarray(data.chelsea()), Image.fromarray(data.coffee())]


@pytest.fixture
def hub(tmp_path, monkeypatch):
    yield from serve_hub(tmp_path, monkeypatch)


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    """Two tiny CLIP folders of different weights: versions 1 and 2 of one repository."""
    root = tmp_path_factory.mktemp("clips")
    for seed in (1, 2):
        write_tiny_clip(root / f"v{seed}", seed=seed)
    return root / "v1", root / "v2"


def same_embeddings(a, b) -> bool:
    return torch.equal(a.encode_image(photos()), b.encode_image(photos())) and torch.equal(
        a.encode_text(TEXTS), b.encode_text(TEXTS)
    )


def test_downloads_only_mmlm_files_then_loads_from_the_cache_without_network(hub, clips, monkeypatch):
    extra = {"pytorch_model.bin": b"pickle", "onnx/model.onnx": b"onnx", "README.md": b"# tiny"}
    commit = hub.push("tiny-org/tiny-clip", clips[0], extra=extra)
    m = mmlm.load("tiny-org/tiny-clip")
    assert same_embeddings(m, mmlm.load(clips[0]))
    snapshot = hub.cache / "models--tiny-org--tiny-clip" / "snapshots" / commit
    assert sorted(p.name for p in snapshot.iterdir()) == sorted(p.name for p in clips[0].iterdir())
    assert (hub.cache / "models--tiny-org--tiny-clip" / "refs" / "main").read_text() == commit
    hub.requests.clear()
    assert resolve_folder("tiny-org/tiny-clip") == snapshot  # the cache first: no request at all
    assert hub.requests == []
    go_offline(monkeypatch)
    assert same_embeddings(mmlm.load("tiny-org/tiny-clip"), m)
    hub.close()  # and with the Hub gone
    assert same_embeddings(mmlm.load("tiny-org/tiny-clip"), m)


def test_a_revision_is_a_branch_tag_or_commit(hub, clips, monkeypatch):
    first = hub.push("tiny-org/tiny-clip", clips[0], revision="v1")
    hub.push("tiny-org/tiny-clip", clips[1], revision="main")
    v1, v2 = mmlm.load(clips[0]), mmlm.load(clips[1])
    assert same_embeddings(mmlm.load("tiny-org/tiny-clip"), v2)
    assert same_embeddings(mmlm.load("tiny-org/tiny-clip", revision="v1"), v1)
    assert same_embeddings(mmlm.load("tiny-org/tiny-clip", revision=first), v1)
    go_offline(monkeypatch)  # each revision is now cached under its own commit
    assert same_embeddings(mmlm.load("tiny-org/tiny-clip", revision="v1"), v1)
    assert same_embeddings(mmlm.load("tiny-org/tiny-clip"), v2)


def test_an_incomplete_cache_entry_is_completed_when_the_network_allows(hub, clips, monkeypatch):
    hub.push("tiny-org/tiny-clip", clips[0])
    # what transformers' AutoConfig leaves behind: config.json alone, fetched file by file
    huggingface_hub.hf_hub_download("tiny-org/tiny-clip", "config.json")
    go_offline(monkeypatch)
    with pytest.raises(InputError) as error:
        mmlm.load("tiny-org/tiny-clip")
    assert str(error.value) == (
        f"model tiny-org/tiny-clip: not a folder; incomplete in the Hugging Face cache ({hub.cache}) at revision "
        "main (no model.safetensors or model.safetensors.index.json or open_clip_model.safetensors); download "
        "failed: downloads are off (HF_HUB_OFFLINE=1)"
    )
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    assert same_embeddings(mmlm.load("tiny-org/tiny-clip"), mmlm.load(clips[0]))


def test_each_failure_is_one_line_that_says_what_was_tried(hub, clips, monkeypatch):
    hub.push("tiny-org/tiny-clip", clips[0])
    hub.push("tiny-org/gated", clips[0])
    hub.gated.add("tiny-org/gated")
    cache = f"the Hugging Face cache ({hub.cache})"
    cases = {
        ("tiny-org/gated", None): f"model tiny-org/gated: not a folder; not in {cache} at revision main; "
        f"download failed: tiny-org/gated is gated on {hub.url}: accept its terms there and set HF_TOKEN",
        ("tiny-org/missing", None): f"model tiny-org/missing: not a folder; not in {cache} at revision main; "
        f"download failed: no repository tiny-org/missing on {hub.url} (or it is private: set HF_TOKEN)",
        ("tiny-org/tiny-clip", "nope"): f"model tiny-org/tiny-clip: not a folder; not in {cache} at revision nope; "
        f"download failed: no revision nope in tiny-org/tiny-clip on {hub.url}",
    }  # fmt: skip
    for (name, revision), message in cases.items():
        with pytest.raises(InputError) as error:
            mmlm.load(name, revision=revision)
        assert str(error.value) == message
    hub.close()
    with pytest.raises(InputError) as error:
        mmlm.load("tiny-org/tiny-clip")
    assert str(error.value) == (
        f"model tiny-org/tiny-clip: not a folder; not in {cache} at revision main; download failed: cannot reach "
        f"{hub.url} (ConnectError)"
    )
    go_offline(monkeypatch)
    with pytest.raises(InputError) as error:
        mmlm.load("tiny-org/tiny-clip")
    assert str(error.value) == (
        f"model tiny-org/tiny-clip: not a folder; not in {cache} at revision main; download failed: downloads "
        "are off (HF_HUB_OFFLINE=1)"
    )


@pytest.mark.parametrize("name", ["no/such/folder", "./missing", "a--b/c", "org/name..x", "-org/name"])
def test_neither_a_folder_nor_a_repo_id_is_not_found(hub, name):
    with pytest.raises(InputError) as error:
        mmlm.load(name)
    assert str(error.value) == f"model folder {Path(name)} not found"
    assert hub.requests == []


def test_a_revision_of_a_folder_is_refused(clips):
    with pytest.raises(InputError) as error:
        mmlm.load(clips[0], revision="v1")
    assert str(error.value) == f"revision v1: {clips[0]} is a folder; a revision applies to hub ids only"


def test_a_llava_loads_by_id(hub, tmp_path):
    write_tiny_llava(tmp_path / "llava")
    hub.push("tiny-org/tiny-llava", tmp_path / "llava")
    prompt, image = "USER: <image>\nWhat is it? ASSISTANT:", [photos()[0]]
    expected = mmlm.load(tmp_path / "llava").generate_tokens(prompt, image, max_new_tokens=8)
    assert mmlm.load("tiny-org/tiny-llava").generate_tokens(prompt, image, max_new_tokens=8) == expected


def test_the_cli_takes_an_id_and_a_revision(hub, clips, tmp_path, capsys):
    hub.push("tiny-org/tiny-clip", clips[0], revision="v1")
    hub.push("tiny-org/tiny-clip", clips[1])
    photo = tmp_path / "cat.png"
    photos()[0].save(photo)

    def similarity(*model_args) -> dict:
        argv = ["similarity", *model_args, "--image", str(photo), *texts, "--json"]
        assert main(argv) == 0, capsys.readouterr().err
        return json.loads(capsys.readouterr().out)

    assert similarity("--model", "tiny-org/tiny-clip") == similarity("--model", str(clips[1]))
    assert similarity("--model", "tiny-org/tiny-clip", "--revision", "v1") == similarity(
        "--model", str(clips[0])
    )


def test_budget_fetches_no_weights(hub, clips, capsys):
    commit = hub.push("tiny-org/tiny-clip", clips[0])
    assert main(["budget", "--model", "tiny-org/tiny-clip", "--json"]) == 0, capsys.readouterr().err
    snapshot = hub.cache / "models--tiny-org--tiny-clip" / "snapshots" / commit
    assert json.loads(capsys.readouterr().out)["config"] == str(snapshot / "config.json")
    fetched = sorted(p.name for p in snapshot.iterdir())  # the weights are fetched only to --measure
    assert fetched == sorted(p.name for p in clips[0].iterdir() if p.suffix != ".safetensors")


def test_cli_offline_from_the_cache_in_a_fresh_process(hub, clips, tmp_path, capsys):
    hub.push("tiny-org/tiny-clip", clips[0])
    resolve_folder("tiny-org/tiny-clip")  # fill the cache
    hub.close()
    photo = tmp_path / "cat.png"
    photos()[0].save(photo)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
    argv = [
        sys.executable,
        "-m",
        "mmlm",
        "similarity",
        "--model",
        "tiny-org/tiny-clip",
        "--image",
        str(photo),
    ]
    by_id = subprocess.run([*argv, *texts, "--json"], env=env, capture_output=True, text=True)
    assert by_id.returncode == 0, by_id.stderr
    assert main(["similarity", "--model", str(clips[0]), "--image", str(photo), *texts, "--json"]) == 0
    assert json.loads(by_id.stdout) == json.loads(capsys.readouterr().out)


def test_serve_resolves_an_id_and_a_revision(hub, clips, monkeypatch):
    from mmlm.cli import serve

    hub.push("tiny-org/tiny-clip", clips[0], revision="v1")
    hub.push("tiny-org/tiny-clip", clips[1])
    served = {}
    monkeypatch.setattr(
        serve, "run", lambda engine, config, host, port: served.update(engine=engine, config=config)
    )
    assert main(["serve", "--model", "tiny-org/tiny-clip", "--revision", "v1", "--port", "8123"]) == 0
    assert served["config"].model_id == "tiny-org/tiny-clip"
    assert same_embeddings(served["engine"].embedder, mmlm.load(clips[0]))


def test_model_files_cover_what_transformers_saves(tmp_path):
    import fnmatch

    write_tiny_llava(tmp_path / "v4")  # preprocessor_config.json, the template in tokenizer_config.json
    write_tiny_llava_processor_save(tmp_path / "v5")  # processor_config.json, chat_template.jinja
    names = {p.name for folder in ("v4", "v5") for p in (tmp_path / folder).iterdir()}
    assert {"preprocessor_config.json", "processor_config.json", "chat_template.jinja"} <= names
    assert all(any(fnmatch.fnmatch(n, pattern) for pattern in MODEL_FILES) for n in names), names


def test_an_index_built_from_an_id_searches_with_that_id_and_revision(hub, clips, tmp_path, capsys):
    hub.push("tiny-org/tiny-clip", clips[0], revision="v1")
    hub.push("tiny-org/tiny-clip", clips[1])
    (tmp_path / "photos").mkdir()
    for name, photo in zip(["cat.png", "coffee.png"], photos(), strict=True):
        photo.save(tmp_path / "photos" / name)
    index = str(tmp_path / "index")
    build = [
        "index",
        "build",
        "--model",
        "tiny-org/tiny-clip",
        "--revision",
        "v1",
        "--images",
        str(tmp_path / "photos"),
    ]
    assert main([*build, "--index", index]) == 0, capsys.readouterr().err
    capsys.readouterr()
    assert main(["index", "info", "--index", index]) == 0
    info = json.loads(capsys.readouterr().out)
    assert (info["model_path"], info["model_revision"]) == ("tiny-org/tiny-clip", "v1")
    # search reloads the recorded id at the recorded revision: main's weights would fail the index's probe
    assert main(["search", "--index", index, "--text", "a cat", "--json"]) == 0, capsys.readouterr().err
    assert len(json.loads(capsys.readouterr().out)["hits"]) == 2
    assert main(["search", "--index", index, "--text", "a cat", "--model", "tiny-org/tiny-clip"]) == 2
    assert "tiny-org/tiny-clip" in capsys.readouterr().err
