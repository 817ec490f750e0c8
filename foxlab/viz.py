"""See what each FoX head forgets: interactive plotly figures, an ipywidgets explorer, offline export.

FoX gives every head a forget gate f_t = exp(log f_t) per token; its prefix sum c_t = sum_{s <= t} log f_s gives
the decay (forget-gate) matrix F_ij = prod_{s=j+1..i} f_s = exp(c_i - c_j) on j <= i, the bias that the attention
A = softmax(s q k^T + log F) adds to its scores (docs/fox.md, "Forgetting attention").

    insp = inspect(model, input_ids, tokenizer)   # one forward pass: tokens, log f, c and A of every layer
    plot_forget_gates(insp)                       # f_t, heads x tokens, every layer
    plot_decay(insp, layer=0, head=1)             # log10 F (upper triangle blank)
    plot_attention(insp, layer=0, head=1)         # A beside F
    plot_head_timescales(insp)                    # how far back each head sees (or from a model's gate biases)
    explore(model, input_ids, tokenizer)          # ipywidgets app: one FigureWidget, updated in place
    show(fig)                                     # interactive plus a static PNG (GitHub, nbviewer)
    save(fig, "fig.html")                         # offline HTML (plotly.js embedded); .png / .svg via kaleido
    write_report("report.html", model, input_ids) # one offline page: loss, gates, F and A, timescales

Limits: an inspection keeps the last ``MAX_TOKENS`` tokens of its input, and the T x T maps show the last
``MAX_MAP_TOKENS`` of those; titles say when anything was cropped. Tokens show as ``position:token`` on the
axes and in hover text (ids when there is no tokenizer).
"""

from __future__ import annotations

import base64
import html
import math
import operator
import os
import shutil
import sys
import tempfile
import warnings
import webbrowser
from collections.abc import Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import ipywidgets as widgets
import numpy as np
import plotly.graph_objects as go
import plotly.io as pio
import torch
from plotly.basedatatypes import BaseFigure
from plotly.offline import get_plotlyjs
from plotly.subplots import make_subplots

from .model import ForgettingTransformerPreTrainedModel

__all__ = [
    "Explorer", "Inspection", "StaticExportError", "explore", "find_chrome", "head_timescales", "inspect",
    "plot_attention", "plot_decay", "plot_forget_gates", "plot_head_timescales", "plot_pruning", "save", "show",
    "to_image",
    "write_report",
]

MAX_TOKENS = 4096  # tokens an inspection keeps (the end of a longer input)
MAX_MAP_TOKENS = 512  # tokens per axis of a T x T map (the end of a longer inspection)
THRESHOLD = math.exp(-1)  # head timescale: the distance at which the decay falls below this
LOG10_FLOOR = -8.0  # colour floor of log10 F maps (the data and hover keep every value)
GATE_SCALE, DECAY_SCALE, ATTENTION_SCALE = "Viridis", "Viridis", "Cividis"  # colour-blind safe
VIEWS = ("gates", "decay", "attention", "decay+attention")
STATIC_FORMATS = ("png", "svg", "pdf", "jpeg", "webp")
CHROME_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")
INPUTS_HELP = ("text (with a tokenizer), token ids of shape (T,) or (B, T) (list, tensor or array of integers), "
               "or a tokenizer's output (BatchEncoding or dict with input_ids)")
INSTALL_CHROME = ("static images (PNG/SVG) need Chrome or Chromium for kaleido: install it with "
                  "`apt-get install -y chromium` (Debian/Ubuntu) or `plotly_get_chrome`, or set BROWSER_PATH")


# --------------------------------------------------------------------------------------------------
# One forward pass
# --------------------------------------------------------------------------------------------------


@dataclass(repr=False)
class Inspection:
    """One forward pass of a model over one sequence: everything the figures draw.

    token_ids, tokens: the T tokens kept (ids; display strings, or ids as strings without a tokenizer).
    input_length: tokens in the input; T < input_length when it was cropped to its last MAX_TOKENS.
    log_f[l]: layer l's log forget gates (T, H), float32 (all 0 for a layer without a gate).
    c[l]: the cumulative log decay c_t = sum_{s <= t} log f_s (T, H), float64.
    attentions[l]: layer l's attention probabilities (H, W, W) among the last W tokens (W <= MAX_MAP_TOKENS;
        when W < T, rows leave out the attention paid to earlier keys).
    fgate_type: the model's gate type ("full", "bias_only", "fixed" or "none").
    """

    token_ids: list[int]
    tokens: list[str]
    input_length: int
    log_f: list[torch.Tensor]
    c: list[torch.Tensor]
    attentions: list[torch.Tensor]
    fgate_type: str

    @property
    def num_layers(self) -> int:
        return len(self.log_f)

    @property
    def num_heads(self) -> int:
        return self.log_f[0].shape[1]

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def window_start(self) -> int:
        """Index (into the kept tokens) of the first token of the T x T maps."""
        return self.num_tokens - self.attentions[0].shape[-1]

    def __repr__(self) -> str:
        return (f"Inspection({self.num_tokens} tokens{self.note()}, {self.num_layers} layers x {self.num_heads} heads, "
                f"maps over the last {self.num_tokens - self.window_start}, fgate_type={self.fgate_type!r})")

    def labels(self, start: int = 0) -> list[str]:
        """Axis and hover labels ``position:token`` from kept token ``start`` on (positions count from the input's start)."""
        offset = self.input_length - self.num_tokens
        return [f"{offset + i}:{html.escape(tok, quote=False)}" for i, tok in enumerate(self.tokens[start:], start)]

    def log_decay(self, layer: int, head: int) -> torch.Tensor:
        """D_ij = c_i - c_j = log F_ij over the maps' window (W, W), float64; -inf above the diagonal (j > i)."""
        c = self.c[_check(layer, self.num_layers, "layer")][self.window_start:, _check(head, self.num_heads, "head")]
        d = c[:, None] - c[None, :]
        return d.masked_fill(torch.ones_like(d, dtype=torch.bool).triu(1), -math.inf)

    def note(self, maps: bool = False) -> str:
        """Title suffix saying what was cropped ('' when nothing was)."""
        shown = self.attentions[0].shape[-1] if maps else self.num_tokens
        return "" if shown == self.input_length else f" (last {shown} of {self.input_length} tokens)"


