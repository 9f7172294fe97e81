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
import torch

import data
import evaluate
import train
from conftest import cli, copy_source, get_settings
from harness import checks, reports
from harness.configurator import ConfigError
from model import GPT
from tools import chat, stress, sweep

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository root
LN2 = math.log(2)


def run_train(*args):
    return subprocess.run([sys.executable, os.path.join(HERE, "train.py"), *args], capture_output=True,
                          text=True, cwd=HERE, timeout=600)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """One full `python train.py --preset=tiny --seeds=2` run, shared by the tests that read its outputs."""
    out_dir = str(tmp_path_factory.mktemp("tiny"))
    result = run_train("--preset=tiny", "--seeds=2", f"--out_dir={out_dir}")
    assert result.returncode == 0, result.stderr[-3000:]
    return out_dir


def snapshot(folder):
    return {name: os.path.getmtime(os.path.join(folder, name)) for name in sorted(os.listdir(folder))}


# ----------------------------------------------------------------------------------------------------------
# the pipeline end to end


def test_tiny_pipeline_writes_all_reports(tiny_run):
    report = json.load(open(os.path.join(tiny_run, "report.json")))
    for section in ("sft", "dpo", "adpo"):
        for key in reports.SECTION_KEYS:
            assert math.isfinite(report[section][key]), (section, key)
        assert 0 <= report[section]["truncated_share"] <= 1 and report[section]["eot_logprob_after_chosen"] < 0
        low, high = report[section]["toxicity_adversarial_ci95"]
        assert low <= report[section]["toxicity_adversarial"] <= high
    assert report["triplets"]["n"] > 0 and 0 <= report["triplets"]["rejected_toxic_share"] <= 1
    for section in ("dpo", "adpo"):
        for key in reports.STABILITY_KEYS:
            assert key in report[section] or (section, key) == ("dpo", "toxic_grad_share")
    for key in reports.SFT_KEYS:
        assert key in report["sft"]
    for name in ("sft.pt", "dpo.pt", "adpo.pt", "tokenizer.json", "report.md", "curves.png",
                 "metrics_dpo.jsonl", "metrics_adpo.jsonl"):
        assert os.path.isfile(os.path.join(tiny_run, name)), name
    first = json.loads(open(os.path.join(tiny_run, "metrics_dpo.jsonl")).readline())
    assert first["loss"] == pytest.approx(LN2, abs=1e-3)  # pi = ref at step 0


