"""foxlab.viz: the figures carry the model's real numbers; explorer, export and report work offline."""

import base64
import json
import math
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

go = pytest.importorskip("plotly.graph_objects", reason="plotly is a foxlab dependency; only bare GPU images lack it")

from foxlab import ForgettingTransformerConfig, ForgettingTransformerForCausalLM
from foxlab import viz
from foxlab.data import ByteTokenizer as FoxTokenizer

T = 24
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def make_model(**overrides) -> ForgettingTransformerForCausalLM:
    torch.manual_seed(0)
    config = ForgettingTransformerConfig.from_preset("tiny", num_hidden_layers=2, **overrides)
    return ForgettingTransformerForCausalLM(config)


def random_ids(n: int = T, seed: int = 1) -> torch.Tensor:
    return torch.randint(4, 260, (n,), generator=torch.Generator().manual_seed(seed))


class ByteTokenizer:
    """Minimal stand-in: bytes at 4..259, specials 0..3 with HTML-like names."""

    specials = ["<pad>", "<bos>", "<eos>", "<reset>"]

    def encode(self, text):
        return [b + 4 for b in text.encode()]

    def convert_ids_to_tokens(self, ids):
        return [self.specials[i] if i < 4 else chr(i - 4) for i in ids]

    def decode(self, ids):
        return bytes(i - 4 for i in ids if i >= 4).decode(errors="replace")


@pytest.fixture(scope="module")
def model():
    # Spread gate biases so heads forget at different rates (timescales 2..64 tokens).
    return make_model(fgate_init_timescales=[2.0, 64.0])


@pytest.fixture(scope="module")
def ids():
    return random_ids()


@pytest.fixture(scope="module")
def reference(model, ids):
    with torch.no_grad():
        return model.eval()(ids[None], output_attentions=True, output_forget_gates=True, use_cache=False)


@pytest.fixture(scope="module")
def insp(model, ids):
    return viz.inspect(model, ids)


def z(trace) -> torch.Tensor:
    return torch.as_tensor(np.asarray(trace.z, dtype=np.float64))


def decay_by_loop(log_f: torch.Tensor) -> torch.Tensor:
    """F_ij = prod_{s=j+1..i} f_s (float64, NaN above the diagonal), straight from the definition."""
    n = log_f.shape[0]
    out = torch.full((n, n), math.nan, dtype=torch.float64)
    for i in range(n):
        for j in range(i + 1):
            out[i, j] = math.exp(log_f[j + 1 : i + 1].double().sum().item())
    return out


def lower(a: torch.Tensor) -> torch.Tensor:
    return torch.nan_to_num(a.double(), nan=0.0).tril()


# --- inspect ----------------------------------------------------------------------------------------


def test_inspection_holds_the_models_numbers(insp, reference, ids):
    assert insp.token_ids == ids.tolist() and insp.tokens == [str(i) for i in ids.tolist()]
    assert (insp.num_layers, insp.num_heads, insp.num_tokens, insp.window_start) == (2, 4, T, 0)
    for layer in range(2):
        torch.testing.assert_close(insp.log_f[layer], reference.forget_gates[layer][0])
        torch.testing.assert_close(insp.attentions[layer], reference.attentions[layer][0])
        torch.testing.assert_close(insp.c[layer], reference.forget_gates[layer][0].double().cumsum(0))


def test_inspect_text_2d_and_batches(model, ids):
    tok = ByteTokenizer()
    from_text = viz.inspect(model, "hi <there>", tok)
    assert from_text.tokens == ["h", "i", "␣", "<", "t", "h", "e", "r", "e", ">"]
    assert viz.inspect(model, ids[None]).token_ids == ids.tolist()
    batch = torch.stack([ids, random_ids(seed=2)])
    with pytest.raises(ValueError, match="row="):
        viz.inspect(model, batch)
    assert viz.inspect(model, batch, row=1).token_ids == batch[1].tolist()
    with pytest.raises(TypeError, match="tokenizer"):
        viz.inspect(model, "text without a tokenizer")


def test_inspect_restores_training_mode(ids):
    model = make_model().train()
    viz.inspect(model, ids)
    assert model.training


# --- figures ----------------------------------------------------------------------------------------


