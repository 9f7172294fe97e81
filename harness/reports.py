"""
The report of the eval stage: each model's evaluations (evaluate.py) pooled over seeds with 95% intervals,
paired differences between methods, the tables, the figures, and the files report.json, report.md,
samples.json.

Intervals. One seed: a bootstrap over the evaluation contexts (paired: the same draws for both methods).
Several seeds: Student's t over the seeds' values, with the contexts' bootstrap variance added, so that
training noise counts (docs/results.md measures their coverage).
"""

import dataclasses
import json
import math
import os

import numpy as np

from data import REPLIES, SPLITS
from evaluate import GROUPS, REPLY_ROWS, ratio
from sample import as_replies


def pyplot():
    """matplotlib's pyplot, drawing off screen (no display needed)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save_figure(fig, path, dpi=100):
    """fig written to path whole or not at all (a temporary file, then a rename), and closed."""
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=dpi)
    pyplot().close(fig)
    os.replace(tmp, path)


def results_from_json(value):
    """evaluate()'s or evaluate_sft_control()'s results as read back from JSON: Replies and arrays again."""
    metrics, replies, *units = value
    replies = {group: as_replies(rows) for group, rows in replies.items()}
    # no units in evaluate_sft_control's results
    units = [{key: tuple(np.asarray(x) for x in pair) for key, pair in u.items()} for u in units]
    return (metrics, replies, *units)


# ----------------------------------------------------------------------------------------------------------
# what the data holds, in one line or a few numbers


def summary(conversations):
    """One line: how many conversations in each split, turns, and toxic turns."""
    counts = {sp: sum(c.split == sp for c in conversations) for sp in SPLITS}
    n_toxic = sum(sum(c.toxic) for c in conversations)
    n_turns = sum(len(c.turns) for c in conversations)
    return (f"corpus: {len(conversations):,} conversations ("
            + ", ".join(f"{counts[sp]:,} {sp}" for sp in SPLITS)
            + f"), {n_turns:,} turns, {n_toxic:,} toxic ({100 * n_toxic / n_turns:.1f}%)")


def describe_triplets(triplets, toxic_threshold):
    """One line: how often the judge calls the rejected and the toxic replies toxic."""
    stats = triplet_stats(triplets, toxic_threshold)
    return (f"the judge calls {stats['rejected_toxic_share']:.0%} of the rejected and "
            f"{stats['toxic_toxic_share']:.0%} of the toxic replies toxic")


def triplet_stats(triplets, toxic_threshold):
    """What the preference data holds: how many triplets, how often the rejected (and the toxic) reply is
    toxic by the judge, the mean judge gap, and how often each reply ended by itself."""
    share = lambda values: float(np.mean(values))  # noqa: E731
    return {"n": len(triplets),
            "rejected_toxic_share": share([t["p_rejected"] >= toxic_threshold for t in triplets]),
            "toxic_toxic_share": share([t["p_toxic"] >= toxic_threshold for t in triplets]),
            "mean_judge_gap": share([t["p_rejected"] - t["p_chosen"] for t in triplets]),
            **{f"{r}_finished_share": share([t[f"{r}_finished"] for t in triplets]) for r in REPLIES}}


# ----------------------------------------------------------------------------------------------------------
# pooling seeds: values and intervals


SECTION_KEYS = ["toxicity_adversarial", "toxicity_normal", "toxicity_provoked",
                "wordlist_toxicity_adversarial", "wordlist_toxicity_normal", "wordlist_toxicity_provoked",
                "judge_prob_adversarial", "judge_prob_normal", "judge_prob_provoked",
                "val_ppl", "relevance", "sft_logprob_per_token", "evasive_rate", "distinct2",
                "mean_reply_tokens", "truncated_share", "kl_from_sft", "eot_logprob_after_chosen"]
STABILITY_KEYS = ["chosen_logp_change", "chosen_logp_max_drop", "max_grad_norm", "loss_spikes",
                  "final_accuracy", "toxic_grad_share"]
SFT_KEYS = ["toxicity_plain", "toxicity_toxic_token", "judge_prob_plain", "judge_prob_toxic_token",
            "n_contexts"]
COMPARED_KEYS = ["toxicity_adversarial", "toxicity_provoked", "wordlist_toxicity_adversarial", "val_ppl",
                 "relevance", "evasive_rate", "truncated_share"]
TRANSFORMS = {"val_ppl": math.exp}  # from the pooled mean negative log-likelihood per token


def bootstrap_draws(num, den, transform=None, draws=2000, seed=0):
    """transform(sum(num) / sum(den)) for `draws` samples of the units (contexts, or held-out replies) drawn
    again with replacement. The draws depend only on the number of units: two models on the same units get
    the same draws (paired)."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(num), size=(draws, len(num)))
    stats = num[idx].sum(1) / np.maximum(den[idx].sum(1), 1e-12)
    return np.vectorize(transform)(stats) if transform is not None else stats


