"""tools/quickstart_check.py (with quickstart_readme.py and quickstart_store.py): the
README's Quick start as the commands it runs, each of them accepted by its command line, the
runner's stop at the first failure, the store check; and (heavy) the Quick start run on a
fresh clone."""

from __future__ import annotations

import http.server
import json
import shutil
import subprocess
import sys
import threading
import urllib.parse
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tools.quickstart_check import main, run_steps  # noqa: E402 - after sys.path
from tools.quickstart_readme import (  # noqa: E402 - after sys.path
    Command,
    ReadmeError,
    extract_commands,
    listen_address,
)
from tools.quickstart_store import (  # noqa: E402 - after sys.path
    CheckFailed,
    check_store,
    printed_references,
)

pytestmark = pytest.mark.timeout(120)

README = (ROOT / "README.md").read_text()


def test_the_quick_start_is_read_from_the_readme():
    commands = extract_commands(README)
    assert [c.line for c in commands] == [
        "freetf train --config tiny", "freetf sweep --smoke", "freetf sweep",
        "mlflow ui --backend-store-uri sqlite:///mlflow.db"]
    assert [c.long for c in commands] == [False, False, True, False]  # ~14 min, next line
    assert [c.server for c in commands] == [False, False, False, True]
    lines = README.splitlines()
    assert all(lines[c.lineno - 1].startswith(c.line) for c in commands)
    assert [c.line for c in extract_commands(README, "Install")] == [
        "pip install torch==2.13.0", "pip install ."]


def test_each_quick_start_command_parses_with_its_command_line():
    """argparse (freetf) and click (mlflow) accept every command as written; nothing runs."""
    from freetf.cli import build_parser

    for command in extract_commands(README):
        program, *args = command.argv
        if program == "freetf":
            parsed = build_parser().parse_args(args)
            assert parsed.command == args[0] and callable(parsed.func)
        else:
            from mlflow.cli import cli

            assert program == "mlflow"
            group = cli.make_context("mlflow", list(args), resilient_parsing=True)
            ui = cli.get_command(group, args[0]).make_context(args[0], args[1:])
            assert ui.params["backend_store_uri"] == "sqlite:///mlflow.db"
            # where the check polls is where mlflow listens
            assert listen_address(command.argv) == (ui.params["host"], ui.params["port"])


BLOCK = """# x

## Quick start

Some text, then the block:

```bash
one --a 'b # not a comment'   # the comment
                              # more of it, ~12 min
two \\
  --continued  # 1 min

# a comment alone
three
```

```bash
not-this
```

## Next

```bash
nor-this
```
"""


def test_a_block_is_its_commands_with_their_comments():
    commands = extract_commands(BLOCK)
    assert commands == [Command("one --a 'b # not a comment'", "the comment more of it, "
                                "~12 min", 8),
                        Command("two --continued", "1 min", 10),
                        Command("three", "", 14)]  # a comment after a blank line: no one's
    assert commands[0].argv == ["one", "--a", "b # not a comment"]
    assert [c.long for c in commands] == [True, False, False]
    assert [c.minutes for c in commands] == [12, 1, None]


@pytest.mark.parametrize("comment,long", [
    ("~14 min on 2 cores", True), ("5 minutes", True), ("2 hours", True), ("4 min", False),
    ("a smoke run: 20 steps, about a minute on 2 cores", False), ("", False)])
def test_long_is_what_the_comment_says(comment, long):
    assert Command("x", comment).long is long


@pytest.mark.parametrize("readme,message", [
    ("# x\n", "no '## Quick start' section"),
    ("## Quick start\n\ntext\n\n## Next\n\n```\nx\n```\n", "has no fenced code block"),
    ("## Quick start\n\n```\nx\n", "has no closed fenced code block"),
    ("## Quick start\n\n```\n# only a comment\n```\n", "holds no command"),
    ("## Quick start\n\n```\ncd data\nfreetf train\n```\n", "line 4: `cd data` changes"),
    ("## Quick start\n\n```\nx \\\n```\n", "line 4: a backslash continues past the block"),
])
def test_what_cannot_be_run_is_refused(readme, message):
    with pytest.raises(ReadmeError, match=message):
        extract_commands(readme)


def test_the_run_stops_at_the_first_failing_command_and_names_it(tmp_path, capsys):
    work, logs = tmp_path / "work", tmp_path / "logs"
    work.mkdir()
    logs.mkdir()
    steps = [Command("true", "", 1), Command("echo said; exit 3", "", 2),
             Command("touch never", "", 3)]
    outcomes = run_steps(steps, work, {"PATH": "/usr/bin:/bin"}, logs)
    assert [o.status for o in outcomes] == ["ok", "failed"]
    assert outcomes[1].notes == ["exit status 3"]
    assert outcomes[1].log.read_text() == "said\n"
    assert not (work / "never").exists()
    assert "      | said" in capsys.readouterr().out  # the log's tail, printed