def inspect(model, inputs, tokenizer=None, *, row: int | None = None, attention_mask=None,
            max_tokens: int = MAX_TOKENS, max_map_tokens: int = MAX_MAP_TOKENS) -> Inspection:
    """Run ``model`` once (eval mode, no grad) and collect every layer's gates, decay and attention.

    inputs: text with a ``tokenizer`` (anything with ``encode`` or ``__call__``; tokens are shown through
    ``convert_ids_to_tokens`` or ``decode``); token ids (T,) or (B, T) (pick a row of a batch with ``row``); or a
    tokenizer's output (a ``BatchEncoding`` or dict with ``input_ids`` and, for a padded batch, ``attention_mask``).
    attention_mask: 1 for real tokens, 0 for padding, shaped like the ids (or taken from ``inputs``). The model runs
    with it, as it does in a batch, and the inspection keeps the real tokens only; positions count real tokens.
    Inputs longer than ``max_tokens`` keep their last ``max_tokens`` tokens; attention maps keep the last
    ``max_map_tokens`` (cropped layer by layer, so memory holds one full T x T map at a time).
    """
    _check_fox_model(model, "inspect")
    _check_positive(max_tokens, "max_tokens")
    _check_positive(max_map_tokens, "max_map_tokens")
    ids, mask = _input_row(inputs, tokenizer, row, attention_mask)
    _check_vocabulary(ids, model.config.vocab_size)
    if mask is None:
        _warn_unmasked_padding(ids, model, tokenizer)
        mask = torch.ones_like(ids, dtype=torch.bool)
    first, end = _real_tokens(mask)
    input_length = end - first
    kept = min(input_length, max_tokens)
    run_from = 0 if kept == input_length else end - kept  # keep left padding, masked, unless cropping drops it
    window = min(kept, max_map_tokens)
    layers = getattr(model, "model", model).layers
    hooks = [layer.attn.register_forward_hook(_crop_attention(window)) for layer in layers]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            out = model(input_ids=ids[None, run_from:end].to(model.device),
                        attention_mask=mask[None, run_from:end].long().to(model.device), output_attentions=True,
                        output_forget_gates=True, use_cache=False)
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    log_f = [g[0, -kept:].float().cpu() for g in out.forget_gates]
    token_ids = ids[end - kept:end].tolist()
    return Inspection(
        token_ids=token_ids, tokens=_token_strings(token_ids, tokenizer), input_length=input_length,
        log_f=log_f, c=[g.double().cumsum(0) for g in log_f], attentions=[a[0].float().cpu() for a in out.attentions],
        fgate_type=model.config.fgate_type,
    )


def _crop_attention(window: int):
    """A forward hook for ForgettingAttention (output, probs (B, H, T, T), log f): keep probs' last window."""

    def hook(module, args, output):
        o, probs, log_f = output
        return o, probs[..., -window:, -window:], log_f

    return hook


def _check_fox_model(model, caller: str, alternative: str = "") -> None:
    if not isinstance(model, ForgettingTransformerPreTrainedModel):
        raise TypeError(f"{caller} needs {alternative}a foxlab ForgettingTransformer model (ForgettingTransformerFor"
                        f"CausalLM or ForgettingTransformerModel), got {type(model).__name__}: other models have no "
                        "forget gates to show")


