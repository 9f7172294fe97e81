"""
Everything a user can hand the project wrong, checked in one place before anything is written: the settings of
train.py and sample.py, a --data file, triplets.jsonl, a GPT-2 folder, --out_dir and checkpoints. Each problem
ends in one line `error: ...` and exit code 1 (run_main).
"""

import dataclasses
import hashlib
import json
import math
import os
import pickle
import re
import warnings

import torch

import adpo
import data
from data import EOT_ID, REPLIES, DataError, UserError
from harness import distributed
from harness.configurator import ConfigError, apply_overrides, check_rules, parse_overrides
from model import CONV1D, DTYPES, GPT, GPTConfig, autocast, default_dtype, read_gpt2_config


class CheckpointError(UserError):
    """A GPT-2 folder that cannot be loaded: the message is one line for the user."""


class RunError(UserError):
    """A run that cannot go on: a stale, missing, corrupt or refused artifact, or a non-finite loss."""


# ----------------------------------------------------------------------------------------------------------
# settings

STAGES = ("sft", "triplets", "pref", "eval")  # train.py's stages, in order

TRAIN_RULES = [  # (settings, rule, what the rule asks)
    ("sft_iters batch_size num_candidates pref_iters pref_batch_size seeds eval_contexts eval_samples "
     "pref_contexts toxic_retries diag_interval eval_interval eval_iters sample_batch_size "
     "ppl_replies context_turns n_layer n_head n_embd max_new_tokens checkpoint_interval", lambda v: v >= 1,
     "at least 1"),
    # temperature > 0: greedy sampling would give K equal replies
    ("beta learning_rate min_lr pref_lr temperature", lambda v: v > 0, "positive"),
    # gamma 0: ADPO is DPO; toxic_copies 0: SFT never shows a toxic turn behind [TOXIC] (EXERCISES.md 3, 7)
    ("max_conversations warmup_iters pref_warmup_iters weight_decay grad_clip min_judge_gap gamma "
     "toxic_copies", lambda v: v >= 0, "at least 0"),
    ("toxic_threshold", lambda v: 0 <= v <= 1, "in [0, 1]"),
    ("dropout beta1 beta2", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("eps", lambda v: 0 <= v < 0.5, "in [0, 0.5)"),
    ("top_k", lambda v: v is None or v >= 1, "at least 1 (or none: all tokens)"),
    ("vocab_size", lambda v: v >= 260, "at least 260 (the 256 bytes and 4 special tokens)"),
    ("stages", lambda v: v.strip(" ,"), "a list of stages"),
]

SAMPLE_RULES = [  # sample.py's, checked before the checkpoint is read
    ("prompt", lambda v: any(t.strip() for t in v.split(" | ")), "some text (turns separated by \" | \")"),
    ("num_samples max_new_tokens", lambda v: v >= 1, "at least 1"),
    ("temperature", lambda v: v >= 0, "at least 0 (0: greedy)"),
    ("top_k", lambda v: v is None or v >= 1, "at least 1 (or none: all tokens)"),
    ("top_p", lambda v: v is None or 0 < v <= 1, "in (0, 1] (or none: off)"),
]


def get_settings(argv, defaults, presets):
    """defaults (train.Settings()), then the preset's, then argv's --key=value, checked."""
    overrides = parse_overrides(argv)
    preset = overrides.get("preset") or ("gpu" if torch.cuda.is_available() else "cpu")
    if preset not in presets:
        raise ConfigError(f"unknown preset {preset!r}; valid presets: {', '.join(presets)}")
    s = apply_overrides(defaults, {k: str(v) for k, v in presets[preset].items()})
    s = apply_overrides(s, overrides)
    s = dataclasses.replace(with_dtype(s), preset=preset)
    check_settings(s)
    return s


def with_dtype(s):
    """Settings s with an empty --dtype made the device's default (model.default_dtype)."""
    return dataclasses.replace(s, dtype=s.dtype or default_dtype(s.device))


def load_corpus(s):
    """The conversations of --data (or the built-in corpus), labelled by the judge where they are not."""
    raw = read_conversations(s.data) if s.data else None
    return data.load_corpus(raw, s.toxic_threshold, s.max_conversations)


def stage_list(s):
    return [x.strip() for x in s.stages.split(",") if x.strip()]


def loss_list(s):
    """The DPO baseline, then the losses of --loss."""
    return list(dict.fromkeys(["dpo"] + [x.strip() for x in s.loss.split(",") if x.strip()]))


def check_settings(s):
    """train.py's settings, each against its rule, and against each other."""
    check_rules(s, TRAIN_RULES)
    if s.preset == "gpt2" and not s.init_from and "sft" in stage_list(s):
        raise ConfigError("--preset=gpt2 needs --init_from=DIR, a GPT-2 folder (README: Starting from GPT-2)")
    bad_stages = [x for x in stage_list(s) if x not in STAGES]
    if bad_stages:
        raise ConfigError(f"unknown stage {bad_stages[0]!r}; valid stages: {', '.join(STAGES)}")
    for name in loss_list(s):
        if name not in adpo.LOSSES:
            raise ConfigError(f"unknown loss {name!r}; valid losses: {', '.join(adpo.LOSSES)}")
    if s.n_embd % s.n_head:
        raise ConfigError(f"--n_embd={s.n_embd} must be a multiple of --n_head={s.n_head}")
    if s.max_new_tokens >= s.block_size:
        raise ConfigError(f"--max_new_tokens={s.max_new_tokens} must be below --block_size={s.block_size}")
    check_device(s.device, s.dtype)
    distributed.check_batches(s.batch_size, s.grad_accum, s.pref_batch_size)  # under torchrun


def check_device(device, dtype="float32"):
    """A device torch can use here (cpu, cuda, cuda:N, mps), and a --dtype it computes in: else one line."""
    try:
        parsed = torch.device(device)
    except RuntimeError:
        raise ConfigError(f"--device={device}: not a device (cpu, cuda, cuda:N or mps)") from None
    kind, index = parsed.type, parsed.index
    if kind == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device={device} but CUDA is not available")
    if kind == "cuda" and index is not None and index >= torch.cuda.device_count():
        raise ConfigError(f"--device={device} but this machine has {torch.cuda.device_count()} GPU(s)")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"--device={device} but MPS is not available (it needs a Mac with Apple silicon "
                          "and a torch built with MPS: torch.backends.mps.is_available())")
    if kind not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"--device={device}: not supported (cpu, cuda, cuda:N or mps)")
    if dtype not in DTYPES:
        raise ConfigError(f"--dtype={dtype}: one of {', '.join(DTYPES)}")
    if dtype != "float32":  # one matmul under autocast: an older GPU or macOS may lack the dtype
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error")  # autocast warns, and computes in float32, where unsupported
                x = torch.ones(8, 8, device=device)
                with autocast(device, dtype):
                    (x @ x).sum().item()
        except Exception as e:  # noqa: BLE001 -- whatever the reason, the same advice
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:120]
            raise ConfigError(f"--dtype={dtype} is not supported on {device} ({reason}); "
                              "use --dtype=float32") from None


