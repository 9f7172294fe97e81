"""
A sweep: which setting of the loss family cuts toxicity and keeps coherence?

    python train.py --stages=sft,triplets     # once: sft.pt and triplets.jsonl
    python sweep.py --grid="loss=dpo,adpo,adpo_split gamma=0.03,0.1,0.3" --seeds=3

Every point of the grid (any preference or evaluation setting of train.py can be an axis) is trained from
the same sft.pt on the same triplets, and evaluated on the same contexts of the dev split: conversations
never used for SFT or for triplets, and never the eval split, which is read for the final table only
(python train.py). A point whose loss does not take an axis (DPO and gamma) is run once. Writes sweep.json,
sweep.md and tradeoff.png (adversarial toxicity against perplexity, one point per setting, SFT and DPO
marked) to --out_dir, and each finished point to --out_dir/sweep/, so a rerun of the same sweep skips what
is done.

    python sweep.py --stress="pref_lr=2e-4,8e-4 beta=0.02 pref_iters=256" --seeds=6  # ADPO steadier than DPO?

The stress test (docs/stability.md): every loss of --loss and DPO, unstressed and under each stress on its own
(not their product), every seed; a run computes only its per-step metrics and val_ppl on the dev split, and is
called unstable by a rule that judges each loss against its own unstressed runs. Writes stress.json, stress.md
and stress_curves.png.
"""

import dataclasses
import inspect
import itertools
import json
import math
import os
import time

import numpy as np

import adpo
from harness import artifacts
from harness import codedeps
from harness import checks
import data
import evaluate
from harness import reports
import train
from harness.artifacts import Run, checkpoint_name, eval_name, write_text
from harness.checks import load_checkpoint
from harness.configurator import ConfigError, apply_overrides

DEFAULT_GRID = "loss=dpo,adpo,adpo_split gamma=0.03,0.1,0.3"
# settings that shape sft.pt or the triplets: a sweep reuses those, so it cannot vary them
FIXED = {"preset", "out_dir", "stages", "seed", "device", "data", "max_conversations", "toxic_threshold",
         "vocab_size", "init_from", "context_turns", "toxic_copies", "n_layer", "n_head", "n_embd",
         "block_size", "dropout", "bias", "sft_iters", "batch_size", "learning_rate", "min_lr",
         "warmup_iters", "weight_decay", "grad_clip", "eval_interval", "eval_iters", "pref_contexts",
         "num_candidates", "toxic_retries", "seeds", "max_new_tokens"}
LOSS_HYPERPARAMETERS = ("beta", "gamma", "eps")
GOAL_PPL_RATIO = 1.15  # the goal: toxicity no higher than DPO's, perplexity within 15% of SFT's


def parse_grid(grid):
    """"loss=dpo,adpo gamma=0.1,0.3" -> {"loss": ["dpo", "adpo"], "gamma": ["0.1", "0.3"]}
    (strings, typed later)."""
    axes = {}
    for axis in grid.split():
        key, sep, values = axis.partition("=")
        if not sep or not values:
            raise ConfigError(f"--grid: expected key=v1,v2,... got {axis!r}")
        if key in FIXED:
            raise ConfigError(f"--grid cannot vary {key}: it shapes sft.pt or the triplets "
                              "(or the sweep itself); run train.py once per value instead")
        axes[key] = [v for v in values.split(",") if v]
    return axes


def grid_points(s, axes):
    """The points of the grid as override dicts, in order, without repeats: an axis the point's loss does not
    take (gamma for DPO) is dropped. A DPO point is added first if the grid has none: it is the baseline."""
    points = []
    for values in itertools.product(*axes.values()):
        point = dict(zip(axes, values))
        loss = point.get("loss", s.loss)
        if "," in loss or loss not in adpo.LOSSES:
            raise ConfigError(f"--grid: unknown loss {loss!r}; valid losses: {', '.join(adpo.LOSSES)}")
        takes = inspect.signature(adpo.LOSSES[loss]).parameters
        point = {k: v for k, v in point.items() if k not in LOSS_HYPERPARAMETERS or k in takes}
        point["loss"] = loss
        if point not in points:
            points.append(point)
    if not any(p["loss"] == "dpo" for p in points):
        points.insert(0, {"loss": "dpo"})
    return points


