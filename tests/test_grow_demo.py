"""Growing the demo model (``train-demo --grow-layers``): appended layers leave every output of the model unchanged
(logits and the committed state of the old layers, in every layout the runtime uses) and train from the first
step."""

from __future__ import annotations

import pytest
import torch

from conftest import random_model, small_config
from zaya_export.grow_demo import grown
from zaya_export.models import Past
from zaya_export.models.layout import BIDIRECTIONAL
from zaya_export.models.packed import packed_layout, training_layout
from zaya_export.train_demo import tidar_loss


def _model():
    cfg = small_config(num_hidden_layers=2, layer_types=["hybrid", "hybrid_sliding"], sliding_window=6)
    return random_model(cfg, seed=5)  # every scale and bias random: the copy must not rely on defaults


def test_grown_model_computes_exactly_what_the_source_computes():
    small = _model()
    big = grown(small, 3, init_seed=1)
    assert big.config.num_hidden_layers == 5
    assert big.config.layer_types == ["hybrid", "hybrid_sliding", "hybrid", "hybrid_sliding", "hybrid"]
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(5, small.config.vocab_size, (2, 11), generator=gen)
    mask = torch.ones(2, 11, dtype=torch.bool)
    mask[1, :4] = False  # left padding
    K = 4
    packed = packed_layout(K, (0, 2, K), small.config.conv_history)  # the fused step
    step = torch.randint(5, small.config.vocab_size, (2, packed.size), generator=gen)
    draft = torch.cat([ids[:, -1:], torch.full((2, K), small.config.mask_token_id)], 1)
    with torch.no_grad():
        outs = []
        for model in (small, big):
            logits, update = model.step(ids, model.empty_past(2), mask)  # prefill, left-padded
            conv, rho = update.committed(mask.sum(-1), model.empty_past(2).rho)
            past = Past(update.k, update.v, mask, conv, rho)
            outs.append((logits, update, model.step(draft, past, layout=BIDIRECTIONAL)[0],
                         model.step(step, past, layout=packed)[0]))
    (la, ua, da, pa), (lb, ub, db, pb) = outs
    assert torch.equal(la, lb) and torch.equal(da, db) and torch.equal(pa, pb)
    L = small.config.num_hidden_layers
    assert torch.equal(ua.k, ub.k[:L]) and torch.equal(ua.v, ub.v[:L]) and ub.k.shape[0] == 5
    with pytest.raises(ValueError, match="at least one layer"):
        grown(small, 0, init_seed=1)


def test_new_layers_train_from_the_first_step():
    """Their output scales are 0, not frozen: the first backward gives them gradient, and one optimizer step
    makes the new layers contribute."""
    big = grown(_model(), 2, init_seed=1).train()
    layout = training_layout(16, 8, big.config.conv_history)
    x = torch.randint(5, 64, (2, 17), generator=torch.Generator().manual_seed(1))
    loss, _, _ = tidar_loss(big, layout, x, 1.0)
    loss.backward()
    for i in (2, 3):
        for scaling in ("post_attention_residual_scale", "post_mlp_residual_scale"):
            grad = getattr(big.model.layers[i], scaling).hidden_states_scale.grad
            assert grad is not None and grad.abs().max() > 0, (i, scaling)