def _input_row(inputs, tokenizer, row: int | None, attention_mask) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The token ids (T,) of one sequence of ``inputs`` and its attention mask (T,) bool, or None without one."""
    if isinstance(inputs, str):
        inputs = _encode(inputs, tokenizer)
    if isinstance(inputs, Mapping):
        if "input_ids" not in inputs:
            raise ValueError(f"inputs is a mapping without 'input_ids' (keys: {list(inputs)}); expected {INPUTS_HELP}")
        if attention_mask is not None and inputs.get("attention_mask") is not None:
            raise ValueError("attention_mask given twice: in inputs and as attention_mask=; pass one")
        inputs, attention_mask = inputs["input_ids"], inputs.get("attention_mask", attention_mask)
    ids = _integer_tensor(inputs, "inputs")
    if ids.dim() not in (1, 2) or ids.shape[-1] == 0:
        raise ValueError(f"inputs must be token ids of shape (T,) or (B, T) with T > 0, got shape {tuple(ids.shape)}")
    mask = None
    if attention_mask is not None:
        mask = _integer_tensor(attention_mask, "attention_mask")
        if mask.shape != ids.shape or not ((mask == 0) | (mask == 1)).all():
            raise ValueError(f"attention_mask must hold 0/1 with the shape of the token ids {tuple(ids.shape)}, "
                             f"got shape {tuple(mask.shape)}")
        mask = mask.bool()
    if ids.dim() == 1:
        if row not in (None, 0):
            raise ValueError(f"row={row!r} given, but inputs hold one sequence (shape {tuple(ids.shape)})")
        return ids, mask
    if row is None and ids.shape[0] > 1:
        raise ValueError(f"inputs hold a batch of {ids.shape[0]} sequences: pass row=i to inspect one")
    row = 0 if row is None else _check(row, ids.shape[0], "row", f"inputs hold {ids.shape[0]} sequences")
    return ids[row], None if mask is None else mask[row]


def _encode(text: str, tokenizer) -> list[int]:
    if tokenizer is None:
        raise TypeError("text input needs a tokenizer; or pass token ids")
    if hasattr(tokenizer, "encode"):
        return tokenizer.encode(text)
    if callable(tokenizer):
        return tokenizer(text)["input_ids"]
    raise TypeError(f"tokenizer must have an encode method or be callable, got {type(tokenizer).__name__}")


def _integer_tensor(value, name: str) -> torch.Tensor:
    """``value`` as a CPU LongTensor; TypeError when it holds anything but integers."""
    try:
        tensor = torch.as_tensor(value).cpu()
    except (TypeError, ValueError, RuntimeError) as err:
        raise TypeError(f"{name} must be {INPUTS_HELP if name == 'inputs' else 'integers'}, "
                        f"got {type(value).__name__} ({err})") from None
    if tensor.is_floating_point() or tensor.is_complex():
        raise TypeError(f"{name} must hold integers, got {tensor.dtype}")
    return tensor.long()


def _check_vocabulary(ids: torch.Tensor, vocab_size: int) -> None:
    outside = ((ids < 0) | (ids >= vocab_size)).nonzero().flatten()
    if len(outside):
        at = int(outside[0])
        raise ValueError(f"inputs hold token id {int(ids[at])} at position {at}, outside the model's vocabulary "
                         f"(0..{vocab_size - 1}); wrong tokenizer?")


def _real_tokens(mask: torch.Tensor) -> tuple[int, int]:
    """[first, end) of the real tokens of a (T,) mask: one block of ones (left and/or right padding)."""
    real = mask.nonzero().flatten()
    if len(real) == 0:
        raise ValueError("attention_mask marks no real token in this row (all 0)")
    first, end = int(real[0]), int(real[-1]) + 1
    if len(real) != end - first:
        raise ValueError("attention_mask must be one block of ones per row (padding on the left and/or right)")
    return first, end


def _warn_unmasked_padding(ids: torch.Tensor, model, tokenizer) -> None:
    pad = getattr(tokenizer, "pad_token_id", None)
    pad = model.config.pad_token_id if pad is None else pad
    if pad is not None and bool((ids == pad).any()):
        warnings.warn(f"inputs hold {int((ids == pad).sum())} pad token(s) (id {pad}) but no attention_mask: they "
                      "are drawn as text and change the gates of the real tokens. Pass the tokenizer's output or "
                      "attention_mask= to inspect the real tokens only.", stacklevel=3)


def _token_strings(ids: list[int], tokenizer) -> list[str]:
    if tokenizer is None:
        return [str(i) for i in ids]
    if hasattr(tokenizer, "convert_ids_to_tokens"):
        tokens = tokenizer.convert_ids_to_tokens(ids)
    else:
        tokens = [tokenizer.decode([i]) for i in ids]
    return [_printable(str(tok)) for tok in tokens]


def _printable(token: str) -> str:
    """Whitespace made visible, other unprintable characters escaped."""
    token = token.replace(" ", "␣").replace("\n", "↵").replace("\t", "⇥")
    return token if token.isprintable() else token.encode("unicode_escape").decode("ascii")


def _check(index, size: int, name: str, of: str | None = None) -> int:
    """``index`` as an int in [0, size): TypeError when it is not an integer, IndexError when out of range."""
    try:
        if isinstance(index, bool):
            raise TypeError
        value = operator.index(index)
    except TypeError:
        raise TypeError(f"{name} must be an integer, got {index!r} ({type(index).__name__})") from None
    if not 0 <= value < size:
        raise IndexError(f"{name} {value} out of range: {of or f'the model has {size} {name}s'} (0..{size - 1})")
    return value


def _check_positive(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _check_bool(value, name: str) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False, got {value!r} ({type(value).__name__})")
    return bool(value)


def _check_inspection(insp, caller: str) -> None:
    if not isinstance(insp, Inspection):
        raise TypeError(f"{caller} needs an Inspection: insp = viz.inspect(model, inputs, tokenizer), then "
                        f"{caller}(insp, ...); got {type(insp).__name__}")


# --------------------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------------------


def plot_forget_gates(insp: Inspection, layer: int | None = None, heads: Sequence[int] | None = None) -> go.Figure:
    """The forget gate f_t of each head over the tokens (heads x tokens heatmap; 1 = keeps everything).

    One layer, or every layer as small multiples (shared token axis and colour scale) when ``layer`` is None.
    """
    _check_inspection(insp, "plot_forget_gates")
    layers = range(insp.num_layers) if layer is None else [_check(layer, insp.num_layers, "layer")]
    if heads is None:
        heads = list(range(insp.num_heads))
    elif isinstance(heads, (Sequence, torch.Tensor, np.ndarray)) and not isinstance(heads, str) and len(heads):
        heads = [_check(h, insp.num_heads, "head") for h in heads]
    else:
        raise TypeError(f"heads must be a non-empty list of head indices such as [0, 2], got {heads!r}")
    panel, gap = max(90, 20 * len(heads)), 45  # pixels per layer and between layers (room for its title)
    height = 200 + len(layers) * (panel + gap)
    fig = make_subplots(rows=len(layers), cols=1, shared_xaxes=True, subplot_titles=[f"layer {l}" for l in layers],
                        vertical_spacing=gap / (height - 200))
    x, y = insp.labels(), [f"head {h}" for h in heads]
    for row, l in enumerate(layers, 1):
        fig.add_trace(go.Heatmap(
            z=insp.log_f[l][:, heads].T.exp().numpy(), x=x, y=y, coloraxis="coloraxis", name=f"layer {l}",
            hovertemplate=f"layer {l}, %{{y}}<br>token %{{x}}<br>f = %{{z:.4f}}<extra></extra>"), row, 1)
    where = "all layers" if layer is None else f"layer {layer}"
    fig.update_layout(title=f"Forget gates f<sub>t</sub> per head, {where}{insp.note()}",
                      coloraxis=dict(colorscale=GATE_SCALE, cmin=0, cmax=1, colorbar_title="f"), height=height)
    fig.update_xaxes(type="category")
    fig.update_xaxes(title_text="position:token", row=len(layers), col=1)
    fig.update_yaxes(type="category", autorange="reversed")
    return fig


def plot_decay(insp: Inspection, layer: int, head: int, log: bool = True) -> go.Figure:
    """The forget-gate (decay) matrix F_ij = prod_{s=j+1..i} f_s = exp(c_i - c_j) of one head, query i by key j.

    ``log``: show log10 F (0 on the diagonal, more negative = more forgotten; colours floor at 1e-8), else F.
    The upper triangle (j > i, keys in the future) is blank.
    """
    _check_inspection(insp, "plot_decay")
    fig = go.Figure(_decay_trace(insp, layer, head, _check_bool(log, "log")))
    _map_layout(fig, f"Layer {layer}, head {head}: forget-gate matrix {'log10 F' if log else 'F'}{insp.note(True)}")
    return fig


def plot_attention(insp: Inspection, layer: int, head: int, with_decay: bool = True) -> go.Figure:
    """The attention probabilities A_ij of one head, query i by key j; beside log10 F when ``with_decay``."""
    _check_inspection(insp, "plot_attention")
    title = f"Layer {layer}, head {head}: attention A{insp.note(True)}"
    if not _check_bool(with_decay, "with_decay"):
        fig = go.Figure(_attention_trace(insp, layer, head))
        _map_layout(fig, title)
        return fig
    fig = make_subplots(rows=1, cols=2, shared_yaxes=True, horizontal_spacing=0.12,
                        subplot_titles=["forget-gate matrix log10 F", "attention A"])
    fig.add_trace(_decay_trace(insp, layer, head, True, colorbar_x=0.44), 1, 1)
    fig.add_trace(_attention_trace(insp, layer, head), 1, 2)
    _map_layout(fig, f"Layer {layer}, head {head}: forget-gate matrix F and attention A{insp.note(True)}")
    fig.update_xaxes(matches="x")
    fig.update_layout(width=1080)
    return fig


def _decay_trace(insp: Inspection, layer: int, head: int, log: bool, colorbar_x: float | None = None) -> go.Heatmap:
    d = insp.log_decay(layer, head)
    if log:
        z, name = d / math.log(10), "log10 F"
        low = z[torch.isfinite(z)].min().item()
        zmin, zmax = min(max(low, LOG10_FLOOR), -1.0), 0.0
    else:
        z, name, zmin, zmax = d.exp(), "F", 0.0, 1.0
    z = z.masked_fill(~torch.isfinite(d), math.nan).float().numpy()  # float32 halves the exported size
    labels = insp.labels(insp.window_start)
    return go.Heatmap(z=z, x=labels, y=labels, zmin=zmin, zmax=zmax, colorscale=DECAY_SCALE, name=name,
                      colorbar=dict(title=name, x=colorbar_x),
                      hovertemplate=f"query %{{y}}<br>key %{{x}}<br>{name} = %{{z:.4g}}<extra></extra>")


def _attention_trace(insp: Inspection, layer: int, head: int) -> go.Heatmap:
    a = insp.attentions[_check(layer, insp.num_layers, "layer")][_check(head, insp.num_heads, "head")]
    z = a.masked_fill(torch.ones_like(a, dtype=torch.bool).triu(1), math.nan).numpy()
    labels = insp.labels(insp.window_start)
    return go.Heatmap(z=z, x=labels, y=labels, zmin=0.0, colorscale=ATTENTION_SCALE, name="A",
                      colorbar=dict(title="A"),
                      hovertemplate="query %{y}<br>key %{x}<br>A = %{z:.4g}<extra></extra>")


def _map_layout(fig: go.Figure, title: str) -> None:
    """Query i down, key j across, both categorical position:token axes."""
    fig.update_layout(title=title, height=560, width=620, yaxis_title="query i", plot_bgcolor="white")
    fig.update_xaxes(type="category", title_text="key j")
    fig.update_yaxes(type="category", autorange="reversed")


def head_timescales(source, threshold: float = THRESHOLD) -> torch.Tensor:
    """Per layer and head, how far back it sees: the distance (tokens) at which the decay falls below ``threshold``.

    From an Inspection: the smallest d with mean_i F_{i, i-d} < threshold over the sample; inf when it never
    does within the sample. From a model: log(threshold) / log sigmoid(b) from the gate biases b; exact for
    "bias_only" and "fixed" gates; for "full" gates it is the bias alone (w . x = 0), input-independent;
    inf for layers without a gate. Returns (layers, heads), float64.
    """
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 < threshold < 1:
        raise ValueError(f"threshold must be a number between 0 and 1 (a fraction of F), got {threshold!r}")
    if isinstance(source, Inspection):
        return torch.stack([_measured_timescales(c, threshold) for c in source.c])
    _check_fox_model(source, "head_timescales", "an Inspection (viz.inspect) or ")
    rows = []
    for layer in getattr(source, "model", source).layers:
        gate = layer.attn.fgate
        if gate is None:
            rows.append(torch.full((source.config.num_heads,), math.inf, dtype=torch.float64))
        else:
            log_f = torch.nn.functional.logsigmoid(gate.bias.detach().double().cpu())
            rows.append(math.log(threshold) / log_f)
    return torch.stack(rows)


def _measured_timescales(c: torch.Tensor, threshold: float) -> torch.Tensor:
    """For c (T, H): per head the smallest d with mean_i exp(c_i - c_{i-d}) < threshold, or inf."""
    out = torch.full((c.shape[1],), math.inf, dtype=torch.float64)
    for d in range(1, c.shape[0]):
        below = torch.isinf(out) & ((c[d:] - c[:-d]).exp().mean(0) < threshold)
        out[below] = d
        if not torch.isinf(out).any():
            break
    return out


def plot_head_timescales(insp_or_model, threshold: float = THRESHOLD) -> go.Figure:
    """Layer x head grid of head timescales (see ``head_timescales``), on a log colour scale.

    From an Inspection the numbers are measured on its tokens ("≥T": never fell below within the sample);
    from a model they come from the gate biases alone ("∞": no gate, or f = 1).
    """
    ts = head_timescales(insp_or_model, threshold)
    measured = isinstance(insp_or_model, Inspection)
    horizon = insp_or_model.num_tokens if measured else math.inf
    text = [[f"≥{horizon}" if measured and math.isinf(t) else _fmt_tokens(t) for t in row] for row in ts.tolist()]
    z = torch.log10(ts.clamp(min=1, max=horizon))
    if not measured:
        z = z.masked_fill(torch.isinf(ts), math.nan)
    layers, heads = ts.shape
    source = (f"measured on {insp_or_model.num_tokens} tokens{insp_or_model.note()}" if measured else
              "from the gate biases alone: f = sigmoid(b), input-independent (full gates: w·x = 0)")
    ticks = list(range(0, 1 + max(1, math.ceil(z.nan_to_num(0).max().item()))))  # 1, 10, 100, ... tokens
    fig = go.Figure(go.Heatmap(
        z=z.numpy(), x=[f"head {h}" for h in range(heads)], y=[f"layer {l}" for l in range(layers)], text=text,
        texttemplate="%{text}" if layers * heads <= 400 else None, colorscale=GATE_SCALE, zmin=0, zmax=ticks[-1],
        colorbar=dict(title="tokens", tickvals=ticks, ticktext=[_fmt_tokens(10 ** t) for t in ticks]),
        hovertemplate="%{y}, %{x}<br>timescale %{text} tokens<extra></extra>"))
    fig.update_layout(title=f"Head timescales: tokens until the decay F < {threshold:.3g}<br><sup>{source}</sup>",
                      height=220 + 40 * layers, width=max(640, 160 + 60 * heads))
    fig.update_xaxes(type="category", title_text="head")
    fig.update_yaxes(type="category", autorange="reversed", title_text="layer")
    return fig


# Tile states of foxlab.acp.PruningStats.tiles: not needed (above the diagonal, padding), computed, skipped.
PRUNING_COLORS = [[0.0, "#ffffff"], [0.33, "#ffffff"], [0.33, "#3b528b"], [0.67, "#3b528b"], [0.67, "#fde725"],
                  [1.0, "#fde725"]]
TILE_STATES = ("not needed", "computed", "skipped")


def plot_pruning(model, inputs, layer: int, head: int, tokenizer=None, *, row: int | None = None,
                 attention_mask=None, log_eps: float = -10.0, tile: tuple[int, int] = (16, 16)) -> go.Figure:
    """Which tiles adaptive computation pruning skips for one head (right), beside its decay matrix log10 F (left).

    Pruning (``foxlab.acp``; config ``acp_log_tolerance``) drops every score whose decay log F_ij is below a
    threshold that keeps all but e^log_eps of any query's attention weight, and the kernels never compute a tile
    of ``tile`` = (queries, keys) whose scores are all dropped. Yellow: skipped; blue: computed; white: above the
    diagonal. The kernels' own tiles are 64 x 64 on a GPU; smaller ones show short inputs in more detail.
    ``inputs``, ``tokenizer``, ``row``, ``attention_mask``: as for ``inspect``.
    """
    from . import acp

    insp = inspect(model, inputs, tokenizer, row=row, attention_mask=attention_mask)
    layer, head = _check(layer, insp.num_layers, "layer"), _check(head, insp.num_heads, "head")
    if not (isinstance(tile, (tuple, list)) and len(tile) == 2 and all(isinstance(t, int) and t > 0 for t in tile)):
        raise ValueError(f"tile must be two positive integers (query rows, keys), got {tile!r}")
    ids = torch.tensor(insp.token_ids)[None].to(model.device)
    stats = acp.pruning_statistics(model, ids, log_eps=log_eps, tile=tuple(tile))
    layer_stats = stats["per_layer"][layer]
    tiles = layer_stats.tiles[0, head].float().cpu().numpy()
    (tm, tn), T, offset = tile, insp.num_tokens, insp.input_length - insp.num_tokens
    hover = [[f"queries {offset + i * tm}..{offset + min((i + 1) * tm, T) - 1}<br>keys {offset + j * tn}.."
              f"{offset + min((j + 1) * tn, T) - 1}<br>{TILE_STATES[int(t)]}" for j, t in enumerate(r)]
             for i, r in enumerate(tiles)]
    fig = make_subplots(rows=1, cols=2, horizontal_spacing=0.14,
                        subplot_titles=["forget-gate matrix log10 F", f"tiles of {tm} queries x {tn} keys"])
    fig.add_trace(_decay_trace(insp, layer, head, True, colorbar_x=0.42), 1, 1)
    fig.add_trace(go.Heatmap(z=tiles, zmin=0, zmax=2, colorscale=PRUNING_COLORS, showscale=False, text=hover,
                             hovertemplate="%{text}<extra></extra>", xgap=1, ygap=1), 1, 2)
    threshold = stats["thresholds"][layer, 0, head].item()
    fig.update_layout(
        title=f"Layer {layer}, head {head}: pruning drops {layer_stats.pruned_fraction[0, head]:.0%} of the scores, "
              f"skips {layer_stats.skipped_tile_fraction[0, head]:.0%} of the tiles<br><sub>scores with log F < "
              f"{threshold:.1f} (at most e^{log_eps:g} of any query's weight){insp.note()}</sub>",
        height=600, width=1100, plot_bgcolor="white")
    fig.update_xaxes(type="category", title_text="key j", row=1, col=1)
    fig.update_yaxes(type="category", autorange="reversed", title_text="query i", row=1, col=1)
    fig.update_xaxes(title_text="key block", row=1, col=2)
    fig.update_yaxes(autorange="reversed", title_text="query block", row=1, col=2)
    return fig


def _fmt_tokens(t: float) -> str:
    if math.isinf(t):
        return "∞"
    return f"{t / 1000:.3g}k" if t >= 1000 else f"{t:.3g}"


def _plot_losses(losses, optimal: float | None = None) -> go.Figure:
    """Loss over steps: a sequence of losses (steps 1, 2, ...), of (step, loss) pairs, or a mapping name -> either
    (e.g. {"train": [...], "eval": [(step, loss), ...]}); ``optimal`` (a loss) as a dotted horizontal line."""
    curves = losses if isinstance(losses, Mapping) else {"loss": losses}
    fig, last = go.Figure(), 1
    for name, values in curves.items():
        try:
            values = list(values)
            pairs = bool(values) and isinstance(values[0], Sequence)
            steps, ys = zip(*values) if pairs else (range(1, len(values) + 1), values)
            ys = [float(y) for y in ys]
        except (TypeError, ValueError):
            raise TypeError(f"losses must be a list of numbers, of (step, loss) pairs, or a mapping name -> either; "
                            f"got {str(values)[:80]} for {name!r}") from None
        mode = "lines" if len(values) > 20 else "lines+markers"
        fig.add_trace(go.Scatter(x=list(steps), y=ys, mode=mode, name=str(name)))
        last = max([last, *steps])
    if optimal is not None:  # a trace, not a shape: it joins the legend and the y range
        fig.add_trace(go.Scatter(x=[1, last], y=[optimal, optimal], mode="lines", name=f"optimal ({optimal:.3f})",
                                 line=dict(color="#2b8a3e", dash="dot"), hoverinfo="name"))
    fig.update_layout(title="Training loss", xaxis_title="step", yaxis_title="loss (nats per token)", height=380)
    return fig


# --------------------------------------------------------------------------------------------------
# Explorer
# --------------------------------------------------------------------------------------------------


class Explorer(widgets.VBox):
    """An ipywidgets app: input text (ids without a tokenizer), layer, head and view selectors, and ONE
    ``go.FigureWidget`` (``.figure``) redrawn in place on every change.

    Parts: ``.text``, ``.layer``, ``.head``, ``.view`` (one of VIEWS), ``.status``, ``.figure``; the current
    ``.inspection``. Editing the text re-runs the model (on Enter / leaving the box).
    """

    def __init__(self, model, inputs, tokenizer=None, *, row: int | None = None):
        self._model, self._tokenizer = model, tokenizer
        self.inspection = inspect(model, inputs, tokenizer, row=row)
        if isinstance(inputs, str):
            value = inputs
        elif tokenizer is not None:
            value = tokenizer.decode(self.inspection.token_ids)
        else:
            value = " ".join(map(str, self.inspection.token_ids))
        self.text = widgets.Textarea(value=value, description="text" if tokenizer else "token ids",
                                     continuous_update=False, layout=widgets.Layout(width="100%"))
        narrow = widgets.Layout(width="150px")
        self.layer = widgets.Dropdown(options=list(range(self.inspection.num_layers)), value=0, description="layer",
                                      layout=narrow)
        self.head = widgets.Dropdown(options=list(range(self.inspection.num_heads)), value=0, description="head",
                                     layout=narrow)
        self.view = widgets.ToggleButtons(options=VIEWS, value="decay+attention", style={"button_width": "auto"})
        self.status = widgets.HTML()
        self.figure = go.FigureWidget()
        super().__init__([self.text, widgets.HBox([self.layer, self.head, self.view]), self.status, self.figure])
        self.text.observe(self._on_text, names="value")
        for control in (self.layer, self.head, self.view):
            control.observe(lambda change: self.redraw(), names="value")
        self.redraw()

    def current_figure(self) -> go.Figure:
        """The figure the selectors ask for (drawn by the plot_* functions)."""
        insp, layer, head, view = self.inspection, self.layer.value, self.head.value, self.view.value
        if view == "gates":
            return plot_forget_gates(insp, layer)
        if view == "decay":
            return plot_decay(insp, layer, head)
        return plot_attention(insp, layer, head, with_decay=view == "decay+attention")

    def redraw(self) -> None:
        """Show current_figure() in ``.figure``: restyle in place when the traces have the same properties, else
        swap them; layout keys the new figure lacks are removed, so nothing stale stays."""
        self.head.disabled = self.view.value == "gates"
        new, fw = self.current_figure(), self.figure
        layout = new.layout.to_plotly_json()
        same = [sorted(t.to_plotly_json()) for t in fw.data] == [sorted(t.to_plotly_json()) for t in new.data]
        if not same:
            fw.data = []
            fw.add_traces([_json_safe(trace.to_plotly_json()) for trace in new.data])
        stale = set(fw.layout.to_plotly_json()) - set(layout)  # e.g. decay+attention's second axes
        if stale:
            fw.plotly_relayout({key: None for key in stale})  # (a None set inside batch_update is dropped)
        with fw.batch_update():
            if same:
                for old, trace in zip(fw.data, new.data):
                    old.update(_json_safe(trace.to_plotly_json()), overwrite=True)
            fw.layout.update(layout, overwrite=True)

    def _on_text(self, change) -> None:
        try:
            text = change["new"]
            inputs = text if self._tokenizer is not None else [int(tok) for tok in text.split()]
            insp = inspect(self._model, inputs, self._tokenizer)
        except (ValueError, TypeError, IndexError) as err:
            self.status.value = f"<span style='color:#b00'>input not used: {html.escape(str(err))}</span>"
            return
        self.inspection, self.status.value = insp, ""
        self.redraw()


def _json_safe(trace: dict) -> dict:
    """The trace with NaN in z as None: the widget sends 2-D arrays as JSON lists, and JSON has no NaN."""
    z = trace.get("z")
    if isinstance(z, np.ndarray) and z.dtype.kind == "f" and np.isnan(z).any():
        trace["z"] = np.where(np.isnan(z), None, z).tolist()
    return trace


def explore(model, inputs, tokenizer=None, *, row: int | None = None) -> Explorer:
    """An ipywidgets explorer of ``model`` on ``inputs`` (see Explorer); display it as a notebook cell's value."""
    return Explorer(model, inputs, tokenizer, row=row)


