"""Data for training small FoX models: a byte-level tokenizer and three seeded, reproducible tasks.

Tokenizer (``ByteTokenizer``, a transformers ``PreTrainedTokenizer``)::

    0 <pad>   1 <bos>   2 <eos>   3 <reset>   4 + b for every byte b of the UTF-8 text   -> vocab 260

It matches the ``tiny`` preset (vocab 260, pad 0 / bos 1 / eos 2). ``<reset>`` separates independent segments
(documents). Importing this module registers it with ``AutoTokenizer`` for ``ForgettingTransformerConfig``, and
every saved tokenizer names its class in ``tokenizer_config.json``, so ``AutoTokenizer.from_pretrained(ckpt)``
works once ``foxlab`` (with this module) is imported.

Tasks. Every sample is a pure function of ``(seed, split, index)`` (its own ``torch.Generator``), so a batch is a
pure function of the step: resuming, sharding over processes and re-running all see exactly the same data.
``sample(index)`` returns ``input_ids`` and ``labels`` (LongTensor (seq_len,)); labels are -100 where a position
is not scored. The model's loss shifts labels itself (``labels[t]`` is the target predicted at ``t - 1``).

- ``segments``: ``<bos>`` then segments, each led by ``<reset>``. A segment picks ``k`` symbols out of an
  alphabet of ``n`` letters and emits i.i.d. uniform draws from them. The best prediction is the set of symbols
  seen *since the last reset* (an in-context unigram: it needs memory of the whole segment), and nothing before a
  reset helps: the optimal model keeps everything inside a segment (f ~ 1) and forgets at ``<reset>`` (f ~ 0).
  ``optimal_loss`` gives the Bayes-optimal loss for comparison.
- ``recall``: multi-query associative recall. ``num_pairs`` key-value pairs, then filler, then queries: a key
  from the pairs followed by its value. Only the values after queries are scored: the model must hold every pair
  across the filler (long memory). ``tiny`` solves the default (128 tokens, 8 pairs) to ~0 loss in about 600 steps
  of batch 32 at lr 1e-3 (a few minutes on 2 CPU cores); at lr 3e-3 it stalled near 1.9 nats in our runs.
- ``text``: byte-level language modelling on random windows of a text file; by default a corpus made of the
  Python standard library's own source files (found with ``sysconfig``; no download), one ``<reset>`` between
  files.
"""

from __future__ import annotations

import math
import os
import sys
import sysconfig
from pathlib import Path

import torch
from transformers import AutoTokenizer, PreTrainedTokenizer
from transformers.tokenization_utils_base import AddedToken

from .config import ForgettingTransformerConfig

PAD_ID, BOS_ID, EOS_ID, RESET_ID = 0, 1, 2, 3
BYTE_OFFSET = 4
VOCAB_SIZE = BYTE_OFFSET + 256
IGNORE_INDEX = -100

# --------------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------------