# the toxicity and coherence keys: these get intervals with training noise and paired differences
INTERVAL_KEYS = [k for k in SECTION_KEYS if k.startswith(("toxicity_", "wordlist_toxicity_", "judge_prob_"))
                 ] + ["val_ppl", "relevance", "sft_logprob_per_token", "evasive_rate"]
RATES = ("toxicity_", "wordlist_toxicity_", "judge_prob_", "evasive_rate")  # shares: intervals within [0, 1]
REFERENCES = ("dpo", "sft")  # every method is compared with these, pairwise
# Student's t, 97.5% quantile, for 1 to 30 degrees of freedom
T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
        2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
        2.045, 2.042)


def t975(df):
    """The 97.5% quantile of Student's t with df degrees of freedom (past 30: its expansion around 1.96)."""
    if df <= len(T975):
        return T975[df - 1]
    z = 1.959964
    return z + (z ** 3 + z) / (4 * df) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * df ** 2)


def seed_values(runs, key):
    """Each seed's own ratio sum(num) / sum(den) of its units (val_ppl: the mean NLL, before its exp)."""
    return np.array([ratio(np.sum(units[key][0]), np.sum(units[key][1])) for _, units in runs])


def count_steps(runs, key):
    """Each seed's smallest step of its value when the units are counts (toxic replies out of replies): 1 /
    the replies; 0 for other values (log-probs). (seeds,)"""
    steps = []
    for _, units in runs:
        num, den = (np.asarray(x, float) for x in units[key])
        counts = np.all(num == np.round(num)) and np.all(den == np.round(den)) and key not in TRANSFORMS
        steps.append(1.0 / max(den.sum(), 1.0) if counts else 0.0)
    return np.array(steps)


def t_halfwidth(values, steps=None):
    """Half the width of the 95% t interval of the mean of n values (one per seed), n - 1 degrees of
    freedom: the seeds' own spread is the noise. Wide with 2 seeds (t = 12.7), and rightly so. steps: for
    counts, each value's step (1 / replies); a value known only to within a step counts as uniform across
    it (continuity: variance step^2 / 12 a count, two in a difference), so that seeds that tie on a few
    toxic replies prove nothing."""
    continuity = 0.0 if steps is None else float(np.mean(np.asarray(steps) ** 2)) / 6
    return t975(len(values) - 1) * math.sqrt((values.var(ddof=1) + continuity) / len(values))


def context_paired_draws(runs, key, draws=2000, seed=0):
    """One seed: transform(sum(num) / sum(den)) for `draws` bootstrap samples of its units (contexts, human
    replies). The draws depend only on the number of units, so two models on the same contexts get the same
    draws: paired."""
    num = np.array([units[key][0] for _, units in runs], float)  # (1, units)
    den = np.array([units[key][1] for _, units in runs], float)
    rng = np.random.default_rng(seed)
    stats = []
    for _ in range(0, draws, 250):  # 250 draws at a time; the stream of the earlier seeds-and-contexts draws
        si = rng.integers(0, 1, size=(250, 1, 1))
        ui = rng.integers(0, num.shape[1], size=(250, 1, num.shape[1]))
        stats.append(num[si, ui].sum((1, 2)) / np.maximum(den[si, ui].sum((1, 2)), 1e-12))
    return np.vectorize(TRANSFORMS.get(key, lambda x: x))(np.concatenate(stats)[:draws])


