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
    assert line.startswith("step      3/10 | loss 9.5000 | heads 2.000 2.500")
    assert "mfu n/a" in line and "1,234 tok/s" in line and "eta 1:15" in line
