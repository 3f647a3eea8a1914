"""Run the README's Quick start top to bottom, as written, on a fresh clone.

    python tools/quickstart_check.py               # all of it: ~20 min on 2 idle cores
    python tools/quickstart_check.py --skip-long   # without what the README marks long
    python tools/quickstart_check.py --tree .      # this tree as it is (uncommitted too)
    python tools/quickstart_check.py --install     # a venv installed as ## Install says
    python tools/quickstart_check.py --dry-run     # the plan; nothing is run

The commands are those of the first fenced block under ``## Quick start`` in the clone's
README, so what is checked is what the README says: one command a line, in order, the
comments stripped (comment-only lines right below a command belong to it); a command whose
comment gives a time of 5 minutes or more (``~14 min``) is long.  Each command runs in its
own ``bash -c``, in an empty working folder, its output in a log file, and must exit 0.
A server (``mlflow ui``, ``mlflow server``) is started instead, polled until it answers,
asked through MLflow's REST API for what the commands before it printed (every
experiment linked and run named, and each sweep's parent run with as many trial runs as
the sweep counted), then stopped.

The environment of the commands: by default a new venv holding the clone installed by
this interpreter's pip, not editable, as the README's ``pip install .`` does, but with
``--no-deps``: the venv reaches this interpreter's packages (torch, Ray, MLflow, ...)
through a .pth line, so nothing is downloaded, and ``mlflow`` is this interpreter's.
``--install`` makes a venv of its own instead and runs the README's ``## Install`` block
in the clone, as written (it downloads torch, the CUDA build on Linux, and the rest).
Either way the venv's bin comes first on PATH, and PYTHONPATH, RAY_ADDRESS, VIRTUAL_ENV
and MLFLOW_TRACKING_URI are unset.

Exit status: 0 when every command passed; 1 naming the first that failed; 2 when the
README has no such block or the setup failed.  The temporary folder (clone, venv,
working folder, logs) is removed after a pass unless ``--keep``, and kept after a failure.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.request
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tools.quickstart_readme import (  # noqa: E402 - after sys.path
    LONG_MINUTES,
    Command,
    ReadmeError,
    extract_commands,
    listen_address,
)
from tools.quickstart_store import CheckFailed, check_store  # noqa: E402 - after sys.path

UNSET = ("PYTHONPATH", "PYTHONHOME", "RAY_ADDRESS", "VIRTUAL_ENV", "MLFLOW_TRACKING_URI")


# ----------------------------------------------------------------------------- running


@dataclasses.dataclass
class Outcome:
    command: Command
    status: str          # ok | failed | skipped
    seconds: float = 0.0
    notes: list[str] = dataclasses.field(default_factory=list)
    log: Path | None = None


def duration(seconds: float) -> str:
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes} min {rest} s" if minutes else f"{rest} s"


def last_line(log: Path, width: int = 100) -> str:
    lines = [t for t in log.read_text(errors="replace").splitlines() if t.strip()]
    return lines[-1].strip()[:width] if lines else ""


def stop(proc: subprocess.Popen) -> None:
    """Stop ``proc`` and what it started (its own session): SIGTERM, then SIGKILL."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def start(line: str, cwd: Path, env: dict[str, str], log: Path) -> subprocess.Popen:
    with log.open("w") as out:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(["bash", "-c", line], cwd=cwd, env=env, stdout=out,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)


def run_command(command: Command, cwd: Path, env: dict[str, str], log: Path,
                progress_s: float = 60.0) -> Outcome:
    """Run ``command`` to its end; a line of progress every ``progress_s`` seconds."""
    began = time.monotonic()
    proc = start(command.line, cwd, env, log)
    report_at = began + progress_s
    try:
        while proc.poll() is None:
            time.sleep(0.5)
            if time.monotonic() >= report_at:
                print(f"      {duration(time.monotonic() - began)}: {last_line(log)}",
                      flush=True)
                report_at += progress_s
    except BaseException:  # Ctrl-C: stop the command and what it started
        stop(proc)
        raise
    seconds = time.monotonic() - began
    if proc.returncode:
        return Outcome(command, "failed", seconds, [f"exit status {proc.returncode}"], log)
    return Outcome(command, "ok", seconds, log=log)


