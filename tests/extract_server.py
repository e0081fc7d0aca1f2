"""One real server over the tiny extraction and CLIP checkpoints (tests/tiny_extract_models.py), for e2e and compat.

`start_extract_server` builds the checkpoints, writes one SIE model-config YAML per model with `weights_path:`, and
starts a server that preloads them all.
"""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from tests import tiny_extract_models as tiny
from tests.server import FamilyServer, Server

SENTIMENT, NLI, NER, GLINER, CLIP, CLIP_IMAGES = ("test/sentiment", "test/nli", "test/ner", "test/gliner",
                                                  "test/clip", "test/clip-images")
NLI_TEMPLATE = "This text is about {}."
CLIP_DIM = 16  # tiny_extract_models.build_clip's projection_dim
CLIP_MAX_PIXELS = 1_000_000  # the CLIP configs' loadtime max_image_pixels

# One config per model: sie_id, family, the extra YAML lines (each config gets weights_path from the built folder).
CONFIGS = {
    SENTIMENT: ("sentiment", "tasks: {extract: {}}\nprofiles: {default: {adapter: classifier}}\n"),
    NLI: ("nli", "tasks: {extract: {}}\nprofiles: {default: {adapter: classifier, adapter_options: {runtime: "
                 f"{{hypothesis_template: \"{NLI_TEMPLATE}\", multi_label: false}}}}}}}}\n"),
    NER: ("ner", "tasks: {extract: {}}\nprofiles: {default: {adapter: ner}}\n"),
    GLINER: ("gliner", "tasks: {extract: {}}\nprofiles: {default: {adapter: gliner, adapter_options: "
                       "{runtime: {threshold: 0.5}}}}\n"),
    CLIP: ("clip", f"inputs: {{text: true, image: true}}\ntasks: {{encode: {{dense: {{dim: {CLIP_DIM}}}}}}}\n"
                   "profiles: {default: {adapter: clip, adapter_options: {loadtime: {max_image_pixels: "
                   f"{CLIP_MAX_PIXELS}}}, runtime: {{normalize: true}}}}}}}}\n"),
    # The same weights behind an image-only profile: the router refuses text for it.
    CLIP_IMAGES: ("clip", f"inputs: {{text: false, image: true}}\ntasks: {{encode: {{dense: {{dim: {CLIP_DIM}}}}}}}\n"
                          "profiles: {default: {adapter: clip, adapter_options: {loadtime: {inputs: [image]}}}}\n"),
}
PRELOADED = (SENTIMENT, NLI, NER, GLINER, CLIP)

TEXTS = ["Alice lives in Paris and works for Acme Corporation.", "Bob moved from Berlin to London last year!",
         "The weather is great today, I love sunny days.", "This movie was terrible and boring."]
LABELS = ["travel", "sports", "politics", "weather"]
ENTITY_LABELS = ["person", "location", "organization"]


ExtractServer = FamilyServer


def build_checkpoints(root: Path) -> dict[str, Path]:
    built = {"bert": tiny.build_bert(root / "bert")}
    built["gliner"] = tiny.build_gliner(root / "gliner", built["bert"])
    for name in ("sentiment", "nli", "ner", "clip"):
        built[name] = getattr(tiny, f"build_{name}")(root / name)
    return {sie_id: built[name] for sie_id, (name, _) in CONFIGS.items()}


def write_bundle(folder: Path, checkpoints: dict[str, Path]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for sie_id, (_, body) in CONFIGS.items():
        text = f"sie_id: {sie_id}\nweights_path: {checkpoints[sie_id]}\n{body}"
        (folder / f"{sie_id.split('/')[-1]}.yaml").write_text(text)
    return folder


def start_extract_server(root: Path) -> ExtractServer:
    """Build, configure and start (without waiting for readiness); the caller stops `server`."""
    checkpoints = build_checkpoints(root / "models")
    bundle = write_bundle(root / "bundle", checkpoints)
    preload = [arg for model in PRELOADED for arg in ("--preload", model)]
    server = Server(["--bundle", str(bundle), *preload], log=root / "server.log")
    return ExtractServer(server=server, folders=checkpoints)


def image_bytes(fmt: str, size: tuple[int, int] = (48, 40), seed: int = 0) -> bytes:
    """Random pixels saved in `fmt` (JPEG, PNG, WEBP)."""
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format=fmt)
    return out.getvalue()


def declared_png(width: int, height: int) -> bytes:
    """A PNG whose header declares `width` x `height` pixels, with almost no data behind it (a few hundred bytes)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
            + chunk(b"IEND", b""))


def clip_reference(folder: Path) -> tuple[Any, Any]:
    """CLIPModel and its processor, loaded from the checkpoint folder."""
    from transformers import AutoProcessor, CLIPModel

    return CLIPModel.from_pretrained(folder, local_files_only=True).eval(), AutoProcessor.from_pretrained(folder)


def clip_text(reference: tuple[Any, Any], text: str) -> np.ndarray:
    """`get_text_features`, normalised."""
    import torch
    import torch.nn.functional as F

    model, processor = reference
    with torch.inference_mode():
        inputs = processor.tokenizer([text], truncation=True, max_length=77, return_tensors="pt")
        return F.normalize(model.get_text_features(**inputs).pooler_output[0], dim=-1).numpy()


def clip_image(reference: tuple[Any, Any], data: bytes) -> np.ndarray:
    """`get_image_features` of the decoded bytes, normalised."""
    import torch
    import torch.nn.functional as F

    model, processor = reference
    with torch.inference_mode():
        inputs = processor(images=Image.open(io.BytesIO(data)).convert("RGB"), return_tensors="pt")
        return F.normalize(model.get_image_features(**inputs).pooler_output[0], dim=-1).numpy()
