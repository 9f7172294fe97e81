"""
The corpus, the toxic control token, the tokenizer and the batches.

A conversation is a list of turns. The judge labels each turn toxic or not; in the token stream every toxic
turn is preceded by the control token [TOXIC] and every turn ends with an end-of-turn token:

    hi, how are you? <|eot|> <|toxic|> shut up, you idiot <|eot|> wow ok <|eot|>

The model learns to reply normally after a plain end-of-turn and toxically after [TOXIC]; it never learns to
emit [TOXIC] itself, because every target position holding it is masked. So one network is both the dialogue
model and, with the token placed after a context, the "inner toxic model".
"""

import hashlib
import json
import os
import re
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

PAD, EOT, TOXIC = "<|pad|>", "<|eot|>", "<|toxic|>"
SPECIAL_TOKENS = [PAD, EOT, TOXIC]  # trained first, so their ids are 0, 1, 2
PAD_ID, EOT_ID, TOXIC_ID = 0, 1, 2
SPLITS = ("sft", "pref", "eval")


class DataError(ValueError):
    """Bad input data; the message names the file and line."""


@dataclass
class Conversation:
    id: str
    turns: list  # list[str]
    toxic: list  # list[bool], one per turn
    split: str  # "sft" (80%), "pref" (10%) or "eval" (10%)


# ----------------------------------------------------------------------------------------------------------
# the judge: one small function, so another classifier can be plugged in


def judge_probs(texts):
    """Probability that each text is toxic, from alt-profanity-check (a linear model over word n-grams that
    ships its weights). To use another classifier, replace this function: list[str] -> np.ndarray in [0, 1]."""
    from profanity_check import predict_prob
    texts = list(texts)
    if not texts:
        return np.zeros(0)
    return np.asarray(predict_prob(texts), dtype=np.float64)


# ----------------------------------------------------------------------------------------------------------
# loading


def clean(text):
    return re.sub(r"\s+", " ", str(text)).strip()


def split_of(conversation_id):
    """Deterministic split from a hash of the id (not file order): 80% sft, 10% pref, 10% eval."""
    bucket = int(hashlib.sha256(conversation_id.encode("utf-8")).hexdigest()[:8], 16) % 100
    return "sft" if bucket < 80 else ("pref" if bucket < 90 else "eval")


def read_chitchat():
    """The chitchat-dataset package: 7,168 human conversations. Consecutive messages of one sender form one
    turn. Returns a list of (id, turns, None)."""
    import chitchat_dataset
    conversations = []
    for conv_id, conv in chitchat_dataset.Dataset().items():
        turns, last_sender = [], None
        for message_group in conv["messages"]:
            text = clean(" ".join(m["text"] for m in message_group))
            sender = message_group[0]["sender"]
            if not text:
                continue
            if sender == last_sender:
                turns[-1] += " " + text
            else:
                turns.append(text)
                last_sender = sender
        if turns:
            conversations.append((conv_id, turns, None))
    return conversations


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


def read_jsonl(path):
    """User data, one conversation a line: {"turns": ["...", "..."], "toxic": [false, true], "id": "..."}.
    "toxic" and "id" are optional: the judge labels when "toxic" is absent, and the id defaults to a hash of
    the turns. Any malformed line stops everything with the file and line number."""
    conversations = []
    for where, obj in json_lines(path, "no such data file"):
        if not isinstance(obj, dict):
            raise DataError(f"{where}: expected a JSON object with a \"turns\" list")
        turns = obj.get("turns")
        if not isinstance(turns, list) or not turns or not all(isinstance(t, str) for t in turns):
            raise DataError(f"{where}: \"turns\" must be a non-empty list of strings")
        turns = [clean(t) for t in turns]
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


def load_corpus(path=None, toxic_threshold=0.5, max_conversations=0):
    """Conversations with toxicity labels and splits. path None means the built-in chitchat corpus.
    max_conversations > 0 keeps that many (chosen by id hash, so the subset is the same every run)."""
    raw = read_jsonl(path) if path else read_chitchat()
    if max_conversations > 0:
        raw = sorted(raw, key=lambda c: hashlib.sha256(c[0].encode("utf-8")).hexdigest())[:max_conversations]
    unlabelled = [t for _, turns, toxic in raw if toxic is None for t in turns]
    probs = iter(judge_probs(unlabelled))
    conversations = []
    for conv_id, turns, toxic in raw:
        if toxic is None:
            toxic = [bool(next(probs) >= toxic_threshold) for _ in turns]
        conversations.append(Conversation(conv_id, turns, toxic, split_of(conv_id)))
    return conversations


# ----------------------------------------------------------------------------------------------------------
# tokenizer: byte-level BPE, with the three special tokens as single ids that plain text can never produce


def train_tokenizer(texts, vocab_size):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return _plain_text_only(tok)


def _plain_text_only(tok):
    # Without this, the text "<|toxic|>" typed by a user would encode to the control token itself.
    tok.encode_special_tokens = True
    for token_id, token in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(token) == token_id, f"{token} should have id {token_id}"
    return tok


