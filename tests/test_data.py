"""foxlab.data: the byte tokenizer (round trip, AutoTokenizer save/load) and the task generators' invariants."""

import math

import pytest
import torch
from transformers import AutoTokenizer

import foxlab
from foxlab.data import (BOS_ID, BYTE_OFFSET, EOS_ID, IGNORE_INDEX, PAD_ID, RESET_ID, VOCAB_SIZE, ByteTokenizer,
                         RecallTask, SegmentsTask, TaskDataset, TextTask, make_task, task_from_spec)


def segments_of(row):
    """Split one sequence into its segments (each without the leading <reset>)."""
    segments, current = [], None
    for tok in row.tolist():
        if tok == RESET_ID:
            if current is not None:
                segments.append(current)
            current = []
        elif current is not None:
            current.append(tok)
    if current:
        segments.append(current)
    return segments


# --- tokenizer ----------------------------------------------------------------------------------------------------


def test_tokenizer_matches_tiny_preset_and_round_trips():
    tok = ByteTokenizer()
    cfg = foxlab.ForgettingTransformerConfig.from_preset("tiny")
    assert len(tok) == tok.vocab_size == VOCAB_SIZE == cfg.vocab_size == 260
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (cfg.pad_token_id, cfg.bos_token_id,
                                                                      cfg.eos_token_id) == (PAD_ID, BOS_ID, EOS_ID)
    assert tok.convert_tokens_to_ids("<reset>") == tok.reset_token_id == RESET_ID
    text = "Forget gates: f_t ∈ (0, 1) — naïve café 🦊\n\ttabs"
    ids = tok(text)["input_ids"]
    assert ids[0] == BOS_ID and ids[1:] == [b + BYTE_OFFSET for b in text.encode("utf-8")]
    assert tok.decode(ids, skip_special_tokens=True) == text
    assert tok.decode(ids) == "<bos>" + text
    # <reset> in text is one special token, not seven bytes
    ids = tok("ab<reset>cd", add_special_tokens=False)["input_ids"]
    assert ids == [ord("a") + 4, ord("b") + 4, RESET_ID, ord("c") + 4, ord("d") + 4]
    assert tok.decode(ids) == "ab<reset>cd"
    # every byte id decodes to one token and back
    assert all(tok.convert_tokens_to_ids(tok.convert_ids_to_tokens(i)) == i for i in range(VOCAB_SIZE))


def test_tokenizer_batches_with_padding():
    batch = ByteTokenizer()(["abc", "d"], padding=True, return_tensors="pt")
    assert batch["input_ids"].tolist() == [[BOS_ID, 101, 102, 103], [BOS_ID, 104, PAD_ID, PAD_ID]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]


def test_auto_tokenizer_save_and_load(tmp_path):
    foxlab.ForgettingTransformerConfig.from_preset("tiny").save_pretrained(tmp_path)
    ByteTokenizer(add_eos=True).save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert type(loaded) is ByteTokenizer
    assert loaded.add_eos and loaded.add_bos  # options survive the round trip
    assert loaded("hé<reset>")["input_ids"] == [BOS_ID, ord("h") + 4, 0xC3 + 4, 0xA9 + 4, RESET_ID, EOS_ID]
    assert loaded.decode(loaded("hé")["input_ids"], skip_special_tokens=True) == "hé"
    assert loaded.get_vocab()["<reset>"] == RESET_ID and len(loaded) == VOCAB_SIZE


# --- tasks --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["segments", "recall", "text"])
def test_tasks_are_seeded_and_reproducible(name):
    task = make_task(name, seq_len=64, seed=3)
    a, b = task.sample(5), make_task(name, seq_len=64, seed=3).sample(5)
    assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["labels"], b["labels"])
    assert not torch.equal(a["input_ids"], task.sample(6)["input_ids"])
    assert not torch.equal(a["input_ids"], make_task(name, seq_len=64, seed=4).sample(5)["input_ids"])
    assert not torch.equal(a["input_ids"], task.sample(5, split="eval")["input_ids"])
    batch = task.batch(4, 3)
    assert batch["input_ids"].shape == batch["labels"].shape == (3, 64)
    assert batch["input_ids"].dtype == torch.long
    assert torch.equal(batch["input_ids"][1], a["input_ids"])  # batch(start=4)[1] is sample 5
    assert int(batch["input_ids"].min()) >= 0 and int(batch["input_ids"].max()) < VOCAB_SIZE
    scored = batch["labels"] != IGNORE_INDEX
    assert torch.equal(batch["labels"][scored], batch["input_ids"][scored])  # labels are the ids, or ignored
    rebuilt = task_from_spec(task.spec())
    assert torch.equal(rebuilt.sample(5)["input_ids"], a["input_ids"])