def test_gate_heatmap_is_exp_log_f(insp, reference):
    fig = viz.plot_forget_gates(insp)
    assert len(fig.data) == 2 and "all layers" in fig.layout.title.text
    for layer, trace in enumerate(fig.data):
        torch.testing.assert_close(z(trace), reference.forget_gates[layer][0].T.double().exp())
        assert trace.coloraxis == "coloraxis"  # one shared colour scale
    assert fig.layout.coloraxis.cmin == 0 and fig.layout.coloraxis.cmax == 1
    one = viz.plot_forget_gates(insp, layer=1, heads=[3, 1])
    assert len(one.data) == 1 and "layer 1" in one.layout.title.text
    assert list(one.data[0].y) == ["head 3", "head 1"]
    torch.testing.assert_close(z(one.data[0]), reference.forget_gates[1][0][:, [3, 1]].T.double().exp())
    with pytest.raises(IndexError, match="layer 5"):
        viz.plot_forget_gates(insp, layer=5)


def test_hover_labels_hold_tokens_and_positions(model):
    tok = ByteTokenizer()
    ids = [1] + tok.encode("ab\nc") + [3]
    insp = viz.inspect(model, ids, tok)
    expected = ["0:&lt;bos&gt;", "1:a", "2:b", "3:↵", "4:c", "5:&lt;reset&gt;"]
    gates = viz.plot_forget_gates(insp, layer=0).data[0]
    assert list(gates.x) == expected and "%{x}" in gates.hovertemplate
    attention = viz.plot_attention(insp, 0, 0, with_decay=False).data[0]
    assert list(attention.x) == expected and list(attention.y) == expected
    assert "%{x}" in attention.hovertemplate and "%{y}" in attention.hovertemplate


def test_decay_is_exp_of_cumsum_differences(insp, reference):
    for layer, head in [(0, 0), (1, 3)]:
        expected = decay_by_loop(reference.forget_gates[layer][0][:, head])
        fig = viz.plot_decay(insp, layer, head)
        assert f"Layer {layer}, head {head}" in fig.layout.title.text
        log10 = z(fig.data[0])
        assert torch.isnan(log10[torch.ones(T, T, dtype=torch.bool).triu(1)]).all()  # upper triangle blank
        torch.testing.assert_close(lower(10 ** log10), lower(expected), rtol=1e-5, atol=1e-12)
        linear = z(viz.plot_decay(insp, layer, head, log=False).data[0])
        torch.testing.assert_close(lower(linear), lower(expected), rtol=1e-5, atol=1e-12)


def test_attention_map_is_output_attentions(insp, reference):
    fig = viz.plot_attention(insp, 1, 2)
    assert len(fig.data) == 2 and "Layer 1, head 2" in fig.layout.title.text
    decay, attention = fig.data
    expected = reference.attentions[1][0][2].double()
    torch.testing.assert_close(lower(z(attention)), expected)
    torch.testing.assert_close(lower(10 ** z(decay)), lower(decay_by_loop(reference.forget_gates[1][0][:, 2])),
                               rtol=1e-5, atol=1e-12)
    alone = viz.plot_attention(insp, 1, 2, with_decay=False)
    assert len(alone.data) == 1
    torch.testing.assert_close(lower(z(alone.data[0])), expected)
    for trace in fig.data:
        assert trace.colorscale is not None and trace.colorbar.title.text


def test_head_timescales_from_model_and_sample(model, insp):
    # sigmoid(b) = exp(-1/T_h) with T_h log-spaced 2..64: the model's timescales are those T_h.
    expected = torch.logspace(math.log10(2), math.log10(64), 4, dtype=torch.float64)
    torch.testing.assert_close(viz.head_timescales(model), expected.expand(2, 4), rtol=1e-5, atol=0)
    measured = viz.head_timescales(insp)
    for layer in range(2):
        c = insp.c[layer]
        for head in range(4):
            dist = next((d for d in range(1, T) if (c[d:, head] - c[:-d, head]).exp().mean() < math.exp(-1)),
                        math.inf)
            assert measured[layer, head] == dist
    fig = viz.plot_head_timescales(insp)
    assert len(fig.data) == 1 and "measured on 24 tokens" in fig.layout.title.text
    assert list(fig.data[0].y) == ["layer 0", "layer 1"] and len(fig.data[0].x) == 4
    from_model = viz.plot_head_timescales(model)
    assert "gate biases" in from_model.layout.title.text and "input-independent" in from_model.layout.title.text