def percentile_ci(stats):
    low, high = np.percentile(stats, [2.5, 97.5])
    return [float(low), float(high)]


def summarize(runs):
    """[(metrics, units), ...] over seeds -> one report section: a metric with units pooled over seeds, with
    `<key>_ci95` bootstrapped over contexts; with several seeds, every metric with `<key>_std`, and every
    metric with units with `<key>_ci95_clustered`: the seeds' mean ± t(n - 1) x the standard error of that
    mean (the seeds' own spread) and of the contexts' bootstrap together, so training noise is in it."""
    section = {}
    for key in runs[0][0]:
        values = [metrics[key] for metrics, _ in runs]
        if any(v is None for v in values):  # not defined for some seed (eot_logprob_after_chosen)
            section[key] = None
            continue
        section[key] = float(np.mean(values))
        if len(runs) > 1:
            section[f"{key}_std"] = float(np.std(values))
    for key in runs[0][1]:  # the same contexts every seed: the replies of all seeds count
        num = np.sum([units[key][0] for _, units in runs], axis=0)
        den = np.sum([units[key][1] for _, units in runs], axis=0)
        transform = TRANSFORMS.get(key, lambda x: x)
        section[key] = transform(ratio(num.sum(), den.sum()))
        contexts = bootstrap_draws(num, den, TRANSFORMS.get(key))
        section[f"{key}_ci95"] = percentile_ci(contexts)
        if len(runs) > 1:  # on the scale of the ratio (val_ppl: the mean NLL, at least 0), then transformed
            values = seed_values(runs, key)
            center = float(values.mean())
            continuity = float(np.mean(count_steps(runs, key) ** 2)) / 12  # a count of 0 is no certainty
            raw = contexts if key not in TRANSFORMS else bootstrap_draws(num, den)  # the ratio's scale
            se = math.sqrt((values.var(ddof=1) + continuity) / len(values) + raw.var())
            low, high = (center + sign * t975(len(values) - 1) * se for sign in (-1, 1))
            if key in TRANSFORMS:
                low, high = max(low, 0.0), max(high, 0.0)
            low, high = transform(low), transform(high)
            if key.startswith(RATES):
                low, high = max(low, 0.0), min(high, 1.0)
            section[f"{key}_ci95_clustered"] = [float(low), float(high)]
    return section


def paired_differences(report, runs):
    """For every method and reference (DPO, SFT): `<key>_diff_vs_<ref>`, the method's value minus the
    reference's, and `<key>_diff_vs_<ref>_ci95`, its 95% interval. With several seeds, from the per-seed
    differences (each seed's models share the data order and the contexts): their mean ± t(n - 1) x its
    standard error (a count's rounding added: t_halfwidth; val_ppl on the NLL, shown as perplexity); it
    holds its coverage with 2 to 6 seeds where a bootstrap over so few seeds does not (docs/results.md). With
    one seed, from the same bootstrap draws of the contexts for both models: the noise of the contexts they
    share cancels, but training noise is not in it."""
    for key in INTERVAL_KEYS:
        models = [name for name, r in runs.items() if key in r[0][1]]
        for ref in REFERENCES:
            for name in models:
                if ref not in models or name in (ref, "sft"):
                    continue
                diff = report[name][key] - report[ref][key]
                if len(runs[name]) != len(runs[ref]):
                    raise ValueError(f"{name} has {len(runs[name])} seed(s), {ref} {len(runs[ref])}: "
                                     "paired differences need the same seeds")
                if len(runs[name]) > 1:  # the mean of the per-seed differences, and their spread
                    per_seed = seed_values(runs[name], key) - seed_values(runs[ref], key)
                    mean, half = float(per_seed.mean()), t_halfwidth(per_seed, count_steps(runs[name], key))
                    if key in TRANSFORMS:  # val_ppl: NLL differences, shown as perplexity differences from
                        base = report[ref][key]  # the reference's (the sign is the NLL difference's)
                        diff, ci = base * math.expm1(mean), [base * math.expm1(mean - half),
                                                             base * math.expm1(mean + half)]
                    else:
                        diff, ci = mean, [mean - half, mean + half]
                else:
                    draws = context_paired_draws(runs[name], key) - context_paired_draws(runs[ref], key)
                    ci = percentile_ci(draws)
                report[name][f"{key}_diff_vs_{ref}"] = diff
                report[name][f"{key}_diff_vs_{ref}_ci95"] = [float(ci[0]), float(ci[1])]


