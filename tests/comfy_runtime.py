"""Real ComfyUI for the integration tests: tiny random-weight models from ComfyUI's own model
classes, the pack loaded by ComfyUI's custom-node loader, and small probes built on torch hooks.

Imported only once ComfyUI is on sys.path (see conftest.py).
"""

from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode

from tgate_bench.comfy_env import import_comfyui, load_pack
from tgate_bench.models import ARCHITECTURES, build_model, random_cond, randomize

SD15_UNET = ARCHITECTURES["tiny-sd15"].unet
CONTEXT_TOKENS = ARCHITECTURES["tiny-sd15"].context_tokens
# What the tiny ACE-Step text encoder's tokenizer is trained on, and the lyrics the tests sing.
TINY_ACE_TAGS = (
    "upbeat electronic pop, female vocals, synth bass, 120 bpm",
    "calm acoustic guitar ballad, piano, soft drums",
    "rock anthem with distorted guitars and male vocals",
    "lofi hip hop beats, jazzy chords, vinyl crackle",
)
TINY_ACE_LYRICS = "[verse]\nla la la\nhello"


@dataclass
class ComfyRuntime:
    comfy_path: Path
    pack_module: object
    TGate: type
    TGateAdvanced: type
    nodes: object
    models: dict = field(default_factory=dict)  # tiny models built once per session, by builder name

    @classmethod
    def load(cls, comfy_path: Path, pack_root: Path) -> ComfyRuntime:
        nodes = import_comfyui(comfy_path)
        if "TGate" not in nodes.NODE_CLASS_MAPPINGS:
            load_pack(nodes, pack_root)
        node = nodes.NODE_CLASS_MAPPINGS["TGate"]
        advanced = nodes.NODE_CLASS_MAPPINGS["TGateAdvanced"]
        module = sys.modules[node.__module__]
        return cls(comfy_path=comfy_path, pack_module=module, TGate=node, TGateAdvanced=advanced, nodes=nodes)

    @property
    def engine(self):
        """The pack's engine as ComfyUI loaded it (not the test's own `import tgate`)."""
        return sys.modules[self.pack_module.__name__.rsplit(".", 1)[0] + ".tgate"]

    def tgate(self, model, gate_at=0.4, fidelity_branch="uncond", cache_device="model_device"):
        return self.TGate.execute(model, gate_at=gate_at, fidelity_branch=fidelity_branch, cache_device=cache_device).result[0]

    def tgate_advanced(
        self, model, gate_at=0.4, fidelity_branch="auto", cache_device="model_device", warm_up=2, sp_interval=5, fi_interval=1
    ):
        settings = dict(gate_at=gate_at, fidelity_branch=fidelity_branch, cache_device=cache_device)
        reuse = dict(warm_up=warm_up, sp_interval=sp_interval, fi_interval=fi_interval)
        return self.TGateAdvanced.execute(model, **settings, **reuse).result[0]

    # -- models and conditioning ------------------------------------------------------------
    def family_model(self, builder: str):
        """The tiny model `builder` (a method name: "ltxv", "ace_step"...), built once per session."""
        if builder not in self.models:
            self.models[builder] = getattr(self, builder)()
        return self.models[builder]

    @staticmethod
    def sd15(seed: int = 0):
        return build_model("tiny-sd15", seed=seed)

    @staticmethod
    def sdxl(seed: int = 0):
        return build_model("tiny-sdxl", seed=seed)

    @staticmethod
    def cond(seed: int, batch: int = 1, pooled: bool = False):
        return random_cond("tiny-sdxl" if pooled else "tiny-sd15", seed, batch)

    @staticmethod
    def svd(seed: int = 0):
        return build_model("tiny-svd", seed=seed)

    @staticmethod
    def svd_conditioning(seed: int = 0, frames: int = 4, size: int = 16, **settings):
        """(positive, negative, latent) from ComfyUI's SVD_img2vid_Conditioning node, run for real on a
        seeded init image with tiny random-weight CLIP-vision and VAE models. `size`: the latent's side;
        `settings`: motion_bucket_id, fps, augmentation_level."""
        from comfy_extras.nodes_video_model import SVD_img2vid_Conditioning

        s = {"motion_bucket_id": 127, "fps": 6, "augmentation_level": 0.0, **settings}
        image = torch.rand(1, size * 8, size * 8, 3, generator=torch.Generator().manual_seed(seed))
        positive, negative, latent = SVD_img2vid_Conditioning().encode(
            tiny_clip_vision(seed), image, tiny_vae(seed), size * 8, size * 8, frames, **s
        )
        return positive, negative, latent["samples"]

    @staticmethod
    def ace_step(seed: int = 0):
        return build_model("tiny-ace-step", seed=seed)

    def ace_conditioning(
        self,
        seed: int = 0,
        tags: str = TINY_ACE_TAGS[0],
        lyrics: str = TINY_ACE_LYRICS,
        lyrics_strength: float = 1.0,
        negative=None,
    ):
        """(positive, negative) as an ACE-Step workflow makes them: TextEncodeAceStepAudio, run for real
        with a tiny random-weight UMT5 and the real lyrics tokenizer, for the positive; the negative is
        ConditioningZeroOut of it (ComfyUI's ACE-Step template), or, given `negative` tags, a second
        TextEncodeAceStepAudio with those tags and no lyrics."""
        from comfy_extras.nodes_ace import TextEncodeAceStepAudio

        clip = tiny_ace_text_encoder(seed)
        positive = TextEncodeAceStepAudio.execute(clip, tags, lyrics, lyrics_strength).result[0]
        if negative is None:
            negative = self.nodes.ConditioningZeroOut().zero_out(positive)[0]
        else:
            negative = TextEncodeAceStepAudio.execute(clip, negative, "", lyrics_strength).result[0]
        return positive, negative

    # -- LTXV and Cosmos Predict2 ---------------------------------------------------------------
    @staticmethod
    def ltxv(seed: int = 0):
        return build_model("tiny-ltxv", seed=seed)

    @staticmethod
    def cosmos_predict2(seed: int = 0, i2v: bool = False):
        return build_model("tiny-cosmos-predict2-i2v" if i2v else "tiny-cosmos-predict2", seed=seed)

    @staticmethod
    def t5_text(arch: str, seed: int, batch: int = 1):
        """What CLIPTextEncode gives with the family's T5-XXL encoder, values random: the padded tokens
        and the attention mask, without what conditioning nodes add later (LTXV's frame_rate)."""
        return random_cond(replace(ARCHITECTURES[arch], cond_values=()), seed, batch)

    @staticmethod
    def ltxv_conditioning(
        seed: int = 0,
        *,
        image: bool = False,
        guide: bool = False,
        frame_rate: float = 25.0,
        size: int = 128,
        length: int = 17,
        batch: int = 1,
    ):
        """(positive, negative, latent dict) from ComfyUI's own LTXV nodes: T5 text through
        LTXVConditioning, then EmptyLTXVLatentVideo, or LTXVImgToVideo on a seeded image with a tiny
        random-weight LTXV VAE (`image`), and LTXVAddGuide with a second image as the last frame's
        keyframe (`guide`). `size` pixels square, `length` frames."""
        from comfy_extras.nodes_lt import EmptyLTXVLatentVideo, LTXVAddGuide, LTXVConditioning, LTXVImgToVideo

        text = ComfyRuntime.t5_text("tiny-ltxv", seed + 1), ComfyRuntime.t5_text("tiny-ltxv", seed + 2)
        positive, negative = LTXVConditioning.execute(*text, frame_rate=frame_rate).result
        if image or guide:
            vae = tiny_ltxv_vae(seed)
        if image:
            picture = torch.rand(1, size, size, 3, generator=torch.Generator().manual_seed(seed))
            positive, negative, latent = LTXVImgToVideo.execute(
                positive, negative, picture, vae, size, size, length, batch, strength=1.0
            ).result
        else:
            latent = EmptyLTXVLatentVideo.execute(size, size, length, batch).result[0]
        if guide:
            picture = torch.rand(1, size, size, 3, generator=torch.Generator().manual_seed(seed + 100))
            positive, negative, latent = LTXVAddGuide.execute(
                positive, negative, vae, latent, picture, frame_idx=-1, strength=1.0
            ).result
        return positive, negative, latent

    @staticmethod
    def cosmos_predict2_conditioning(seed: int = 0, *, image: bool = False, size: int = 128, length: int = 9, batch: int = 1):
        """(positive, negative, latent dict) as ComfyUI makes them for Cosmos Predict2: T5 text (the
        conds carry nothing else), then EmptySD3LatentImage (text-to-image; KSampler adds the frame
        axis, see comfy.sample.fix_empty_latent_channels), or CosmosPredict2ImageToVideoLatent on a
        seeded start image with a random-weight Wan 2.1 VAE (`image`; ComfyUI builds that VAE at full
        size only, so keep `size` small)."""
        from comfy_extras.nodes_cosmos import CosmosPredict2ImageToVideoLatent
        from comfy_extras.nodes_sd3 import EmptySD3LatentImage

        positive = ComfyRuntime.t5_text("tiny-cosmos-predict2", seed + 1)
        negative = ComfyRuntime.t5_text("tiny-cosmos-predict2", seed + 2)
        if image:
            picture = torch.rand(1, size, size, 3, generator=torch.Generator().manual_seed(seed))
            latent = CosmosPredict2ImageToVideoLatent.execute(
                wan21_vae(seed), size, size, length, batch, start_image=picture
            ).result[0]
        else:
            latent = EmptySD3LatentImage.execute(size, size, batch).result[0]
        return positive, negative, latent

    # -- Wan 2.1/2.2 ---------------------------------------------------------------------------
    @staticmethod
    def wan(arch: str = "tiny-wan21-t2v", seed: int = 0):
        return build_model(arch, seed=seed)

    def wan_i2v(self):
        return self.wan("tiny-wan21-i2v")

    def wan22_5b(self):
        return self.wan("tiny-wan22-5b")

    def wan_vace(self):
        return self.wan("tiny-wan21-vace")

    def wan_i2v_conditioning(self, seed: int = 0, side: int = 8, frames: int = 3, batch: int = 1):
        """(positive, negative, latent) from ComfyUI's WanImageToVideo node, run for real: a seeded start
        image encoded by a tiny Wan 2.1 VAE, the CLIP-vision output of CLIPVisionEncode on a tiny
        ViT-H-shaped model, and UMT5-shaped text (as CLIPTextEncode gives it) in both conds."""
        from comfy_extras.nodes_wan import WanImageToVideo

        width = height = side * 8
        image = torch.rand(1, height, width, 3, generator=torch.Generator().manual_seed(seed))
        vision = self.nodes.CLIPVisionEncode().encode(tiny_clip_vision_h(seed), image, "none")[0]
        text = [random_cond("tiny-wan21-i2v", seed + i) for i in (1, 2)]
        positive, negative = ([[c[0][0], {}]] for c in text)  # the text alone, as CLIPTextEncode gives it
        out = WanImageToVideo.execute(
            positive, negative, tiny_wan_vae(seed), width, height, (frames - 1) * 4 + 1, batch, start_image=image,
            clip_vision_output=vision,
        )  # fmt: skip
        positive, negative, latent = out.result
        return positive, negative, latent["samples"]

    @staticmethod
    def wan_vace_conditioning(seed: int = 0, controls: int = 2, side: int = 8, frames: int = 3):
        """(positive, negative) as WanVaceToVideo chained `controls` times leaves them: both conds carry
        the same lists of control frames (32 channels), masks (64) and strengths."""
        import node_helpers

        g = torch.Generator().manual_seed(seed)
        values = {
            "vace_frames": [torch.randn(1, 32, frames, side, side, generator=g) for _ in range(controls)],
            "vace_mask": [torch.rand(1, 64, frames, side, side, generator=g) for _ in range(controls)],
            "vace_strength": [1.0, 0.7][:controls],
        }
        text = [random_cond("tiny-wan21-vace", seed + i) for i in (1, 2)]
        return tuple(node_helpers.conditioning_set_values(c, values) for c in text)

    # -- PixArt -------------------------------------------------------------------------------
    @staticmethod
    def pixart(arch: str = "tiny-pixart-sigma", seed: int = 0):
        return build_model(arch, seed=seed)

    def pixart_alpha(self):
        return self.pixart("tiny-pixart-alpha")

    def pixart_conditioning(self, positive: str, negative: str = "", *, size: int | None = None, seed: int = 0):
        """(positive, negative) as a PixArt workflow makes them, with ComfyUI's own text encode nodes over
        a tiny random-weight T5: CLIPTextEncode, or with `size` (pixels), CLIPTextEncodePixArtAlpha,
        which adds alpha's size micro-condition (width, height). ComfyUI's PixArt T5 neither pads nor
        masks: a prompt gives as many tokens as it has, the empty prompt one, and ComfyUI runs the two
        branches in separate model calls when their lengths cannot share one (more than 4x apart)."""
        clip = tiny_pixart_text_encoder(seed)
        if size is None:
            encode = self.nodes.CLIPTextEncode().encode
            return encode(clip, positive)[0], encode(clip, negative)[0]
        from comfy_extras.nodes_pixart import CLIPTextEncodePixArtAlpha

        return tuple(CLIPTextEncodePixArtAlpha.execute(clip, size, size, text).result[0] for text in (positive, negative))

    # -- sampling -----------------------------------------------------------------------------
    def sample(self, model, positive, negative, *, size=16, batch=1, seed=0, latent=None, **settings):
        """comfy.sample.sample with a seeded noise, as KSampler does. `settings`: steps, cfg, sampler,
        scheduler, denoise, callback, start_step, last_step, sigmas."""
        import comfy.sample

        s = {**SAMPLING_DEFAULTS, **settings}
        if latent is None:
            latent = torch.zeros(batch, 4, size, size)
        noise = comfy.sample.prepare_noise(latent, seed)
        steps, cfg, sampler, scheduler = s.pop("steps"), s.pop("cfg"), s.pop("sampler"), s.pop("scheduler")
        return comfy.sample.sample(
            model, noise, steps, cfg, sampler, scheduler, positive, negative, latent, disable_pbar=True, seed=seed, **s
        )

    def ksampler(self, model, positive, negative, *, size=16, batch=1, seed=0, latent=None, **settings):
        """The KSampler node itself."""
        s = {**SAMPLING_DEFAULTS, **settings}
        latent = latent if latent is not None else {"samples": torch.zeros(batch, 4, size, size)}
        node = self.nodes.KSampler()
        return node.sample(
            model, seed, s["steps"], s["cfg"], s["sampler"], s["scheduler"], positive, negative, latent, denoise=s["denoise"]
        )[0]["samples"]