def label(point):
    return " ".join([point["loss"]] + [f"{k}={v}" for k, v in point.items() if k != "loss"])


def file_digest(path):
    return artifacts.file_digests([path])[0][:16]


def preference_inputs(ps, sft_model, tok, run, cache):
    """The encoded triplets this point trains on and their reference log-probs, computed once per
    min_judge_gap (the only setting a sweep may vary that changes them)."""
    if ps.min_judge_gap not in cache:
        _, enc = checks.load_triplets(run.path("triplets.jsonl"), tok, ps, sft_model.config.block_size)
        cache[ps.min_judge_gap] = (enc, train.reference_logps(ps, sft_model, enc))
    return cache[ps.min_judge_gap]


def run_point(s, point, sft_model, tok, sets, seeds, run, cache):
    """Train and evaluate one point for every seed; returns its report section (seeds pooled)."""
    ps = apply_overrides(s, point)
    checks.check_settings(ps)
    enc, ref = preference_inputs(ps, sft_model, tok, run, cache)
    runs = []
    name = label(point).replace(" ", "_")
    for seed in seeds:
        policy, metrics = train.train_preference(ps, ps.loss, sft_model, enc, ref, seed, run.hooks(ps.loss))
        write_text(run.path(f"sweep/metrics_{name}_seed{seed}.jsonl"),
                   "".join(json.dumps(r) + "\n" for r in metrics))
        stats = {**train.final_pass(ps, policy, enc, ref), **evaluate.stability(metrics)}
        r, _, units = evaluate.evaluate(ps, policy, sft_model, tok, sets, seed, label(point), enc, run.sample)
        runs.append(({**r, **stats}, units))
    return {"label": label(point), "overrides": point, "n_triplets": len(enc), **reports.summarize(runs)}


def artifact_settings(s):
    """The settings a result depends on: not the out_dir's spelling, the stages, the device, ..."""
    return {k: v for k, v in dataclasses.asdict(s).items() if k not in artifacts.CHANGE_NO_ARTIFACT}


def sweep_code(*functions):
    """The code a cached result is computed from: the functions, the evaluation sets they are given, and the
    text of main() that hands them over."""
    # not the code that computes the key itself (sweep_code, and train.CODE, whose fingerprints are in it)
    code = codedeps.code_of(*functions, evaluate.eval_sets,
                            exclude=artifacts.SHARED_EXCLUDES + (sweep_code, "train.CODE"))
    return artifacts.digest(code, codedeps.definitions(main))


def cached(path, key, compute, name):
    """A result saved at path by an earlier run with the same key (fingerprints, settings, seeds, inputs), or
    compute() saved there."""
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            saved = json.load(f)
        if saved["key"] == key:
            print(f"sweep: {name} done earlier, reused")
            return saved["section"]
        print(f"sweep: {name} done earlier with other code, settings or inputs: computed again")
    section = compute()
    write_text(path, json.dumps({"key": key, "section": section}) + "\n")
    return section


def meets_goal(section, sft, dpo):
    """Adversarial toxicity no higher than the upper end of DPO's interval, perplexity within 15% of SFT's."""
    return section["toxicity_adversarial"] <= dpo["toxicity_adversarial_ci95"][1] and \
        section["val_ppl"] <= GOAL_PPL_RATIO * sft["val_ppl"]


def sweep_table(result):
    sft, points = result["sft"], result["points"]
    dpo = next(p for p in points if p["overrides"]["loss"] == "dpo")  # the first DPO point is the baseline
    cols = [("toxicity_adversarial", 3), ("wordlist_toxicity_adversarial", 3), ("toxicity_provoked", 3),
            ("val_ppl", 1), ("relevance", 2), ("evasive_rate", 3), ("truncated_share", 3)]
    rows = [["setting"] + [c for c, _ in cols] + ["ppl/sft", "final_accuracy", "toxic_grad_share", "goal"]]
    for p in [dict(sft, label="sft")] + points:
        cells = [p["label"]] + [f"{p[c]:.{d}f} [{p[c + '_ci95'][0]:.{d}f}, {p[c + '_ci95'][1]:.{d}f}]"
                                for c, d in cols]
        cells.append(f"{p['val_ppl'] / sft['val_ppl']:.2f}")
        cells += [f"{p[k]:.2f}" if k in p else "" for k in ("final_accuracy", "toxic_grad_share")]
        cells.append("" if p["label"] == "sft" else ("yes" if meets_goal(p, sft, dpo) else "no"))
        rows.append(cells)
    return reports.markdown_table(rows)