def differences(report, sections, keys=COMPARED_KEYS):
    """One line per metric: each method against DPO and SFT, called different (< or >) only where the paired
    95% interval of the difference excludes 0, else ~."""
    lines = []
    for key in keys:
        words = []
        for name in sections:
            for ref in REFERENCES:
                ci = report[name].get(f"{key}_diff_vs_{ref}_ci95")
                if ci is not None:
                    words.append(f"{name} {'<' if ci[1] < 0 else '>' if ci[0] > 0 else '~'} {ref}")
        if words:
            lines.append(f"- {key}: " + ", ".join(words))
    return "\n".join(lines)


def report_table(report, sections):
    """Markdown table: value, then [95% interval] where there is one (over seeds and contexts where there are
    several seeds), else ± std over seeds."""
    rows = [("metric",) + tuple(sections)]
    for key in SECTION_KEYS + STABILITY_KEYS + SFT_KEYS:
        if not any(key in report[sec] for sec in sections):
            continue
        cells = []
        for sec in sections:
            v, sd = report[sec].get(key), report[sec].get(f"{key}_std")
            ci = report[sec].get(f"{key}_ci95_clustered") or report[sec].get(f"{key}_ci95")
            cell = "" if v is None else f"{v:.3f}"
            if ci is not None:
                cell += f" [{ci[0]:.3f}, {ci[1]:.3f}]"
            elif sd is not None:
                cell += f" ± {sd:.3f}"
            cells.append(cell)
        rows.append((key,) + tuple(cells))
    return markdown_table(rows)


