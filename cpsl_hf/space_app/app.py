"""A Gradio demo of a CPSL segmentation model: upload a street photo (or pick an example) and see its colour mask and
overlay side by side, with a legend of the classes it found.

Written by ``scripts/make_space.py`` (package ``cpsl-hf``) beside ``space_config.json``, which names the model and
its class colours. The model loads through ``trust_remote_code`` (its modelling code travels with the checkpoint),
so this app needs only ``requirements.txt``, not the ``cpsl-hf`` package. Locally: ``python app.py`` serves on
``http://127.0.0.1:7860`` (``GRADIO_SERVER_PORT`` / ``GRADIO_SERVER_NAME`` change it); ``CPSL_MODEL`` overrides the
model (a Hub id or a local folder).
"""

import html
import json
import os
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import gradio as gr  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from transformers import AutoImageProcessor, AutoModelForSemanticSegmentation  # noqa: E402

HERE = Path(__file__).resolve().parent
SETTINGS = json.loads((HERE / "space_config.json").read_text(encoding="utf-8"))
MODEL = os.environ.get("CPSL_MODEL") or SETTINGS["model"]

processor = AutoImageProcessor.from_pretrained(MODEL)
model = AutoModelForSemanticSegmentation.from_pretrained(MODEL, trust_remote_code=True).eval()
CLASS_NAMES = [model.config.id2label[index] for index in range(model.config.num_labels)]
PALETTE = np.asarray(SETTINGS["palette"], dtype=np.uint8)  # C x 3 RGB, one colour per class
if PALETTE.shape != (len(CLASS_NAMES), 3):
    raise ValueError(
        f"space_config.json: the palette has {PALETTE.shape[0]} colours, the model {len(CLASS_NAMES)} classes"
    )
MAX_SIDE = int(SETTINGS.get("max_side", 1024))  # larger uploads are scaled down first (CPU Spaces are slow)


def _legend(train_ids: np.ndarray) -> str:
    """HTML legend of the classes present, largest share first: colour swatch, name, share of the image."""
    counts = np.bincount(train_ids.ravel(), minlength=len(CLASS_NAMES))
    total = max(int(counts.sum()), 1)
    rows = []
    for index in np.argsort(-counts):
        if counts[index] == 0:
            break
        red, green, blue = (int(value) for value in PALETTE[index])
        rows.append(
            f'<li class="cpsl-class"><span style="display:inline-block;width:1em;height:1em;margin-right:0.4em;'
            f'background:rgb({red},{green},{blue})"></span>{html.escape(CLASS_NAMES[index])} '
            f"({100.0 * counts[index] / total:.1f}%)</li>"
        )
    return '<ul class="cpsl-legend" style="list-style:none;padding:0">' + "".join(rows) + "</ul>"


@torch.no_grad()
def segment(image: Image.Image):
    """``(colour mask, overlay, legend HTML)`` of an RGB image: the model's arg-max class per pixel at the
    image's own size."""
    if image is None:
        raise gr.Error("Upload an image first.")
    image = image.convert("RGB")
    if max(image.size) > MAX_SIDE:
        image.thumbnail((MAX_SIDE, MAX_SIDE))
    inputs = processor(images=image, return_tensors="pt")
    outputs = model(pixel_values=inputs["pixel_values"])
    train_ids = processor.post_process_semantic_segmentation(outputs, target_sizes=[image.size[::-1]])[0]
    train_ids = train_ids.numpy().astype(np.int64)  # H x W
    mask = PALETTE[train_ids]  # H x W x 3
    blended = (0.5 * np.asarray(image, dtype=np.float32) + 0.5 * mask).round().astype(np.uint8)
    return Image.fromarray(mask), Image.fromarray(blended), _legend(train_ids)


examples = sorted(str(path) for path in (HERE / "examples").glob("*") if path.is_file())

with gr.Blocks(title=SETTINGS.get("title", "CPSL segmentation")) as demo:
    gr.Markdown(f"# {SETTINGS.get('title', 'CPSL segmentation')}\n\n{SETTINGS.get('description', '')}")
    with gr.Row():
        image_input = gr.Image(type="pil", label="Image", height=360, elem_id="cpsl-input")
    button = gr.Button("Segment", variant="primary", elem_id="cpsl-segment")
    with gr.Row():
        mask_output = gr.Image(type="pil", format="png", height=360, label="Colour mask", elem_id="cpsl-mask")
        overlay_output = gr.Image(
            type="pil", format="png", height=360, label="Overlay", elem_id="cpsl-overlay"
        )
    legend_output = gr.HTML(label="Classes present", elem_id="cpsl-legend")
    if examples:
        gr.Examples(examples=examples, inputs=image_input)
    button.click(
        segment, inputs=image_input, outputs=[mask_output, overlay_output, legend_output], api_name="segment"
    )

if __name__ == "__main__":
    demo.launch(
        server_name=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"),
        server_port=int(os.environ.get("GRADIO_SERVER_PORT", "7860")),
    )