# --------------------------------------------------------------------------------------------------
# Display and export
# --------------------------------------------------------------------------------------------------


class StaticExportError(RuntimeError):
    """kaleido could not make a static image (no Chrome/Chromium, or it failed to start)."""


def find_chrome() -> str | None:
    """The Chrome/Chromium kaleido will use: $BROWSER_PATH, else the first of CHROME_NAMES on PATH, else None."""
    return os.environ.get("BROWSER_PATH") or next(filter(None, map(shutil.which, CHROME_NAMES)), None)


@contextmanager
def _browser_env():
    chrome, previous = find_chrome(), os.environ.get("BROWSER_PATH")
    if chrome:
        os.environ["BROWSER_PATH"] = chrome
    try:
        yield chrome
    finally:
        if previous is None:
            os.environ.pop("BROWSER_PATH", None)


def _check_figure(fig, caller: str) -> None:
    if not isinstance(fig, BaseFigure):
        raise TypeError(f"{caller} needs a plotly figure (such as viz.plot_attention(insp, 0, 0)), "
                        f"got {type(fig).__name__}")


def to_image(fig: go.Figure, format: str = "png", **kwargs) -> bytes:
    """A static image (png, svg, pdf, jpeg, webp) through kaleido; StaticExportError says what to install."""
    _check_figure(fig, "to_image")
    if format not in STATIC_FORMATS:
        raise ValueError(f"format must be one of {', '.join(STATIC_FORMATS)}, got {format!r}")
    with _browser_env() as chrome:
        try:
            return pio.to_image(fig, format=format, **kwargs)
        except Exception as err:  # kaleido raises several kinds; all mean "no usable browser" here
            where = f"Chromium at {chrome} failed: {err}" if chrome else INSTALL_CHROME
            raise StaticExportError(where) from err