def load_tokenizer(path):
    from tokenizers import Tokenizer
    return _plain_text_only(Tokenizer.from_file(path))


def get_tokenizer(conversations, vocab_size, path):
    """The tokenizer at path if it is there with this vocabulary size; else train one on the sft split only."""
    if os.path.exists(path):
        tok = load_tokenizer(path)
        if tok.get_vocab_size() == vocab_size:
            return tok
    texts = [t for c in conversations if c.split == "sft" for t in c.turns]
    tok = train_tokenizer(texts, vocab_size)
    tmp = path + ".tmp"
    tok.save(tmp)
    os.replace(tmp, path)
    return tok


def encode(tok, text):
    return tok.encode(text).ids


def decode(tok, ids):
    return tok.decode(list(ids))


# ----------------------------------------------------------------------------------------------------------
# SFT: one token stream, random windows


def conversation_ids(tok, turns, toxic):
    """Each turn is tokenized on its own and the ids concatenated: enc(a + b) can differ from enc(a) + enc(b),
    and sampling always sees turns encoded apart, so training must too."""
    ids = []
    for text, is_toxic in zip(turns, toxic):
        if is_toxic:
            ids.append(TOXIC_ID)
        ids.extend(encode(tok, text))
        ids.append(EOT_ID)
    return ids


def sft_stream(tok, conversations, split="sft", toxic_repeat=0, context_turns=2):
    """All conversations of a split as one stream of ids. toxic_repeat > 0 appends each toxic turn again
    that many times, with its context_turns preceding turns: toxic turns are rare in chit-chat (about 2%),
    and the control token must still be learned."""
    stream = []
    for c in conversations:
        if c.split == split:
            stream.extend(conversation_ids(tok, c.turns, c.toxic))
    for _ in range(toxic_repeat):
        for c in conversations:
            if c.split != split:
                continue
            for i, is_toxic in enumerate(c.toxic):
                if is_toxic:
                    lo = max(0, i - context_turns)
                    stream.extend(conversation_ids(tok, c.turns[lo:i + 1], c.toxic[lo:i + 1]))
    return np.array(stream, dtype=np.int32)


def get_sft_batch(stream, batch_size, block_size, generator=None):
    """Random windows x of block_size tokens and their next tokens y; y is -1 wherever it is the control token,
    so the model is never trained to produce [TOXIC] by itself (only to react to it)."""
    ix = torch.randint(len(stream) - block_size - 1, (batch_size,), generator=generator).tolist()
    x = torch.from_numpy(np.stack([stream[i:i + block_size] for i in ix]).astype(np.int64))
    y = torch.from_numpy(np.stack([stream[i + 1:i + 1 + block_size] for i in ix]).astype(np.int64))
    y[y == TOXIC_ID] = -1
    return x, y


# ----------------------------------------------------------------------------------------------------------
# (context, response) examples: for sampling, triplets and evaluation


def context_ids(tok, context, toxic=False, max_tokens=None):
    """The context turns, each ended by end-of-turn, then [TOXIC] when the reply should be toxic. Context turns
    are shown plain, without markers, as a user's turns would be. Kept to the last max_tokens ids."""
    ids = []
    for text in context:
        ids.extend(encode(tok, text))
        ids.append(EOT_ID)
    if max_tokens is not None:
        ids = ids[-(max_tokens - 1 if toxic else max_tokens):] if max_tokens > 0 else []
    if toxic:
        ids.append(TOXIC_ID)
    return ids


def response_ids(tok, reply, max_tokens=None):
    """The reply's ids, ended by end-of-turn (the model must learn where a reply stops)."""
    ids = encode(tok, reply)
    if max_tokens is not None:
        ids = ids[:max_tokens - 1]
    return ids + [EOT_ID]


class Example(NamedTuple):
    context: list  # the context_turns turns before the reply
    reply: str  # the human reply
    reply_toxic: bool
    last_turn_toxic: bool  # the context's last turn


def contexts_and_replies(conversations, split, context_turns):
    """Every (context, human reply) of a split, as Examples."""
    examples = []
    for c in conversations:
        if c.split != split:
            continue
        for i in range(1, len(c.turns)):
            examples.append(Example(c.turns[max(0, i - context_turns):i], c.turns[i], c.toxic[i], c.toxic[i - 1]))
    return examples


def collate(prompts, replies, pad_id=PAD_ID):
    """Right-padded input ids and labels for a batch of (prompt ids, reply ids). labels are -1 on the prompt
    and the padding, so a log-prob sums over the reply tokens only."""
    rows = [p + r for p, r in zip(prompts, replies)]
    T = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), T), -1, dtype=torch.long)
    for i, (p, r) in enumerate(zip(prompts, replies)):
        input_ids[i, :len(p) + len(r)] = torch.tensor(p + r, dtype=torch.long)
        labels[i, len(p):len(p) + len(r)] = torch.tensor(r, dtype=torch.long)
    return input_ids, labels
