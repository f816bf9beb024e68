"""validate's shared eager side: memoized runs equal fresh ones and are reused, and runs that differ in any
input byte, length or sampler seed are never served from the memo. (Runs under a routing tape bypass the memo:
test_probe_checks' flip-explanation test covers them.)"""

from __future__ import annotations

import numpy as np

from conftest import perturbed, random_model, small_config
from zaya_export.eager_reference import EagerReference
from zaya_export.models.entries import example_feed
from zaya_export.runtime.generate import generate_greedy
from zaya_export.runtime.sampling import SamplerConfig
from zaya_export.runtime.session import Session, TorchBackend
from zaya_export.runtime.tidar import generate_tidar

K = 4


def _counting(ref: EagerReference) -> list[str]:
    calls: list[str] = []
    run = ref.backend.run

    def counted(entry, inputs):  # noqa: ANN001, ANN202
        calls.append(entry)
        return run(entry, inputs)

    ref.backend.run = counted
    return calls


def test_memoized_runs_equal_fresh_ones_and_are_reused():
    model = perturbed(random_model(small_config(diffusion_block_len=K), seed=3), seed=1)
    ref = EagerReference(model)
    calls = _counting(ref)
    fresh = TorchBackend(model)
    for entry, (B, T, S) in [("prefill", (2, 5, 0)), ("decode", (3, 1, 6)), ("verify", (1, K + 1, 4))]:
        feed = example_feed(model, B, T, S, seed=B + T + S)
        first = ref.run(entry, feed)
        again = ref.run(entry, {n: a.copy() for n, a in feed.items()})  # equal bytes, other arrays
        want = fresh.run(entry, feed)
        assert first is again and set(first) == set(want)
        for name in want:
            np.testing.assert_array_equal(first[name], want[name])
    assert calls == ["prefill", "decode", "verify"]
    # one changed input value is another run
    feed = example_feed(model, 2, 5, 0, seed=99)
    ref.run("prefill", feed)
    feed["input_ids"] = feed["input_ids"].copy()
    feed["input_ids"][0, 0] += 1
    ref.run("prefill", feed)
    assert calls[-2:] == ["prefill", "prefill"]


def test_generations_are_memoized_per_prompt_length_and_sampler():
    model = random_model(small_config(diffusion_block_len=K), seed=4)
    ref = EagerReference(model)
    stop = model.config.eos_token_ids
    prompt = [5, 9, 33, 2]
    tokens = ref.greedy(prompt, 6, stop)
    assert tokens == generate_greedy(model, [prompt], 6, stop).tokens[0]
    tokens.append(-1)  # a copy: the caller cannot change the memo
    assert ref.greedy(prompt, 6, stop) == generate_greedy(model, [prompt], 6, stop).tokens[0]
    assert len(ref.greedy(prompt, 3, stop)) <= 3
    eager = Session.from_model(model, K)
    for seed in (1, 2):
        cfg = SamplerConfig(temperature=1.0, seed=seed)
        got = ref.tidar(K, prompt, 8, stop, cfg, fused=True)
        want = generate_tidar(eager, [prompt], 8, stop, cfg, fused=True)
        assert got.tokens == want.tokens and got.lengths == want.lengths
        assert ref.tidar(K, prompt, 8, stop, cfg, fused=True) is got
    assert len(ref._tidar) == 2