SAMPLING_DEFAULTS = {"steps": 12, "cfg": 7.0, "sampler": "euler", "scheduler": "normal", "denoise": 1.0}


@dataclass
class ModelProbe:
    """Counts, with torch hooks, what the diffusion model and its cross-attention really compute."""

    batch_sizes: list[int] = field(default_factory=list)
    to_q_calls: int = 0
    attn2_calls: int = 0

    @contextlib.contextmanager
    def watch(self, patcher):
        diffusion_model = patcher.model.diffusion_model
        handles = [diffusion_model.register_forward_pre_hook(lambda m, args: self.batch_sizes.append(args[0].shape[0]))]
        for name, module in diffusion_model.named_modules():
            if name.endswith("attn2"):
                handles.append(module.register_forward_pre_hook(self._count_attn2))
                handles.append(module.to_q.register_forward_pre_hook(self._count_to_q))
        try:
            yield self
        finally:
            for h in handles:
                h.remove()

    def _count_attn2(self, module, args):
        self.attn2_calls += 1

    def _count_to_q(self, module, args):
        self.to_q_calls += 1


SYNCING_OPS = {"item", "tolist", "__bool__", "__float__", "__int__", "nonzero", "cpu", "numpy"}


class SyncCounter(TorchFunctionMode):
    """Counts tensor operations that make the host wait for the device, and where they happen."""

    def __init__(self):
        super().__init__()
        self.total = 0
        self.in_attention = 0
        self._depth = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in SYNCING_OPS:
            self.total += 1
            if self._depth:
                self.in_attention += 1
        return func(*args, **(kwargs or {}))

    @contextlib.contextmanager
    def around_attention(self, patcher, suffixes=("attn2",)):
        handles = []
        for name, module in patcher.model.diffusion_model.named_modules():
            if name.endswith(suffixes):
                handles.append(module.register_forward_pre_hook(lambda m, a: self._enter()))
                handles.append(module.register_forward_hook(lambda m, a, o: self._leave()))
        try:
            with self:
                yield self
        finally:
            for h in handles:
                h.remove()

    def _enter(self):
        self._depth += 1

    def _leave(self):
        self._depth -= 1


