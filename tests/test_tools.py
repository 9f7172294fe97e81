"""The commands the documentation gives: every one names a script, module or file that exists, and each tool
runs its tiny form from the repository root as `python -m tools.NAME` (the sweep and the stress test run in
test_train.py, export in test_export.py)."""

import glob
import json
import os
import re
import shutil
import subprocess
import sys

import pytest

from conftest import RUN
from harness.configurator import ConfigError
from tools import vs_nanogpt

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository root
DOCS = ["README.md", "EXERCISES.md"] + sorted(os.path.relpath(p, HERE) for p in glob.glob(f"{HERE}/docs/*.md"))
TOOLS = ["bench", "chat", "check_loss", "export", "stress", "sweep", "vs_nanogpt"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def doc_commands():
    """(file, line, command) for each command the docs show: `python X.py`, `python -m X`, `bash X`."""
    found = []
    for name in DOCS:
        with open(os.path.join(HERE, name), encoding="utf-8") as f:
            for i, line in enumerate(f, 1):
                for m in re.finditer(r"(?:python|torchrun [^`]*?|bash)\s+(-m\s+[\w.]+|[\w./-]+\.(?:py|sh))", line):
                    found.append((name, i, m.group(1)))
    return found


def test_every_command_in_the_docs_names_what_exists():
    commands = doc_commands()
    assert len(commands) > 40 and any(c.startswith("-m tools.") for _, _, c in commands)
    missing = []
    for name, line, target in commands:
        if "NAME" in target:  # `python -m tools.NAME`: the placeholder of the README's table
            continue
        if target.startswith("-m "):
            path = os.path.join(HERE, *target[3:].split(".")) + ".py"
        else:
            path = os.path.join(HERE, target)
        if not os.path.isfile(path):
            missing.append(f"{name}:{line}: {target}")
    assert not missing, missing


def test_every_tool_is_documented():
    text = "".join(open(os.path.join(HERE, name), encoding="utf-8").read() for name in DOCS)
    found = sorted(f[:-3] for f in os.listdir(os.path.join(HERE, "tools")) if f.endswith(".py") and f[0] != "_")
    assert found == TOOLS
    assert all(f"python -m tools.{tool}" in text or f"tools/{tool}.py" in text for tool in TOOLS)


def tool(*args, timeout=300, **kwargs):
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, cwd=HERE, env=ENV,
                          timeout=timeout, **kwargs)


def test_the_tools_run_their_tiny_form(finished, tmp_path):
    """chat here; check_loss in test_coursework.py, sweep and stress in test_train.py, export in
    test_export.py, bench in the GPU check below."""
    chat = tool("tools.chat", f"--checkpoint={finished}/sft.pt", "--prompt=hi there", "--num_samples=2",
                "--max_new_tokens=4")
    assert chat.returncode == 0 and chat.stdout.count("  > ") == 2, chat.stderr[-2000:]
    bad = tool("tools.chat", "--nope=1")
    assert bad.returncode == 1 and bad.stderr.startswith("error: unknown setting")


@pytest.mark.skipif(not os.path.exists("/bin/bash"), reason="bash")
def test_the_gpu_check_script_runs_on_a_cpu(finished, tmp_path):
    """tools/gpu_check.sh as its own comment says it runs on a CPU: the bench, then the tiny preset (here on a
    finished run's copy, which it finds done)."""
    shutil.copytree(finished, tmp_path / "run")
    env = {**ENV, "PRESET": "tiny", "BENCH_ARGS": "--device=cpu --steps=1 --warmup=1", "OUT": str(tmp_path),
           "TRAIN_ARGS": " ".join(a for a in RUN if not a.startswith("--preset"))}
    result = subprocess.run(["bash", "tools/gpu_check.sh"], capture_output=True, text=True, cwd=HERE, env=env,
                            timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "the tiny preset on 1 process(es)" in result.stdout and "exit status 0" in result.stdout
    assert json.load(open(tmp_path / "bench.json"))["pref"] and "| metric" in result.stdout


def test_vs_nanogpt_measures_a_model_of_the_same_function_and_refuses_another(tmp_path):
    """tools/vs_nanogpt.py on our own model.py in nanoGPT's place (nanoGPT is not in this repository): the
    weights are copied, the losses agree, each round gives both speeds; a model file whose function differs
    (no final LayerNorm) is refused before anything is timed."""
    out = tmp_path / "vs.json"
    result = vs_nanogpt.main([f"--nanogpt={os.path.join(HERE, 'model.py')}", "--rounds=2", "--steps=1",
                              "--warmup=0", "--batch_size=2", "--max_load=2", f"--out={out}"])
    saved = json.loads(out.read_text())
    assert len(saved["rounds"]) == 2 and saved["ours_over_nanoGPT"] == result["ours_over_nanoGPT"]
    assert all(min(r["tokens_per_s"].values()) > 0 for r in saved["rounds"])
    assert set(saved["rounds"][0]["tokens_per_s"]) == {"ours", "nanoGPT", "nanoGPT_tanh"}
    other = tmp_path / "other_model.py"
    other.write_text(open(os.path.join(HERE, "model.py")).read().replace(  # no final LayerNorm
        "logits = self.lm_head(self.transformer.ln_f(x))", "logits = self.lm_head(x)"))
    with pytest.raises(ConfigError, match="different losses"):
        vs_nanogpt.main([f"--nanogpt={other}", f"--out={out}"])
    with pytest.raises(ConfigError, match="no such file"):
        vs_nanogpt.main([f"--nanogpt={tmp_path / 'none.py'}"])
