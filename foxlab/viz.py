"""See what each FoX head forgets: interactive plotly figures, an ipywidgets explorer, offline export.

FoX (FOX.md section 1) gives every head a forget gate f_t = exp(log f_t) per token; its prefix sum
c_t = sum_{s <= t} log f_s gives the decay (forget-gate) matrix F_ij = prod_{s=j+1..i} f_s = exp(c_i - c_j)
on j <= i, the bias that the attention A = softmax(s q k^T + log F) adds to its scores.

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
import os
import shutil
from collections.abc import Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import ipywidgets as widgets
import numpy as np
import plotly.graph_objects as go
import plotly.io as pio
import torch
from plotly.offline import get_plotlyjs
from plotly.subplots import make_subplots

__all__ = [
    "Explorer", "Inspection", "StaticExportError", "explore", "find_chrome", "head_timescales", "inspect",
    "plot_attention", "plot_decay", "plot_forget_gates", "plot_head_timescales", "save", "show", "to_image",
    "write_report",
]

MAX_TOKENS = 4096  # tokens an inspection keeps (the end of a longer input)
MAX_MAP_TOKENS = 512  # tokens per axis of a T x T map (the end of a longer inspection)
THRESHOLD = math.exp(-1)  # head timescale: the distance at which the decay falls below this
LOG10_FLOOR = -8.0  # colour floor of log10 F maps (the data and hover keep every value)
GATE_SCALE, DECAY_SCALE, ATTENTION_SCALE = "Viridis", "Viridis", "Cividis"  # colour-blind safe
VIEWS = ("gates", "decay", "attention", "decay+attention")
CHROME_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")
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


def inspect(model, inputs, tokenizer=None, *, row: int | None = None, max_tokens: int = MAX_TOKENS,
            max_map_tokens: int = MAX_MAP_TOKENS) -> Inspection:
    """Run ``model`` once (eval mode, no grad) and collect every layer's gates, decay and attention.

    inputs: token ids (T,) or (B, T) (pick a row of a batch with ``row``), or text with a ``tokenizer``
    (anything with ``encode`` or ``__call__``; tokens are shown through ``convert_ids_to_tokens`` or ``decode``).
    Inputs longer than ``max_tokens`` keep their last ``max_tokens`` tokens; attention maps keep the last
    ``max_map_tokens`` (cropped layer by layer, so memory holds one full T x T map at a time).
    """
    ids = _input_ids(inputs, tokenizer, row)
    input_length, ids = len(ids), ids[-max_tokens:]
    window = min(len(ids), max_map_tokens)
    layers = getattr(model, "model", model).layers
    hooks = [layer.attn.register_forward_hook(_crop_attention(window)) for layer in layers]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            out = model(input_ids=ids[None].to(model.device), output_attentions=True,
                        output_forget_gates=True, use_cache=False)
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    log_f = [g[0].float().cpu() for g in out.forget_gates]
    return Inspection(
        token_ids=ids.tolist(), tokens=_token_strings(ids.tolist(), tokenizer), input_length=input_length,
        log_f=log_f, c=[g.double().cumsum(0) for g in log_f], attentions=[a[0].float().cpu() for a in out.attentions],
        fgate_type=model.config.fgate_type,
    )


def _crop_attention(window: int):
    """A forward hook for ForgettingAttention (output, probs (B, H, T, T), log f): keep probs' last window."""

    def hook(module, args, output):
        o, probs, log_f = output
        return o, probs[..., -window:, -window:], log_f

    return hook


def _input_ids(inputs, tokenizer, row: int | None) -> torch.Tensor:
    if isinstance(inputs, str):
        if tokenizer is None:
            raise TypeError("text input needs a tokenizer; or pass token ids")
        inputs = tokenizer.encode(inputs) if hasattr(tokenizer, "encode") else tokenizer(inputs)["input_ids"]
    ids = torch.as_tensor(inputs, dtype=torch.long).cpu()
    if ids.dim() == 2:
        if ids.shape[0] > 1 and row is None:
            raise ValueError(f"inputs hold a batch of {ids.shape[0]} sequences: pass row=i to inspect one")
        ids = ids[row or 0]
    if ids.dim() != 1 or ids.numel() == 0:
        raise ValueError(f"inputs must be token ids of shape (T,) or (B, T) with T > 0, got {tuple(ids.shape)}")
    return ids


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