class ByteTokenizer(PreTrainedTokenizer):
    """UTF-8 bytes as tokens: ``<pad>`` 0, ``<bos>`` 1, ``<eos>`` 2, ``<reset>`` 3, byte b -> 4 + b (vocab 260).

    ``encode`` prepends ``<bos>`` (``add_bos``, saved with the tokenizer) and optionally appends ``<eos>``
    (``add_eos``);
    ``decode`` joins the bytes back into text (invalid UTF-8 becomes U+FFFD). No vocabulary file: the class and its
    special tokens are all that ``save_pretrained`` needs to write.
    """

    model_input_names = ["input_ids", "attention_mask"]

    def __init__(self, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>", reset_token="<reset>",
                 add_bos: bool = True, add_eos: bool = False, **kwargs):
        tokens = [pad_token, bos_token, eos_token, reset_token]
        tokens = [t if isinstance(t, AddedToken) else AddedToken(t, special=True, normalized=False) for t in tokens]
        self._added_tokens_decoder = dict(enumerate(tokens))
        self._reset_token = str(tokens[3])
        self.add_bos, self.add_eos = bool(add_bos), bool(add_eos)
        kwargs.pop("extra_special_tokens", None)  # saved configs list <reset> there; it is always added below
        kwargs.pop("additional_special_tokens", None)
        super().__init__(pad_token=tokens[0], bos_token=tokens[1], eos_token=tokens[2],
                         extra_special_tokens=[tokens[3]], add_bos=self.add_bos, add_eos=self.add_eos,
                         **kwargs)

    # --- vocabulary ---
    @property
    def vocab_size(self) -> int:
        return VOCAB_SIZE

    @property
    def reset_token(self) -> str:
        return self._reset_token

    @property
    def reset_token_id(self) -> int:
        return RESET_ID

    def get_vocab(self) -> dict[str, int]:
        vocab = {chr(b): b + BYTE_OFFSET for b in range(256)}
        vocab.update({str(tok): i for i, tok in self._added_tokens_decoder.items()})
        return vocab

    def _tokenize(self, text: str, **kwargs) -> list[str]:
        return [chr(b) for b in text.encode("utf-8")]

    def _convert_token_to_id(self, token: str):
        if len(token) == 1 and ord(token) < 256:
            return ord(token) + BYTE_OFFSET
        return self._added_tokens_encoder.get(token)

    def _convert_id_to_token(self, index: int) -> str:
        if index in self._added_tokens_decoder:
            return str(self._added_tokens_decoder[index])
        if BYTE_OFFSET <= index < VOCAB_SIZE:
            return chr(index - BYTE_OFFSET)
        raise IndexError(f"token id {index} is outside the byte vocabulary (0..{VOCAB_SIZE - 1})")

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        out, pending = [], bytearray()
        for token in tokens:
            if token in self._added_tokens_encoder:
                out.append(pending.decode("utf-8", errors="replace"))
                out.append(token)
                pending = bytearray()
            else:
                pending.append(ord(token))
        out.append(pending.decode("utf-8", errors="replace"))
        return "".join(out)

    # --- special tokens ---
    def build_inputs_with_special_tokens(self, token_ids_0, token_ids_1=None):
        bos = [BOS_ID] if self.add_bos else []
        eos = [EOS_ID] if self.add_eos else []
        out = bos + list(token_ids_0) + eos
        if token_ids_1 is not None:
            out += bos + list(token_ids_1) + eos
        return out

    def get_special_tokens_mask(self, token_ids_0, token_ids_1=None, already_has_special_tokens=False):
        if already_has_special_tokens:
            return [1 if i in self._added_tokens_decoder else 0 for i in token_ids_0]
        bos, eos = [1] if self.add_bos else [], [1] if self.add_eos else []
        mask = bos + [0] * len(token_ids_0) + eos
        if token_ids_1 is not None:
            mask += bos + [0] * len(token_ids_1) + eos
        return mask

    def num_special_tokens_to_add(self, pair: bool = False) -> int:
        return (int(self.add_bos) + int(self.add_eos)) * (2 if pair else 1)

    def save_vocabulary(self, save_directory: str, filename_prefix: str | None = None) -> tuple[str, ...]:
        return ()  # the vocabulary is fixed: nothing to write


AutoTokenizer.register(ForgettingTransformerConfig, slow_tokenizer_class=ByteTokenizer, exist_ok=True)


def bytes_to_ids(data: bytes) -> torch.Tensor:
    """Raw bytes -> token ids (no special tokens), a LongTensor."""
    if not data:
        return torch.empty(0, dtype=torch.long)
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).long() + BYTE_OFFSET


# --------------------------------------------------------------------------------------------------
# Tasks
# --------------------------------------------------------------------------------------------------

_SPLIT_SALT = {"train": 0, "eval": 0x5EED_E7A1}
_MASK63 = (1 << 63) - 1


def sample_generator(seed: int, split: str, index: int) -> torch.Generator:
    """The generator of one sample: a fixed, well-mixed function of (seed, split, index) (splitmix64)."""
    if split not in _SPLIT_SALT:
        raise ValueError(f"split must be one of {list(_SPLIT_SALT)}, got {split!r}")
    x = (seed * 0x9E3779B97F4A7C15 + _SPLIT_SALT[split] * 0xBF58476D1CE4E5B9 + index) & ((1 << 64) - 1)
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & ((1 << 64) - 1)
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & ((1 << 64) - 1)
    return torch.Generator().manual_seed((x ^ (x >> 31)) & _MASK63)