def test_long_commands_are_skipped_only_when_asked(tmp_path):
    steps = [Command("touch short", "", 1), Command("touch long", "~20 min", 2)]
    outcomes = run_steps(steps, tmp_path, {"PATH": "/usr/bin:/bin"}, tmp_path, skip_long=True)
    assert [o.status for o in outcomes] == ["ok", "skipped"]
    assert (tmp_path / "short").exists() and not (tmp_path / "long").exists()


TRAIN_OUTPUT = """step 20/20  loss 1.59
MLflow run 0123456789abcdef0123456789abcdef in experiment 'freetf-tiny'; compare runs with: ...
  then open http://127.0.0.1:5000/#/experiments/1/runs?workflowType=machine_learning
"""
SWEEP_OUTPUT = """6 trials: 4 leaking, 2 baseline
compare runs:  mlflow ui --backend-store-uri sqlite:////tmp/w/mlflow.db
               then open http://127.0.0.1:5000/#/experiments/2/runs?workflowType=x
"""


def test_what_the_commands_printed_is_found():
    found = printed_references([TRAIN_OUTPUT, SWEEP_OUTPUT])
    assert found.bases == {"http://127.0.0.1:5000"}
    assert found.experiments == {"1", "2"}
    assert found.runs == {"0123456789abcdef0123456789abcdef"}
    assert found.sweeps == [("2", 6)]


class FakeMlflow(http.server.BaseHTTPRequestHandler):
    """The REST endpoints the store check asks: two experiments, a finished training run
    and a sweep parent with ``children`` trial runs."""

    children = 6

    def _answer(self, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):  # runs/get
        run_id = urllib.parse.parse_qs(urllib.parse.urlparse(self.path).query)["run_id"][0]
        self._answer({"run": {"info": {"run_id": run_id, "run_name": "tiny",
                                       "status": "FINISHED"}}})

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if self.path.endswith("experiments/search"):
            self._answer({"experiments": [{"experiment_id": "1", "name": "freetf-tiny"},
                                          {"experiment_id": "2", "name": "smoke"}]})
        elif "'sweep'" in body["filter"]:
            self._answer({"runs": [{"info": {"run_id": "p" * 32, "run_name": "sweep"}}]})
        else:
            self._answer({"runs": [{"info": {"run_id": str(i)}}
                                   for i in range(self.children)]})

    def log_message(self, *args):
        pass


@pytest.fixture
def fake_mlflow():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FakeMlflow)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_the_store_lists_what_the_commands_printed(fake_mlflow, monkeypatch):
    seen = check_store(fake_mlflow, "http://127.0.0.1:5000", [TRAIN_OUTPUT, SWEEP_OUTPUT])
    assert seen[-1] == "sweep sweep in smoke: 6 trial runs, as counted"
    monkeypatch.setattr(FakeMlflow, "children", 5)
    with pytest.raises(CheckFailed, match="sweep sweep: 5 trial runs, the sweep counted 6"):
        check_store(fake_mlflow, "http://127.0.0.1:5000", [TRAIN_OUTPUT, SWEEP_OUTPUT])
    with pytest.raises(CheckFailed, match=r"does not list the experiments \['7'\]"):
        check_store(fake_mlflow, "http://127.0.0.1:5000",
                    [SWEEP_OUTPUT.replace("experiments/2", "experiments/7")])
    with pytest.raises(CheckFailed, match="point at .'http://127.0.0.1:5001'., not at"):
        check_store(fake_mlflow, "http://127.0.0.1:5000", [TRAIN_OUTPUT.replace("5000", "5001")])
    with pytest.raises(CheckFailed, match="printed no MLflow link or run"):
        check_store(fake_mlflow, "http://127.0.0.1:5000", ["nothing"])


def test_a_dry_run_prints_the_plan(capsys):
    assert main(["--dry-run", "--tree", str(ROOT), "--install", "--skip-long"]) == 0
    out = capsys.readouterr().out
    assert "## Install [2/2] pip install .    (README line" in out
    assert "## Quick start [3/4] freetf sweep    (README line" in out
    assert "skipped (long)" in out and "a server: started, checked, stopped" in out


@pytest.mark.heavy  # a clone, a venv, a training run, the smoke sweep, mlflow ui: ~6 min
@pytest.mark.ray
@pytest.mark.timeout(1800)
def test_the_quick_start_runs_on_a_fresh_clone(tmp_path):
    """The script itself, with --skip-long (all but the 14-minute sweep); a fresh clone
    where the checkout has git, else the tree as it is."""
    source = ["--repo", str(ROOT)] if (ROOT / ".git").exists() and shutil.which("git") \
        else ["--tree", str(ROOT)]
    done = subprocess.run([sys.executable, str(ROOT / "tools" / "quickstart_check.py"),
                           *source, "--skip-long", "--dir", str(tmp_path)],
                          capture_output=True, text=True, timeout=1700)
    assert done.returncode == 0, (done.stdout + done.stderr)[-6000:]
    assert "skipped (long): freetf sweep\n" in done.stdout
    assert "sweep search_kl_smoke in freetf-search-kl-smoke: 6 trial runs, as counted" \
        in done.stdout
    assert not list(tmp_path.iterdir())  # removed after a pass