from tgate_testkit.model_files import SD_VAE, write_sd15_checkpoint  # noqa: E402,F401

# SVD's conditioning node needs a CLIP-vision model and a VAE. These are their real ComfyUI classes,
# shrunk: the CLIP-vision projection is as wide as tiny-svd's context, and the VAE keeps SD's 8x
# downscale (four levels) and 4 latent channels.
TINY_CLIP_VISION = {
    "attention_dropout": 0.0,
    "dropout": 0.0,
    "hidden_act": "gelu",
    "hidden_size": 32,
    "image_size": 32,
    "intermediate_size": 64,
    "layer_norm_eps": 1e-05,
    "model_type": "clip_vision_model",
    "num_attention_heads": 2,
    "num_channels": 3,
    "num_hidden_layers": 2,
    "patch_size": 8,
    "projection_dim": ARCHITECTURES["tiny-svd"].context_dim,
}
TINY_VAE = dict(SD_VAE, ch=32, ch_mult=[1, 1, 1, 1], num_res_blocks=1)


def tiny_clip_vision(seed: int = 0, settings: dict | None = None):
    import json
    import tempfile

    import comfy.clip_vision

    # ClipVisionModel reads its configuration from a json file only.
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "clip_vision.json"
        config.write_text(json.dumps(settings or TINY_CLIP_VISION))
        clip_vision = comfy.clip_vision.ClipVisionModel(str(config))
    randomize(clip_vision.model, seed)
    return clip_vision


