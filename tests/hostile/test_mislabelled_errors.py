"""Errors keep their own name (issue 17's *mislabelled errors*): ``mtml rank`` used to turn any RuntimeError of
a source model into "cannot read the target inputs", and a real failure then sent the user after shapes."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from mtml.errors import ShapeError
from mtml.nn import MultiTaskModel
from mtml.transfer import Source
from mtml.workflows._rank import source_outputs


class Failing(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        raise RuntimeError("NCCL communicator was aborted")


def test_a_wrong_input_width_is_a_shape_error() -> None:
    model = MultiTaskModel(nn.Linear(4, 3), {"t": nn.Linear(3, 1)})
    with pytest.raises(ShapeError, match=r"cannot read the target inputs of shape \(5, 6\)"):
        source_outputs(Source(model, kinds={"t": "regression"}), torch.zeros(5, 6), None)


def test_any_other_runtime_error_is_shown_as_itself() -> None:
    model = MultiTaskModel(Failing(), {"t": nn.Linear(3, 1)})
    with pytest.raises(RuntimeError, match="NCCL communicator was aborted") as caught:
        source_outputs(Source(model, kinds={"t": "regression"}), torch.zeros(5, 4), None)
    assert not isinstance(caught.value, ShapeError)