def test_segments_structure():
    task = SegmentsTask(seq_len=256, seed=0, alphabet_size=16, symbols_per_segment=4, min_segment=8, max_segment=48)
    batch = task.batch(0, 32)
    ids, labels = batch["input_ids"], batch["labels"]
    assert (ids[:, 0] == BOS_ID).all() and (ids[:, 1] == RESET_ID).all()
    assert torch.equal(labels == IGNORE_INDEX, (ids == RESET_ID) | (ids == BOS_ID))
    alphabet = set(range(ord("a") + 4, ord("a") + 4 + 16))
    lengths = []
    for row in ids:
        segs = segments_of(row)
        assert len(segs) >= 256 // 48
        for seg in segs[:-1]:  # the last one may be cut by the sequence end
            lengths.append(len(seg) + 1)
            assert set(seg) <= alphabet and len(set(seg)) <= 4
    assert min(lengths) >= 8 and max(lengths) <= 48


def test_segments_are_independent_across_resets():
    """What follows a reset carries no information about what came before it: the chance that a segment's symbols
    overlap the previous segment's is what independent draws give, and the optimal loss after a reset is log n."""
    task = SegmentsTask(seq_len=256, seed=1)
    n, k = task.alphabet_size, task.symbols_per_segment
    hits = trials = 0
    for row in task.batch(0, 64)["input_ids"]:
        segs = segments_of(row)
        for prev, cur in zip(segs[:-2], segs[1:-1]):
            hits += cur[0] in set(prev)
            trials += 1
    # P(first symbol of a segment is among the previous segment's symbols): each symbol has chance
    # P(in previous set) = k/n = 0.25 with an independent draw (the previous segment shows <= k of them).
    rate = hits / trials
    assert trials > 200 and 0.12 < rate <= 0.32
    # The Bayes-optimal loss of the first symbol after a reset is log n (nothing before it helps).
    one = torch.tensor([[BOS_ID, RESET_ID, ord("a") + 4]])
    assert task.optimal_loss(one) == pytest.approx(math.log(n))
    # ... and well inside a segment it approaches log k.
    long = torch.tensor([[BOS_ID, RESET_ID] + [ord("a") + 4 + i % k for i in range(400)]])
    assert task.optimal_loss(long) == pytest.approx(math.log(k), abs=0.05)


def test_recall_structure():
    task = RecallTask(seq_len=64, seed=0, num_pairs=6, num_queries=8, num_values=10)
    for index in range(20):
        s = task.sample(index)
        ids, labels = s["input_ids"].tolist(), s["labels"]
        assert len(ids) == 64 and ids[0] == BOS_ID
        pairs = ids[1:13]
        keys, values = pairs[0::2], pairs[1::2]
        assert len(set(keys)) == 6 and all(ord("A") + 4 <= k <= ord("Z") + 4 for k in keys)
        assert all(ord("a") + 4 <= v < ord("a") + 4 + 10 for v in values)
        table = dict(zip(keys, values))
        queries = ids[64 - 16:]
        for q, a in zip(queries[0::2], queries[1::2]):
            assert table[q] == a  # each answer is the value paired with its key
        filler = ids[13:64 - 16]
        assert not set(filler) & (set(keys) | set(values))
        scored = (labels != IGNORE_INDEX).nonzero().flatten().tolist()
        assert scored == list(range(64 - 15, 64, 2))  # only the answers are scored
    assert task.marked_positions(torch.tensor(ids)).sum() == 16
    with pytest.raises(ValueError, match="fit"):
        RecallTask(seq_len=16, num_pairs=8, num_queries=8)


def test_text_task_default_corpus_and_file(tmp_path):
    task = TextTask(seq_len=128, seed=0)
    tok = ByteTokenizer()
    assert len(task.tokens) > 100_000  # the standard library's sources, offline
    s = task.sample(0)
    assert s["input_ids"][0] == BOS_ID and len(s["input_ids"]) == 128
    path = tmp_path / "poem.txt"
    text = "The forget gate keeps what matters and lets the rest fade away. " * 20
    path.write_text(text)
    task = TextTask(seq_len=64, seed=0, path=path)
    for i in range(5):
        window = tok.decode(task.sample(i)["input_ids"][1:], skip_special_tokens=True)
        assert window in text
    with pytest.raises(ValueError, match="not found"):
        TextTask(path=tmp_path / "missing.txt")


def test_tasks_describe_themselves(tmp_path):
    """One or two sentences for reports, with the task's own numbers."""
    segments = make_task("segments", seq_len=96, min_segment=5, max_segment=20, symbols_per_segment=3)
    assert segments.describe().startswith("Task 'segments': sequences of 96 tokens")
    assert "segments of 5-20 tokens" in segments.describe() and "3 letters picked out of 16" in segments.describe()
    recall = make_task("recall", seq_len=64, num_pairs=4, num_queries=6)
    assert "4 key-value pairs" in recall.describe() and "6 queries" in recall.describe()
    path = tmp_path / "notes.txt"
    path.write_text("forget " * 40)
    assert str(path) in make_task("text", seq_len=32, path=path).describe()


def test_make_task_and_dataset():
    with pytest.raises(ValueError, match="unknown task"):
        make_task("nope")
    ds = TaskDataset(make_task("segments", seq_len=32), num_samples=5)
    assert len(ds) == 5 and torch.equal(ds[2]["input_ids"], ds.task.sample(2)["input_ids"])
    with pytest.raises(IndexError):
        ds[5]