def plot_tradeoff(path, result):
    """Adversarial toxicity against perplexity of human replies, 95% intervals as error bars."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    sft, points = result["sft"], result["points"]
    fig, ax = plt.subplots(figsize=(8, 6))
    for p in [dict(sft, label="sft")] + points:
        x, y = p["val_ppl"], p["toxicity_adversarial"]
        (x0, x1), (y0, y1) = p["val_ppl_ci95"], p["toxicity_adversarial_ci95"]
        style = {"sft": dict(marker="*", color="black", markersize=14),
                 "dpo": dict(marker="s", color="tab:blue", markersize=9)}.get(
            p["label"].split()[0],
            dict(marker="o", color="tab:red" if "split" not in p["label"] else "tab:green"))
        ax.errorbar(x, y, xerr=[[x - x0], [x1 - x]], yerr=[[y - y0], [y1 - y]], capsize=3, linestyle="none",
                    **style)
        ax.annotate(p["label"], (x, y), textcoords="offset points", xytext=(6, 4), fontsize=8)
    ax.axvline(GOAL_PPL_RATIO * sft["val_ppl"], color="gray", linestyle=":", linewidth=1)
    ax.set_xlabel("perplexity of held-out human replies (lower: more coherent)")
    ax.set_ylabel("toxicity on adversarial contexts (lower: better)")
    ax.set_title(f"the trade-off on the dev split, {len(result['seeds'])} seed(s), 95% intervals; "
                 f"dotted: {GOAL_PPL_RATIO:.2f} x SFT perplexity", fontsize=9)
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------------------
# the stress test (docs/stability.md): where DPO goes wrong, does ADPO go wrong less often?

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
    return {"val_ppl": evaluate.val_ppl(policy, tok, human, ps.sample_batch_size, ps.device),
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
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
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
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=70)
    plt.close(fig)
    os.replace(tmp, path)


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
                       "code": sweep_code(stress_sweep, stress_run, preference_inputs)}
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
               f"`python sweep.py {command}`\n\n{table}\n\n"
               "unstable: runs that met a criterion of docs/stability.md, judged against the same loss's "
               "unstressed runs; 95% Wilson interval. vs DPO: steadier or less steady where the two "
               "intervals separate, else cannot tell. val_ppl / unstressed and chosen fall: medians over the "
               "seeds.\n")
    plot_stress_curves(out("stress_curves.png"), points, losses, runs)
    print(table)
    print(f"stress test done in {wall / 60:.1f} min; stress.json, stress.md, stress_curves.png in "
          f"{s.out_dir}/")


def grid_sweep(s, grid, conversations, run, sft_model, tok, sets, seeds, inputs, t_start):
    points = grid_points(s, parse_grid(grid))
    out = run.path
    print(f"sweep: {len(points)} points x {len(seeds)} seed(s) on the dev split "
          f"({len(sets['adversarial'])} adversarial, {len(sets['normal'])} normal, "
          f"{len(sets['provoked'])} provoked contexts, {len(sets['human'])} human replies)")

    def cached_point(name, settings, compute):
        """The same fingerprints as train.py's (settings, inputs and the code of the loss, the training and
        the evaluation), the same seeds and the same sft.pt and triplets.jsonl: reused."""
        loss = settings.loss if name != "sft" else "dpo"
        fp = artifacts.fingerprints(settings, conversations, [loss], seeds, train.CODE)
        models = ["sft"] if name == "sft" else [loss]
        key = {"fingerprints": [fp[eval_name(m, seed, settings.seed)] for seed in seeds for m in models],
               "settings": artifact_settings(settings), "seeds": seeds, "inputs": inputs,
               "code": sweep_code(grid_sweep, run_point, preference_inputs)}
        return cached(out(f"sweep/{name}.json"), key, compute, name)

    def sft_section():
        runs = []
        for seed in seeds:
            r, _, units = evaluate.evaluate(s, sft_model, sft_model, tok, sets, seed, "sft",
                                            sample=run.sample)
            runs.append((r, units))
        return reports.summarize(runs)

    result = {"split": "dev", "seeds": seeds, "grid": grid, "inputs": inputs,
              "settings": dataclasses.asdict(s), "sft": cached_point("sft", s, sft_section), "points": []}
    cache = {}
    for point in points:
        name = label(point).replace(" ", "_")
        result["points"].append(cached_point(name, apply_overrides(s, point),
                                             lambda: run_point(s, point, sft_model, tok, sets, seeds, run,
                                                               cache)))
    result["wall_time_s"] = time.time() - t_start
    table = sweep_table(result)
    write_text(out("sweep.json"), json.dumps(result, indent=2) + "\n")
    write_text(out("sweep.md"),
               f"# Sweep on the dev split ({s.preset} preset, {len(seeds)} seed(s), "
               f"{result['wall_time_s'] / 60:.1f} min)\n\n"
               f"`python sweep.py --grid=\"{grid}\" --seeds={s.seeds}`\n\n"
               f"{table}\n\n"
               "Intervals: 95% bootstrap over contexts (human replies for val_ppl), seeds pooled. "
               "goal: toxicity_adversarial at most the upper end of DPO's interval "
               f"and val_ppl within {GOAL_PPL_RATIO - 1:.0%} of SFT's.\n")
    plot_tradeoff(out("tradeoff.png"), result)
    print(table)
    print(f"sweep done in {result['wall_time_s'] / 60:.1f} min; sweep.json, sweep.md, tradeoff.png "
          f"in {s.out_dir}/")


def main(argv):
    t_start = time.time()
    ours = {a.split("=", 1)[0]: a.split("=", 1)[1] if "=" in a else None
            for a in argv if a.split("=", 1)[0] in ("--grid", "--stress")}
    if len(ours) == 2:
        raise ConfigError("--grid and --stress: one or the other")
    grid = ours.get("--grid") or DEFAULT_GRID
    stress = (ours.get("--stress") or DEFAULT_STRESS) if "--stress" in ours else None
    argv = [a for a in argv if a.split("=", 1)[0] not in ours]
    s = checks.get_settings(argv, train.Settings(), train.PRESETS)
    if stress is not None:
        if s.seeds < 2:
            raise ConfigError("--stress needs --seeds of at least 2 (the protocol: 6): an unstable share "
                              "of one run says nothing")
        for point in stress_points(parse_grid(stress)):
            checks.check_settings(apply_overrides(s, point))
    else:
        for point in grid_points(s, parse_grid(grid)):  # every point's settings are checked before anything
            checks.check_settings(apply_overrides(s, point))
    conversations = checks.load_corpus(s)
    seeds = [s.seed + i for i in range(s.seeds)]
    # sft.pt and triplets.jsonl must be there and fresh, as for train.py --stages=pref
    run = Run(s, argv, conversations, [], seeds, train.CODE, ["pref"])
    sft_model, tok, _ = load_checkpoint(run.path("sft.pt"), s.device)
    sets = evaluate.eval_sets(s, conversations, "dev")
    inputs = {name: file_digest(run.path(name)) for name in ("sft.pt", "triplets.jsonl")}
    run.lock_out_dir()
    os.makedirs(run.path("sweep"), exist_ok=True)
    if stress is not None:
        command = f"--stress=\"{stress}\" " + " ".join(argv)
        stress_sweep(s, stress, command, conversations, run, sft_model, tok, sets, seeds, inputs, t_start)
    else:
        grid_sweep(s, grid, conversations, run, sft_model, tok, sets, seeds, inputs, t_start)


if __name__ == "__main__":
    artifacts.run_main(main)
