"""`python -m tgate_bench.examples` end to end, and the model files it writes as ComfyUI's loaders see them.

The command writes tiny random-weight files (tgate_testkit.model_files), starts a real ComfyUI server
on them and runs the API example workflows with T-GATE and with gate_at 1.0.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import COMFYUI_MISSING, COMFYUI_PATH, PACK_ROOT

RUN = ["tgate_sd15_txt2img", "tgate_sd15_probe", "tgate_advanced_sdxl_txt2img", "tgate_sd35_txt2img"]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A base directory whose models/ holds every tiny file, written once for the module."""
    if COMFYUI_PATH is None:
        pytest.skip(COMFYUI_MISSING)
    return tmp_path_factory.mktemp("examples_base")


@pytest.fixture(scope="module")
def files(comfy, base):
    from tgate_testkit import model_files

    return {name: model_files.write(name, base / "models") for name in model_files.FILES}


def test_the_examples_command_runs_the_sd15_probe_advanced_and_sd35_workflows(files, base, tmp_path):
    report = tmp_path / "results.json"
    command = [sys.executable, "-m", "tgate_bench.examples", "--models-dir", str(base), "--json", str(report)]
    command += ["--workflows", ",".join(RUN), "--comfyui", str(COMFYUI_PATH), "--steps", "6"]  # 6 of 25 steps: quicker
    run = subprocess.run(command, cwd=PACK_ROOT, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    results = json.loads(report.read_text())["results"]
    assert [r["workflow"] for r in results] == RUN
    for r in results:
        assert r["ok"], r
        assert r["seconds_tgate"] > 0 and r["seconds_gate_1"] > 0
        assert r["outputs"] and all((base / "output" / f).is_file() for f in r["outputs"])
    assert "tgate_advanced_sdxl_txt2img  ok" in run.stdout  # the table
    probe = results[RUN.index("tgate_sd15_probe")]["outputs"]  # the probe's ungated image and T-GATE's, both saved
    assert any(f.startswith("TGATE_probe_ungated") for f in probe) and any(f.startswith("TGATE_0") for f in probe)
    assert f"using {files['sdxl']}" in run.stdout  # the module's files, not written again
    # The joint-attention example: T-GATE froze the MMDiT's text stream (the pack's log line in the server's log).
    assert "the text stream's keys and values are cached there" in (base / "comfyui-server.log").read_text()


def test_each_file_loads_through_comfyuis_loaders_as_its_model_type(files):
    import comfy.model_base as model_base
    import comfy.sd
    import comfy.utils

    from tgate_testkit.comfy_tiny_options import install

    install()  # what the examples' server loads from its custom_nodes (idempotent)

    for name, model_class, config_name, clip_class in (
        ("sd15", model_base.BaseModel, "SD15", "SD1ClipModel"),
        ("sdxl", model_base.SDXL, "SDXL", "SDXLClipModel"),
        ("sd35", model_base.SD3, "SD3", "SD3ClipModel"),
    ):
        model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(str(files[name]))
        assert type(model.model) is model_class and type(model.model.model_config).__name__ == config_name
        assert type(clip.cond_stage_model).__name__.rstrip("_") == clip_class
        assert vae.latent_channels == (16 if name == "sd35" else 4)
        cond = clip.encode_from_tokens_scheduled(clip.tokenize("a red fox"))
        if name == "sdxl":  # CLIP-L and the 3-layer CLIP-G
            assert cond[0][0].shape == (1, 77, 2048) and cond[0][1]["pooled_output"].shape == (1, 1280)
    # SD3.5's: CLIP-L and CLIP-G padded to T5's width, then T5-XXL's tokens; the MMDiT's buffer filled
    assert cond[0][0].shape == (1, 154, 4096) and cond[0][1]["pooled_output"].shape == (1, 2048) and cond[0][0].isfinite().all()
    assert model.model.diffusion_model.pos_embed.isfinite().all() and model.model.model_config.unet_config["qk_norm"] == "rms"

    for name, config_name in (("pixart-sigma", "PixArtSigma"), ("wan21", "WAN21_T2V")):
        assert type(comfy.sd.load_diffusion_model(str(files[name])).model.model_config).__name__ == config_name
    for name, clip_type, width in (("pixart-t5", comfy.sd.CLIPType.PIXART, 4096), ("wan-umt5", comfy.sd.CLIPType.WAN, 4096)):
        clip = comfy.sd.load_clip([str(files[name])], clip_type=clip_type)
        cond = clip.encode_from_tokens_scheduled(clip.tokenize("a red fox"))
        assert cond[0][0].shape[-1] == width and cond[0][0].isfinite().all()
    assert type(clip.cond_stage_model).__name__ == "WanTEModel"
    for name, channels, module in (("sdxl-vae", 4, "AutoencoderKL"), ("wan21-vae", 16, "WanVAE")):
        vae = comfy.sd.VAE(sd=comfy.utils.load_torch_file(str(files[name])))
        assert vae.latent_channels == channels and type(vae.first_stage_model).__name__ == module


def test_file_names_never_shadow_real_checkpoints():
    from tgate_testkit.model_files import FILES

    real = set()
    for path in (PACK_ROOT / "example_workflows" / "api").glob("*.json"):
        for node in json.loads(path.read_text()).values():
            real.update(v for k, v in node["inputs"].items() if k.endswith("_name") and isinstance(v, str))
    assert all(name.startswith("tgate-tiny-") for _, name, _ in FILES.values())
    assert not real & {name for _, name, _ in FILES.values()}


def test_the_runner_substitutes_the_tiny_files_and_sets_gate_at_on_the_tgate_node_only():
    from tgate_bench import examples

    workflow = json.loads((examples.WORKFLOWS / "tgate_wan21_t2v.json").read_text())
    files, sizes = examples.PLANS["tgate_wan21_t2v"]
    prepared, changes = examples.prepare(workflow, files, sizes, steps=None)
    assert prepared["1"]["inputs"]["unet_name"] == "tgate-tiny-wan21-t2v.safetensors"
    assert prepared["2"]["inputs"] == {"clip_name": "tgate-tiny-wan-umt5xxl.safetensors", "type": "wan", "device": "default"}
    assert prepared["8"]["inputs"]["length"] == 5 and "8.length: 33 -> 5" in changes
    off = examples.with_gate_at(prepared, gate_at=1.0)
    assert off["5"]["inputs"]["gate_at"] == 1.0 and prepared["5"]["inputs"]["gate_at"] == 0.4
    assert off["9"]["inputs"]["steps"] == prepared["9"]["inputs"]["steps"] == 30


def test_every_api_workflow_is_run_or_skipped_with_a_reason():
    from tgate_bench import examples

    assert examples.unaccounted() == []
    files = sorted(path.stem for path in examples.WORKFLOWS.glob("*.json"))
    assert "tgate_sd15_probe" in examples.PLANS  # the probe example runs, on the tiny SD1.5 checkpoint
    assert sorted([*examples.PLANS, *examples.SKIPPED]) == files


def test_the_examples_command_fails_on_a_workflow_neither_run_nor_skipped(tmp_path, monkeypatch, capsys):
    from tgate_bench import examples

    for path in examples.WORKFLOWS.glob("*.json"):
        (tmp_path / path.name).write_text(path.read_text())
    (tmp_path / "tgate_new_example.json").write_text("{}")
    monkeypatch.setattr(examples, "WORKFLOWS", tmp_path)
    monkeypatch.delenv("COMFYUI_PATH", raising=False)  # past the check it would stop at "ComfyUI not found", never run
    with pytest.raises(SystemExit) as exit_:
        examples.main(["--comfyui", str(tmp_path / "no-comfyui")])
    assert exit_.value.code == 2
    assert "tgate_new_example.json is neither run (PLANS) nor skipped with a reason (SKIPPED)" in capsys.readouterr().err

    monkeypatch.setitem(examples.SKIPPED, "tgate_new_example", " ")
    assert examples.unaccounted() == ["tgate_new_example is skipped without a reason"]
    monkeypatch.setitem(examples.SKIPPED, "tgate_new_example", "needs a model the kit cannot write")
    assert examples.unaccounted() == []
    (tmp_path / "tgate_sd15_probe.json").unlink()
    assert examples.unaccounted() == [f"tgate_sd15_probe is listed but {tmp_path / 'tgate_sd15_probe'}.json does not exist"]


def test_a_workflow_fails_where_tgate_did_not_act_or_the_image_is_not_finite(tmp_path):
    from PIL import Image

    from tgate_bench import examples

    summary = "T-GATE: 9 of 20 steps planned with text, then ...; {} of 40 CFG branch evaluations saved; 0.3 s per step\n"
    assert examples.not_acted("got prompt\n" + summary.format(11)) == ""
    assert "saved no CFG branch evaluation" in examples.not_acted(summary.format(0))
    assert "no T-GATE run summary" in examples.not_acted("got prompt\nPrompt executed in 1 s\n")
    Image.new("RGB", (8, 8), (0, 0, 0)).save(tmp_path / "flat.png")  # what SaveImage writes for a NaN image
    Image.effect_noise((8, 8), 40).save(tmp_path / "noise.png")
    (tmp_path / "clip.mp4").write_bytes(b"not an image")  # videos are not read
    assert examples.not_finite(tmp_path, ["noise.png", "clip.mp4"], "") == ""
    assert "flat.png is one flat colour" in examples.not_finite(tmp_path, ["noise.png", "flat.png"], "")
    warning = "RuntimeWarning: invalid value encountered in cast"
    assert examples.NAN_CAST in examples.not_finite(tmp_path, ["noise.png"], warning)