def tiny_vae(seed: int = 0):
    import comfy.ldm.models.autoencoder as autoencoder
    import comfy.sd

    params = {"ddconfig": TINY_VAE, "embed_dim": 4}
    module = autoencoder.AutoencoderKL(**params)
    randomize(module, seed)
    return comfy.sd.VAE(sd=module.state_dict(), config={"params": params})


# ACE-Step's text encoder is ComfyUI's AceT5Model: a UMT5-base (its configuration is fixed in a json
# file, 768 wide, a 256k vocabulary) for the tags and the lyrics tokenizer (a vocabulary file in
# ComfyUI) for the lyrics. The UMT5 is shrunk through the configuration override SDClipModel reads
# from model_options ("<model_name>_model_config"; UMT5BaseModel sets no model name) to the width of
# tiny-ace-step's context, and its sentencepiece tokenizer is trained here on TINY_ACE_TAGS.
TINY_UMT5 = {"d_model": ARCHITECTURES["tiny-ace-step"].context_dim, "d_ff": 64, "d_kv": 16, "num_heads": 2, "num_layers": 2}


def tiny_ace_text_encoder(seed: int = 0):
    import io

    import comfy.sd
    import comfy.supported_models_base
    import comfy.text_encoders.ace as ace
    import sentencepiece

    spiece = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(TINY_ACE_TAGS * 20),
        model_writer=spiece,
        vocab_size=64,
        hard_vocab_limit=False,
        pad_id=0,  # UMT5's special tokens: pad 0, end 1
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        minloglevel=2,
    )
    target = comfy.supported_models_base.ClipTarget(ace.AceT5Tokenizer, ace.AceT5Model)
    config = dict(TINY_UMT5, vocab_size=64)
    clip = comfy.sd.CLIP(target, tokenizer_data={"spiece_model": spiece.getvalue()}, model_options={"_model_config": config})
    randomize(clip.cond_stage_model, seed)
    return clip


