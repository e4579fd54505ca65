"""`flashhead demo`: a Gradio page for offline generation (portrait + speech -> MP4 to watch and download)."""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

from flashhead.errors import FlashHeadError

logger = logging.getLogger(__name__)

MODELS = ["auto", "lite", "pro", "tiny"]


class DemoBackend:
    """Loads each requested model once and renders videos with it (kept apart from the UI for testing)."""

    def __init__(self, weights: str | None = None, device: str | None = None, output_dir: str | Path | None = None):
        self.weights, self.device = weights, device
        self.output_dir = Path(output_dir or tempfile.mkdtemp(prefix="flashhead-demo-"))
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self._pipelines: dict = {}

    def pipeline(self, model: str):
        from flashhead.pipeline.flashhead_pipeline import FlashHeadPipeline

        if model not in self._pipelines:
            self._pipelines[model] = FlashHeadPipeline.from_pretrained(model, weights=self.weights, device=self.device)
        return self._pipelines[model]

    def generate(self, image: str, audio: str, model: str = "auto", seed: int = 42, crop: bool = True) -> str:
        """Render a video; returns the MP4 path. Raises FlashHeadError with a one-line message on bad input."""
        if not image:
            raise FlashHeadError("please upload a portrait")
        if not audio:
            raise FlashHeadError("please upload or record speech")
        pipe = self.pipeline(model)
        result = pipe(image, audio, seed=int(seed), crop=crop, progress=False)
        out = self.output_dir / f"flashhead_{Path(image).stem}_{int(seed)}.mp4"
        result.save(out)
        return str(out)


def build_demo(backend: DemoBackend):
    import gradio as gr

    def run(image, audio, model, seed, crop, progress=gr.Progress(track_tqdm=True)):  # noqa: B008 (gradio idiom)
        try:
            return backend.generate(image, audio, model, seed, crop)
        except FlashHeadError as e:
            raise gr.Error(str(e)) from None

    with gr.Blocks(title="flashhead") as demo:
        gr.Markdown(
            "## flashhead — audio-driven talking heads\n"
            "Upload a portrait and speech; get a lip-synced 25 fps video. Every video carries an invisible "
            "watermark and a provenance tag. Do not impersonate anyone without their consent."
        )
        with gr.Row():
            with gr.Column():
                image = gr.Image(type="filepath", label="Portrait")
                audio = gr.Audio(type="filepath", label="Speech")
                model = gr.Dropdown(MODELS, value="auto", label="Model (or a pipeline folder)", allow_custom_value=True)
                seed = gr.Number(value=42, precision=0, label="Seed")
                crop = gr.Checkbox(value=True, label="Detect and crop the face")
                button = gr.Button("Generate", variant="primary")
            video = gr.Video(label="Result")
        button.click(run, inputs=[image, audio, model, seed, crop], outputs=video, api_name="generate")
    return demo


def launch(host: str = "127.0.0.1", port: int = 7860, weights: str | None = None, device: str | None = None) -> None:
    build_demo(DemoBackend(weights=weights, device=device)).queue().launch(server_name=host, server_port=port)
