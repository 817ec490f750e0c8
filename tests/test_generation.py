"""Decoding with the cache computes exactly what a full forward computes."""

import pytest
import torch

from foxlab import ForgettingTransformerCache
from foxlab.model import ForgettingCacheLayer

from conftest import VARIANTS, tiny_model

PAD = 0


def prompts(lengths, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(4, 260, (n,), generator=g).to(device) for n in lengths]


def left_pad(seqs):
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), PAD, device=seqs[0].device)
    mask = torch.zeros(len(seqs), width, dtype=torch.long, device=seqs[0].device)
    for row, s in enumerate(seqs):
        ids[row, width - len(s):], mask[row, width - len(s):] = s, 1
    return ids, mask


def test_generate_with_cache_equals_without(variant_model):
    ids = torch.stack(prompts([9, 9], device=variant_model.device))
    cached = variant_model.generate(ids, max_new_tokens=12, do_sample=False, use_cache=True)
    uncached = variant_model.generate(ids, max_new_tokens=12, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)


def test_step_by_step_cached_logits_equal_full_forward(variant_model):
    ids = torch.stack(prompts([14, 14], device=variant_model.device))
    full = variant_model(ids, use_cache=False).logits
    cache = ForgettingTransformerCache(variant_model.config)
    steps = [variant_model(ids[:, t:t + 1], cache=cache, use_cache=True).logits for t in range(ids.shape[1])]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)
    assert cache.get_seq_length() == 14


def test_chunked_prefill_equals_single_prefill(variant_model):
    ids = torch.stack(prompts([15, 15], seed=1, device=variant_model.device))
    single = variant_model(ids, use_cache=True)
    cache = ForgettingTransformerCache(variant_model.config)
    first = variant_model(ids[:, :6], cache=cache, use_cache=True).logits
    second = variant_model(ids[:, 6:], cache=cache, use_cache=True).logits  # Tq = 9 against 15 keys
    torch.testing.assert_close(torch.cat([first, second], dim=1), single.logits, rtol=1e-5, atol=1e-5)
    nxt = single.logits[:, -1:].argmax(-1)
    after_single = variant_model(nxt, cache=getattr(single, "cache", None) or single.past_key_values).logits
    after_chunks = variant_model(nxt, cache=cache).logits
    torch.testing.assert_close(after_chunks, after_single, rtol=1e-5, atol=1e-5)


def test_left_padded_batch_generates_what_each_generates_alone(variant_model):
    seqs = prompts([5, 11, 8], seed=2, device=variant_model.device)
    ids, mask = left_pad(seqs)
    batch = variant_model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=PAD)
    for row, s in enumerate(seqs):
        alone = variant_model.generate(s[None], max_new_tokens=10, do_sample=False, pad_token_id=PAD)
        assert torch.equal(batch[row, ids.shape[1]:], alone[0, len(s):]), f"row {row}"


def test_left_padded_logits_match_unpadded(variant_model):
    seqs = prompts([4, 10], seed=3, device=variant_model.device)
    ids, mask = left_pad(seqs)
    out = variant_model(ids, attention_mask=mask).logits
    for row, s in enumerate(seqs):
        alone = variant_model(s[None]).logits[0]
        torch.testing.assert_close(out[row, -len(s):], alone, rtol=1e-5, atol=1e-5)
    assert torch.isfinite(out).all()  # padded positions see no key: zeros, never NaN


def test_beam_search_reorders_the_whole_cache(variant_model):
    ids = torch.stack(prompts([7, 7], seed=4, device=variant_model.device))
    kwargs = dict(max_new_tokens=6, num_beams=3, do_sample=False, early_stopping=True)
    assert torch.equal(variant_model.generate(ids, use_cache=True, **kwargs),
                       variant_model.generate(ids, use_cache=False, **kwargs))


def test_generate_returns_attentions_and_cache_type():
    model = tiny_model()
    ids = torch.stack(prompts([6], device="cpu"))
    out = model.generate(ids, max_new_tokens=3, do_sample=False, return_dict_in_generate=True,
                         output_attentions=True)
    assert len(out.attentions) == 3 and out.attentions[-1][0].shape == (1, 4, 1, 8)
    cache = getattr(out, "cache", None) or out.past_key_values
    assert isinstance(cache, ForgettingTransformerCache)