def save(fig: go.Figure, path, **kwargs) -> Path:
    """Write ``fig`` to ``path`` by its suffix: .html fully offline (plotly.js embedded, no network script),
    .png/.svg/.pdf/.jpeg/.webp through kaleido (needs Chrome/Chromium; see find_chrome). Returns the path.

    Offline HTML carries no MathJax, so LaTeX text (``$...$``) would show as raw source: save warns about it
    (foxlab's own figures use HTML sub/superscripts instead)."""
    _check_figure(fig, "save")
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a file name (str or Path), got {type(path).__name__}")
    path = Path(path)
    suffix = path.suffix.lower().lstrip(".")
    if suffix in ("html", "htm"):
        latex = _latex_strings(fig)
        if latex:
            warnings.warn(f"{path.name}: LaTeX text needs MathJax, which offline HTML does not carry, so it shows "
                          f"as raw source: {latex[0][:60]!r}; write it with HTML (<sub>, <sup>) and Unicode "
                          "instead", stacklevel=2)
        fig.write_html(path, include_plotlyjs=True, include_mathjax=False, full_html=True)
    elif suffix in STATIC_FORMATS or suffix == "jpg":
        path.write_bytes(to_image(fig, "jpeg" if suffix == "jpg" else suffix, **kwargs))
    else:
        raise ValueError(f"unknown figure format {path.suffix!r}: use .html, .png, .svg, .pdf, .jpeg or .webp")
    return path


