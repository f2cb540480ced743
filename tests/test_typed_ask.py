"""The actor API is typed: ``ask`` returns the reply type its message declares (``class M(Ask[R])``), so callers never
re-annotate, and mypy refuses a wrong annotation or an ask of a message that expects no reply."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

SNIPPET = textwrap.dedent(
    """
    from dataclasses import dataclass
    from typing import assert_type

    from actors.base import Actor, Ask


    @dataclass(frozen=True)
    class Double(Ask[int]):
        n: int


    @dataclass(frozen=True)
    class Note:  # a tell-only message
        text: str


    async def caller(actor: Actor) -> None:
        assert_type(await actor.ask(Double(2)), int)
        wrong: str = await actor.ask(Double(2))  # line 20: the reply is an int
        await actor.ask(Note("x"))  # line 21: Note expects no reply
        actor.tell(Note("x"))
    """
)


def test_ask_returns_the_reply_type_its_message_declares(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    api = pytest.importorskip("mypy.api")
    monkeypatch.chdir(ROOT)  # mypy finds the product's packages from the working directory
    snippet = tmp_path / "typed_ask.py"
    snippet.write_text(SNIPPET)
    out, err, status = api.run(
        ["--strict", "--no-incremental", "--cache-dir", str(tmp_path / "cache"), "--config-file", "", str(snippet)]
    )
    assert status == 1, out + err
    errors = sorted(line.split(":")[1] for line in out.splitlines() if ": error:" in line)
    assert errors == ["20", "21"], out + err
    assert 'incompatible type "Double"; expected "Ask[str]"' in out, out
    assert 'incompatible type "Note"; expected "Ask[' in out, out
