"""The study on two rented boxes, typed as docs/remote.md says: python -m pytest tests/test_remote_study.py -q

A fresh clone plays the laptop; two real sshd + tmux boxes on 127.0.0.1 with
hostnames of their own (``box-one``, ``box-two``) play the rentals. Their image
has Python with the packages installed (as Vast's PyTorch images do): sshd's
``SetEnv`` hands every session ``PYTHON`` and ``PYTHONPATH``, and the documented
set-up launch builds the box's ``.venv`` on top. Then, in the documented
``-- ablate ...`` form and watched with ``scripts/local/wait_or_crash.sh``:
stage 1, stage 2, stage 3 (causal) on box one; stage 3 (prefill_bidir) killed
there after a checkpoint, pushed to box two, resumed there (set-up on first use);
both boxes synced in either order; stage 4, the report and STATUS.md at home,
with every run's commit and host shown.
"""

import hashlib
import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from sshbox import AVAILABLE, WHY_NOT, Server

pytestmark = pytest.mark.skipif(not AVAILABLE, reason=WHY_NOT)
REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent  # this checkout's venv: `ablate` on the laptop's PATH
STAGE3B = "stage3_finetune_prefill_bidir"


def laptop_clone(tmp: Path) -> Path:
    """A fresh clone of this checkout, plus its uncommitted work (so a dev run tests what is on disk)."""
    laptop = tmp / "laptop"
    subprocess.run(["git", "clone", "-q", "--no-hardlinks", str(REPO), str(laptop)], check=True)
    changed = subprocess.run(["git", "ls-files", "-m", "-o", "--exclude-standard", "-z"], cwd=REPO,
                             capture_output=True, check=True).stdout.decode().split("\0")
    for rel in filter(None, changed):
        if (REPO / rel).is_file():
            (laptop / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, laptop / rel)
    return laptop


def sha_tree(root: Path) -> dict:
    """Every file of a run by content; dot files (the local lock and records) are not the run's."""
    root = root.resolve()
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*"))
            if p.is_file() and not any(s.startswith(".") for s in p.relative_to(root).parts)}


class Laptop:
    def __init__(self, root: Path):
        self.root = root
        self.env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "POLL_SECONDS": "1",
                    "MAX_POLL_SECONDS": "2"}

    def ablate(self, *args, code=0, env=None):
        proc = subprocess.run(["ablate", *map(str, args)], cwd=self.root, env={**self.env, **(env or {})},
                              capture_output=True, text=True, timeout=900)
        assert proc.returncode == code, f"ablate {' '.join(map(str, args))} -> {proc.returncode}\n" \
                                        f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        return proc.stdout + proc.stderr

    def wait(self, box: Server, workdir: str, session: str, code=0):
        """scripts/local/wait_or_crash.sh, configured by its variables only."""
        env = {**self.env, "VAST_HOST": "127.0.0.1", "VAST_PORT": str(box.port), "VAST_USER": box.user,
               "REMOTE_SESSION": session, "COMPLETE_FILE": f"runs/.complete-{session}", "REMOTE_WORKDIR": workdir,
               "SSH_KEY": box.key, "ABLATE_KNOWN_HOSTS": box.known_hosts}
        proc = subprocess.run(["bash", "scripts/local/wait_or_crash.sh"], cwd=self.root, env=env,
                              capture_output=True, text=True, timeout=900)
        assert proc.returncode == code, f"{session}: exit {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-2000:]}"
        return proc.stdout

    def launch(self, box: Server, workdir: str, session: str, *command, extra=()):
        out = self.ablate("remote", "launch", *box.flags(workdir, "--session", session, *extra), "--", *command)
        assert f"launched '{session}'" in out
        return out


def box_image(folder: Path) -> Path:
    """The packages of the boxes' image: this venv's, without ablate itself (each box installs its own copy)."""
    folder.mkdir()
    for entry in Path(sysconfig.get_paths()["purelib"]).iterdir():
        if "ablate" not in entry.name and entry.suffix != ".pth":
            (folder / entry.name).symlink_to(entry)
    return folder


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_models):
    tmp = tmp_path_factory.mktemp("study")
    laptop = laptop_clone(tmp)
    shutil.copytree(tiny_models("llama"), laptop / "models" / "tiny")  # untracked: copied with the code
    (laptop / "models" / "NOTES.md").write_text("a tiny model for the remote study test\n")
    image = {"PYTHON": os.path.realpath(sys._base_executable), "PYTHONPATH": str(box_image(tmp / "image"))}
    home = Path(os.path.expanduser("~"))
    boxes = {}
    for name in ("box-one", "box-two"):
        server = Server(tmp / name, hostname=name, setenv=image)
        # relative to the box's login directory, as a user's `--workdir` usually is
        boxes[name] = (server, os.path.relpath(tmp / f"{name}-work", home))
    yield Laptop(laptop), boxes
    for server, _ in boxes.values():
        server.kill_tmux()
        server.stop()