def test_long_inputs_are_cropped_with_a_note(model):
    ids = random_ids(600, seed=3)
    with torch.no_grad():
        ref = model.eval()(ids[None], output_attentions=True, output_forget_gates=True, use_cache=False)
    insp = viz.inspect(model, ids)
    assert insp.num_tokens == 600 and insp.window_start == 600 - viz.MAX_MAP_TOKENS
    fig = viz.plot_attention(insp, 0, 1)
    assert "last 512 of 600 tokens" in fig.layout.title.text
    assert np.asarray(fig.data[1].z).shape == (512, 512) and fig.data[1].x[0].startswith("88:")
    torch.testing.assert_close(lower(z(fig.data[1])), ref.attentions[0][0][1, -512:, -512:].double().tril())
    decay = z(fig.data[0])
    c = ref.forget_gates[0][0][:, 1].double().cumsum(0)[-512:]
    torch.testing.assert_close(lower(10 ** decay), lower((c[:, None] - c[None, :]).exp()), rtol=1e-5, atol=1e-12)
    cropped = viz.inspect(model, ids, max_tokens=100)
    assert cropped.num_tokens == 100 and cropped.labels()[0].startswith("500:")
    assert "last 100 of 600 tokens" in viz.plot_forget_gates(cropped).layout.title.text


def test_model_without_gate_forgets_nothing(ids):
    model = make_model(fgate_type="none")
    insp = viz.inspect(model, ids)
    for trace in viz.plot_forget_gates(insp).data:
        assert (z(trace) == 1).all()
    assert (lower(z(viz.plot_decay(insp, 1, 2).data[0])) == 0).all()  # log10 F = 0: F = 1
    assert torch.isinf(viz.head_timescales(insp)).all() and torch.isinf(viz.head_timescales(model)).all()
    assert {t for row in viz.plot_head_timescales(insp).data[0].text for t in row} == {f"≥{T}"}
    assert {t for row in viz.plot_head_timescales(model).data[0].text for t in row} == {"∞"}


# --- explorer ---------------------------------------------------------------------------------------


def test_explorer_updates_one_figure_in_place(model, ids):
    app = viz.explore(model, ids)
    fw = app.figure
    assert isinstance(fw, go.FigureWidget) and fw in app.children
    expected_traces = {"gates": 1, "decay": 1, "attention": 1, "decay+attention": 2}
    assert app.view.value == "decay+attention" and len(fw.data) == 2
    before = z(fw.data[1]).clone()
    app.layer.value = 1
    assert app.figure is fw and not torch.equal(z(fw.data[1]), before)
    assert "Layer 1, head 0" in fw.layout.title.text
    before = z(fw.data[0]).clone()
    app.head.value = 3
    assert not torch.equal(torch.nan_to_num(z(fw.data[0])), torch.nan_to_num(before))
    for view, count in expected_traces.items():
        app.view.value = view
        assert len(fw.data) == count and app.head.disabled == (view == "gates")
        want = app.current_figure()
        assert fw.layout.to_plotly_json() == want.layout.to_plotly_json()  # no stale axes or titles
        for got, ref in zip(fw.data, want.data):
            torch.testing.assert_close(torch.nan_to_num(z(got)), torch.nan_to_num(z(ref)))
            assert not any(v != v for row in got.z for v in row), "NaN cannot cross the widget's JSON: use None"
    app.view.value = "decay"
    assert "xaxis2" not in fw.layout.to_plotly_json()


def test_explorer_text_box_reruns_the_model(model):
    tok = ByteTokenizer()
    app = viz.explore(model, "hello", tok)
    assert app.text.value == "hello" and len(app.figure.data[0].x) == 5
    app.text.value = "hello there"
    assert app.inspection.num_tokens == 11 and len(app.figure.data[0].x) == 11
    app_ids = viz.explore(model, [5, 6, 7])
    assert app_ids.text.value == "5 6 7"
    app_ids.text.value = "9 10"
    assert app_ids.inspection.token_ids == [9, 10] and app_ids.status.value == ""
    app_ids.text.value = "not ids"
    assert "input not used" in app_ids.status.value and app_ids.inspection.token_ids == [9, 10]