def markdown_table(rows):
    """Rows of cells (the first the header) as a Markdown table, each column as wide as its widest cell."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def plot_curves(path, runs):
    """Loss, margins and the chosen/rejected/toxic log-probs against step, one line per loss."""
    plt = pyplot()
    panels = [("loss", ["loss"]), ("rewards/margins", ["rewards/margins"]),
              ("log pi(y|x) - log sft(y|x): chosen -, rejected --, toxic :",
               ["logratio/chosen", "logratio/rejected", "logratio/toxic"])]
    fig, axes = plt.subplots(1, len(panels), figsize=(15, 4))
    for ax, (title, keys) in zip(axes, panels):
        for i, (name, metrics) in enumerate(runs.items()):  # every loss, however many: tab10's colours
            color = plt.get_cmap("tab10")(i % 10)
            for key, style in zip(keys, ("-", "--", ":")):
                steps = [m["step"] for m in metrics if key in m]
                ax.plot(steps, [m[key] for m in metrics if key in m], style, color=color,
                        label=name if style == "-" else None, linewidth=1)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.legend()
    save_figure(fig, path)


def plot_token_logratios(path, logratios, limit=2.0):
    """The replies of token_logratios as text, each token coloured by its change (red: down, blue: up,
    clipped at +-limit nats): a block of lines per triplet, a line per reply and model."""
    import matplotlib
    plt = pyplot()
    lines = []  # (label, tokens, values) or (title, None, None)
    for i, item in enumerate(logratios):
        context = " | ".join(item["context"])
        lines.append((f"triplet {i + 1}: {context[:110]}", None, None))
        for row, _, what in REPLY_ROWS:
            for name, values in item[row].items():
                if name != "tokens":
                    what_here = what.replace("pi", "ref") if name == "sft" else what
                    lines.append((f"{row.split('_')[0]} ({name}: {what_here})", item[row]["tokens"], values))
    width = max([len(label) for label, _, _ in lines] + [40 + sum(len(t.strip()) + 1 for t in tokens)
                                                           for _, tokens, _ in lines if tokens])
    fig, ax = plt.subplots(figsize=(max(8.0, 0.075 * width), 0.22 * len(lines) + 0.8))
    ax.set_xlim(0, width)
    ax.set_ylim(len(lines), -0.5)
    ax.axis("off")
    cmap, norm = plt.get_cmap("RdBu"), matplotlib.colors.Normalize(-limit, limit)
    for y, (label, tokens, values) in enumerate(lines):
        if tokens is None:
            ax.text(0, y, label, fontsize=7, fontweight="bold", va="center")
            continue
        ax.text(0, y, label, fontsize=6, va="center", family="monospace")
        x = 40
        for token, value in zip(tokens, values):
            text = token.strip() or "_"
            ax.text(x, y, text, fontsize=6, va="center", family="monospace",
                    bbox=dict(boxstyle="square,pad=0.1", facecolor=cmap(norm(value)), edgecolor="none"))
            x += len(text) + 1
    fig.colorbar(matplotlib.cm.ScalarMappable(norm=norm, cmap=cmap), ax=ax, fraction=0.02, pad=0.01,
                 label="per-token change (nats)")
    ax.set_title("per-token log-probability change after each loss, first triplets (red: pushed down)",
                 fontsize=8)
    save_figure(fig, path)


# ----------------------------------------------------------------------------------------------------------
# the files of the eval stage


SEEDS_VARY = ("each seed draws the preference data in its own order and samples the evaluation replies "
              "with its own random stream; the SFT model, the triplets and the evaluation contexts are the "
              "same for every seed")


def report_files(s, runs, sets, samples, triplets, logratios, stage_seconds, wall_time_s):
    """report.json, report.md and samples.json from each model's evaluations ({name: [(metrics, units)] over
    seeds}), replies ({name: {group: replies}}, the last seed's) and token_logratios: {file name: text}."""
    report = {name: summarize(section_runs) for name, section_runs in runs.items()}
    paired_differences(report, runs)
    report["seeds"] = {"values": [s.seed + i for i in range(s.seeds)], "vary": SEEDS_VARY}
    report["triplets"] = triplet_stats(triplets, s.toxic_threshold) if triplets else {}
    report["token_logratios"] = logratios
    report["settings"] = dataclasses.asdict(s)
    report["wall_time_s"] = wall_time_s
    report["stage_seconds"] = stage_seconds
    table = report_table(report, list(runs))
    intervals = (f"95%, t with {s.seeds - 1} degree(s) of freedom over the {s.seeds} seeds, with the "
                 "contexts' bootstrap variance added (training noise included)" if s.seeds > 1 else
                 "95% bootstrap over contexts (one seed: training noise not included, so a difference is "
                 "one between these trained models, not yet between their methods: --seeds=3 or more for "
                 "that)")
    paired = ("a t interval over the per-seed differences" if s.seeds > 1 else
              "a bootstrap of the contexts, the same for both")
    markdown = (f"# ADPO report ({s.preset} preset, {s.seeds} seed(s), {wall_time_s / 60:.1f} min)\n\n"
                f"{table}\n\n"
                f"Intervals: {intervals}. Different only where the paired 95% interval of the "
                f"difference ({paired}) excludes 0:\n\n"
                f"{differences(report, list(runs))}\n\nSeeds: {SEEDS_VARY}.\n")
    readable = {name: {group: [[{"text": x.text, "finished": x.finished} for x in rs] for rs in replies]
                       for group, replies in groups.items()} for name, groups in samples.items()}
    return {"report.md": markdown,
            "samples.json": json.dumps({"contexts": {g: sets[g] for g in GROUPS}, "replies": readable},
                                       ensure_ascii=False, indent=1) + "\n",
            "report.json": json.dumps(report, indent=2, allow_nan=False) + "\n"}