def _check(index: int, size: int, name: str) -> int:
    if not 0 <= index < size:
        raise IndexError(f"{name} {index} out of range: the model has {size} {name}s")
    return index


# --------------------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------------------


def plot_forget_gates(insp: Inspection, layer: int | None = None, heads: Sequence[int] | None = None) -> go.Figure:
    """The forget gate f_t of each head over the tokens (heads x tokens heatmap; 1 = keeps everything).

    One layer, or every layer as small multiples (shared token axis and colour scale) when ``layer`` is None.
    """
    layers = range(insp.num_layers) if layer is None else [_check(layer, insp.num_layers, "layer")]
    heads = list(range(insp.num_heads)) if heads is None else [_check(h, insp.num_heads, "head") for h in heads]
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
    fig = go.Figure(_decay_trace(insp, layer, head, log))
    _map_layout(fig, f"Layer {layer}, head {head}: forget-gate matrix {'log10 F' if log else 'F'}{insp.note(True)}")
    return fig


def plot_attention(insp: Inspection, layer: int, head: int, with_decay: bool = True) -> go.Figure:
    """The attention probabilities A_ij of one head, query i by key j; beside log10 F when ``with_decay``."""
    title = f"Layer {layer}, head {head}: attention A{insp.note(True)}"
    if not with_decay:
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
    if isinstance(source, Inspection):
        return torch.stack([_measured_timescales(c, threshold) for c in source.c])
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


def _fmt_tokens(t: float) -> str:
    if math.isinf(t):
        return "∞"
    return f"{t / 1000:.3g}k" if t >= 1000 else f"{t:.3g}"


def _plot_losses(losses) -> go.Figure:
    """Training loss over steps: a sequence of losses (steps 1, 2, ...), of (step, loss) pairs, or a mapping
    name -> either (e.g. {"train": [...], "eval": [(step, loss), ...]})."""
    curves = losses if isinstance(losses, Mapping) else {"loss": losses}
    fig = go.Figure()
    for name, values in curves.items():
        values = list(values)
        steps, ys = zip(*values) if values and isinstance(values[0], Sequence) else (range(1, len(values) + 1), values)
        fig.add_trace(go.Scatter(x=list(steps), y=[float(y) for y in ys], mode="lines", name=str(name)))
    fig.update_layout(title="Training loss", xaxis_title="step", yaxis_title="loss", height=380)
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


def to_image(fig: go.Figure, format: str = "png", **kwargs) -> bytes:
    """A static image (png, svg, pdf, jpeg, webp) through kaleido; StaticExportError says what to install."""
    with _browser_env() as chrome:
        try:
            return pio.to_image(fig, format=format, **kwargs)
        except Exception as err:  # kaleido raises several kinds; all mean "no usable browser" here
            where = f"Chromium at {chrome} failed: {err}" if chrome else INSTALL_CHROME
            raise StaticExportError(where) from err


def save(fig: go.Figure, path, **kwargs) -> Path:
    """Write ``fig`` to ``path`` by its suffix: .html fully offline (plotly.js embedded, no network script),
    .png/.svg/.pdf/.jpeg/.webp through kaleido (needs Chrome/Chromium; see find_chrome). Returns the path."""
    path = Path(path)
    suffix = path.suffix.lower().lstrip(".")
    if suffix in ("html", "htm"):
        fig.write_html(path, include_plotlyjs=True, include_mathjax=False, full_html=True)
    elif suffix in ("png", "svg", "pdf", "jpeg", "jpg", "webp"):
        path.write_bytes(to_image(fig, "jpeg" if suffix == "jpg" else suffix, **kwargs))
    else:
        raise ValueError(f"unknown figure format {path.suffix!r}: use .html, .png, .svg, .pdf, .jpeg or .webp")
    return path