# --- export -----------------------------------------------------------------------------------------


def assert_offline(page: str) -> None:
    assert not re.search(r"<script[^>]*src=[\"']?http", page), "a script is loaded from the network"
    assert page.count("plotly.js v") == 1, "plotly.js must be embedded exactly once"


def test_save_html_is_offline(insp, tmp_path):
    path = viz.save(viz.plot_attention(insp, 0, 0), tmp_path / "fig.html")
    assert_offline(path.read_text(encoding="utf-8"))
    with pytest.raises(ValueError, match="unknown figure format"):
        viz.save(go.Figure(), tmp_path / "fig.txt")


def test_offline_html_has_no_latex_or_warns(insp, tmp_path):
    """Offline HTML carries no MathJax: foxlab's figures write math with HTML; a user's LaTeX gets a warning."""
    for fig in (viz.plot_forget_gates(insp), viz.plot_attention(insp, 0, 0), viz.plot_head_timescales(insp),
                viz._plot_losses([3.0, 2.0], optimal=1.5)):
        assert viz._latex_strings(fig) == []
    fig = go.Figure(go.Scatter(y=[1, 2], name=r"$\log F$"))
    assert viz._latex_strings(fig) == [r"$\log F$"]
    with pytest.warns(UserWarning, match="LaTeX text needs MathJax"):
        viz.save(fig, tmp_path / "latex.html")


@pytest.mark.skipif(viz.find_chrome() is None, reason="no Chrome/Chromium (apt-get install -y chromium)")
def test_save_png_makes_a_real_image(insp, tmp_path):
    path = viz.save(viz.plot_decay(insp, 0, 1), tmp_path / "decay.png")
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE and len(data) > 10_000
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert (width, height) == (620, 560)


def test_missing_browser_gives_install_advice(monkeypatch, tmp_path):
    def no_chrome(*args, **kwargs):
        raise RuntimeError("Kaleido requires Google Chrome to be installed.")

    monkeypatch.setattr(viz, "find_chrome", lambda: None)
    monkeypatch.setattr(viz.pio, "to_image", no_chrome)
    with pytest.raises(viz.StaticExportError, match="apt-get install -y chromium"):
        viz.save(go.Figure(), tmp_path / "fig.png")


class Display:
    """Stands in for IPython's display(): records the shown bundle and its later updates."""

    def __init__(self):
        self.bundles = []

    def __call__(self, obj, raw=False, display_id=None):
        assert raw and display_id is True
        self.bundles.append(obj)
        return self

    def update(self, obj, raw=False):
        assert raw
        self.bundles.append(obj)


@pytest.fixture
def in_kernel(monkeypatch):
    """Make show() take its notebook path, as in a Jupyter kernel."""
    monkeypatch.setattr(viz, "_in_jupyter_kernel", lambda: True)


def test_show_interactive_first_then_png_or_a_note(insp, monkeypatch, capsys, in_kernel):
    fig = viz.plot_forget_gates(insp, layer=0)
    if viz.find_chrome() is not None:
        shown = Display()
        monkeypatch.setattr("IPython.display.display", shown)
        viz.show(fig)
        first, updated = shown.bundles
        assert list(first) == ["application/vnd.plotly.v1+json"]
        assert updated["application/vnd.plotly.v1+json"] == first["application/vnd.plotly.v1+json"]
        assert base64.b64decode(updated["image/png"])[:8] == PNG_SIGNATURE

    def fail(*args, **kwargs):
        raise viz.StaticExportError(viz.INSTALL_CHROME)

    shown = Display()
    monkeypatch.setattr("IPython.display.display", shown)
    monkeypatch.setattr(viz, "find_chrome", lambda: "/usr/bin/chromium")  # a browser that then fails
    monkeypatch.setattr(viz, "to_image", fail)
    viz.show(fig)
    assert [list(b) for b in shown.bundles] == [["application/vnd.plotly.v1+json"]]
    assert "interactive only" in capsys.readouterr().out


