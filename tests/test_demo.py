"""`flashhead demo`: the Gradio page really serves generation on loopback."""

from __future__ import annotations

import pytest

from _tiny import tiny_pipeline
from _util import MEDIA
from flashhead.media.video_io import probe

gr = pytest.importorskip("gradio")


def test_gradio_page_generates_a_video(tmp_path):
    from gradio_client import Client, handle_file

    from flashhead.demo import DemoBackend, build_demo

    pipe, _, _ = tiny_pipeline("lite", height=64, width=64)
    folder = pipe.save_pretrained(tmp_path / "tiny")
    demo = build_demo(DemoBackend(output_dir=tmp_path / "out"))
    demo.queue().launch(server_name="127.0.0.1", server_port=None, prevent_thread_lock=True, quiet=True)
    try:
        client = Client(demo.local_url, verbose=False)
        image = handle_file(str(MEDIA / "portraits" / "man_mouth_open_frontal.jpg"))
        audio = handle_file(str(MEDIA / "audio" / "speech_en_radio34_16k_8s.wav"))
        result = client.predict(image, audio, str(folder), 7, True, api_name="/generate")
        video = result["video"] if isinstance(result, dict) else result
        info = probe(video)
        assert info["frames"] == 200 and info["fps"] == 25 and info["audio_codec"] == "aac"
        # A bad input comes back as a readable error, and the page keeps working.
        bad = handle_file(str(MEDIA / "portraits" / "noface_coffee_cup.jpg"))
        with pytest.raises(Exception, match="no face found"):
            client.predict(bad, audio, str(folder), 7, True, api_name="/generate")
    finally:
        demo.close()
