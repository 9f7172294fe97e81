"""train.py end to end on the tiny preset: the reports and triplets a run writes, sample.py's command line on
its checkpoint, one-line errors for bad settings and bad data, typed overrides, and sweep.py. One
`python train.py --preset=tiny` run (tiny_run) is shared by the tests that read its outputs."""

import json
import math
import os
import shutil
import subprocess
import sys

import pytest

import checks
import data
import evaluate
import train
from configurator import ConfigError

HERE = os.path.dirname(os.path.abspath(__file__))
LN2 = math.log(2)


def run_train(*args):
    return subprocess.run([sys.executable, os.path.join(HERE, "train.py"), *args], capture_output=True,
                          text=True, cwd=HERE, timeout=600)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """One full `python train.py --preset=tiny` run, shared by the tests that read its outputs."""
    out_dir = str(tmp_path_factory.mktemp("tiny"))
    result = run_train("--preset=tiny", f"--out_dir={out_dir}")
    assert result.returncode == 0, result.stderr[-3000:]
    return out_dir


def snapshot(folder):
    return {name: os.path.getmtime(os.path.join(folder, name)) for name in sorted(os.listdir(folder))}


# ----------------------------------------------------------------------------------------------------------
# the pipeline end to end


def test_tiny_pipeline_writes_all_reports(tiny_run):
    report = json.load(open(os.path.join(tiny_run, "report.json")))
    for section in ("sft", "dpo", "adpo"):
        for key in evaluate.SECTION_KEYS:
            assert math.isfinite(report[section][key]), (section, key)
        assert 0 <= report[section]["truncated_share"] <= 1 and report[section]["eot_logprob_after_chosen"] < 0
        low, high = report[section]["toxicity_adversarial_ci95"]
        assert low <= report[section]["toxicity_adversarial"] <= high
    assert report["triplets"]["n"] > 0 and 0 <= report["triplets"]["rejected_toxic_share"] <= 1
    for section in ("dpo", "adpo"):
        for key in evaluate.STABILITY_KEYS:
            assert key in report[section] or (section, key) == ("dpo", "toxic_grad_share")
    for key in evaluate.SFT_KEYS:
        assert key in report["sft"]
    for name in ("sft.pt", "dpo.pt", "adpo.pt", "tokenizer.json", "report.md", "curves.png",
                 "metrics_dpo.jsonl", "metrics_adpo.jsonl"):
        assert os.path.isfile(os.path.join(tiny_run, name)), name
    first = json.loads(open(os.path.join(tiny_run, "metrics_dpo.jsonl")).readline())
    assert first["loss"] == pytest.approx(LN2, abs=1e-3)  # pi = ref at step 0


def test_triplets_file_is_well_formed(tiny_run):
    lines = open(os.path.join(tiny_run, "triplets.jsonl"), encoding="utf-8").read().splitlines()
    assert lines
    _, tok, _ = checks.load_checkpoint(os.path.join(tiny_run, "sft.pt"))
    assert checks.read_triplets(os.path.join(tiny_run, "triplets.jsonl"))  # its own checks pass
    for line in lines:
        t = json.loads(line)
        assert isinstance(t["context"], list) and all(isinstance(x, str) for x in t["context"])
        assert t["chosen"] and t["rejected"] and t["chosen_ids"] != t["rejected_ids"]
        assert isinstance(t["toxic"], str)
        for key in data.REPLIES:  # the text is the decoded ids, end-of-turn exactly when finished
            ids = t[f"{key}_ids"]
            assert t[f"{key}_finished"] == (ids[-1] == data.EOT_ID) and 0 < len(ids) <= 12
            assert data.decode(tok, ids[:-1] if t[f"{key}_finished"] else ids).strip() == t[key]
        assert 0 <= t["p_chosen"] <= t["p_rejected"] <= 1 and 0 <= t["p_toxic"] <= 1
        assert t["toxic_is_toxic"] == (t["p_toxic"] >= 0.5)


def test_sample_cli(tiny_run):
    result = subprocess.run([sys.executable, os.path.join(HERE, "sample.py"),
                             f"--checkpoint={tiny_run}/sft.pt", "--prompt=i hate mondays", "--toxic",
                             "--num_samples=3", "--max_new_tokens=8"], capture_output=True, text=True, cwd=HERE)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("  > ") == 3 and "[TOXIC]" in result.stdout


# ----------------------------------------------------------------------------------------------------------
# bad input