def test_show_without_chrome_uses_the_default_renderer(insp, monkeypatch, capsys, in_kernel):
    """No Chromium (Colab, say): plotly's own renderer draws the figure, whatever the front end."""
    fig = viz.plot_forget_gates(insp, layer=0)
    shown = []
    monkeypatch.setattr(viz, "find_chrome", lambda: None)
    monkeypatch.setattr(go.Figure, "show", lambda self, *a, **k: shown.append(self))
    viz.show(fig)
    assert shown == [fig]
    assert "apt-get install -y chromium" in capsys.readouterr().out


def test_write_report_has_every_section(model, ids, reference, tmp_path):
    marks = [5, 17]
    path = viz.write_report(tmp_path / "report.html", model, ids, losses=[5.5, 4.0, 3.2],
                            marked_positions=marks, title="demo <run>")
    page = path.read_text(encoding="utf-8")
    assert_offline(page)
    assert "<title>demo &lt;run&gt;</title>" in page
    for section in ("Training loss", "Forget gates", "Decay and attention", "Head timescales"):
        assert f"<h2>{section}" in page
    assert page.count("Plotly.newPlot") == 4
    scores = torch.stack([g[0][marks].mean(0) for g in reference.forget_gates])
    layer, head = divmod(int(scores.argmin()), 4)
    assert f"<h2>Decay and attention: layer {layer}, head {head}</h2>" in page
    assert page.count('"dash":"dash"') == 2 * len(marks)  # one line per mark on each layer's subplot
    mask = torch.zeros(T, dtype=torch.bool)
    mask[marks] = True
    from_mask = viz.write_report(tmp_path / "mask.html", model, ids[None], marked_positions=mask[None])
    assert f"<h2>Decay and attention: layer {layer}, head {head}</h2>" in from_mask.read_text(encoding="utf-8")
    plain = viz.write_report(tmp_path / "plain.html", model, ids).read_text(encoding="utf-8")
    assert "Training loss" not in plain and "<h2>Decay and attention: layer 0, head 0</h2>" in plain


def page_figures(page: str) -> list[tuple[list, dict]]:
    """(data, layout) of every figure drawn in a report page, from its Plotly.newPlot(id, data, layout) calls."""
    decoder, figures = json.JSONDecoder(), []
    for call in re.finditer(r'Plotly\.newPlot\(\s*"[^"]+",\s*', page):
        data, end = decoder.raw_decode(page, call.end())
        layout, _ = decoder.raw_decode(page, end + page[end:].index("{"))
        figures.append((data, layout))
    return figures


def test_report_says_what_was_learned(model, ids, tmp_path):
    marks = [3, 11, 20]
    metrics = {"step": 300, "final_loss": 1.716, "eval_loss": 1.721, "optimal_loss": 1.7056,
               "boundary_forget_ratio": 7.5e-7, "boundary_forget_head": {"layer": 1, "head": 2}, "per_head": [[1.0]]}
    page = viz.write_report(tmp_path / "r.html", model, ids, losses={"train": [5.5, 3.0, 2.0], "eval": [(3, 1.9)]},
                            marked_positions=marks, description="Task 'segments': <reset> splits segments.",
                            metrics=metrics).read_text(encoding="utf-8")
    assert "<p>Task &#x27;segments&#x27;: &lt;reset&gt; splits segments.</p>" in page
    results = page[page.index("<h2>Results</h2>"):page.index("<h2>Training loss</h2>")]
    for label, value in [("training steps", "300"), ("final training loss", "1.716"), ("eval loss", "1.721"),
                         ("optimal loss", "1.706"), ("boundary_forget_ratio", "7.5e-07 (layer 1, head 2)")]:
        assert f"<tr><td>{label}</td><td>{value}</td>" in results
    assert "Bayes-optimal" in results and "near 0: the head erases its memory" in results
    assert "0.0154 above the optimal loss" in results
    assert '"name":"optimal (1.706)"' in page and '"y":[1.7056,1.7056]' in page  # the optimal line on the loss plot
    # the map shows the head boundary_forget_ratio names, and says why
    assert "<h2>Decay and attention: layer 1, head 2</h2><p>The head with the lowest boundary_forget_ratio" in page
    labels = [f"{m}:{ids[m].item()}" for m in marks]
    _, (_, gates), (_, maps), _ = page_figures(page)
    for layout, axes in [(gates, ["xaxis", "xaxis2"]), (maps, ["xaxis", "xaxis2", "yaxis", "yaxis2"])]:
        for axis in axes:
            ticks = dict(zip(layout[axis]["tickvals"], layout[axis]["ticktext"]))
            for label in labels:  # every marked position has a tick label, in the marks' colour
                assert ticks[label] == f"<span style='color:{viz.MARK_COLOR}'><b>{label}</b></span>", (axis, label)
    assert "layer 0, head 0 without marks" not in page


