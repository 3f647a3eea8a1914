"""freetf as an installed package: the wheel holds the shipped configs, and an installed
freetf runs its main job from an empty folder, away from the repository."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.heavy  # builds a wheel, makes a venv, runs the smoke sweep: minutes on 2 cores
@pytest.mark.ray
@pytest.mark.timeout(1500)
def test_the_installed_wheel_runs_the_smoke_sweep_from_an_empty_folder(tmp_path):
    """``pip wheel .``, the wheel installed in a new venv, ``freetf sweep --smoke`` in an
    empty folder with no path to the repository.  The venv reaches this interpreter's
    installed packages (torch, Ray, MLflow) through a .pth line instead of downloading
    them; a .pth line adds no site directory, so the checkout's editable install of freetf
    does not come along (asserted: freetf is imported from the wheel)."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "RAY_ADDRESS")}
    env.update(RAY_DISABLE_USAGE_STATS="1", PYTHONUNBUFFERED="1")
    source = tmp_path / "source"  # a copy: the build writes build/ and freetf.egg-info/
    for name in ("pyproject.toml", "README.md"):
        (source / name).parent.mkdir(exist_ok=True)
        shutil.copy2(ROOT / name, source / name)
    shutil.copytree(ROOT / "freetf", source / "freetf",
                    ignore=shutil.ignore_patterns("__pycache__"))
    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "--quiet", "-w", str(dist), str(source)], check=True, cwd=tmp_path,
                   env=env)
    (wheel,) = dist.glob("freetf-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {f"freetf/configs/{p.name}" for p in (ROOT / "freetf" / "configs").glob("*.yaml")}
    assert shipped and shipped <= names

    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=False)
    python = env_dir / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig."
                                "get_paths()['purelib'])"], capture_output=True, text=True,
                               check=True).stdout.strip())
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install",
                    "--no-deps", "--quiet", str(wheel)], check=True, cwd=tmp_path, env=env)
    # after the install: pip would take the editable freetf found there for this one
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")

    work = tmp_path / "empty"
    work.mkdir()
    where = subprocess.run([str(python), "-c", "import freetf; print(freetf.__file__)"],
                           cwd=work, env=env, capture_output=True, text=True, check=True)
    assert Path(where.stdout.strip()).is_relative_to(site)
    done = subprocess.run([str(env_dir / "bin" / "freetf"), "sweep", "--smoke"], cwd=work,
                          env=env, capture_output=True, text=True, timeout=1200)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]
    assert "kappa_c (collapse onset)" in output and "6 trials" in output
    assert (work / "mlflow.db").is_file()
    assert (work / "reports" / "search_kl_smoke" / "collapse_map.png").is_file()
    assert (work / "ray_results" / "search_kl_smoke").is_dir()
