"""The family table: which family serves a model config, which are refused, and why."""

import pytest
import torch

from tgate import CROSS, FAMILIES, REFUSED, SELF, FidelityBranch, UnsupportedModelError, attention_layers, family_of


def config_of(name, *bases):
    """An object whose class is named like a ComfyUI model_config class, with those base classes."""
    return type(name, bases or (object,), {})()


def test_families_are_found_by_class_name_and_by_base_class():
    assert family_of(config_of("SDXL")).name == "SD1.x/SD2.x/SDXL"
    sdxl = type("SDXL", (), {})
    assert family_of(config_of("SomeNewSDXLFinetune", sdxl)).name == "SD1.x/SD2.x/SDXL"  # served as its base
    assert family_of(config_of("SVD_img2vid")).auto_branch is FidelityBranch.COND


def test_the_most_specific_class_decides():
    sd20 = type("SD20", (), {})
    assert family_of(config_of("SD21UnclipL", sd20)).auto_branch is FidelityBranch.COND  # not SD20's uncond


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_refused_families_say_why_and_what_to_do(name):
    with pytest.raises(UnsupportedModelError) as error:
        family_of(config_of(name))
    message = str(error.value)
    assert name in message and REFUSED[name][0] in message and "Remove the T-GATE node" in message


def test_an_unknown_family_is_refused_with_the_served_families_named():
    with pytest.raises(UnsupportedModelError, match="does not know the Mystery model family") as error:
        family_of(config_of("Mystery"))
    assert all(f.name in str(error.value) for f in FAMILIES)


def test_every_family_says_why_auto_keeps_its_branch():
    for family in FAMILIES:
        assert family.auto_branch in (FidelityBranch.UNCOND, FidelityBranch.COND) and family.auto_reason


def test_no_cross_attention_where_the_family_keeps_it_is_refused():
    family = FAMILIES[0]
    with pytest.raises(UnsupportedModelError, match="found no cross-attention layers"):
        attention_layers(family, torch.nn.Sequential(torch.nn.Linear(2, 2)), (CROSS, SELF))


def test_every_comfyui_model_family_is_served_or_refused_with_its_own_reason(comfy):
    """Walks ComfyUI's own list of model configurations (comfy.supported_models.models)."""
    import comfy.supported_models as supported_models

    served, refused, unknown = {}, {}, []
    for cls in supported_models.models:
        try:
            served[cls.__name__] = family_of(cls.__new__(cls)).name
        except UnsupportedModelError as error:
            if "does not know" in str(error):
                unknown.append(cls.__name__)
            else:
                refused[cls.__name__] = str(error)
    assert not unknown, f"neither served nor refused with a reason: {unknown}"
    assert {"SD15", "SDXL", "SVD_img2vid", "LTXV", "CosmosT2IPredict2", "ACEStep", "PixArtAlpha", "PixArtSigma"} <= set(served)
    joint = {"Flux", "FluxSchnell", "FluxInpaint", "Chroma", "QwenImage", "SD3", "AuraFlow", "GenmoMochi", "Lumina2", "HiDream"}
    assert joint <= set(served)
    assert {"Omnigen2", "HunyuanVideo", "ChromaRadiance", "HunyuanDiT", "CosmosT2V", "Hunyuan3Dv2_1"} <= set(refused)
    assert "Stable_Cascade_C" in refused
    assert "under 0.3 %" in refused["HunyuanImage21"]  # through its base class, HunyuanVideo
    assert "frames x height x width x batch" in refused["CosmosI2V"]  # its own reason, through its base class


def test_the_error_type_reads_as_the_packs_own_name_wherever_it_is_installed():
    # ComfyUI loads the pack by its folder path and reports `type.__module__ + "." + __qualname__`.
    assert f"{UnsupportedModelError.__module__}.{UnsupportedModelError.__qualname__}" == "comfyui_tgate.UnsupportedModelError"