def check_out_dir(out_dir):
    """An out_dir that cannot be created or written stops the run before any stage starts."""
    parent = os.path.abspath(out_dir)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK):
        raise RunError(f"cannot write to --out_dir={out_dir}: {parent} is not a writable folder")


# ----------------------------------------------------------------------------------------------------------
# data files


def json_lines(path, missing="no such file"):
    """(where, object) for each non-blank line of a JSONL file; where is "path:line" for error messages."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: {missing}")
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if line.strip():
                try:
                    yield f"{path}:{lineno}", json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None


def read_conversations(path):
    """A --data file, one conversation a line: {"turns": ["...", "..."], "toxic": [false, true], "id": "..."}.
    "toxic" and "id" are optional: the judge labels when "toxic" is absent, and the id defaults to a hash of
    the turns. Returns (id, turns, toxic or None) for each line."""
    conversations = []
    for where, obj in json_lines(path, "no such data file"):
        if not isinstance(obj, dict):
            raise DataError(f"{where}: expected a JSON object with a \"turns\" list")
        turns = obj.get("turns")
        if not isinstance(turns, list) or not turns or not all(isinstance(t, str) for t in turns):
            raise DataError(f"{where}: \"turns\" must be a non-empty list of strings")
        turns = [data.clean(t) for t in turns]
        if not all(turns):
            raise DataError(f"{where}: a turn is empty")
        toxic = obj.get("toxic")
        if toxic is not None:
            if not isinstance(toxic, list) or not all(isinstance(t, bool) for t in toxic):
                raise DataError(f"{where}: \"toxic\" must be a list of true/false")
            if len(toxic) != len(turns):
                raise DataError(f"{where}: \"toxic\" has {len(toxic)} labels for {len(turns)} turns")
        conv_id = obj.get("id")
        if conv_id is None:
            conv_id = hashlib.sha256("\x00".join(turns).encode("utf-8")).hexdigest()
        conversations.append((str(conv_id), turns, toxic))
    if not conversations:
        raise DataError(f"{path}: no conversations in the file")
    return conversations


def check_inputs(s, stages, conversations, triplets_path):
    """What train.py's stages read besides out_dir's artifacts: the GPT-2 folder (--init_from), a split with
    contexts for each sampling stage, and triplets that --min_judge_gap leaves some of."""
    if s.init_from and "sft" in stages:
        check_gpt2_folder(s.init_from, s.block_size)
    for stage, split in (("triplets", "pref"), ("eval", "eval")):
        if stage in stages and not data.contexts_and_replies(conversations, split, s.context_turns):
            raise DataError(f"the {split} split has no context with a reply; use more conversations")
    if "pref" in stages and "triplets" not in stages:
        data.select_triplets(read_triplets(triplets_path), s.min_judge_gap)


def load_triplets(path, tok, s, block_size):
    """(the triplets of path, checked, with --min_judge_gap applied; the same encoded for scoring)."""
    return data.preference_data(tok, read_triplets(path), s.min_judge_gap, block_size, s.max_new_tokens)


def read_triplets(path):
    """triplets.jsonl, checked line by line: a context (list of turns) and, for each of chosen, rejected and
    toxic, the text, the sampled ids (`chosen_ids`, ...), whether the model ended the reply itself
    (`chosen_finished`, ...; then, and only then, the ids end with end-of-turn) and the judge's
    probability."""
    triplets = []
    fields = ["context"] + [f"{r}{suffix}" for r in REPLIES for suffix in ("", "_ids", "_finished")] + \
        [f"p_{r}" for r in REPLIES]
    for where, t in json_lines(path, "no triplets file; run the triplets stage first"):
        missing = [k for k in fields if k not in t] if isinstance(t, dict) else fields
        if missing:
            raise DataError(f"{where}: missing field {missing[0]!r} (each line needs {', '.join(fields)})")
        if not isinstance(t["context"], list) or not all(isinstance(x, str) for x in t["context"]):
            raise DataError(f"{where}: context must be a list of strings")
        for r in REPLIES:
            ids, finished = t[f"{r}_ids"], t[f"{r}_finished"]
            if not isinstance(t[r], str) or not isinstance(finished, bool) or not isinstance(ids, list) or \
                    not ids or not all(isinstance(i, int) and i >= 0 for i in ids):
                raise DataError(f"{where}: {r} must be a string, {r}_ids a non-empty list of token ids, "
                                f"{r}_finished true/false")
            if finished != (ids[-1] == EOT_ID) or EOT_ID in ids[:-1]:
                raise DataError(f"{where}: {r}_ids must end with end-of-turn exactly when "
                                f"{r}_finished is true")
            if not isinstance(t[f"p_{r}"], (int, float)) or not 0 <= t[f"p_{r}"] <= 1:
                raise DataError(f"{where}: p_{r} must be a probability")
        triplets.append(t)
    if not triplets:
        raise DataError(f"{path}: no triplets")
    return triplets


# ----------------------------------------------------------------------------------------------------------
# a pretrained GPT-2 folder (train.py --init_from)

GPT2_FILES = ("config.json", "model.safetensors", "tokenizer.json")
# what export.py writes: a GPT-2 folder, and what generate() and AutoTokenizer read to end a turn
EXPORT_FILES = GPT2_FILES + ("generation_config.json", "tokenizer_config.json")
NOT_WEIGHTS = (".attn.bias", ".attn.masked_bias")  # old GPT-2 files store the causal mask as a buffer


def read_json(path):
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: not a JSON object")
    return obj


def check_gpt2_folder(folder, block_size):
    """Every file there, config.json a GPT-2 our block computes exactly, every tensor of the shape config.json
    implies, and a vocabulary that fits. Reads only the safetensors header: a bad folder stops in a moment."""
    from safetensors import SafetensorError, safe_open
    for name in GPT2_FILES:
        if not os.path.isfile(os.path.join(folder, name)):
            raise CheckpointError(f"{folder}: no {name} (a GPT-2 folder holds {', '.join(GPT2_FILES)})")
    path = os.path.join(folder, "config.json")
    cfg = read_json(path)
    if cfg.get("model_type") != "gpt2":
        raise CheckpointError(f"{path}: model_type is {cfg.get('model_type')!r}, not 'gpt2'")
    missing = [k for k in ("n_layer", "n_head", "n_embd", "n_positions", "vocab_size") if k not in cfg]
    if missing:
        raise CheckpointError(f"{path}: no {missing[0]!r}")
    # what GPT-2 computes and our block computes too; anything else would load without error and be wrong
    supported = {"activation_function": ("gelu_new", "gelu_pytorch_tanh"),  # both GELU's tanh approximation
                 "layer_norm_epsilon": (1e-5,), "n_inner": (None, 4 * cfg["n_embd"]),
                 "scale_attn_weights": (True,), "scale_attn_by_inverse_layer_idx": (False,)}
    for key, values in supported.items():
        if cfg.get(key, values[0]) not in values:
            raise CheckpointError(f"{path}: {key}={cfg[key]!r}; this GPT computes GPT-2 with {key} "
                                  f"in {values}")
    if block_size > cfg["n_positions"]:
        raise CheckpointError(f"--block_size={block_size} is longer than the {cfg['n_positions']} positions "
                              f"of the GPT-2 in {folder}")

    path = os.path.join(folder, "model.safetensors")
    try:
        with safe_open(path, framework="pt") as f:
            shapes = {k.removeprefix("transformer."): tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path}: not a safetensors file ({e})") from None
    config = GPTConfig(block_size=cfg["n_positions"], vocab_size=cfg["vocab_size"], n_layer=cfg["n_layer"],
                       n_head=cfg["n_head"], n_embd=cfg["n_embd"], bias=True)
    with torch.device("meta"):  # our GPT's tensors and shapes, without memory or time
        ours = GPT(config).state_dict()
    expected = {k.removeprefix("transformer."): tuple(v.shape[::-1] if k.endswith(CONV1D) else v.shape)
                for k, v in ours.items() if k != "lm_head.weight"}
    for key, shape in expected.items():
        if shapes.get(key) != shape:
            found = "no such tensor" if key not in shapes else f"shape {shapes[key]}"
            raise CheckpointError(f"{path}: {key}: {found}, config.json implies {shape}")
    # lm_head.weight, when a file has it, is wte again: GPT-2 ties them
    extra = [k for k in shapes if k not in expected and k != "lm_head.weight" and not k.endswith(NOT_WEIGHTS)]
    if extra:
        raise CheckpointError(f"{path}: unexpected tensor {extra[0]!r}: not a GPT-2 language model")

    path = os.path.join(folder, "tokenizer.json")
    spec = read_json(path)
    vocab = spec["model"].get("vocab") if isinstance(spec.get("model"), dict) else None
    if not isinstance(vocab, dict) or not vocab:
        raise CheckpointError(f"{path}: no vocabulary (model.vocab)")
    if max(read_gpt2_config(folder, block_size)[1].values()) >= cfg["vocab_size"]:
        raise CheckpointError(f"{path}: token ids beyond the {cfg['vocab_size']} rows of wte")


def check_export_dir(out):
    """A folder export.py may write into: new, empty, or one that holds only the files an export writes."""
    ours = set(EXPORT_FILES) | {name + ".tmp" for name in EXPORT_FILES}  # .tmp: an interrupted export
    if os.path.exists(out) and not os.path.isdir(out):
        raise ConfigError(f"--out={out} is a file, not a folder")
    others = sorted(set(os.listdir(out)) - ours) if os.path.isdir(out) else []
    if others:
        raise ConfigError(f"--out={out} holds {others[0]}, not an export's; give a new or empty folder")



# ----------------------------------------------------------------------------------------------------------
# checkpoints: tensors and plain values only


def read_checkpoint(path, device="cpu"):
    """The dict saved in path, never running code from it: weights_only=True refuses any pickled object other
    than tensors, numbers, strings, lists and dicts (a callable in a shared file would run on a full load)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint at {path}; run `python train.py` first "
                                "(or pass --checkpoint=...)")
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError as e:
        refused = re.search(r"GLOBAL (\S+) was not an allowed global", str(e))  # what a full load would call
        if refused:
            raise RunError(f"{path}: refused: loading it would call {refused.group(1)} (a checkpoint from "
                           f"train.py holds only tensors and plain values)") from None
        raise RunError(f"{path}: not a readable checkpoint (corrupt)") from None
    except Exception:  # noqa: BLE001 (a truncated zip, random bytes, an empty file: torch raises many kinds)
        raise RunError(f"{path}: not a readable checkpoint (truncated or corrupt)") from None