def serve_and_check(command: Command, cwd: Path, env: dict[str, str], log: Path,
                    printed: list[str], wait_s: float = 300.0) -> Outcome:
    """Start the server ``command``, ask it for what ``printed`` names, stop it."""
    began = time.monotonic()
    host, port = listen_address(command.argv)
    written = f"http://{host}:{port}"
    line, notes = command.line, []
    if _answers(host, port):  # taken (another server here): the same command elsewhere
        port = _free_port()
        line += f" --port {port}"
        notes.append(f"{written} was taken: ran with --port {port}")
    url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}"
    proc = start(line, cwd, env, log)
    try:
        deadline = began + wait_s
        while not _answers_http(f"{url}/health"):
            if proc.poll() is not None:
                raise CheckFailed(f"exited ({proc.returncode}) before answering on {url}")
            if time.monotonic() > deadline:
                raise CheckFailed(f"no answer on {url}/health within {wait_s:.0f} s")
            time.sleep(1.0)
        notes.append(f"answered on {url} after {duration(time.monotonic() - began)}")
        notes += check_store(url, written, printed)
    except CheckFailed as err:
        return Outcome(command, "failed", time.monotonic() - began, [*notes, str(err)], log)
    finally:
        stop(proc)
    return Outcome(command, "ok", time.monotonic() - began, notes, log)


def _answers(host: str, port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(1.0)
        return sock.connect_ex(("127.0.0.1" if host in ("0.0.0.0", "::") else host,
                                port)) == 0


def _answers_http(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=5):
            return True
    except OSError:
        return False


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ----------------------------------------------------------------------------- setting up


def clone(repo: str, into: Path) -> str:
    """A fresh clone of ``repo`` at its HEAD commit (a worktree's HEAD too); that commit."""
    commit = _git(repo, "rev-parse", "HEAD").strip()
    subprocess.run(["git", "clone", "--quiet", "--no-checkout", repo, str(into)], check=True)
    subprocess.run(["git", "-C", str(into), "checkout", "--quiet", "--detach", commit],
                   check=True)
    return commit


def _git(repo: str, *args: str) -> str:
    return subprocess.run(["git", "-C", repo, *args], check=True, capture_output=True,
                          text=True).stdout


def command_env(env_dir: Path, with_this_python: bool) -> dict[str, str]:
    """The environment of the commands: the venv's bin first on PATH (then this
    interpreter's, for ``mlflow``, unless the venv is self-contained)."""
    env = {k: v for k, v in os.environ.items() if k not in UNSET}
    path = [str(env_dir / "bin")]
    if with_this_python:
        path.append(str(Path(sys.executable).parent))
    env["PATH"] = os.pathsep.join([*path, env.get("PATH", "")])
    env["PYTHONUNBUFFERED"] = "1"  # the logs follow the commands as they run
    return env


def install_from_clone(source: Path, env_dir: Path, log: Path) -> None:
    """``pip install --no-deps`` of ``source`` into a new venv at ``env_dir`` that reaches
    this interpreter's packages through a .pth line.  The wheel is built by this
    interpreter's pip (the venv has no setuptools), as ``pip install .`` builds one; the
    .pth line is written after the install, since pip would otherwise take this
    interpreter's own freetf, if it has one, as already installed."""
    venv.create(env_dir, with_pip=False)
    python = env_dir / "bin" / "python"
    wheels = env_dir.parent / "wheel"
    pip = [sys.executable, "-m", "pip"]
    with log.open("w") as out:
        for step in (["wheel", "--no-deps", "--no-build-isolation", "-w", str(wheels),
                      str(source)],
                     ["--python", str(python), "install", "--no-deps", "--find-links",
                      str(wheels), "--no-index", "freetf"]):
            try:
                subprocess.run([*pip, *step], check=True, stdout=out,
                               stderr=subprocess.STDOUT, cwd=env_dir.parent)
            except subprocess.CalledProcessError:
                raise RuntimeError(f"pip {step[0]} failed; see {log}") from None
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()"
                           "['purelib'])"], check=True, capture_output=True, text=True)
    paths = dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]])
    (Path(site.stdout.strip()) / "freetf-deps.pth").write_text("\n".join(paths) + "\n")


