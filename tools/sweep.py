"""
A sweep: which setting of the loss family cuts toxicity and keeps coherence?

    python train.py --stages=sft,triplets     # once: sft.pt and triplets.jsonl
    python -m tools.sweep --grid="loss=dpo,adpo,adpo_split gamma=0.03,0.1,0.3" --seeds=3

Every point of the grid (any preference or evaluation setting of train.py can be an axis) is trained from
the same sft.pt on the same triplets, and evaluated on the same contexts of the dev split: conversations
never used for SFT or for triplets, and never the eval split, which is read for the final table only
(python train.py). A point whose loss does not take an axis (DPO and gamma) is run once. Writes sweep.json,
sweep.md and tradeoff.png (adversarial toxicity against perplexity, one point per setting, SFT and DPO
marked) to --out_dir, and each finished point to --out_dir/sweep/, so a rerun of the same sweep skips what
is done.
"""

import dataclasses
import inspect
import itertools
import json
import os
import time

import adpo
import evaluate
import train
from harness import artifacts, checks, codedeps, reports, run_main
from harness.artifacts import Run, as_json, eval_name, kept, saved_key, write_text
from harness.configurator import ConfigError, apply_overrides

DEFAULT_GRID = "loss=dpo,adpo,adpo_split gamma=0.03,0.1,0.3"
# what a grid cannot vary: a setting that is no preference or evaluation setting (it shapes sft.pt or the
# triplets, which a sweep reuses, or changes nothing a point computes: the fingerprints' tables say which),
# and those the points read but the triplets they share were made with (dtype: and their reference log-probs,
# computed once, in the command's dtype)
SHARED_WITH_TRIPLETS = ("seed", "context_turns", "max_new_tokens", "toxic_threshold", "dtype")
FIXED = ({f.name for f in dataclasses.fields(train.Settings)} - {"loss"} - set(artifacts.DEPENDS_ON["pref"])
         - set(artifacts.DEPENDS_ON["eval"])) | set(SHARED_WITH_TRIPLETS)
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
            raise ConfigError(f"--grid cannot vary {key}: it shapes sft.pt, the triplets or their reference "
                              "log-probs, which a sweep reuses, or changes nothing a sweep computes; run "
                              "train.py once per value instead")
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


def sweep_code(command, *functions):
    """The code a cached result is computed from: the functions, the evaluation sets they are given, and the
    text of the command's main() and open_sweep, which hand them over."""
    # not the code that computes the key itself (sweep_code, and train.CODE, whose fingerprints are in it)
    code = codedeps.code_of(*functions, evaluate.eval_sets,
                            exclude=artifacts.SHARED_EXCLUDES + (sweep_code, "train.CODE"))
    return artifacts.digest(code, codedeps.definitions(command), codedeps.definitions(open_sweep))


def cached(path, key, compute, name):
    """A result kept at path by an earlier run with the same key (fingerprints, settings, seeds, inputs,
    code), or compute() kept there (harness.artifacts.kept); says which."""
    before = saved_key(path)
    if before is not None:
        same = before == as_json(key)
        print(f"sweep: {name} done earlier" + (", reused" if same else
                                              " with other code, settings or inputs: computed again"))
    return kept(path, key, compute, strict=False)


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
    plt = reports.pyplot()
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
    reports.save_figure(fig, path, dpi=110)


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
               "code": sweep_code(main, grid_sweep, run_point, preference_inputs)}
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
               f"`python -m tools.sweep --grid=\"{grid}\" --seeds={s.seeds}`\n\n"
               f"{table}\n\n"
               "Intervals: 95% bootstrap over contexts (human replies for val_ppl), seeds pooled. "
               "goal: toxicity_adversarial at most the upper end of DPO's interval "
               f"and val_ppl within {GOAL_PPL_RATIO - 1:.0%} of SFT's.\n")
    plot_tradeoff(out("tradeoff.png"), result)
    print(table)
    print(f"sweep done in {result['wall_time_s'] / 60:.1f} min; sweep.json, sweep.md, tradeoff.png "
          f"in {s.out_dir}/")


def open_sweep(argv, points):
    """What a sweep or a stress test starts from: its settings (every point's checked before anything runs),
    the corpus, a Run that has checked that sft.pt and triplets.jsonl are there and fresh (as for train.py
    --stages=pref) and holds out_dir, the SFT model, the dev split's sets and the inputs' digests."""
    s = checks.get_settings(argv, train.Settings(), train.PRESETS)
    for point in points(s):
        checks.check_settings(apply_overrides(s, point))
    conversations = checks.load_corpus(s)
    seeds = [s.seed + i for i in range(s.seeds)]
    run = Run(s, argv, conversations, [], seeds, train.CODE, ["pref"])
    sft_model, tok = run.load_sft()
    sets = evaluate.eval_sets(s, conversations, "dev")
    inputs = {name: file_digest(run.path(name)) for name in ("sft.pt", "triplets.jsonl")}
    run.lock_out_dir()
    os.makedirs(run.path("sweep"), exist_ok=True)
    return s, conversations, run, sft_model, tok, sets, seeds, inputs


def main(argv):
    t_start = time.time()
    grid = next((a.split("=", 1)[1] for a in argv if a.startswith("--grid=")), "") or DEFAULT_GRID
    argv = [a for a in argv if not a.startswith("--grid")]
    s, conversations, run, sft_model, tok, sets, seeds, inputs = open_sweep(
        argv, lambda s: grid_points(s, parse_grid(grid)))
    grid_sweep(s, grid, conversations, run, sft_model, tok, sets, seeds, inputs, t_start)


if __name__ == "__main__":
    run_main(main)
