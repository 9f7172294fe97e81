"""
The stress test (docs/stability.md): where DPO goes wrong, does ADPO go wrong less often?

    python train.py --stages=sft,triplets     # once: sft.pt and triplets.jsonl
    python -m tools.stress --stress="pref_lr=2e-4,8e-4 beta=0.02 pref_iters=256" --seeds=6

Every loss of --loss and DPO, unstressed and under each stress on its own (not their product), every seed,
from the same sft.pt on the same triplets as a sweep (tools/sweep.py); a run computes only its per-step
metrics and val_ppl on the dev split, and is called unstable by a rule that judges each loss against its own
unstressed runs. Writes stress.json, stress.md and stress_curves.png to --out_dir, each finished run to
--out_dir/sweep/, so a rerun skips what is done.
"""

import dataclasses
import json
import math
import time

import numpy as np

import evaluate
import train
from harness import artifacts, checks, reports, run_main
from harness.artifacts import checkpoint_name, write_text
from harness.configurator import ConfigError, apply_overrides
from tools.sweep import artifact_settings, cached, open_sweep, parse_grid, preference_inputs, sweep_code

DEFAULT_STRESS = "pref_lr=2e-4,8e-4 beta=0.02 pref_iters=256"
DEGENERATE_PPL_RATIO = 1.5  # degenerate: val_ppl over 1.5 x the median of the loss's unstressed runs
COLLAPSE_FACTOR, COLLAPSE_NATS = 2.0, 1.0  # collapsing: the chosen reply falls over 2 x U's largest fall + 1


def stress_points(axes):
    """The unstressed point, then every value of every axis on its own (not their product)."""
    return [{}] + [{key: value} for key, values in axes.items() for value in values]


def stress_label(point):
    return " ".join(f"{k}={v}" for k, v in point.items()) or "unstressed"


def stress_run(ps, loss, seed, enc, ref, human, sft_model, tok, run):
    """One training run: its per-step metrics, their stability numbers and val_ppl. A run that a non-finite
    loss stopped is kept as broken."""
    try:
        policy, metrics = train.train_preference(ps, loss, sft_model, enc, ref, seed, run.hooks(loss))
    except checks.RunError as e:
        return {"broken": str(e), "metrics": []}
    return {"val_ppl": evaluate.val_ppl(policy, tok, human, ps.sample_batch_size, ps.dtype),
            **evaluate.stability(metrics), "metrics": metrics}


def finished(runs):
    """The runs that ended with a finite loss and val_ppl."""
    return [r for r in runs if "broken" not in r and math.isfinite(r["val_ppl"])]


def unstable(r, unstressed):
    """The criteria of docs/stability.md that run r meets, judged against its own loss's unstressed runs."""
    if not finished([r]):
        return ["broken"]
    ok = finished(unstressed)
    if not ok:
        raise checks.RunError("every unstressed run of a loss broke: there is nothing to judge against")
    fired = []
    if r["val_ppl"] > DEGENERATE_PPL_RATIO * np.median([u["val_ppl"] for u in ok]):
        fired.append("degenerate")
    if r["loss_spikes"] > max(u["loss_spikes"] for u in ok):
        fired.append("spiking")
    largest_fall = max(u["chosen_logp_max_drop"] for u in ok)
    if r["chosen_logp_max_drop"] > COLLAPSE_FACTOR * largest_fall + COLLAPSE_NATS:
        fired.append("collapsing")
    return fired


def wilson(k, n, z=1.96):
    """95% Wilson interval of a share k/n (sound at 0 of n and n of n, where the plain one is not)."""
    p = k / n
    center = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return [max(0.0, center - half), min(1.0, center + half)]


def compare_shares(a, b):
    """'steadier' where a's interval of the unstable share lies wholly below b's, 'less steady' where wholly
    above, else 'cannot tell'."""
    if a[1] < b[0]:
        return "steadier"
    return "less steady" if b[1] < a[0] else "cannot tell"