def test_the_bf16_pipeline_on_cpu(tiny_run, tmp_path, monkeypatch):
    """--dtype=bfloat16 on CPU, every stage: each forward of the model (SFT steps and validation, sampling,
    reference and policy log-probs, the evaluation, the report's token log-ratios) runs under bf16 autocast;
    pi = ref at step 0 within 1e-3 nats (the stated tolerance: the same weights and kernels score each row,
    in eval mode for the reference and in train mode without dropout for the policy); the report is written
    and finite; the numbers are bf16's, not float32's; and the float32 run's command finds every file stale."""
    seen = []

    def recording(forward):
        def wrapped(self, *args, **kwargs):
            seen.append((forward.__name__, torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))
            return forward(self, *args, **kwargs)
        return wrapped
    for name in ("forward", "_forward_sampling"):
        monkeypatch.setattr(GPT, name, recording(getattr(GPT, name)))
    out_dir = str(tmp_path / "bf16")
    short = ["--preset=tiny", "--sft_iters=20", "--pref_iters=2", "--pref_contexts=12", "--eval_contexts=4",
             "--ppl_replies=8"]  # every stage, smaller
    result = cli(train.main, *short, "--dtype=bfloat16", f"--out_dir={out_dir}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert {f for f, _, _ in seen} == {"forward", "_forward_sampling"}
    assert {(on, dtype) for _, on, dtype in seen} == {(True, torch.bfloat16)}, "a forward outside bf16"

    report = json.load(open(os.path.join(out_dir, "report.json")))
    assert report["settings"]["dtype"] == "bfloat16"
    for section in ("sft", "dpo", "adpo"):
        for key in reports.SECTION_KEYS:
            assert math.isfinite(report[section][key]), (section, key)
    for loss in ("dpo", "adpo"):
        first = json.loads(open(os.path.join(out_dir, f"metrics_{loss}.jsonl")).readline())
        for reply in ("chosen", "rejected", "toxic"):
            assert abs(first[f"logratio/{reply}"]) <= 1e-3, (loss, reply, first)
        if loss == "dpo":
            assert first["loss"] == pytest.approx(LN2, abs=1e-3)
    # the first 10 SFT steps (warmup: the same learning rates for any --sft_iters) of the float32 tiny_run:
    # close, but not the same numbers
    bf16, fp32 = (json.loads(open(os.path.join(d, "metrics_sft.jsonl")).readline()) for d in (out_dir, tiny_run))
    assert bf16["step"] == fp32["step"] == 10 and bf16["lr"] == fp32["lr"]
    assert bf16["loss"] != fp32["loss"] and abs(bf16["loss"] - fp32["loss"]) < 0.05, (bf16, fp32)

    message = cli(train.main, *short, f"--out_dir={out_dir}", "--stages=eval").stderr
    assert "sft.pt" in message and "is stale" in message, message


def test_two_seeds_give_intervals_with_training_noise_and_paired_differences(tiny_run):
    report = json.load(open(os.path.join(tiny_run, "report.json")))
    assert report["seeds"]["values"] == [1337, 1338] and "preference data" in report["seeds"]["vary"]
    for section in ("sft", "dpo", "adpo"):
        for key in ("toxicity_adversarial", "wordlist_toxicity_provoked", "val_ppl", "relevance"):
            low, high = report[section][f"{key}_ci95_clustered"]
            assert low <= report[section][key] <= high, (section, key)
    for key in ("toxicity_adversarial", "val_ppl", "evasive_rate"):
        for name, ref in (("dpo", "sft"), ("adpo", "sft"), ("adpo", "dpo")):
            low, high = report[name][f"{key}_diff_vs_{ref}_ci95"]
            assert report[name][f"{key}_diff_vs_{ref}"] == pytest.approx(report[name][key] - report[ref][key])
            assert low <= high
    assert "paired 95% interval" in open(os.path.join(tiny_run, "report.md")).read()


def test_the_eval_stage_draws_the_mechanism_token_by_token(tiny_run):
    report = json.load(open(os.path.join(tiny_run, "report.json")))
    assert os.path.isfile(os.path.join(tiny_run, "token_logratios.png"))
    first = report["token_logratios"][0]
    triplet = json.loads(open(os.path.join(tiny_run, "triplets.jsonl")).readline())
    assert first["context"] == triplet["context"]  # the first triplet, not a picked one
    for row in ("chosen", "rejected", "toxic"):
        assert len(first[row]["tokens"]) == len(triplet[f"{row}_ids"])
        for loss in ("dpo", "adpo"):
            assert len(first[row][loss]) == len(triplet[f"{row}_ids"]) and all(map(math.isfinite, first[row][loss]))
    assert set(first["toxic_vs_tox"]) == {"tokens", "sft", "dpo", "adpo"}


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
                             "--num_samples=3", "--max_new_tokens=8", "--dtype=bfloat16"], capture_output=True,
                            text=True, cwd=HERE)
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
    (["--dtype=float16"], "--dtype=float16: one of float32, bfloat16"),
    (["--device=gpu"], "--device=gpu: not a device (cpu, cuda, cuda:N or mps)"),
    pytest.param(["--device=mps"], "--device=mps but MPS is not available",
                 marks=pytest.mark.skipif(torch.backends.mps.is_available(), reason="this machine has MPS")),
])
def test_bad_settings_stop_with_one_line(tmp_path, args, message):
    out_dir = tmp_path / "out"
    result = cli(train.main, "--preset=tiny", f"--out_dir={out_dir}", *args)
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
    result = cli(train.main, "--preset=tiny", f"--out_dir={out_dir}", "--stages=pref,eval")
    assert result.returncode != 0
    assert "triplets.jsonl:2: missing field 'rejected'" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and snapshot(out_dir) == before

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"turns": ["hi", "hello"]}\n{"turns": [1, 2]}\n')
    result = cli(train.main, "--preset=tiny", f"--out_dir={out_dir}", f"--data={bad}")
    assert result.returncode != 0 and "bad.jsonl:2:" in result.stderr and snapshot(out_dir) == before

    empty = str(tmp_path / "empty")
    result = cli(train.main, "--preset=tiny", f"--out_dir={empty}", "--stages=triplets")
    assert result.returncode != 0 and "no checkpoint at" in result.stderr and not os.path.exists(empty)
    result = cli(chat.main, f"--checkpoint={empty}/x.pt")
    assert result.returncode != 0 and "no checkpoint at" in result.stderr


