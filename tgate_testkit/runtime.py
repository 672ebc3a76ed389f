"""Real ComfyUI for the tests and the examples: the pack loaded by ComfyUI's custom-node loader,
tiny random-weight models of every served family, each family's own conditioning nodes run for
real, and sampling as KSampler does it.

Imported only once ComfyUI is on sys.path (see comfy_env.import_comfyui).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from .comfy_env import import_comfyui, load_pack
from .encoders import (
    TINY_ACE_LYRICS,
    TINY_ACE_TAGS,
    tiny_ace_text_encoder,
    tiny_clip_vision,
    tiny_clip_vision_h,
    tiny_ltxv_vae,
    tiny_pixart_text_encoder,
    tiny_vae,
    tiny_wan_vae,
    wan21_vae,
)
from .models import ARCHITECTURES, build_model, random_cond

CONTEXT_TOKENS = ARCHITECTURES["tiny-sd15"].context_tokens


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
        self,
        model,
        gate_at=0.4,
        fidelity_branch="auto",
        cache_device="model_device",
        warm_up=2,
        sp_interval=5,
        fi_interval=1,
        **deepcache,  # deepcache_interval, deepcache_branch: left out as an older workflow leaves them out
    ):
        settings = dict(gate_at=gate_at, fidelity_branch=fidelity_branch, cache_device=cache_device)
        reuse = dict(warm_up=warm_up, sp_interval=sp_interval, fi_interval=fi_interval)
        return self.TGateAdvanced.execute(model, **settings, **reuse, **deepcache).result[0]

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