def test_report_without_marks_says_how_it_picked_the_head(model, ids, tmp_path):
    page = viz.write_report(tmp_path / "plain.html", model, ids).read_text(encoding="utf-8")
    assert "<h2>Results</h2>" not in page
    assert "Layer 0, head 0 (no marked positions to choose a head by)" in page
    with pytest.raises(TypeError, match="metrics"):
        viz.write_report(tmp_path / "bad.html", model, ids, metrics=[1.0])
    with pytest.raises(TypeError, match=r"metrics\['eval_loss'\] must be a number"):
        viz.write_report(tmp_path / "bad.html", model, ids, metrics={"eval_loss": "low"})
    with pytest.raises(TypeError, match="boundary_forget_head"):
        viz.write_report(tmp_path / "bad.html", model, ids, metrics={"boundary_forget_head": 3})
    with pytest.raises(TypeError, match="description must be a string"):
        viz.write_report(tmp_path / "bad.html", model, ids, description=["task"])
    with pytest.raises(TypeError, match="losses must be a list of numbers"):
        viz.write_report(tmp_path / "bad.html", model, ids, losses=["low", "lower"])
    with pytest.raises(TypeError, match="path must be a file name"):
        viz.write_report(None, model, ids)
    with pytest.raises(TypeError, match="marked_positions"):
        viz.write_report(tmp_path / "bad.html", model, ids, marked_positions=[1.5])


# --- padding ----------------------------------------------------------------------------------------

PRO = dict(qk_norm=True, use_output_gate=True, use_output_norm=True, use_k_shift=True, use_v_shift=True)
TEXTS = ["short one", "a longer second sequence"]


def assert_same_inspection(got, want):
    assert (got.token_ids, got.tokens, got.input_length) == (want.token_ids, want.tokens, want.input_length)
    assert got.labels() == want.labels() and got.window_start == want.window_start
    for layer in range(want.num_layers):
        torch.testing.assert_close(got.log_f[layer], want.log_f[layer], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(got.c[layer], want.c[layer], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got.attentions[layer], want.attentions[layer], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("switches", [dict(fgate_init_timescales=[2.0, 64.0]), PRO,
                                      dict(fgate_type="none", use_rope=True)], ids=["fox", "fox-pro", "transformer"])
def test_padded_row_inspects_like_the_sequence_alone(switches, side):
    model, tok = make_model(**switches), FoxTokenizer()
    batch = tok(TEXTS, padding=True, padding_side=side, return_tensors="pt")
    alone = viz.inspect(model, tok(TEXTS[0], return_tensors="pt"), tok)
    assert alone.num_tokens == len(TEXTS[0]) + 1  # <bos> and the bytes, no padding
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a mask means no padding warning
        assert_same_inspection(viz.inspect(model, batch, tok, row=0), alone)
        explicit = viz.inspect(model, batch["input_ids"], tok, row=0, attention_mask=batch["attention_mask"])
    assert_same_inspection(explicit, alone)
    assert list(viz.plot_forget_gates(explicit, layer=0).data[0].x) == alone.labels()  # the figures: real tokens
    assert_same_inspection(viz.inspect(model, batch, tok, row=1), viz.inspect(model, tok.encode(TEXTS[1]), tok))
    cropped = viz.inspect(model, batch, tok, row=0, max_tokens=6, max_map_tokens=4)
    assert_same_inspection(cropped, viz.inspect(model, tok.encode(TEXTS[0]), tok, max_tokens=6, max_map_tokens=4))
    assert cropped.labels()[0].startswith("4:") and cropped.window_start == 2


def test_unmasked_padding_warns(model):
    tok = FoxTokenizer()
    batch = tok(TEXTS, padding=True, padding_side="left", return_tensors="pt")
    with pytest.warns(UserWarning, match="attention_mask"):
        viz.inspect(model, batch["input_ids"], tok, row=0)


# --- bad arguments ----------------------------------------------------------------------------------


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=2))