def stress_rows(points, losses, runs):
    """One row per setting and loss: the unstable share with its interval, the criteria, the medians."""
    rows = []
    for point in points:
        for loss in losses:
            unstressed = runs[("unstressed", loss)]
            rs = runs[(stress_label(point), loss)]
            criteria = [unstable(r, unstressed) for r in rs]
            n_unstable = sum(1 for c in criteria if c)
            finite = finished(rs)
            u_ppl = float(np.median([u["val_ppl"] for u in finished(unstressed)]))
            rows.append({
                "setting": stress_label(point), "overrides": point, "loss": loss, "unstable": n_unstable,
                "n": len(rs), "unstable_share": n_unstable / len(rs),
                "unstable_share_ci95": wilson(n_unstable, len(rs)),
                "criteria": {c: sum(c in cs for cs in criteria)
                             for c in ("degenerate", "spiking", "collapsing", "broken")},
                "val_ppl_ratio_median": float(np.median([r["val_ppl"] / u_ppl for r in finite]))
                if finite else None,
                "chosen_logp_max_drop_median": float(np.median([r["chosen_logp_max_drop"] for r in finite]))
                if finite else None,
                "runs": [{k: v for k, v in r.items() if k != "metrics"} | {"unstable": c}
                         for r, c in zip(rs, criteria)]})
    for row in rows:  # each loss against DPO at the same setting
        dpo = next(r for r in rows if r["setting"] == row["setting"] and r["loss"] == "dpo")
        row["vs_dpo"] = "" if row["loss"] == "dpo" else compare_shares(row["unstable_share_ci95"],
                                                                       dpo["unstable_share_ci95"])
    return rows


def stress_table(rows):
    head = ["setting", "loss", "unstable", "95% interval", "degenerate", "spiking", "collapsing", "broken",
            "val_ppl / unstressed", "chosen fall (nats)", "vs DPO"]
    table = [head]
    def num(x):
        return "" if x is None else f"{x:.2f}"
    for r in rows:
        c = r["criteria"]
        table.append([r["setting"], r["loss"], f"{r['unstable']}/{r['n']}",
                      "[{:.2f}, {:.2f}]".format(*r["unstable_share_ci95"]),
                      *(str(c[k]) for k in ("degenerate", "spiking", "collapsing", "broken")),
                      num(r["val_ppl_ratio_median"]), num(r["chosen_logp_max_drop_median"]), r["vs_dpo"]])
    return reports.markdown_table(table)


def plot_stress_curves(path, points, losses, runs):
    """The loss and log pi - log ref of the chosen reply against step: a row per setting, a line per seed,
    a colour per loss."""
    plt = reports.pyplot()
    keys = [("loss", "loss"), ("logratio/chosen", "log pi(y_w|x) - log ref(y_w|x)"),
            ("logratio/rejected", "log pi(y_l|x) - log ref(y_l|x)")]
    fig, axes = plt.subplots(len(points), len(keys), figsize=(15, 3.2 * len(points)), squeeze=False)
    for row, point in zip(axes, points):
        for ax, (key, title) in zip(row, keys):
            for i, loss in enumerate(losses):
                for j, r in enumerate(runs[(stress_label(point), loss)]):
                    steps = [m["step"] for m in r["metrics"]]
                    ax.plot(steps, [m[key] for m in r["metrics"]], color=plt.get_cmap("tab10")(i % 10),
                            linewidth=0.8, alpha=0.7, label=loss if j == 0 else None)
            ax.set_title(f"{stress_label(point)}: {title}", fontsize=9)
            ax.set_xlabel("step")
            if key == "loss":
                ax.set_yscale("log")
        row[0].legend(fontsize=8)
    reports.save_figure(fig, path, dpi=70)