EVAL = ("--model", "models/tiny", "--tasks", "ablate_tiny", "--device", "cpu", "--limit", "12")
TRAIN = ("--model", "models/tiny", "--data", "tests/data/sft.jsonl", "--device", "cpu", "--max-steps", "4",
         "--save-steps", "2", "--warmup-steps", "0", "--learning-rate", "1e-3", "--max-length", "64")


def test_the_study_on_two_boxes_one_of_them_lost(world):
    laptop, boxes = world
    one, w1 = boxes["box-one"]
    two, w2 = boxes["box-two"]
    runs = laptop.root / "runs"

    laptop.launch(one, w1, "setup", "bash", "scripts/local/setup.sh")
    laptop.wait(one, w1, "setup")
    laptop.launch(one, w1, "stage1", "ablate", "stage1", *EVAL)
    laptop.wait(one, w1, "stage1")
    laptop.launch(one, w1, "stage2", "ablate", "stage2", "--mask", "prefill_bidir", *EVAL)
    laptop.wait(one, w1, "stage2")
    laptop.launch(one, w1, "stage3a", "ablate", "stage3", "--mask", "causal", *TRAIN)
    laptop.wait(one, w1, "stage3a")
    # stage 3B dies on box one after its step-2 checkpoint (SIGKILL at step 3, as a preempted box would)
    laptop.launch(one, w1, "stage3b", "ablate", "stage3", "--mask", "prefill_bidir", *TRAIN,
                  extra=("--env", "ABLATE_FAULT_KILL_AT=step:3"))
    laptop.wait(one, w1, "stage3b", code=1)
    laptop.ablate("remote", "sync", *one.flags(w1, "--with-checkpoints"))
    (killed,) = (runs / STAGE3B).iterdir()
    log = (Path(os.path.expanduser("~")) / w1 / ".ablate-remote" / "stage1" / "log").read_text()
    assert str(REPO) not in log and "models/tiny" in log  # the box ran its own copy of the code
    status = laptop.ablate("status")
    assert f"`runs/{STAGE3B}/{killed.name}` is **crashed**" in (laptop.root / "STATUS.md").read_text(), status

    # box one is gone for good: its run continues on box two
    one.kill_tmux()
    one.stop()
    pushed = laptop.ablate("remote", "push", f"runs/{STAGE3B}/{killed.name}", *two.flags(w2))
    assert "resume: ablate remote launch" in pushed
    laptop.launch(two, w2, "stage3b-resume", "ablate", "stage3", "--resume", "--run-dir",
                  f"runs/{STAGE3B}/{killed.name}")
    laptop.wait(two, w2, "stage3b-resume")
    laptop.ablate("remote", "sync", *two.flags(w2, "--with-checkpoints"))
    box2_run = Path(os.path.expanduser("~")) / w2 / "runs" / STAGE3B / killed.name
    assert sha_tree(runs / STAGE3B / killed.name) == sha_tree(box2_run)

    # box one comes back with its old state of that run: a sync never takes the run back to it
    one.start()
    back = laptop.ablate("remote", "sync", *one.flags(w1, "--with-checkpoints"))
    assert sha_tree(runs / STAGE3B / killed.name) == sha_tree(box2_run), back
    assert [p.name for p in (runs / STAGE3B).iterdir()] == [killed.name]
    for order in ((one, w1, two, w2), (two, w2, one, w1)):
        home = laptop.root / f"runs-{order[0].hostname}-first"
        for server, workdir in (order[:2], order[2:]):
            laptop.ablate("remote", "sync", *server.flags(workdir, "--with-checkpoints", "--runs-dir", home))
        assert sha_tree(home / STAGE3B / killed.name) == sha_tree(box2_run)
        assert json.loads((home / STAGE3B / killed.name / "summary.json").read_text())["status"] == "completed"

    out = laptop.ablate("stage4", "--device", "cpu")
    assert "retention" in out
    laptop.ablate("report")
    laptop.ablate("status")
    status = (laptop.root / "STATUS.md").read_text()
    report = (laptop.root / "docs" / "RESULTS.md").read_text()
    sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=laptop.root, capture_output=True, text=True).stdout
    for text in (status, report):
        assert f"code `{sha[:12]}` + uncommitted changes" in text  # models/ was copied untracked
        assert "ran on `box-one`" in text and "ran on `box-two`" in text
    env = json.loads((runs / STAGE3B / killed.name / "env.json").read_text())
    assert env["hostname"] == "box-two" and env["git_sha"] == sha.strip() and env["source"]["from_host"]
    history = [json.loads(line) for line in (runs / STAGE3B / killed.name / "history.jsonl").read_text().splitlines()]
    assert [(h["host"], h["from_step"]) for h in history] == [("box-one", 0), ("box-two", 2)]
