"""A wheel install behaves as the editable one: python -m pytest tests/test_packaging.py -q

The stage defaults (``ablate/stages/*.yaml``) and the bundled task data ship in
the wheel. The wheel is built from this checkout and installed alone into a
fresh virtualenv, which borrows only the dependencies (torch, transformers, ...)
from this environment; the stage configs it resolves must equal the editable
install's.
"""

import json
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESOLVE = """
import json, ablate
from dataclasses import asdict
from ablate.stages.config import load_eval_config, load_finetune_config, load_stage4_config
from ablate.core.tasks import BUNDLED_DATA
print(json.dumps({
    "package": ablate.__file__,
    "stage1": load_eval_config("stage1_baseline_eval", {"model": "m"}).to_dict(),
    "stage2": load_eval_config("stage2_ablation_eval", {"model": "m"}).to_dict(),
    "stage3": load_finetune_config({"model": "m", "data": "d"}).to_dict(),
    "stage4": asdict(load_stage4_config({})),
    "bundled_task_data": {k: v.is_file() for k, v in BUNDLED_DATA.items()},
}))
"""


def resolve(python: str, cwd: Path) -> dict:
    # Outside the checkout: `python -c` puts the working directory first on sys.path.
    out = subprocess.run([python, "-c", RESOLVE], capture_output=True, text=True, check=True, timeout=120, cwd=cwd)
    return json.loads(out.stdout)


def test_wheel_install_resolves_the_same_configs_as_the_editable_install(tmp_path):
    # A clean copy of the sources: a stale build/ or *.egg-info in the checkout could supply files the
    # package data rules would not.
    source, wheels = tmp_path / "source", tmp_path / "wheels"
    shutil.copytree(ROOT / "ablate", source / "ablate", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(wheels), str(source)], check=True, timeout=300, capture_output=True)
    (wheel,) = wheels.glob("ablate-*.whl")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = str(venv / "bin" / "python")
    site = Path(subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)],
                   check=True, timeout=300, capture_output=True)
    # Dependencies only: a path added by a .pth line does not run that folder's own .pth files, so this
    # environment's editable `ablate` finder stays out and `import ablate` finds the wheel's copy.
    (site / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")

    installed, editable = resolve(python, tmp_path), resolve(sys.executable, tmp_path)
    assert installed["package"].startswith(str(site)) and not editable["package"].startswith(str(site))
    assert installed["stage3"]["warmup_steps"] == 50 and installed["stage3"]["gradient_accumulation_steps"] == 4
    assert installed["bundled_task_data"] == {"ablate_tiny": True}
    for key in ("stage1", "stage2", "stage3", "stage4", "bundled_task_data"):
        assert installed[key] == editable[key], key