def show(fig: go.Figure) -> None:
    """Display ``fig`` in a notebook: the interactive figure at once, then the same output updated to carry a
    static PNG too (kaleido; what GitHub and nbviewer show). Without Chrome/Chromium: interactive only, with a
    one-line note, through plotly's default renderer (so Colab, whose renderer is HTML, draws it too).

    Why an update and not one bundle: JupyterLab's plotly renderer shows a bundle's PNG instead of the interactive
    plot, but keeps an already drawn plot when its output is updated. VS Code and nbconvert take the updated output.
    """
    from IPython.display import display

    if find_chrome() is None or "colab" in str(pio.renderers.default):
        fig.show()
        if find_chrome() is None:
            print("foxlab.viz.show: interactive only, no static PNG (no Chrome/Chromium: apt-get install -y chromium)")
        return
    bundle = pio.renderers["plotly_mimetype"].to_mimebundle(fig.to_dict())
    handle = display(bundle, raw=True, display_id=True)
    try:
        png = to_image(fig, "png")
    except StaticExportError as err:
        print(f"foxlab.viz.show: interactive only, no static PNG ({str(err).splitlines()[0][:200]})")
        return
    handle.update({**bundle, "image/png": base64.b64encode(png).decode("ascii")}, raw=True)


def write_report(path, model, input_ids, *, tokenizer=None, losses=None, marked_positions=None,
                 title: str = "foxlab report") -> Path:
    """One offline HTML page (plotly.js embedded once): the loss curve (when ``losses``, see _plot_losses), every
    layer's gates over ``input_ids`` with ``marked_positions`` (input positions such as reset tokens, or a boolean
    mask over the input) as dashed lines, F and A of the head that forgets most at the marked positions (else
    layer 0, head 0), and the head-timescale grid."""
    insp = inspect(model, input_ids, tokenizer)
    offset = insp.input_length - insp.num_tokens
    marks = torch.as_tensor([] if marked_positions is None else marked_positions).flatten()
    marks = marks.nonzero().flatten() if marks.dtype == torch.bool else marks.long()
    marks = sorted({p - offset for p in marks.tolist() if offset <= p < insp.input_length})
    gates = plot_forget_gates(insp)
    for m in marks:
        gates.add_vline(x=m, line=dict(color="#e8590c", dash="dash", width=1), row="all", col=1)
    layer, head = _most_forgetting_head(insp, marks)
    sections = [] if losses is None else [("Training loss", "", _plot_losses(losses))]
    sections += [
        ("Forget gates", "f_t per head and token (1 keeps everything, 0 forgets everything before t); "
                         f"{len(marks)} marked position(s) as dashed lines.", gates),
        (f"Decay and attention: layer {layer}, head {head}",
         "The head with the lowest mean log f at the marked positions (layer 0, head 0 without marks). "
         "F_ij = exp(c_i - c_j) is the factor forgetting puts on the attention from query i to key j.",
         plot_attention(insp, layer, head)),
        ("Head timescales", "How far back each head sees on this sample.", plot_head_timescales(insp)),
    ]
    cfg = model.config
    summary = (f"{cfg.num_hidden_layers} layers x {cfg.num_heads} heads, fgate_type={cfg.fgate_type!r}; "
               f"{insp.num_tokens} tokens{insp.note()}.")
    body = "\n".join(f"<section><h2>{html.escape(name)}</h2><p>{html.escape(text)}</p>"
                     f"{pio.to_html(fig, include_plotlyjs=False, full_html=False)}</section>"
                     for name, text, fig in sections)
    page = (f"<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>{html.escape(title)}</title>\n"
            "<style>body{font-family:system-ui,sans-serif;max-width:1200px;margin:auto;padding:1em}</style>\n"
            "<script type='text/javascript'>window.PlotlyConfig = {MathJaxConfig: 'local'};</script>\n"
            f"<script type='text/javascript'>{get_plotlyjs()}</script>\n</head><body>\n"
            f"<h1>{html.escape(title)}</h1><p>{html.escape(summary)}</p>\n{body}\n</body></html>\n")
    path = Path(path)
    path.write_text(page, encoding="utf-8")
    return path


def _most_forgetting_head(insp: Inspection, marks: list[int]) -> tuple[int, int]:
    """(layer, head) with the lowest mean log f over the marked tokens; (0, 0) without marks."""
    if not marks:
        return 0, 0
    scores = torch.stack([g[marks].mean(0) for g in insp.log_f])  # (layers, heads)
    index = int(scores.argmin())
    return divmod(index, insp.num_heads)
