"""Shared test fixtures: small CPU tensors and fake velocity models with known outputs."""

from __future__ import annotations

import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

torch.set_num_threads(min(2, torch.get_num_threads()))


class Recorder:
    """Wraps a velocity function f(x, t, k, y) and records every call's arguments."""

    def __init__(self, fn):
        self.fn = fn
        self.calls: list[dict] = []

    def __call__(self, x, t, k, y):
        self.calls.append(dict(x=x.clone(), t=t.clone(), k=k.clone(), y=y.clone()))
        return self.fn(x, t, k, y)


@pytest.fixture
def recorder():
    return Recorder