def cached(out):
    return getattr(out, "cache", None) or out.past_key_values


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("crop", [-3, 7, -10])  # remove 3, keep 7 (the older positive form), remove all
def test_crop_then_continue_equals_full_forward(variant, crop, one_thread):
    model = tiny_model(**VARIANTS[variant])
    ids = torch.stack(prompts([14, 14], seed=5))
    full = model(ids, use_cache=False).logits
    cache = ForgettingTransformerCache(model.config)
    cache.activate_past_recording()
    model(ids[:, :4], cache=cache)  # two chunks, so the crop reaches into an earlier one
    model(ids[:, 4:10], cache=cache)
    cache.crop(crop)
    keep = cache.get_seq_length()
    assert keep == (10 + crop if crop < 0 else crop)
    assert all(layer.fgate_cumsum.shape[-1] == keep for layer in cache.layers)
    rest = model(ids[:, keep:], cache=cache).logits
    torch.testing.assert_close(rest, full[:, keep:], rtol=1e-5, atol=1e-5)


def test_cache_keeps_the_gates_prefix_sums_through_crop_and_reorder(one_thread):
    """fgate_cumsum (B, H, T) is the running sum of the layer's log forget gates, chunk after chunk, after a crop
    and after a reorder of the batch (beam search), as a full forward's gates give it."""
    model = tiny_model()
    ids = torch.stack(prompts([12, 12], seed=8))
    gates = model(ids, use_cache=False, output_forget_gates=True).forget_gates  # per layer (B, T, H)
    cache = ForgettingTransformerCache(model.config)
    model(ids[:, :5], cache=cache)
    model(ids[:, 5:9], cache=cache)
    for layer, log_f in zip(cache.layers, gates):
        assert layer.fgate_cumsum.dtype == torch.float32
        torch.testing.assert_close(layer.fgate_cumsum, log_f[:, :9].cumsum(1).transpose(1, 2), rtol=1e-5, atol=1e-5)
    cache.crop(-3)
    cache.reorder_cache(torch.tensor([1, 0]))
    model(ids.flip(0)[:, 6:], cache=cache)
    for layer, log_f in zip(cache.layers, gates):
        torch.testing.assert_close(layer.fgate_cumsum, log_f.flip(0).cumsum(1).transpose(1, 2), rtol=1e-5,
                                   atol=1e-5)


def test_kv_shift_crop_without_recording_is_refused_and_changes_nothing():
    model = tiny_model(**VARIANTS["fox-pro"])
    cache = cached(model(torch.stack(prompts([5])), use_cache=True))
    with pytest.raises(RuntimeError, match="activate_past_recording"):
        cache.crop(-2)
    assert cache.get_seq_length() == 5 and cache.layers[0].fgate_cumsum.shape[-1] == 5
    cache.crop(0)  # nothing to undo: allowed


def greedy_and_count_crops(monkeypatch, model, ids, **kwargs):
    """generate(); also how many crops removed tokens from a cache (so a test knows drafts were rejected)."""
    removals = []
    original = ForgettingCacheLayer.crop

    def counting_crop(layer, tokens_to_remove):
        removals.append(layer.get_seq_length())
        original(layer, tokens_to_remove)
        removals[-1] -= layer.get_seq_length()

    monkeypatch.setattr(ForgettingCacheLayer, "crop", counting_crop)
    out = model.generate(ids, max_new_tokens=24, do_sample=False, **kwargs)
    monkeypatch.undo()
    return out, sum(r > 0 for r in removals)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_prompt_lookup_and_assisted_decoding_equal_greedy(variant, monkeypatch, one_thread):
    model = tiny_model(**VARIANTS[variant])
    assistant = tiny_model(seed=7, **VARIANTS["fox-pro"])  # a different model: some drafts are rejected
    phrase = prompts([6], seed=6)[0]
    ids = torch.cat([phrase, phrase, phrase[:3]])[None]  # repeats, so prompt lookup finds drafts
    greedy = model.generate(ids, max_new_tokens=24, do_sample=False)
    lookup, lookup_crops = greedy_and_count_crops(monkeypatch, model, ids, prompt_lookup_num_tokens=3)
    assisted, assisted_crops = greedy_and_count_crops(monkeypatch, model, ids, assistant_model=assistant)
    assert torch.equal(lookup, greedy) and torch.equal(assisted, greedy)
    assert lookup_crops > 0 and assisted_crops > 0  # drafts were rejected and rolled back
