"""T-GATE keeps the prompt on a trained model: the coloured-shapes model of tgate_testkit.trained
(weights in tgate_testkit/weights/), sampled by ComfyUI's KSampler node, gated by the real T-GATE
nodes and probed by the real TGateProbe node, scored by the checker.

The fixed prompt set: 24 of the 48 prompts (every colour and shape, each at two of the four
positions, all four positions equally often), one batch, seed 0, cfg 6, euler/simple (KSampler's
default scheduler), 25 steps (the paper's setting; tgate_bench.trained_eval reports all 48 prompts)."""

from __future__ import annotations

import pytest
import torch

from tgate_bench import trained_eval
from tgate_testkit import trained

STEPS, CFG, SEED = 25, 6.0, 0
PROMPTS = [p for k, p in enumerate(trained.PROMPTS) if (k + k // 4) % 2 == 0]


@pytest.fixture(scope="module")
def shapes(comfy):
    return trained.build()


@pytest.fixture(scope="module")
def evaluation():
    return trained_eval


@pytest.fixture(scope="module")
def probed(comfy, shapes, evaluation):
    """The probe node on the prompt set: (latent, image, suggested_gate_at, summary). Its LATENT is
    KSampler's ungated result (bit for bit, tests/test_probe.py), the baseline here."""
    return evaluation.probe(comfy.nodes, shapes, PROMPTS, steps=STEPS, cfg=CFG, seed=SEED)


def accuracy(comfy, shapes, evaluation, name, **settings) -> trained.Score:
    variant = evaluation.VARIANTS[name]
    samples = evaluation.sample(comfy.nodes, shapes, variant, PROMPTS, steps=STEPS, cfg=CFG, seed=SEED, **settings)
    return trained.score(samples, PROMPTS)


def test_the_prompt_set_covers_every_word():
    assert len(PROMPTS) == 24
    for words in (trained.COLOURS, trained.SHAPES, trained.POSITIONS):
        counts = [sum(word in p for p in PROMPTS) for word in words]
        assert len(set(counts)) == 1 and counts[0] > 0, counts


def test_the_checker_reads_every_drawing_and_only_its_own_prompt():
    g = torch.Generator().manual_seed(0)
    for prompt in trained.PROMPTS:
        image = trained.draw(prompt, g)
        assert trained.read(image).scores(prompt) == (True, True, True), prompt
        # A latent as KSampler returns it reads the same; an empty canvas reads as nothing.
        samples = (image / trained.SD15_SCALE).unsqueeze(0)
        assert trained.score(samples, [prompt]).accuracy == 1.0
        other = next(p for p in trained.PROMPTS if all(a != b for a, b in zip(p, prompt, strict=True)))
        assert trained.score(samples, [other]).accuracy == 0.0
        # A tinted background or canvas (samples of the small model often have one) does not change the reading.
        tinted = image.clone()
        tinted[:, image[3] < 0] += torch.tensor([0.3, 0.6, 0.5, 0.7]).unsqueeze(1)
        assert trained.read(tinted).scores(prompt) == (True, True, True), prompt
        assert trained.read(image + torch.tensor([0.5, -0.4, 0.6, 0.8]).view(4, 1, 1)).scores(prompt) == (True, True, True)
    assert trained.read(-torch.ones(4, trained.SIDE, trained.SIDE)) == trained.Reading(None, None, None)


def test_full_cfg_follows_the_prompt(probed):
    baseline = trained.score(probed[0]["samples"], PROMPTS)
    assert baseline.accuracy >= 0.85, baseline  # chance is 1/48


def test_tgate_at_the_default_gate_keeps_the_prompt(comfy, shapes, evaluation, probed):
    baseline = trained.score(probed[0]["samples"], PROMPTS).accuracy
    for name in ("tgate", "tgate_advanced"):
        gated = accuracy(comfy, shapes, evaluation, name)
        assert abs(gated.accuracy - baseline) <= 0.05, (name, gated, baseline)


def test_text_only_after_the_gate_loses_the_prompt(comfy, shapes, evaluation, probed):
    baseline = trained.score(probed[0]["samples"], PROMPTS).accuracy
    after = accuracy(comfy, shapes, evaluation, "text_after")
    assert after.accuracy <= baseline - 0.5, (after, baseline)


def test_the_probe_suggests_a_gate_where_accuracy_holds(comfy, shapes, evaluation, probed):
    _, image, suggested, summary = probed
    baseline = trained.score(probed[0]["samples"], PROMPTS).accuracy
    assert 0.0 < suggested < 1.0, summary  # it does suggest gating
    gated = accuracy(comfy, shapes, evaluation, "tgate", gate_at=suggested)
    assert abs(gated.accuracy - baseline) <= 0.05, (suggested, gated, baseline, summary)