def test_settings_overrides_are_typed():
    s = get_settings(["--preset=tiny", "--beta=0.5", "--top_k=none", "--bias=false", "--stages=sft"])
    assert s.beta == 0.5 and s.top_k is None and s.bias is False and s.n_embd == 64
    assert get_settings(["--preset=tiny", "--top_k=40"]).top_k == 40
    with pytest.raises(ConfigError, match="expected --key=value"):
        get_settings(["beta=1"])
    with pytest.raises(ConfigError, match="unknown stage 'dpo'"):
        get_settings(["--stages=sft,dpo"])


# ----------------------------------------------------------------------------------------------------------
# the sweep


def test_sweep_on_the_tiny_preset(tiny_run, tmp_path):
    out_dir = str(tmp_path / "sweep")
    shutil.copytree(tiny_run, out_dir)
    code = tmp_path / "code"  # a copy of the project, for a student's edit of a loss
    copy_source(code)
    args = [sys.executable, "-m", "tools.sweep", "--preset=tiny", f"--out_dir={out_dir}",
            "--grid=loss=dpo,adpo gamma=0.1", "--pref_iters=2"]
    result = subprocess.run(args, capture_output=True, text=True, cwd=code, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    sweep = json.load(open(os.path.join(out_dir, "sweep.json")))
    assert [p["label"] for p in sweep["points"]] == ["dpo", "adpo gamma=0.1"]  # DPO added as the baseline
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
    assert again.stdout.count("done earlier with other code, settings or inputs: computed again") == 1  # ADPO
    bad = subprocess.run(args[:-2] + ["--grid=block_size=32,64"], capture_output=True, text=True, cwd=HERE)
    assert bad.returncode != 0 and "cannot vary block_size" in bad.stderr


def test_a_grid_cannot_vary_what_the_points_share():
    """--dtype shapes sft.pt, the triplets and the reference log-probs every point of a sweep shares: a grid
    over it would train a bf16 point against float32 references (pi != ref at step 0); the stress test too."""
    for axis in ("dtype=bfloat16,float32", "max_new_tokens=8,12", "n_layer=2,4"):
        with pytest.raises(ConfigError, match="--grid cannot vary"):
            sweep.parse_grid(axis)
    assert sweep.parse_grid("gamma=0.1,0.3 beta2=0.9,0.95") == {"gamma": ["0.1", "0.3"], "beta2": ["0.9", "0.95"]}


def test_grid_points_run_dpo_once_and_drop_axes_a_loss_does_not_take():
    s = get_settings(["--preset=tiny"])
    points = sweep.grid_points(s, sweep.parse_grid("loss=dpo,adpo gamma=0.1,0.3"))
    assert points == [{"loss": "dpo"}, {"gamma": "0.1", "loss": "adpo"}, {"gamma": "0.3", "loss": "adpo"}]
    assert sweep.grid_points(s, sweep.parse_grid("loss=adpo"))[0] == {"loss": "dpo"}  # the baseline added


def stress_result(val_ppl=100.0, spikes=0, drop=0.5):
    return {"val_ppl": val_ppl, "loss_spikes": spikes, "chosen_logp_max_drop": drop, "max_grad_norm": 1.0}


def test_the_stress_rule_judges_each_loss_against_its_own_unstressed_runs():
    unstressed = [stress_result(100.0, 0, 6.0), stress_result(110.0, 0, 5.0), stress_result(90.0, 0, 6.5)]
    assert stress.unstable(stress_result(140.0, 0, 6.0), unstressed) == []  # within 1.5 x the median (100)
    assert stress.unstable(stress_result(151.0, 0, 6.0), unstressed) == ["degenerate"]
    assert stress.unstable(stress_result(100.0, 1, 6.0), unstressed) == ["spiking"]
    assert stress.unstable(stress_result(100.0, 0, 13.9), unstressed) == []  # 2 x 6.5 + 1 = 14 nats
    assert stress.unstable(stress_result(100.0, 0, 14.1), unstressed) == ["collapsing"]
    assert stress.unstable(stress_result(float("inf")), unstressed) == ["broken"]
    assert stress.unstable({"broken": "dpo step 3: the loss is nan", "metrics": []}, unstressed) == ["broken"]
    # DPO's own runs barely move the chosen reply: a 2-nat fall is a collapse for DPO, not for ADPO
    assert stress.unstable(stress_result(drop=2.0), [stress_result(drop=0.07)]) == ["collapsing"]
    # Wilson's interval, not the plain one (which is [0, 0] at 0 of 6): 0 of 6 is compatible with up to 39%
    assert stress.wilson(0, 6) == pytest.approx([0.0, 0.390], abs=1e-3)
    assert stress.wilson(3, 6) == pytest.approx([0.188, 0.812], abs=1e-3)
    # with six seeds 0 of 6 and 5 of 6 separate, 1 of 6 and 4 of 6 do not (docs/stability.md)
    assert stress.compare_shares(stress.wilson(0, 6), stress.wilson(5, 6)) == "steadier"
    assert stress.compare_shares(stress.wilson(6, 6), stress.wilson(0, 6)) == "less steady"
    assert stress.compare_shares(stress.wilson(1, 6), stress.wilson(4, 6)) == "cannot tell"
    assert stress.stress_points({"pref_lr": ["2e-4", "8e-4"], "beta": ["0.02"]}) == \
        [{}, {"pref_lr": "2e-4"}, {"pref_lr": "8e-4"}, {"beta": "0.02"}]  # one at a time, not the product


def test_stress_sweep_on_the_tiny_preset(tiny_run, tmp_path):
    out_dir = str(tmp_path / "stress")
    shutil.copytree(tiny_run, out_dir)
    args = [sys.executable, "-m", "tools.stress", "--preset=tiny", f"--out_dir={out_dir}",
            "--stress=pref_lr=5e-2", "--seeds=2", "--pref_iters=2"]
    result = subprocess.run(args, capture_output=True, text=True, cwd=HERE, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    written = json.load(open(os.path.join(out_dir, "stress.json")))
    assert written["split"] == "dev" and written["seeds"] == [1337, 1338]
    rows = {(r["setting"], r["loss"]): r for r in written["rows"]}
    assert set(rows) == {(p, loss) for p in ("unstressed", "pref_lr=5e-2") for loss in ("dpo", "adpo")}
    for row in rows.values():
        low, high = row["unstable_share_ci95"]
        assert row["n"] == 2 and low <= row["unstable_share"] <= high and len(row["runs"]) == 2
    # a learning rate 1000 x the tiny preset's: every run's perplexity explodes
    assert rows[("pref_lr=5e-2", "dpo")]["unstable"] == 2
    assert rows[("unstressed", "dpo")]["val_ppl_ratio_median"] == pytest.approx(1.0)
    for name in ("stress.md", "stress_curves.png"):
        assert os.path.isfile(os.path.join(out_dir, name))
    relative = [a if not a.startswith("--out_dir=") else f"--out_dir={os.path.relpath(out_dir, HERE)}" for a in args]
    again = subprocess.run(relative, capture_output=True, text=True, cwd=HERE, timeout=600)  # the same run
    assert again.returncode == 0 and again.stdout.count("done earlier, reused") == 8, again.stdout[-2000:]
    with pytest.raises(ConfigError, match="--stress needs --seeds of at least 2"):
        stress.main(args[3:-2] + ["--seeds=1"])
