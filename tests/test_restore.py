"""What a pass puts back: train/eval flags."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from fntrain.restore import mode


@settings(max_examples=40, deadline=None)
@given(flags=st.lists(st.booleans(), min_size=1, max_size=8), training=st.booleans())
def test_every_flag_is_restored_after_an_exception(flags: list[bool], training: bool) -> None:
    """Whatever mix of train/eval submodules, each gets its own flag back, even on error."""
    model = nn.Sequential(*[nn.Sequential(nn.Identity()) for _ in flags])
    for module, flag in zip(model, flags, strict=True):
        module.train(flag)
    before = [module.training for module in model.modules()]
    with pytest.raises(KeyError), mode(model, training):
        assert all(module.training == training for module in model.modules())
        raise KeyError("escape")
    assert [module.training for module in model.modules()] == before