def load_checkpoint(path, device="cpu", dropout=None):
    """(model in eval mode, tokenizer, checkpoint dict) from a file written by train.py, which carries its own
    tokenizer. dropout, when given, replaces the checkpoint's (the preference stage needs 0)."""
    ckpt = read_checkpoint(path, device)
    missing = [k for k in ("model", "model_config", "tokenizer_json")
               if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise RunError(f"{path}: not a checkpoint written by train.py (no {missing[0]!r})")
    try:
        config = GPTConfig(**dict(ckpt["model_config"], **({} if dropout is None else {"dropout": dropout})))
        model = GPT(config)
        model.load_state_dict(ckpt["model"])
    except (TypeError, RuntimeError, ValueError):
        raise RunError(f"{path}: its weights do not fit its model config "
                       "(written by another version?)") from None
    model.to(device).eval()
    try:
        tok = data.tokenizer_from_str(ckpt["tokenizer_json"])
    except Exception:  # noqa: BLE001 (tokenizers raises its own Exception on a broken string)
        raise RunError(f"{path}: its tokenizer is not readable (corrupt)") from None
    if tok.get_vocab_size() > config.vocab_size:
        raise RunError(f"{path}: its tokenizer has {tok.get_vocab_size()} tokens, more than its model "
                       f"({config.vocab_size})")
    return model, tok, ckpt


def checkpoint_dict(model, tok, settings, **extra):
    """What train.py saves: weights, model config, settings and the tokenizer itself, as plain values."""
    return {"model": model.state_dict(), "model_config": dataclasses.asdict(model.config),
            "settings": dataclasses.asdict(settings), "tokenizer_json": tok.to_str(), **extra}


def check_finite(loss, stage, step):
    """A nan or inf loss ruins every later step: stop, keeping the last good resume state in out_dir."""
    value = float(loss.detach() if torch.is_tensor(loss) else loss)
    if not math.isfinite(value):
        raise RunError(f"{stage} step {step}: the loss is {value}; stopped, out_dir keeps the last good "
                       f"checkpoint (try a lower learning rate)")