BAD_CALLS = [  # (call, error, what the message must say)
    (lambda m, i, s: viz.plot_attention(s, layer=0, head="0"), TypeError, "head must be an integer, got '0'"),
    (lambda m, i, s: viz.plot_attention(s, "1", 0), TypeError, "layer must be an integer"),
    (lambda m, i, s: viz.plot_attention(s, 0, 0, with_decay="no"), TypeError, "with_decay must be True or False"),
    (lambda m, i, s: viz.plot_attention(s, 0, 4), IndexError, r"head 4 out of range: the model has 4 heads \(0..3\)"),
    (lambda m, i, s: viz.plot_decay(s, 0, 1.0), TypeError, "head must be an integer, got 1.0"),
    (lambda m, i, s: viz.plot_decay(s, 0, 0, log="yes"), TypeError, "log must be True or False"),
    (lambda m, i, s: viz.plot_decay(m, 0, 0), TypeError, r"plot_decay needs an Inspection: insp = viz.inspect"),
    (lambda m, i, s: viz.plot_forget_gates(s, layer=True), TypeError, "layer must be an integer, got True"),
    (lambda m, i, s: viz.plot_forget_gates(s, heads=2), TypeError, "heads must be a non-empty list"),
    (lambda m, i, s: viz.plot_forget_gates(s, heads=[]), TypeError, "heads must be a non-empty list"),
    (lambda m, i, s: viz.plot_forget_gates(s, heads=["0"]), TypeError, "head must be an integer"),
    (lambda m, i, s: viz.plot_forget_gates(i), TypeError, "plot_forget_gates needs an Inspection"),
    (lambda m, i, s: viz.head_timescales(s, threshold=2), ValueError, "threshold must be a number between 0 and 1"),
    (lambda m, i, s: viz.plot_head_timescales("model"), TypeError, "needs an Inspection .* or a foxlab"),
    (lambda m, i, s: viz.inspect(tiny_llama(), i), TypeError, "inspect needs a foxlab ForgettingTransformer .* got "
                                                               "LlamaForCausalLM"),
    (lambda m, i, s: viz.head_timescales(tiny_llama()), TypeError, "got LlamaForCausalLM"),
    (lambda m, i, s: viz.inspect(m, i, row=1), ValueError, "row=1 given, but inputs hold one sequence"),
    (lambda m, i, s: viz.inspect(m, i[None].repeat(2, 1), row=2), IndexError, "row 2 out of range: inputs hold 2 "
                                                                             "sequences"),
    (lambda m, i, s: viz.inspect(m, i[None].repeat(2, 1), row="1"), TypeError, "row must be an integer"),
    (lambda m, i, s: viz.inspect(m, i.float()), TypeError, "inputs must hold integers, got torch.float32"),
    (lambda m, i, s: viz.inspect(m, [["a", "b"]]), TypeError, "inputs must be text .* token ids"),
    (lambda m, i, s: viz.inspect(m, [5, 300]), ValueError, r"token id 300 at position 1, outside the model's "
                                                          r"vocabulary \(0..259\)"),
    (lambda m, i, s: viz.inspect(m, i[:0]), ValueError, "T > 0"),
    (lambda m, i, s: viz.inspect(m, i, max_tokens=0), ValueError, "max_tokens must be a positive integer"),
    (lambda m, i, s: viz.inspect(m, i, max_map_tokens=2.5), ValueError, "max_map_tokens must be a positive integer"),
    (lambda m, i, s: viz.inspect(m, {"ids": i}), ValueError, "without 'input_ids'"),
    (lambda m, i, s: viz.inspect(m, {"input_ids": i, "attention_mask": torch.ones_like(i)},
                                 attention_mask=torch.ones_like(i)), ValueError, "attention_mask given twice"),
    (lambda m, i, s: viz.inspect(m, i, attention_mask=[1, 1]), ValueError, "attention_mask must hold 0/1 with the "
                                                                          "shape"),
    (lambda m, i, s: viz.inspect(m, i, attention_mask=2 * torch.ones_like(i)), ValueError, "attention_mask must hold "
                                                                                           "0/1"),
    (lambda m, i, s: viz.inspect(m, i, attention_mask=torch.zeros_like(i)), ValueError, "no real token"),
    (lambda m, i, s: viz.inspect(m, i, attention_mask=torch.arange(T) % 2), ValueError, "one block of ones"),
    (lambda m, i, s: viz.inspect(m, "text", tokenizer=object()), TypeError, "tokenizer must have an encode method"),
    (lambda m, i, s: viz.explore(m, i, row=3), ValueError, "row=3 given"),
    (lambda m, i, s: viz.show(s), TypeError, "show needs a plotly figure .* got Inspection"),
    (lambda m, i, s: viz.save(s, "fig.html"), TypeError, "save needs a plotly figure"),
    (lambda m, i, s: viz.save(go.Figure(), 3), TypeError, "path must be a file name"),
    (lambda m, i, s: viz.to_image(go.Figure(), "gif"), ValueError, "format must be one of png, svg"),
]