def finite_or_none(x):
    """For JSON: a non-finite number as null."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: finite_or_none(v) for k, v in x.items()}
    if isinstance(x, list):
        return [finite_or_none(v) for v in x]
    return x


def stress_sweep(s, stress, command, conversations, run, sft_model, tok, sets, seeds, inputs, t_start):
    points = stress_points(parse_grid(stress))
    losses = checks.loss_list(s)
    out = run.path
    print(f"stress: {len(points)} settings x {len(losses)} losses x {len(seeds)} seed(s) on the dev split "
          f"({len(sets['human'])} human replies)")
    runs, cache = {}, {}
    for point in points:
        ps = apply_overrides(s, point)
        enc, ref = preference_inputs(ps, sft_model, tok, run, cache)
        for loss in losses:
            fp = artifacts.fingerprints(ps, conversations, [loss], seeds, train.CODE)
            runs[(stress_label(point), loss)] = []
            for seed in seeds:
                name = f"stress_{stress_label(point).replace(' ', '_')}_{loss}_seed{seed}"
                key = {"fingerprint": fp[checkpoint_name(loss, seed, ps.seed)], "seed": seed,
                       "inputs": inputs,
                       "settings": artifact_settings(ps),
                       "code": sweep_code(main, stress_sweep, stress_run, preference_inputs)}
                r = cached(out(f"sweep/{name}.json"), key, lambda: stress_run(
                    ps, loss, seed, enc, ref, sets["human"], sft_model, tok, run), name)
                runs[(stress_label(point), loss)].append(r)
                print(f"stress: {stress_label(point)}, {loss}, seed {seed}: " +
                      (r["broken"] if "broken" in r else
                       f"val_ppl {r['val_ppl']:.1f}, chosen fall {r['chosen_logp_max_drop']:.2f}, "
                       f"{r['loss_spikes']} spike(s)"))
    rows = stress_rows(points, losses, runs)
    wall = time.time() - t_start
    rule = {"degenerate_ppl_ratio": DEGENERATE_PPL_RATIO, "collapse_factor": COLLAPSE_FACTOR,
            "collapse_nats": COLLAPSE_NATS, "spike": "a step's loss over 3 x the median of the 20 before it"}
    write_text(out("stress.json"), json.dumps(finite_or_none(
        {"split": "dev", "stress": stress, "seeds": seeds, "losses": losses, "rule": rule, "inputs": inputs,
         "settings": dataclasses.asdict(s), "rows": rows, "wall_time_s": wall}), indent=2) + "\n")
    table = stress_table(rows)
    write_text(out("stress.md"),
               f"# Stress test on the dev split ({s.preset} preset, {len(seeds)} seeds, "
               f"{wall / 60:.1f} min)\n\n"
               f"`python -m tools.stress {command}`\n\n{table}\n\n"
               "unstable: runs that met a criterion of docs/stability.md, judged against the same loss's "
               "unstressed runs; 95% Wilson interval. vs DPO: steadier or less steady where the two "
               "intervals separate, else cannot tell. val_ppl / unstressed and chosen fall: medians over the "
               "seeds.\n")
    plot_stress_curves(out("stress_curves.png"), points, losses, runs)
    print(table)
    print(f"stress test done in {wall / 60:.1f} min; stress.json, stress.md, stress_curves.png in "
          f"{s.out_dir}/")




def main(argv):
    t_start = time.time()
    stress = next((a.split("=", 1)[1] for a in argv if a.startswith("--stress=")), "") or DEFAULT_STRESS
    argv = [a for a in argv if not a.startswith("--stress")]
    if checks.get_settings(argv, train.Settings(), train.PRESETS).seeds < 2:
        raise ConfigError("--stress needs --seeds of at least 2 (the protocol: 6): an unstable share "
                          "of one run says nothing")
    s, conversations, run, sft_model, tok, sets, seeds, inputs = open_sweep(
        argv, lambda s: stress_points(parse_grid(stress)))
    command = f"--stress=\"{stress}\" " + " ".join(argv)
    stress_sweep(s, stress, command, conversations, run, sft_model, tok, sets, seeds, inputs, t_start)


if __name__ == "__main__":
    run_main(main)
