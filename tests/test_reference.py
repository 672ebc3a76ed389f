"""The node against an independent computation of the T-GATE rule, written here from the paper.

The reference drives ComfyUI's model directly (BaseModel.apply_model) with its own euler loop and
its own classifier-free guidance, and realises T-GATE with nothing but torch forward hooks: at the
last step before the gate each cross-attention output is averaged over the cond and uncond halves;
after it, the hooks return that average and only the uncond branch is evaluated.
"""

import pytest
import torch

from tgate_testkit.runtime import CONTEXT_TOKENS


def reference_tgate(comfy, patcher, positive, negative, steps, cfg, gate_at, seed, pooled):
    import comfy.sample as sample
    import comfy.samplers as samplers

    base = patcher.model
    model_sampling = patcher.get_model_object("model_sampling")
    sigmas = samplers.calculate_sigmas(model_sampling, "normal", steps)
    gate_sigma = model_sampling.percent_to_sigma(gate_at)
    gate = max(1, sum(1 for s in sigmas[:-1].tolist() if s >= gate_sigma))

    latent = torch.zeros(1, 4, 16, 16)
    x = model_sampling.noise_scaling(sigmas[0], sample.prepare_noise(latent, seed), latent, max_denoise=True)
    layers = {n: m for n, m in base.diffusion_model.named_modules() if n.endswith("attn2")}
    cond_ctx, uncond_ctx = positive[0][0], negative[0][0]

    def extra(cond, batch):
        if not pooled:
            return {}
        return {"y": base.encode_adm(**cond[0][1]).repeat(batch, 1)}

    def both(x, sigma):
        y = {}
        if pooled:
            y = {"y": torch.cat([extra(negative, 1)["y"], extra(positive, 1)["y"]])}
        out = base.apply_model(torch.cat([x, x]), sigma.repeat(2), c_crossattn=torch.cat([uncond_ctx, cond_ctx]), **y)
        return out.chunk(2)

    cached = {}
    for i in range(steps):
        sigma = sigmas[i : i + 1]
        if i < gate:
            handles = []
            if i == gate - 1:
                for name, module in layers.items():
                    handles.append(module.register_forward_hook(lambda m, a, o, name=name: cached.__setitem__(name, o.chunk(2))))
            uncond, cond = both(x, sigma)
            for h in handles:
                h.remove()
            denoised = uncond + (cond - uncond) * cfg
        else:
            handles = [
                m.register_forward_hook(lambda m, a, o, name=name: (cached[name][0] + cached[name][1]) / 2)
                for name, m in layers.items()
            ]
            denoised = base.apply_model(x, sigma, c_crossattn=uncond_ctx, **extra(negative, 1))
            for h in handles:
                h.remove()
        x = x + (x - denoised) / sigmas[i] * (sigmas[i + 1] - sigmas[i])  # euler
    return base.process_latent_out(x), gate


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
@pytest.mark.parametrize("gate_at", [0.4, 0.7])
def test_node_output_matches_the_reference_rule(comfy, family, gate_at):
    patcher = getattr(comfy, family)(seed=3)
    pooled = family == "sdxl"
    positive, negative = comfy.cond(1, pooled=pooled), comfy.cond(2, pooled=pooled)
    assert positive[0][0].shape[1] == CONTEXT_TOKENS
    expected, gate = reference_tgate(
        comfy, patcher, positive, negative, steps=10, cfg=6.0, gate_at=gate_at, seed=5, pooled=pooled
    )
    assert 0 < gate < 10
    got = comfy.sample(comfy.tgate(patcher, gate_at=gate_at), positive, negative, steps=10, cfg=6.0, seed=5)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-3)
    # And it is not plain CFG: the rule makes a difference the comparison can see.
    plain = comfy.sample(patcher, positive, negative, steps=10, cfg=6.0, seed=5)
    assert (plain - expected).abs().max() > 100 * 1e-3
