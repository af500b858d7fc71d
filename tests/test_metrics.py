"""What MFU is measured against, and the console line."""

from __future__ import annotations

import torch

from mtp_dist import metrics


def test_peak_is_a_datasheet_a_measurement_or_unknown(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H100 80GB HBM3")
    assert metrics.default_peak_flops() == (989e12, "the dense bf16 peak of H100")
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Some Future GPU")
    peak, source = metrics.default_peak_flops()
    assert peak is None and "set logging.peak_flops" in source
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    peak, source = metrics.default_peak_flops()
    assert 1e8 < peak < 1e13 and "measured" in source  # a real CPU's fp32 matmul rate


def test_console_line_without_a_known_peak():
    record = {
        "step": 3, "loss": 9.5, "head_losses": [2.0, 2.5], "lr": 1e-3, "grad_norm": 1.0,
        "tokens_per_s": 1234.0, "mfu": None, "memory_gib": 1.5, "eta_s": 75.0, "skipped": False,
    }  # fmt: skip
    line = metrics.console_line(record, total_steps=10)
    assert line.startswith("step      3/10 | loss 9.5000 (sum of 2 heads) | heads 2.000 2.500")
    assert "mfu n/a" in line and "1,234 tok/s" in line and "eta 1:15" in line
    assert "validation" not in line
    weighted = metrics.console_line(record, total_steps=10, loss_weights=[1.0, 0.5])
    assert "| loss 9.5000 (weighted sum of 2 heads) |" in weighted
    assert "(sum of 2 heads)" in metrics.console_line(record, 10, loss_weights=[1.0, 1.0])


def test_console_line_prints_every_heads_validation_loss():
    record = {
        "step": 4, "loss": 9.5, "head_losses": [2.0, 2.5], "lr": 1e-3, "grad_norm": 1.0,
        "tokens_per_s": 1.0, "mfu": 0.5, "memory_gib": 1.5, "eta_s": 1.0, "skipped": False,
        "eval_loss": 4.75, "eval_head_losses": [2.25, 2.5], "eval_head_accuracy": [0.5, 0.25],
    }  # fmt: skip
    second = metrics.console_line(record, total_steps=10).splitlines()[1]
    assert second == (
        "  validation: loss 4.7500 (sum of 2 heads) | heads 2.250 2.500 | top-1 acc 0.500 0.250"
    )


def test_loss_plot_has_a_validation_loss_panel(tmp_path):
    """Training loss, then validation loss and validation accuracy per head where the run
    evaluated: one panel each, 6 inches at 110 dpi."""
    from PIL import Image

    from mtp_dist.report import plot

    rows = [{"step": s, "head_losses": [3.0 - s / 10, 3.5 - s / 10]} for s in range(1, 5)]
    only_training = plot(rows, tmp_path / "train.png")
    rows[1] |= {"eval_head_losses": [2.9, 3.3], "eval_head_accuracy": [0.2, 0.1]}
    rows[3] |= {"eval_head_losses": [2.7, 3.1], "eval_head_accuracy": [0.3, 0.2]}
    with_validation = plot(rows, tmp_path / "both.png")
    assert Image.open(only_training).size[0] == 6 * 110
    assert Image.open(with_validation).size[0] == 3 * 6 * 110


def test_sizes_are_printed_in_a_unit_that_shows_them():
    assert metrics.format_bytes(512) == "512 B"
    assert metrics.format_bytes(37.5 * 2**20) == "37.5 MiB"
    assert metrics.format_bytes(3 * 2**30) == "3.0 GiB"
    assert metrics.format_bytes(5 * 2**40) == "5120.0 GiB"


def test_packed_weights_warning_names_sizes_that_are_not_zero(monkeypatch):
    """A small model on a machine with little free memory: the warning's numbers are
    readable (it once read "need 0.0 GiB and 0.0 GiB of memory are free")."""
    import warnings
    from types import SimpleNamespace

    import psutil

    from mtp_dist.inference import packed_linear

    model = torch.nn.Linear(1024, 1024)  # 4 MiB of fp32 weights and bias
    monkeypatch.setattr(psutil, "virtual_memory", lambda: SimpleNamespace(available=6 * 2**20))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert not packed_linear._fits(model)
    (w,) = caught
    assert "their copies need 4.0 MiB, and only 6.0 MiB of memory is free" in str(w.message)