def installed_freetf(env: dict[str, str], cwd: Path) -> str:
    """Where the ``freetf`` on the commands' PATH imports freetf from."""
    script = shutil.which("freetf", path=env["PATH"])
    if script is None:
        raise RuntimeError("no freetf on the commands' PATH after the install")
    python = Path(script).parent / "python"
    where = subprocess.run([str(python), "-c", "import freetf; print(freetf.__file__)"],
                           env=env, cwd=cwd, capture_output=True, text=True)
    if where.returncode:
        last = (where.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"{python} cannot import freetf: {last}")
    return f"{script}, importing {Path(where.stdout.strip()).parent}"


# ----------------------------------------------------------------------------- command line


def run_steps(steps: list[Command], cwd: Path, env: dict[str, str], logs: Path,
              skip_long: bool = False, progress_s: float = 60.0) -> list[Outcome]:
    """Run ``steps`` in order in ``cwd``, up to the first that fails."""
    outcomes: list[Outcome] = []
    printed: list[str] = []  # what the commands before a server printed
    for number, command in enumerate(steps, 1):
        if skip_long and command.long:
            outcomes.append(Outcome(command, "skipped", notes=[f"long: {command.comment}"]))
            print(f"[{number}/{len(steps)}] skipped (long): {command.line}", flush=True)
            continue
        words = re.sub(r"\W+", "-", " ".join(command.argv[:3])).strip("-")
        log = logs / f"{len(list(logs.glob('*.log'))):02d}-{words}.log"
        print(f"[{number}/{len(steps)}] {command.line}    (README line {command.lineno}; "
              f"log: {log})", flush=True)
        if command.server:
            outcome = serve_and_check(command, cwd, env, log, printed)
        else:
            outcome = run_command(command, cwd, env, log, progress_s)
            printed.append(log.read_text(errors="replace"))
        outcomes.append(outcome)
        print(f"      {outcome.status} in {duration(outcome.seconds)}", flush=True)
        print("".join(f"        {note}\n" for note in outcome.notes), end="", flush=True)
        if outcome.status == "failed":
            tail = log.read_text(errors="replace").splitlines()[-15:]
            print("\n".join(f"      | {t}" for t in tail), flush=True)
            break
    return outcomes


def plan(readme: str, install: bool) -> tuple[list[Command], list[Command]]:
    """The commands of the README's ``## Install`` block (if ``install``) and of its
    ``## Quick start`` block."""
    return (extract_commands(readme, "Install") if install else []), extract_commands(readme)


def print_plan(source: str, install: list[Command], quick: list[Command],
               skip_long: bool) -> None:
    print(f"source: {source}")
    print("environment: " + ("a venv of its own, installed by ## Install, run in the tree"
                             if install else "a venv with the tree installed (--no-deps), "
                             "reaching this interpreter's packages"))
    for block, commands in (("## Install", install), ("## Quick start", quick)):
        for number, command in enumerate(commands, 1):
            kind = ("skipped (long)" if skip_long and command.long else
                    "a server: started, checked, stopped" if command.server else
                    "run" + (" (long)" if command.long else ""))
            print(f"{block} [{number}/{len(commands)}] {command.line}    (README line "
                  f"{command.lineno}; {kind})")