def _letters(start: str, count: int) -> torch.Tensor:
    return torch.arange(count) + ord(start) + BYTE_OFFSET


class Task:
    """Base class: ``sample(index, split)`` -> {"input_ids", "labels"}; ``batch(start, size, split)`` stacks
    samples ``start .. start + size - 1``. ``marked_positions(input_ids)`` marks the positions worth showing
    (resets, queries)."""

    name = "task"

    def __init__(self, seq_len: int, seed: int = 0):
        if not isinstance(seq_len, int) or seq_len < 8:
            raise ValueError(f"seq_len must be an integer >= 8, got {seq_len!r}")
        self.seq_len, self.seed = seq_len, int(seed)

    def generate(self, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def sample(self, index: int, split: str = "train") -> dict[str, torch.Tensor]:
        ids, labels = self.generate(sample_generator(self.seed, split, index))
        return {"input_ids": ids, "labels": labels}

    def batch(self, start: int, size: int, split: str = "train") -> dict[str, torch.Tensor]:
        samples = [self.sample(start + i, split) for i in range(size)]
        return {key: torch.stack([s[key] for s in samples]) for key in samples[0]}

    def marked_positions(self, input_ids: torch.Tensor) -> torch.Tensor:
        return input_ids == RESET_ID

    def describe(self) -> str:
        """The task in a sentence or two, for reports."""
        raise NotImplementedError

    def spec(self) -> dict:
        """The arguments that rebuild this task (saved with checkpoints)."""
        return {"name": self.name, "seq_len": self.seq_len, "seed": self.seed}


class SegmentsTask(Task):
    """Independent segments led by ``<reset>``; inside one, i.i.d. draws from ``symbols_per_segment`` letters
    chosen out of ``alphabet_size`` (an in-context unigram). Nothing before a reset says anything after it."""

    name = "segments"

    def __init__(self, seq_len: int = 128, seed: int = 0, alphabet_size: int = 16, symbols_per_segment: int = 4,
                 min_segment: int = 8, max_segment: int = 48):
        super().__init__(seq_len, seed)
        if not 1 <= symbols_per_segment <= alphabet_size <= 26:
            raise ValueError("need 1 <= symbols_per_segment <= alphabet_size <= 26")
        if not 2 <= min_segment <= max_segment:
            raise ValueError("need 2 <= min_segment <= max_segment")
        self.alphabet_size, self.symbols_per_segment = alphabet_size, symbols_per_segment
        self.min_segment, self.max_segment = min_segment, max_segment
        self.alphabet = _letters("a", alphabet_size)

    def generate(self, g):
        T, n, k = self.seq_len, self.alphabet_size, self.symbols_per_segment
        ids = torch.empty(T, dtype=torch.long)
        ids[0] = BOS_ID
        pos = 1
        while pos < T:
            length = int(torch.randint(self.min_segment, self.max_segment + 1, (1,), generator=g))
            symbols = self.alphabet[torch.randperm(n, generator=g)[:k]]
            body = symbols[torch.randint(0, k, (length - 1,), generator=g)]
            seg = torch.cat([torch.tensor([RESET_ID]), body])[: T - pos]
            ids[pos:pos + len(seg)] = seg
            pos += len(seg)
        labels = ids.clone()
        labels[(ids == RESET_ID) | (ids == BOS_ID)] = IGNORE_INDEX  # when a segment ends is not the pattern
        return ids, labels

    def optimal_loss(self, input_ids: torch.Tensor) -> float:
        """Bayes-optimal mean loss (nats) over the scored positions of ``input_ids`` (B, T): knowing the task,
        after seeing s distinct symbols of a segment, P(seen one) = 1/k, P(unseen one) = (k - s) / (k (n - s))."""
        n, k = self.alphabet_size, self.symbols_per_segment
        total, count = 0.0, 0
        for row in input_ids.tolist():
            seen: set[int] = set()
            for t in range(1, len(row)):
                tok = row[t]
                if tok in (RESET_ID, BOS_ID):
                    seen = set()
                    continue
                s = len(seen)
                p = 1.0 / k if tok in seen else (k - s) / (k * (n - s))
                total -= math.log(p)
                count += 1
                seen.add(tok)
        return total / max(count, 1)

    def describe(self):
        return (f"Task 'segments': sequences of {self.seq_len} tokens made of independent segments of "
                f"{self.min_segment}-{self.max_segment} tokens, each led by <reset>. Each segment repeats random draws "
                f"from {self.symbols_per_segment} letters picked out of {self.alphabet_size}, so predicting the next "
                "letter needs every letter since the last <reset> and nothing before it: the ideal model keeps "
                "its memory inside a segment (forget gate f near 1) and erases it at each <reset> (f near 0).")

    def spec(self):
        return {**super().spec(), "alphabet_size": self.alphabet_size,
                "symbols_per_segment": self.symbols_per_segment, "min_segment": self.min_segment,
                "max_segment": self.max_segment}


class RecallTask(Task):
    """Multi-query associative recall: ``<bos> k1 v1 ... kP vP <filler ...> q1 a1 q2 a2 ...`` with keys unique
    upper-case letters, values digits/lower-case letters, filler from punctuation, queries drawn from the keys.
    Only the answers a_i are scored."""

    name = "recall"

    def __init__(self, seq_len: int = 128, seed: int = 0, num_pairs: int = 8, num_queries: int = 16,
                 num_values: int = 16):
        super().__init__(seq_len, seed)
        if not 1 <= num_pairs <= 26:
            raise ValueError(f"num_pairs must be in 1..26, got {num_pairs!r}")
        if not 1 <= num_values <= 26:
            raise ValueError(f"num_values must be in 1..26, got {num_values!r}")
        if num_queries < 1 or 1 + 2 * num_pairs + 2 * num_queries > seq_len:
            raise ValueError(f"1 + 2 * num_pairs + 2 * num_queries must fit in seq_len ({seq_len})")
        self.num_pairs, self.num_queries, self.num_values = num_pairs, num_queries, num_values
        self.keys, self.values = _letters("A", 26), _letters("a", num_values)
        self.filler = torch.tensor([ord(c) + BYTE_OFFSET for c in ".,;:-=+*"])

    def generate(self, g):
        P, Q = self.num_pairs, self.num_queries
        keys = self.keys[torch.randperm(26, generator=g)[:P]]
        values = self.values[torch.randint(0, self.num_values, (P,), generator=g)]
        gap = self.seq_len - 1 - 2 * P - 2 * Q
        filler = self.filler[torch.randint(0, len(self.filler), (gap,), generator=g)]
        which = torch.randint(0, P, (Q,), generator=g)
        pairs = torch.stack([keys, values], 1).flatten()
        queries = torch.stack([keys[which], values[which]], 1).flatten()
        ids = torch.cat([torch.tensor([BOS_ID]), pairs, filler, queries])
        labels = torch.full_like(ids, IGNORE_INDEX)
        answers = torch.arange(self.seq_len - 2 * Q + 1, self.seq_len, 2)
        labels[answers] = ids[answers]
        return ids, labels

    def marked_positions(self, input_ids):
        mask = torch.zeros_like(input_ids, dtype=torch.bool)
        mask[..., self.seq_len - 2 * self.num_queries:] = True  # the query region
        return mask

    def describe(self):
        return (f"Task 'recall': {self.num_pairs} key-value pairs, filler, then {self.num_queries} queries (a key "
                f"followed by its value) in {self.seq_len} tokens; only the values after queries are scored, so "
                "the model must hold every pair across the filler.")

    def spec(self):
        return {**super().spec(), "num_pairs": self.num_pairs, "num_queries": self.num_queries,
                "num_values": self.num_values}


def default_corpus(max_bytes: int = 8 << 20) -> list[bytes]:
    """The default text: the Python standard library's top-level ``*.py`` files, sorted by name, about
    ``max_bytes`` in all, one document each. Falls back to the docstrings of imported modules when the sources are
    not installed. Offline, no download; the text depends on the Python version."""
    parts, size = [], 0
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(stdlib.glob("*.py")):
        try:
            data = path.read_bytes()
        except OSError:
            continue
        parts.append(data)
        size += len(data)
        if size >= max_bytes:
            break
    if size < 100_000:  # stripped install: use what every Python carries
        docs = [getattr(m, "__doc__", None) for _, m in sorted(sys.modules.items())]
        parts = [d.encode() for d in docs if isinstance(d, str) and d.strip()]
    if not parts:
        raise RuntimeError("no default text corpus found; pass a text file")
    return parts


class TextTask(Task):
    """Byte-level LM on random windows of ``path`` (a text file), or of ``default_corpus()`` (files separated by
    ``<reset>``). Every position is scored except those whose target is ``<reset>``."""

    name = "text"

    def __init__(self, seq_len: int = 256, seed: int = 0, path: str | os.PathLike | None = None):
        super().__init__(seq_len, seed)
        self.path = None if path is None else str(path)
        if path is None:
            docs = default_corpus()
        else:
            p = Path(path)
            if not p.is_file():
                raise ValueError(f"text file not found: {path}")
            docs = [p.read_bytes()]
        # int16 keeps a few MB of text small; one <reset> between documents.
        raw = torch.frombuffer(bytearray(b"".join(docs)), dtype=torch.uint8).to(torch.int16) + BYTE_OFFSET
        ends = torch.tensor([len(doc) for doc in docs]).cumsum(0)[:-1]
        pieces = list(torch.tensor_split(raw, ends))
        reset = torch.tensor([RESET_ID], dtype=torch.int16)
        self.tokens = torch.cat([t for i, piece in enumerate(pieces) for t in ((reset, piece) if i else (piece,))])
        if len(self.tokens) < seq_len:
            raise ValueError(f"the text has {len(self.tokens)} bytes, fewer than seq_len ({seq_len})")

    def generate(self, g):
        start = int(torch.randint(0, len(self.tokens) - self.seq_len + 2, (1,), generator=g))
        ids = torch.cat([torch.tensor([BOS_ID]), self.tokens[start:start + self.seq_len - 1].long()])
        labels = ids.clone()
        labels[(ids == RESET_ID) | (ids == BOS_ID)] = IGNORE_INDEX
        return ids, labels

    def describe(self):
        source = f"the text file {self.path}" if self.path else "the Python standard library's source files"
        return (f"Task 'text': byte-level language modelling on windows of {self.seq_len} bytes of {source} "
                "(<reset> between files); every byte is predicted from the ones before it.")

    def spec(self):
        return {**super().spec(), "path": self.path}


TASKS: dict[str, type[Task]] = {"segments": SegmentsTask, "recall": RecallTask, "text": TextTask}


def make_task(name: str, **kwargs) -> Task:
    """A task by name (``segments``, ``recall``, ``text``) with its keyword arguments (``seq_len``, ``seed``, ...)."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose one of {', '.join(TASKS)}")
    return TASKS[name](**kwargs)


def task_from_spec(spec: dict) -> Task:
    spec = dict(spec)
    return make_task(spec.pop("name"), **spec)


class TaskDataset(torch.utils.data.Dataset):
    """A map-style view of a task (for ``transformers.Trainer`` or a DataLoader): item i is ``task.sample(i)``."""

    def __init__(self, task: Task, num_samples: int, split: str = "train"):
        self.task, self.num_samples, self.split = task, num_samples, split

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if not 0 <= index < self.num_samples:
            raise IndexError(index)
        return self.task.sample(index, self.split)


__all__ = [
    "BOS_ID", "BYTE_OFFSET", "EOS_ID", "IGNORE_INDEX", "PAD_ID", "RESET_ID", "TASKS", "VOCAB_SIZE",
    "ByteTokenizer", "RecallTask", "SegmentsTask", "Task", "TaskDataset", "TextTask", "default_corpus",
    "make_task", "task_from_spec",
]
