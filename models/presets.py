"""Presets for the pathology foundation encoders the field runs: each entry declares its facts.

Data only (no torch): the architecture and its timm keyword arguments (layers named by strings),
the input transform (patch size and µm/px cut from the slide, the network's input size and how
the patch reaches it, mean/std), the feature definition, code size and parameter count, licence,
commercial use, gated access, the Hugging Face repository and file the weights are published as,
and the citation. Sources per entry: docs/models.md ("Foundation presets"). Nothing ships weights:
they are read from a file, a snapshot folder or the local Hugging Face cache
(:mod:`nic_models.pretrained`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

IMAGENET = "imagenet"
HOPTIMUS = ((0.707223, 0.578729, 0.703617), (0.211883, 0.230117, 0.177517))
HIBOU = ((0.7068, 0.5755, 0.722), (0.195, 0.2316, 0.1816))
KAIKO = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
LUNIT = ((0.70322989, 0.53606487, 0.66096631), (0.21716536, 0.26081574, 0.20723464))
CLASSIFIER_HEADS = ("head.", "fc.", "_fc.", "classifier.")
"""A classifier dropped from a trunk: the only keys a file may hold that a network leaves unused."""

SWIGLU = {"mlp_layer": "swiglu_packed", "act_layer": "silu"}


@dataclass(frozen=True)
class Preset:
    """One foundation encoder, as its model card declares it."""

    name: str
    architecture: str
    """A timm architecture (built by ``token-vit``), or ``resnet50-trunc`` / ``unavailable``."""
    code_dim: int
    params: int
    """Parameters of the network as built here (the classifier removed)."""
    licence: str
    commercial: bool
    gated: bool
    hf_repo: str
    citation: str
    kwargs: dict = field(default_factory=dict)
    feature: str = "cls"
    key_format: str = "timm"
    patch_size: int = 224
    input_size: int | None = None
    input_resize: str = "bilinear"
    input_crop: bool = False
    mpp: float = 0.5
    normalisation: str | tuple = IMAGENET
    weight_files: tuple[str, ...] = ("model.safetensors", "pytorch_model.bin")
    allowed_extra_keys: tuple[str, ...] = CLASSIFIER_HEADS
    aliases: tuple[str, ...] = ()
    depth: int = 0
    embed_dim: int = 0
    reg_tokens: int = 0
    layerscale: bool = False
    """What the card says of the network's shape, checked against the built key set (tests)."""
    note: str = ""


def _vit(name, architecture, code_dim, params, depth, embed_dim, **facts) -> Preset:
    return Preset(name=name, architecture=architecture, code_dim=code_dim, params=params, depth=depth,
                  embed_dim=embed_dim, **facts)


