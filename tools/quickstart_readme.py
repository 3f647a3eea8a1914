"""The commands of a README's fenced block, for tools/quickstart_check.py: one command a
line, in order, the comments stripped (comment-only lines right below a command belong to
it); a command whose comment gives a time of 5 minutes or more (``~14 min``) is long."""

from __future__ import annotations

import dataclasses
import re
import shlex

LONG_MINUTES = 5.0  # a command whose comment says it takes this long or longer is long
SERVERS = {("mlflow", "ui"), ("mlflow", "server")}
# builtins whose effect a later line would need: each line runs in a shell of its own
SHELL_STATE = {"cd", "pushd", "popd", "export", "unset", "source", ".", "set", "alias"}


class ReadmeError(ValueError):
    """The README has no block of commands this script can run."""


@dataclasses.dataclass(frozen=True)
class Command:
    """One command of a README block: the line as written, without its comment."""

    line: str
    comment: str = ""  # its comment and the comment-only lines below it, joined
    lineno: int = 0    # in the README

    @property
    def argv(self) -> list[str]:
        return shlex.split(self.line)

    @property
    def minutes(self) -> float | None:
        """The time its comment gives, in minutes (``~14 min``, ``2 hours``), if any."""
        found = re.search(r"(\d+(?:\.\d+)?)\s*(min|minutes?|h|hours?)\b", self.comment)
        if found is None:
            return None
        return float(found[1]) * (60 if found[2].startswith("h") else 1)

    @property
    def long(self) -> bool:
        return (self.minutes or 0) >= LONG_MINUTES

    @property
    def server(self) -> bool:
        return tuple(self.argv[:2]) in SERVERS


def fenced_block(readme: str, heading: str) -> list[tuple[int, str]]:
    """The lines, with their numbers, of the first fenced block in section ``## heading``."""
    lines = readme.splitlines()
    start = next((i for i, text in enumerate(lines) if text.strip() == f"## {heading}"), None)
    if start is None:
        raise ReadmeError(f"the README has no '## {heading}' section")
    block, inside = [], False
    for i in range(start + 1, len(lines)):
        text = lines[i]
        if text.lstrip().startswith("```"):
            if inside:
                return block
            inside = True
        elif inside:
            block.append((i + 1, text))
        elif text.startswith("## "):
            break
    raise ReadmeError(f"'## {heading}' has no " + ("closed " if inside else "")
                      + "fenced code block")


def split_comment(text: str) -> tuple[str, str]:
    """``text`` cut at its shell comment: a ``#`` outside quotes that starts a word."""
    quote, escaped = "", False
    for i, char in enumerate(text):
        if escaped:
            escaped = False
        elif char == "\\" and quote != "'":
            escaped = True
        elif quote:
            quote = "" if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char == "#" and (i == 0 or text[i - 1].isspace()):
            return text[:i].rstrip(), text[i + 1:].strip()
    return text.rstrip(), ""


def extract_commands(readme: str, heading: str = "Quick start") -> list[Command]:
    """The commands of the first fenced block under ``## heading``, in order."""
    commands: list[Command] = []
    held, held_at = "", 0  # a line continued with a trailing backslash
    above = False  # the line above is a command or its comment
    for lineno, text in fenced_block(readme, heading):
        if held:
            text, lineno, held = held + " " + text.strip(), held_at, ""
        line, comment = split_comment(text.strip())
        if line.endswith("\\"):
            held, held_at = line[:-1].rstrip(), lineno
            continue
        if not line:
            if comment and above:  # a comment-only line goes on the command right above
                last = commands[-1]
                commands[-1] = dataclasses.replace(last, comment=f"{last.comment} {comment}"
                                                   .strip())
            above = above and bool(comment)
            continue
        above = True
        try:
            words = shlex.split(line)
        except ValueError as err:
            raise ReadmeError(f"README line {lineno}: {err}: {line}") from None
        if words[0] in SHELL_STATE:
            raise ReadmeError(f"README line {lineno}: `{line}` changes the shell for the "
                              "lines after it, and each line runs in a shell of its own")
        commands.append(Command(line, comment, lineno))
    if held:
        raise ReadmeError(f"README line {held_at}: a backslash continues past the block")
    if not commands:
        raise ReadmeError(f"the block under '## {heading}' holds no command")
    return commands


def listen_address(argv: list[str]) -> tuple[str, int]:
    """Where ``mlflow ui`` / ``mlflow server`` with ``argv`` listens (its defaults:
    127.0.0.1:5000)."""
    host, port = "127.0.0.1", 5000
    for i, word in enumerate(argv):
        name, _, value = word.partition("=")
        if not value and i + 1 < len(argv):
            value = argv[i + 1]
        if name in ("-h", "--host"):
            host = value
        elif name in ("-p", "--port"):
            port = int(value)
    return host, port
