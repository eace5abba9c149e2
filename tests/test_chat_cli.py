"""`mmlm chat`: one answer, or a multi-turn conversation on stdin, streamed; bad input exits 2 with one line."""

import io

import pytest
from PIL import Image
from skimage import data

import mmlm
from fixtures_models import write_tiny_clip
from fixtures_vlm import write_tiny_llava
from mmlm.cli import main
from mmlm.cli.chat import user_turn


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat")
    write_tiny_llava(root / "llava")
    write_tiny_clip(root / "clip")
    Image.fromarray(data.chelsea()).save(root / "cat.png")
    return root


def test_one_question_prints_the_models_answer(world, capsys):
    args = ["chat", "--model", str(world / "llava"), "--image", str(world / "cat.png")]
    assert main([*args, "--system", "Be brief.", "--max-new-tokens", "10", "What is this?"]) == 0
    printed = capsys.readouterr().out
    m = mmlm.load(world / "llava")
    messages = [{"role": "system", "content": "Be brief."}, user_turn("What is this?", 1)]
    assert printed == m.generate(messages, [world / "cat.png"], max_new_tokens=10) + "\n"


def test_interactive_conversation_keeps_the_history(world, capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO("What is this?\nAnd its colour?\n\n"))
    args = [
        "chat",
        "--model",
        str(world / "llava"),
        "--image",
        str(world / "cat.png"),
        "--max-new-tokens",
        "6",
    ]
    assert main(args) == 0
    out = capsys.readouterr().out
    answers = [
        line.removeprefix("you> ").removeprefix("model> ") for line in out.splitlines() if "model> " in line
    ]
    m = mmlm.load(world / "llava")
    first = m.generate([user_turn("What is this?", 1)], [world / "cat.png"], max_new_tokens=6)
    history = [
        user_turn("What is this?", 1),
        {"role": "assistant", "content": first},
        user_turn("And its colour?", 0),
    ]
    second = m.generate(history, [world / "cat.png"], max_new_tokens=6)
    assert [a.split("model> ")[-1] for a in answers] == [first, second]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--model", "{root}/clip", "Hi"], "not a vision-language model"),
        (["--model", "{root}/llava", "--max-new-tokens", "0", "Hi"], "--max-new-tokens"),
        (["--model", "{root}/llava", "--image", "{root}/missing.png", "Hi"], "missing.png"),
        (["--model", "{root}/llava", "--image", "{root}/cat.png", "--image", "{root}/cat.png", "Hi"], None),
    ],
)
def test_chat_bad_inputs(world, extra, message, capsys):
    code = main(["chat", *[a.format(root=world) for a in extra]])
    err = capsys.readouterr().err.strip()
    if message is None:  # two images are fine: both go in the first turn
        assert code == 0
        return
    assert code == 2 and err.startswith("mmlm: error:") and message in err and "\n" not in err