def _latex_strings(fig: go.Figure) -> list[str]:
    """The texts of ``fig`` that plotly renders with MathJax (those wrapped in $...$)."""
    found, stack = [], [fig.to_plotly_json()]
    while stack:
        item = stack.pop()
        if isinstance(item, str) and len(item) > 1 and item.startswith("$") and item.endswith("$"):
            found.append(item)
        elif isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
    return found


def show(fig: go.Figure, path=None) -> Path | None:
    """Show ``fig`` wherever this runs.

    In a Jupyter kernel (JupyterLab, Notebook, VS Code, Colab): the interactive figure at once, then the same output
    updated to carry a static PNG too (kaleido; what GitHub and nbviewer show). Without Chrome/Chromium:
    interactive only, with a one-line note, through plotly's default renderer (so Colab, whose renderer is HTML,
    draws it too). Returns None.

    Elsewhere (a script, terminal IPython): writes the figure as offline HTML to ``path`` (default: a new file in
    the temp folder), prints where, opens it in the web browser when there is a graphical one, and returns the path.

    Why an update and not one bundle: JupyterLab's plotly renderer shows a bundle's PNG instead of the interactive
    plot, but keeps an already drawn plot when its output is updated. VS Code and nbconvert take the updated output.
    """
    _check_figure(fig, "show")
    if not _in_jupyter_kernel():
        return _show_in_browser(fig, path)
    from IPython.display import display

    if find_chrome() is None or "colab" in str(pio.renderers.default):
        fig.show()
        if find_chrome() is None:
            print("foxlab.viz.show: interactive only, no static PNG (no Chrome/Chromium: apt-get install -y chromium)")
        return None
    bundle = pio.renderers["plotly_mimetype"].to_mimebundle(fig.to_dict())
    handle = display(bundle, raw=True, display_id=True)
    try:
        png = to_image(fig, "png")
    except StaticExportError as err:
        print(f"foxlab.viz.show: interactive only, no static PNG ({str(err).splitlines()[0][:200]})")
        return None
    handle.update({**bundle, "image/png": base64.b64encode(png).decode("ascii")}, raw=True)
    return None