@pytest.mark.parametrize("args, message", [
    (["--nope=1"], "unknown setting --nope; valid settings: preset, out_dir"),
    (["--sft_iters=many"], "--sft_iters=many: expected int"),
    (["--loss=kto"], "unknown loss 'kto'; valid losses: dpo, adpo, adpo_split, ipo, cdpo"),
    (["--beta=0"], "--beta must be positive"),
    (["--gamma=-0.1"], "--gamma must be at least 0, got -0.1"),  # 0 is DPO; below it, ADPO rewards y_t
    (["--preset=huge"], "unknown preset 'huge'"),
])
def test_bad_settings_stop_with_one_line(tmp_path, args, message):
    out_dir = tmp_path / "out"
    result = run_train("--preset=tiny", f"--out_dir={out_dir}", *args)
    assert result.returncode != 0
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not out_dir.exists()  # nothing written


def test_bad_data_and_missing_files_overwrite_nothing(tiny_run, tmp_path):
    out_dir = str(tmp_path / "run")
    shutil.copytree(tiny_run, out_dir)
    with open(os.path.join(out_dir, "triplets.jsonl")) as f:
        lines = f.read().splitlines()
    broken = json.loads(lines[0])
    del broken["rejected"]
    with open(os.path.join(out_dir, "triplets.jsonl"), "w") as f:
        f.write("\n".join([lines[0], json.dumps(broken)] + lines[2:]) + "\n")
    before = snapshot(out_dir)
    result = run_train("--preset=tiny", f"--out_dir={out_dir}", "--stages=pref,eval")
    assert result.returncode != 0
    assert "triplets.jsonl:2: missing field 'rejected'" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and snapshot(out_dir) == before

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"turns": ["hi", "hello"]}\n{"turns": [1, 2]}\n')
    result = run_train("--preset=tiny", f"--out_dir={out_dir}", f"--data={bad}")
    assert result.returncode != 0 and "bad.jsonl:2:" in result.stderr and snapshot(out_dir) == before

    empty = str(tmp_path / "empty")
    result = run_train("--preset=tiny", f"--out_dir={empty}", "--stages=triplets")
    assert result.returncode != 0 and "no checkpoint at" in result.stderr and not os.path.exists(empty)
    result = subprocess.run([sys.executable, os.path.join(HERE, "sample.py"), f"--checkpoint={empty}/x.pt"],
                            capture_output=True, text=True, cwd=HERE)
    assert result.returncode != 0 and "no checkpoint at" in result.stderr


def test_settings_overrides_are_typed():
    s = train.get_settings(["--preset=tiny", "--beta=0.5", "--top_k=none", "--bias=false", "--stages=sft"])
    assert s.beta == 0.5 and s.top_k is None and s.bias is False and s.n_embd == 64
    assert train.get_settings(["--preset=tiny", "--top_k=40"]).top_k == 40
    with pytest.raises(ConfigError, match="expected --key=value"):
        train.get_settings(["beta=1"])
    with pytest.raises(ConfigError, match="unknown stage 'dpo'"):
        train.get_settings(["--stages=sft,dpo"])


# ----------------------------------------------------------------------------------------------------------
# the sweep


def test_sweep_on_the_tiny_preset(tiny_run, tmp_path):
    out_dir = str(tmp_path / "sweep")
    shutil.copytree(tiny_run, out_dir)
    code = tmp_path / "code"  # a copy of the project, for a student's edit of a loss
    code.mkdir()
    for name in os.listdir(HERE):
        if name.endswith(".py") or name == "provoked.txt":
            shutil.copy(os.path.join(HERE, name), code / name)
    args = [sys.executable, str(code / "sweep.py"), "--preset=tiny", f"--out_dir={out_dir}",
            "--grid=loss=dpo,adpo gamma=0.1,0.3", "--pref_iters=2"]
    result = subprocess.run(args, capture_output=True, text=True, cwd=code, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    sweep = json.load(open(os.path.join(out_dir, "sweep.json")))
    assert [p["label"] for p in sweep["points"]] == ["dpo", "adpo gamma=0.1", "adpo gamma=0.3"]  # DPO once
    assert sweep["split"] == "dev"
    for p in [sweep["sft"]] + sweep["points"]:
        for key in ("toxicity_adversarial_ci95", "val_ppl_ci95", "wordlist_toxicity_adversarial", "relevance"):
            assert key in p
    for name in ("sweep.md", "tradeoff.png"):
        assert os.path.isfile(os.path.join(out_dir, name))
    source = (code / "adpo.py").read_text()
    assert "- gamma * h_t)" in source
    (code / "adpo.py").write_text(source.replace("- gamma * h_t)", "- 5 * gamma * h_t)", 1))  # adpo_loss edited
    again = subprocess.run(args, capture_output=True, text=True, cwd=code, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "sweep: sft done earlier, reused" in again.stdout and "sweep: dpo done earlier, reused" in again.stdout
    assert again.stdout.count("done earlier with other code, settings or inputs: computed again") == 2  # ADPO
    bad = subprocess.run(args[:-2] + ["--grid=block_size=32,64"], capture_output=True, text=True, cwd=HERE)
    assert bad.returncode != 0 and "cannot vary block_size" in bad.stderr