# LTXV's VAE (comfy/ldm/lightricks/vae), shrunk through the configuration ComfyUI reads from a
# checkpoint's metadata: the real 128 latent channels, 8x time and 32x space downscale (patch 4 and
# three compress_all stages), one residual block at each end.
TINY_LTXV_VAE = {
    "dims": 3,
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 128,
    "blocks": [["res_x", 1], ["compress_all", 1], ["compress_all", 1], ["compress_all", 1], ["res_x", 1]],
    "scaling_factor": 1.0,
    "norm_layer": "pixel_norm",
    "patch_size": 4,
    "latent_log_var": "uniform",
    "use_quant_conv": False,
    "causal_decoder": False,
}


def tiny_ltxv_vae(seed: int = 0):
    import json

    import comfy.ldm.lightricks.vae.causal_video_autoencoder as ltxv_vae
    import comfy.sd

    module = ltxv_vae.VideoVAE(config=TINY_LTXV_VAE)
    randomize(module, seed)
    stats = module.per_channel_statistics  # buffers, left uninitialized by the constructor
    stats.get_buffer("mean-of-means").zero_()
    stats.get_buffer("std-of-means").fill_(1.0)
    return comfy.sd.VAE(sd=module.state_dict(), metadata={"config": json.dumps({"vae": TINY_LTXV_VAE})})