MAHMOOD_NC = "CC-BY-NC-ND-4.0"
PRESETS: tuple[Preset, ...] = (
    _vit("uni", "vit_large_patch16_224", 1024, 303_350_784, 24, 1024, aliases=("uni-v1",),
         kwargs={"img_size": 224, "patch_size": 16, "init_values": 1e-5, "dynamic_img_size": True},
         layerscale=True, patch_size=256, input_size=224,
         licence=MAHMOOD_NC, commercial=False, gated=True, hf_repo="MahmoodLab/UNI",
         weight_files=("pytorch_model.bin",),
         citation="R. J. Chen et al., Towards a general-purpose foundation model for computational pathology, "
                  "Nat. Med. 30:850-862, 2024"),
    _vit("uni2-h", "vit_giant_patch14_224", 1536, 681_394_176, 24, 1536,
         kwargs={"img_size": 224, "patch_size": 14, "depth": 24, "num_heads": 24, "init_values": 1e-5,
                 "embed_dim": 1536, "mlp_ratio": 2.66667 * 2, "no_embed_class": True, "reg_tokens": 8,
                 "dynamic_img_size": True, **SWIGLU},
         layerscale=True, reg_tokens=8, patch_size=256, input_size=224,
         licence=MAHMOOD_NC, commercial=False, gated=True, hf_repo="MahmoodLab/UNI2-h",
         weight_files=("pytorch_model.bin",),
         citation="R. J. Chen et al., Nat. Med. 2024 (UNI); UNI2-h model card, MahmoodLab/UNI2-h, 2025"),
    _vit("virchow", "vit_huge_patch14_224", 2560, 631_229_184, 32, 1280, feature="cls+mean",
         kwargs={"img_size": 224, "init_values": 1e-5, "mlp_ratio": 5.3375, "global_pool": "",
                 "dynamic_img_size": True, **SWIGLU},
         layerscale=True, licence="Apache-2.0", commercial=True, gated=True, hf_repo="paige-ai/Virchow",
         input_resize="bicubic",
         citation="E. Vorontsov et al., A foundation model for clinical-grade computational pathology and rare "
                  "cancers detection, Nat. Med. 30:2924-2935, 2024"),
    _vit("virchow2", "vit_huge_patch14_224", 2560, 631_239_424, 32, 1280, feature="cls+mean",
         kwargs={"img_size": 224, "init_values": 1e-5, "mlp_ratio": 5.3375, "global_pool": "",
                 "reg_tokens": 4, "dynamic_img_size": True, **SWIGLU},
         layerscale=True, reg_tokens=4, licence=MAHMOOD_NC, commercial=False, gated=True,
         hf_repo="paige-ai/Virchow2", input_resize="bicubic",
         citation="E. Zimmermann et al., Virchow2: Scaling Self-Supervised Mixed Magnification Models in "
                  "Pathology, arXiv:2408.00738, 2024"),
    _vit("h-optimus-0", "vit_giant_patch14_reg4_dinov2", 1536, 1_134_774_272, 40, 1536,
         kwargs={"img_size": 224, "init_values": 1e-5, "global_pool": "token", "dynamic_img_size": True},
         layerscale=True, reg_tokens=4, normalisation=HOPTIMUS, input_resize="bicubic",
         licence="Apache-2.0", commercial=True, gated=True, hf_repo="bioptimus/H-optimus-0",
         citation="C. Saillard et al., H-optimus-0, Bioptimus, 2024 (github.com/bioptimus/releases)"),
    _vit("h-optimus-1", "vit_giant_patch14_reg4_dinov2", 1536, 1_134_774_272, 40, 1536,
         kwargs={"img_size": 224, "init_values": 1e-5, "global_pool": "token", "dynamic_img_size": True},
         layerscale=True, reg_tokens=4, normalisation=HOPTIMUS, input_resize="bicubic",
         licence="CC-BY-NC-ND-4.0", commercial=False, gated=True,
         hf_repo="bioptimus/H-optimus-1",
         citation="Bioptimus, H-optimus-1, 2025 (huggingface.co/bioptimus/H-optimus-1)"),
    _vit("h0-mini", "vit_base_patch14_reg4_dinov2", 1536, 85_739_520, 12, 768, feature="cls+mean",
         kwargs={"img_size": 224, "init_values": 1e-5, "mlp_ratio": 2.66667 * 2, "dynamic_img_size": True,
                 **SWIGLU},
         note="SwiGLU as TRIDENT/eva/LazySlide pass it to timm; mlp_ratio 5.33 is what gives LazySlide's 85.7M "
              "count of the hub model (4 would give 71.6M), not read from its config.json",
         layerscale=True, reg_tokens=4, normalisation=HOPTIMUS, input_resize="bicubic",
         licence=MAHMOOD_NC, commercial=False, gated=True,
         hf_repo="bioptimus/H0-mini",
         citation="A. Filiot et al., Distilling foundation models for robust and efficient models in digital "
                  "pathology, MICCAI 2025 (arXiv:2501.16239)"),
    _vit("prov-gigapath", "vit_giant_patch14_dinov2", 1536, 1_134_953_984, 40, 1536, aliases=("gigapath",),
         kwargs={"img_size": 224, "in_chans": 3, "patch_size": 16, "embed_dim": 1536, "depth": 40,
                 "num_heads": 24, "init_values": 1e-5, "mlp_ratio": 5.33334, "dynamic_img_size": True},
         layerscale=True, patch_size=256, input_size=224, input_crop=True,
         licence="Apache-2.0 (README: research use only)", commercial=False, gated=True,
         hf_repo="prov-gigapath/prov-gigapath",
         citation="H. Xu et al., A whole-slide foundation model for digital pathology from real-world data, "
                  "Nature 630:181-188, 2024"),
    _vit("phikon", "vit_base_patch16_224", 768, 85_798_656, 12, 768, key_format="hf-vit",
         kwargs={"img_size": 224, "layer_norm_eps": 1e-12},
         allowed_extra_keys=("pooler.",), licence="other (Owkin non-commercial licence)", commercial=False,
         gated=False, hf_repo="owkin/phikon",
         citation="A. Filiot et al., Scaling Self-Supervised Learning for Histopathology with Masked Image "
                  "Modeling, medRxiv 2023.07.21.23292757"),
    _vit("phikon-v2", "vit_large_patch16_224", 1024, 303_350_784, 24, 1024, key_format="hf-dinov2",
         kwargs={"img_size": 224, "init_values": 1e-5},
         layerscale=True, allowed_extra_keys=("pooler.",),
         licence="other (Owkin non-commercial licence)", commercial=False, gated=False, hf_repo="owkin/phikon-v2",
         citation="A. Filiot et al., Phikon-v2, A large and public feature extractor for biomarker prediction, "
                  "arXiv:2409.09173, 2024"),
    _vit("hibou-b", "vit_base_patch14_reg4_dinov2", 768, 85_739_520, 12, 768, key_format="hf-dinov2",
         kwargs={"img_size": 224, "init_values": 1e-5, "mlp_ratio": 2.66667 * 2, **SWIGLU},
         layerscale=True, reg_tokens=4,
         normalisation=HIBOU, input_resize="bicubic", allowed_extra_keys=("pooler.",),
         note="SwiGLU as in DINOv2's SwiGLUFFNFused (hidden 2048, packed fc1 768 -> 4096): HistAI/hibou's "
              "build_model defaults (ffn_layer='swiglufused', mlp_ratio 4, 4 registers, LayerScale 1e-5)",
         licence="Apache-2.0", commercial=True, gated=True, hf_repo="histai/hibou-b",
         citation="D. Nechaev, A. Pchelnikov, E. Ivanova, Hibou: A Family of Foundational Vision Transformers "
                  "for Pathology, arXiv:2406.05074, 2024"),
    _vit("hibou-l", "vit_large_patch14_reg4_dinov2", 1024, 303_657_216, 24, 1024, key_format="hf-dinov2",
         kwargs={"img_size": 224, "init_values": 1e-5, "mlp_ratio": 2736 * 2 / 1024, **SWIGLU},
         layerscale=True, reg_tokens=4,
         normalisation=HIBOU, input_resize="bicubic", allowed_extra_keys=("pooler.",),
         note="SwiGLU as in DINOv2's SwiGLUFFNFused: hidden (int(4096 * 2 / 3) + 7) // 8 * 8 = 2736, packed "
              "fc1 1024 -> 5472 (mlp_ratio 5.34375); inferred from Hibou-B's build_model defaults and LazySlide's "
              "303.7M count (a GELU MLP gives 303.2M), not read from hibou-L's config.json",
         licence="Apache-2.0", commercial=True, gated=True, hf_repo="histai/hibou-L",
         citation="D. Nechaev et al., Hibou, arXiv:2406.05074, 2024"),
    *(
        _vit(f"kaiko-{v}", arch, dim, params, depth, dim,
             kwargs={"img_size": img, "dynamic_img_size": True, **({"init_values": 1e-5} if ls else {})},
             layerscale=ls, reg_tokens=4 if ls else 0, normalisation=KAIKO,
             licence="other (Kaiko Non-Commercial Public License, v1 May 2024)", commercial=False, gated=False,
             hf_repo=f"1aurent/{arch}.kaiko_ai_towards_large_pathology_fms",
             citation="kaiko.ai, N. Aben et al., Towards Large-Scale Training of Pathology Foundation Models, "
                      "arXiv:2404.15217, 2024")
        for v, arch, dim, params, depth, img, ls in (
            ("vits16", "vit_small_patch16_224", 384, 21_665_664, 12, 224, False),
            ("vits8", "vit_small_patch8_224", 384, 21_670_272, 12, 224, False),
            ("vitb16", "vit_base_patch16_224", 768, 85_798_656, 12, 224, False),
            ("vitb8", "vit_base_patch8_224", 768, 85_807_872, 12, 224, False),
            ("vitl14", "vit_large_patch14_reg4_dinov2", 1024, 304_370_688, 24, 518, True),
        )
    ),
    _vit("midnight", "vit_giant_patch14_dinov2", 3072, 1_134_769_664, 40, 1536, feature="cls+mean",
         key_format="hf-dinov2", aliases=("midnight-12k",),
         kwargs={"img_size": 224, "init_values": 1e-5}, layerscale=True, normalisation=KAIKO,
         allowed_extra_keys=("pooler.",), licence="MIT", commercial=True, gated=False,
         hf_repo="kaiko-ai/midnight",
         note="timm's ViT-g/14 DINOv2 (SwiGLU, no registers) as the card's base_model facebook/dinov2-giant; the "
              "MLP type is inferred from that, not read from Midnight's config.json. Trained at 224 px (card); "
              "a 518-px position embedding in the file is resampled to 224",
         citation="M. Karasikov et al., Training state-of-the-art pathology foundation models with orders of "
                  "magnitude less data, MICCAI 2025 (arXiv:2504.05186)"),
    _vit("lunit-vits8", "vit_small_patch8_224", 384, 21_670_272, 12, 384,
         kwargs={"img_size": 224, "dynamic_img_size": True}, normalisation=LUNIT,
         licence="other (Lunit non-commercial licence)", commercial=False, gated=False,
         hf_repo="1aurent/vit_small_patch8_224.lunit_dino",
         citation="M. Kang, H. Song, S. Park, D. Yoo, S. Pereira, Benchmarking Self-Supervised Learning on "
                  "Diverse Pathology Datasets, CVPR 2023"),
    Preset("conch-v1.5", "unavailable", 768, 0, MAHMOOD_NC, commercial=False, gated=True,
           hf_repo="MahmoodLab/conchv1_5", weight_files=("pytorch_model_vision.bin",),
           patch_size=512, input_size=448,
           note="CONCH v1.5's vision tower is a ViT-L/16 (LayerScale init 1.0) at 448 px whose tokens go through "
                "an attentional pooler (one 768-d query, 8 heads) and a LayerNorm (TITAN's tile encoder): not a "
                "timm architecture; use TRIDENT's conch_v15",
           citation="T. Ding et al., Multimodal whole slide foundation model for pathology (TITAN), "
                    "arXiv:2411.19666, 2024"),
    Preset("ctranspath", "unavailable", 768, 0, "GPL-3.0 (README: non-commercial academic use)", commercial=False,
           gated=False,
           hf_repo="", weight_files=("ctranspath.pth",), mpp=1.0,
           note="CTransPath is a Swin-T with a convolutional stem in a patched timm 0.5.4 (timm_ctp), whose "
                "key layout differs from current timm's Swin: not expressed here; use TRIDENT's ctranspath",
           citation="X. Wang et al., Transformer-based unsupervised contrastive learning for histopathological "
                    "image classification, Med. Image Anal. 81:102559, 2022"),
    Preset("resnet50-imagenet", "resnet50-trunc", 1024, 8_543_296, "BSD-3-Clause (torchvision weights)",
           commercial=True, gated=False, hf_repo="timm/resnet50.tv_in1k", aliases=("clam-resnet50",),
           patch_size=256, input_size=224, allowed_extra_keys=("fc.", "layer4."),
           weight_files=("model.safetensors", "pytorch_model.bin"),
           citation="He et al., CVPR 2016 (torchvision IMAGENET1K_V1 weights); truncated after layer3 as in "
                    "M. Y. Lu et al., CLAM, Nat. Biomed. Eng. 5:555-570, 2021"),
)
"""Every foundation preset, in the order ``nic encoders`` lists them."""