def _in_jupyter_kernel() -> bool:
    """True inside a Jupyter kernel (the shell has a kernel); False in a plain script or terminal IPython."""
    if "IPython" not in sys.modules:
        return False
    shell = sys.modules["IPython"].get_ipython()
    return shell is not None and getattr(shell, "kernel", None) is not None


def _show_in_browser(fig: go.Figure, path) -> Path:
    if path is None:
        handle, name = tempfile.mkstemp(prefix="foxlab-figure-", suffix=".html")
        os.close(handle)
        path = name
    path = save(fig, path).resolve()
    # On Linux without a desktop, webbrowser falls back to text browsers (lynx, w3m) that take over the terminal.
    graphical = bool(os.environ.get("BROWSER") or os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")
                     or sys.platform in ("darwin", "win32"))
    opened = graphical and webbrowser.open(path.as_uri())
    print(f"foxlab.viz.show: figure written to {path}" + ("; opened in the web browser" if opened else
                                                          "; open it in a web browser"))
    return path


def write_report(path, model, input_ids, *, tokenizer=None, losses=None, marked_positions=None,
                 title: str = "foxlab report", description: str | None = None,
                 metrics: Mapping | None = None) -> Path:
    """One offline HTML page (plotly.js embedded once, no network) about ``model`` on the sample ``input_ids``:

    - ``description``: what the model learned, in a sentence or two (e.g. ``task.describe()``);
    - a results table from ``metrics``, with what each number means; it shows those of ``step``, ``final_loss``,
      ``eval_loss``, ``optimal_loss``, ``boundary_forget_ratio`` and ``boundary_forget_head`` ({"layer", "head"})
      that are present (``foxlab.train.demo``'s metrics.json has them all);
    - the loss curves (``losses``: see _plot_losses), with ``optimal_loss`` as a dotted line;
    - every layer's gates, ``marked_positions`` (positions of ``input_ids`` such as its ``<reset>`` tokens, or a
      boolean mask over it) as dashed lines, every marked tick labelled;
    - F beside A for one head: ``boundary_forget_head`` when given, else the head whose gate is lowest at the
      marked positions, else layer 0, head 0; then the head-timescale grid.
    """
    for name, text in (("title", title), ("description", description)):
        if not (text is None and name == "description") and not isinstance(text, str):
            raise TypeError(f"{name} must be a string, got {type(text).__name__}")
    if metrics is not None and not isinstance(metrics, Mapping):
        raise TypeError(f"metrics must be a mapping such as metrics.json's, got {type(metrics).__name__}")
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a file name (str or Path), got {type(path).__name__}")
    metrics = dict(metrics or {})
    insp = inspect(model, input_ids, tokenizer)
    marks = _report_marks(marked_positions, insp)
    gates = plot_forget_gates(insp)
    for m in marks:
        gates.add_vline(x=m, line=dict(color=MARK_COLOR, dash="dash", width=1), row="all", col=1)
    _label_ticks(gates, insp.labels(), marks, "x", per_axis=24)
    layer, head, why = _report_head(insp, marks, metrics.get("boundary_forget_head"))
    maps = plot_attention(insp, layer, head)
    window_marks = [m - insp.window_start for m in marks if m >= insp.window_start]
    for axis in ("x", "y"):
        _label_ticks(maps, insp.labels(insp.window_start), window_marks, axis, per_axis=12)
    mark_note = f"{len(marks)} marked position(s) (dashed lines, orange tick labels)" if marks else "no marks"
    sections = [] if losses is None else [("Training loss", "Loss per token (nats) over the training steps.",
                                           _plot_losses(losses, metrics.get("optimal_loss")))]
    sections += [
        ("Forget gates", f"f_t per head and token (1 keeps everything, 0 forgets everything before t); "
                         f"{mark_note}.", gates),
        (f"Decay and attention: layer {layer}, head {head}",
         f"{why} Left: log10 F, where F_ij = exp(c_i - c_j) is the factor forgetting puts on the attention from "
         "query i to key j. Right: the attention A it produced.", maps),
        ("Head timescales", "How far back each head sees on this sample.", plot_head_timescales(insp)),
    ]
    cfg = model.config
    summary = (f"Model: {cfg.num_hidden_layers} layers x {cfg.num_heads} heads, fgate_type={cfg.fgate_type!r}. "
               f"Figures: one sample of {insp.num_tokens} tokens{insp.note()}.")
    intro = "".join(f"<p>{html.escape(text)}</p>" for text in (description, summary) if text)
    body = "\n".join(f"<section><h2>{html.escape(name)}</h2><p>{html.escape(text)}</p>"
                     f"{pio.to_html(fig, include_plotlyjs=False, full_html=False)}</section>"
                     for name, text, fig in sections)
    page = (f"<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>{html.escape(title)}</title>\n"
            f"<style>{REPORT_STYLE}</style>\n"
            f"<script type='text/javascript'>{get_plotlyjs()}</script>\n</head><body>\n"
            f"<h1>{html.escape(title)}</h1>{intro}\n{_results_table(metrics)}\n{body}\n</body></html>\n")
    path = Path(path)
    path.write_text(page, encoding="utf-8")
    return path