def wan21_vae(seed: int = 0):
    """Cosmos Predict2's VAE (Wan 2.1's) with random weights. ComfyUI detects it from the state dict
    and always builds it at full width (dim 96), so it is not tiny: about 127M parameters."""
    import comfy.ldm.wan.vae as wan_vae
    import comfy.sd

    module = wan_vae.WanVAE(
        dim=96,
        z_dim=16,
        dim_mult=[1, 2, 4, 4],
        num_res_blocks=2,
        attn_scales=[],
        temperal_downsample=[False, True, True],
        dropout=0.0,
    )
    randomize(module, seed)
    return comfy.sd.VAE(sd=module.state_dict())


# Wan 2.1's VAE and a ViT-H-shaped CLIP vision model, tiny, for the real WanImageToVideo node.
TINY_WAN_VAE_DIM = 8  # the real Wan 2.1 VAE is 96 wide; everything else (8x spatial, 4x temporal, 16 channels) is real


def tiny_wan_vae(seed: int = 0):
    """comfy.sd.VAE built as for a real Wan 2.1 VAE checkpoint, 8 wide instead of 96.

    comfy.sd.VAE detects the Wan 2.1 VAE from its state dict and builds comfy.ldm.wan.vae.WanVAE with a
    fixed config (dim 96); for the time of the call that class is swapped for one forcing dim 8, and
    the state dict comes from that same tiny class, so all of ComfyUI's Wan VAE handling (scale factors,
    latent format, causal 4x time compression) is the real one."""
    import comfy.ldm.wan.vae as wan_vae
    import comfy.sd

    real = wan_vae.WanVAE

    class TinyWanVAE(real):
        def __init__(self, **kwargs):
            super().__init__(**{**kwargs, "dim": TINY_WAN_VAE_DIM})

    module = TinyWanVAE(
        z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[], temperal_downsample=[False, True, True], dropout=0.0
    )
    randomize(module, seed)
    sd = {k: v.contiguous() for k, v in module.state_dict().items()}
    wan_vae.WanVAE = TinyWanVAE
    try:
        vae = comfy.sd.VAE(sd=sd)
    finally:
        wan_vae.WanVAE = real
    return vae


# ViT-H/14's token layout (224 px, 14 px patches: 257 tokens) and width (1280), 2 thin layers.
TINY_CLIP_VISION_H = dict(TINY_CLIP_VISION, hidden_size=1280, image_size=224, patch_size=14, projection_dim=64)


def tiny_clip_vision_h(seed: int = 0):
    return tiny_clip_vision(seed, TINY_CLIP_VISION_H)


# PixArt's text encoder as CLIPLoader (type "pixart") builds it, shrunk: ComfyUI's own PixArt clip
# target (PixArtTokenizer, with the T5 tokenizer files ComfyUI ships, and PixArtT5XXL), its T5-XXL
# configuration overridden through the model option SDClipModel reads ("t5xxl_model_config") to the
# tiny PixArt models' caption width.
TINY_PIXART_T5 = {
    "d_model": ARCHITECTURES["tiny-pixart-sigma"].context_dim,
    "d_ff": 64,
    "d_kv": 16,
    "num_heads": 2,
    "num_layers": 2,
}


def tiny_pixart_text_encoder(seed: int = 0):
    import comfy.sd
    import comfy.supported_models as supported_models

    target = supported_models.PixArtSigma({}).clip_target()  # PixArtAlpha's is the same
    clip = comfy.sd.CLIP(target, model_options={"t5xxl_model_config": TINY_PIXART_T5, "dtype": torch.float32})
    randomize(clip.cond_stage_model, seed)
    return clip