@pytest.mark.parametrize("index", range(len(BAD_CALLS)))
def test_bad_arguments_name_the_argument(model, ids, insp, index):
    call, error, message = BAD_CALLS[index]
    with pytest.raises(error, match=message):
        call(model, ids, insp)


# --- show outside a notebook ------------------------------------------------------------------------


def test_kernel_detection(monkeypatch):
    import IPython

    class Shell:
        pass

    monkeypatch.setattr(IPython, "get_ipython", lambda: None)  # a plain script
    assert not viz._in_jupyter_kernel()
    monkeypatch.setattr(IPython, "get_ipython", lambda: Shell())  # terminal IPython: no kernel
    assert not viz._in_jupyter_kernel()
    kernel_shell = Shell()
    kernel_shell.kernel = object()  # ipykernel's shell (JupyterLab, VS Code, Colab)
    monkeypatch.setattr(IPython, "get_ipython", lambda: kernel_shell)
    assert viz._in_jupyter_kernel()


SHOW_SCRIPT = """
import plotly.graph_objects as go
from foxlab import viz
path = viz.show(go.Figure(go.Scatter(y=[1, 3, 2]), layout_title_text="from a script"))
print("returned", path)
"""


@pytest.mark.parametrize("runner", ["python", "ipython"])
def test_show_outside_a_notebook_writes_html_and_says_where(runner, tmp_path):
    """As a script (or in terminal IPython) show() writes offline HTML, prints the path and opens a browser."""
    opened = tmp_path / "opened.txt"
    browser = tmp_path / "browser"  # stands in for the web browser: records the URL it was asked to open
    browser.write_text(f"#!{sys.executable}\nimport sys\nopen({str(opened)!r}, 'w').write(sys.argv[1])\n")
    browser.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY", "BROWSER")}
    env.update(PYTHONPATH=str(Path(__file__).resolve().parents[1]), TMPDIR=str(tmp_path))
    if runner == "python":
        env["BROWSER"], command = str(browser), [sys.executable, "-c", SHOW_SCRIPT]
    else:  # no graphical browser here: it must not try one
        command = [sys.executable, "-m", "IPython", "--no-banner", "--quick", "-c", SHOW_SCRIPT]
    out = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    written = re.search(r"foxlab.viz.show: figure written to (\S+\.html); (.*)", out.stdout)
    assert written, out.stdout
    path = Path(written.group(1))
    assert path.parent == tmp_path and f"returned {path}" in out.stdout
    page = path.read_text(encoding="utf-8")
    assert_offline(page) and "from a script" in page
    if runner == "python":
        assert written.group(2) == "opened in the web browser" and opened.read_text() == path.as_uri()
    else:
        assert written.group(2) == "open it in a web browser" and not opened.exists()