MARK_COLOR = "#e8590c"
REPORT_STYLE = ("body{font-family:system-ui,sans-serif;max-width:1200px;margin:auto;padding:1em}"
                "table{border-collapse:collapse}td{padding:.25em .8em;border-bottom:1px solid #ddd;vertical-align:top}"
                "td:nth-child(2){font-variant-numeric:tabular-nums;white-space:nowrap}")


def _report_marks(marked_positions, insp: Inspection) -> list[int]:
    """Marked input positions (a list of them, or a boolean mask) as sorted indices into the kept tokens."""
    marks = torch.as_tensor([] if marked_positions is None else marked_positions).flatten()
    if marks.is_floating_point() and len(marks):
        raise TypeError(f"marked_positions must be integer positions or a boolean mask, got {marks.dtype}")
    marks = marks.nonzero().flatten() if marks.dtype == torch.bool else marks.long()
    offset = insp.input_length - insp.num_tokens
    return sorted({p - offset for p in marks.tolist() if offset <= p < insp.input_length})


def _report_head(insp: Inspection, marks: list[int], chosen) -> tuple[int, int, str]:
    """(layer, head, why this head) for the report's F and A maps."""
    if chosen is not None:
        if not isinstance(chosen, Mapping) or not {"layer", "head"} <= set(chosen):
            raise TypeError(f"metrics['boundary_forget_head'] must be {{'layer': l, 'head': h}}, got {chosen!r}")
        layer, head = _check(chosen["layer"], insp.num_layers, "layer"), _check(chosen["head"], insp.num_heads, "head")
        return layer, head, ("The head with the lowest boundary_forget_ratio: the one that forgets most at <reset> "
                             "(see Results).")
    if marks:
        layer, head = _most_forgetting_head(insp, marks)
        return layer, head, "The head whose forget gate is lowest, on average, at the marked positions."
    return 0, 0, "Layer 0, head 0 (no marked positions to choose a head by)."


def _label_ticks(fig: go.Figure, labels: list[str], marks: list[int], axis: str, per_axis: int) -> None:
    """Tick labels on every ``axis`` ("x" or "y") of ``fig``: every marked position (orange), plus about
    ``per_axis`` evenly spaced ones that keep clear of the marks."""
    step = _nice_step(len(labels) / per_axis)
    regular = [i for i in range(0, len(labels), step) if all(abs(i - m) > step // 2 for m in marks)]
    ticks = sorted(set(regular) | set(marks))
    text = [f"<span style='color:{MARK_COLOR}'><b>{labels[i]}</b></span>" if i in marks else labels[i]
            for i in ticks]
    update = fig.update_xaxes if axis == "x" else fig.update_yaxes
    update(tickmode="array", tickvals=[labels[i] for i in ticks], ticktext=text)


def _nice_step(at_least: float) -> int:
    """The smallest of 1, 2, 5, 10, 20, 50, ... that is >= at_least."""
    scale = 1
    while True:
        for base in (1, 2, 5):
            if base * scale >= at_least:
                return base * scale
        scale *= 10


RESULT_ROWS = {  # metric: (label, what it means)
    "step": ("training steps", ""),
    "final_loss": ("final training loss", "nats per scored token, the last step's batch"),
    "eval_loss": ("eval loss", "nats per scored token on held-out samples"),
    "optimal_loss": ("optimal loss", "the Bayes-optimal loss: the best any predictor can do on this data, knowing "
                                     "how it is generated (dotted line on the loss plot)"),
    "boundary_forget_ratio": ("boundary_forget_ratio", "mean forget gate f at <reset> divided by its mean elsewhere, "
                                                       "for the head where it is lowest. 1: the gate ignores resets; "
                                                       "near 0: the head erases its memory at every reset, which is "
                                                       "what the task rewards (nothing before a reset helps after it)"),
}


def _results_table(metrics: dict) -> str:
    rows = []
    for key, (label, meaning) in RESULT_ROWS.items():
        value = metrics.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"metrics[{key!r}] must be a number, got {value!r}")
        shown = f"{value}" if isinstance(value, int) else f"{value:.4g}"
        if key == "boundary_forget_ratio" and "boundary_forget_head" in metrics:
            where = metrics["boundary_forget_head"]
            shown += f" (layer {where['layer']}, head {where['head']})"
        if key == "eval_loss" and metrics.get("optimal_loss") is not None:
            meaning += f"; {value - metrics['optimal_loss']:.3g} above the optimal loss"
        rows.append(f"<tr><td>{html.escape(label)}</td><td>{html.escape(shown)}</td><td>{html.escape(meaning)}</td>"
                    "</tr>")
    return f"<section><h2>Results</h2><table>{''.join(rows)}</table></section>" if rows else ""


def _most_forgetting_head(insp: Inspection, marks: list[int]) -> tuple[int, int]:
    """(layer, head) with the lowest mean log f over the marked tokens; (0, 0) without marks."""
    if not marks:
        return 0, 0
    scores = torch.stack([g[marks].mean(0) for g in insp.log_f])  # (layers, heads)
    index = int(scores.argmin())
    return divmod(index, insp.num_heads)