def dry_run(args: argparse.Namespace) -> int:
    """Print what would run, from the README of the tree or of the repository's HEAD."""
    try:
        if args.tree:
            source, readme = (f"the tree {args.tree.resolve()} as it is",
                              (args.tree / "README.md").read_text())
        else:
            commit = _git(args.repo, "rev-parse", "HEAD").strip()
            source, readme = (f"a fresh clone of {args.repo} at {commit[:7]}",
                              _git(args.repo, "show", f"{commit}:README.md"))
        print_plan(source, *plan(readme, args.install), args.skip_long)
    except (ReadmeError, OSError, subprocess.CalledProcessError) as err:
        print(f"quickstart_check: {err}", file=sys.stderr)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--repo", default=str(ROOT),
                        help="clone this repository at its HEAD (default: this checkout)")
    source.add_argument("--tree", type=Path,
                        help="use this tree as it is instead of a clone (uncommitted "
                        "changes too; pip writes build/ and *.egg-info into it)")
    parser.add_argument("--install", action="store_true",
                        help="a self-contained venv installed by the README's ## Install "
                        "block (downloads torch and the rest)")
    parser.add_argument("--skip-long", action="store_true",
                        help=f"skip the commands whose comment says {LONG_MINUTES:.0f} min "
                        "or more")
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()),
                        help="make the temporary folder here (default: %(default)s)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    parser.add_argument("--progress", type=float, default=60.0, metavar="SECONDS",
                        help="a line of progress this often (default: %(default)s)")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the commands and the plan; run nothing")
    args = parser.parse_args(argv)

    if args.dry_run:
        return dry_run(args)
    began = time.monotonic()
    args.dir.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="freetf-quickstart-", dir=args.dir))
    logs, work, env_dir = root / "logs", root / "work", root / "venv"
    logs.mkdir()
    work.mkdir()  # the Quick start runs here, empty
    outcomes: list[Outcome] = []
    try:
        if args.tree:
            tree, source = args.tree.resolve(), f"the tree {args.tree.resolve()} as it is"
        else:
            tree = root / "clone"
            source = f"a fresh clone of {args.repo} at {clone(args.repo, tree)[:7]}"
            if _git(args.repo, "status", "--porcelain", "--untracked-files=no").strip():
                print(f"note: {args.repo} has uncommitted changes, which the clone does not "
                      "have (--tree checks a tree as it is)")
        install, quick = plan((tree / "README.md").read_text(), args.install)
        print(f"source: {source}\nfolder: {root}", flush=True)
        if args.install:
            venv.create(env_dir, with_pip=True)
            env = command_env(env_dir, with_this_python=False)
            print(f"## Install, in {tree}:", flush=True)
            outcomes = run_steps(install, tree, env, logs, progress_s=args.progress)
            if any(o.status == "failed" for o in outcomes):
                return _report(outcomes, began, root)
        else:
            print("pip install --no-deps of the tree into a new venv", flush=True)
            install_from_clone(tree, env_dir, logs / "00-pip-install.log")
            env = command_env(env_dir, with_this_python=True)
        print(f"freetf: {installed_freetf(env, work)}", flush=True)
    except (ReadmeError, RuntimeError, OSError, subprocess.CalledProcessError) as err:
        print(f"quickstart_check: setup failed: {err}; folder kept: {root}", file=sys.stderr)
        return 2
    print(f"## Quick start, in {work}:", flush=True)
    outcomes += run_steps(quick, work, env, logs, args.skip_long, args.progress)
    status = _report(outcomes, began, root)
    if status == 0 and not args.keep:
        shutil.rmtree(root, ignore_errors=True)
    return status


def _report(outcomes: list[Outcome], began: float, root: Path) -> int:
    print("\nsummary:")
    for outcome in outcomes:
        print(f"  {outcome.status:7s} {duration(outcome.seconds):>12s}  {outcome.command.line}")
    failed = next((o for o in outcomes if o.status == "failed"), None)
    print(f"total {duration(time.monotonic() - began)}")
    if failed:
        print(f"FAILED: `{failed.command.line}` (README line {failed.command.lineno}): "
              f"{failed.notes[-1]}; log: {failed.log}; folder kept: {root}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
