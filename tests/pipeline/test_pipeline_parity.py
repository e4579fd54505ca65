"""Two streaming chunks of the official Lite and Pro pipelines, reproduced intermediate by intermediate."""

from __future__ import annotations

import numpy as np
import pytest

from _tiny import tiny_pipeline
from _util import rel_l2
from flashhead.models.audio import AudioContextCache
from flashhead.pipeline.flashhead_pipeline import to_uint8

TOL = 1e-4


@pytest.mark.parametrize("variant", ["lite", "pro"])
def test_two_streaming_chunks_match_official(variant):
    pipe, t, params = tiny_pipeline(variant)
    assert pipe.motion_frames == params["motion_frames_num"]
    image = t["inputs/cond_image_uint8"].numpy().astype(np.uint8)
    encode_noise = t.get("prepare/encode_noise")  # Lite samples the posterior; Wan returns the mean
    reference = pipe.encode_reference(image, noise=encode_noise)
    assert rel_l2(reference.image, t["cond_image_tensor"]) <= TOL
    assert rel_l2(reference.latents[0], t["ref_latent"]) <= TOL

    cache = AudioContextCache(pipe.audio_encoder, pipe.new_frames, pipe.audio_config())
    audio = t["inputs/audio"].split(cache.slice_samples)
    motion = reference.first_motion
    for k in range(2):
        assert rel_l2(motion[0], t[f"chunk{k}/motion_latents_in"]) <= TOL
        context = cache.push(audio[k])
        assert rel_l2(context, t[f"chunk{k}/audio_embedding"]) <= TOL
        chunk = pipe.generate_chunk(
            reference, motion, context,
            noise=t[f"chunk{k}/initial_noise"][None],
            renoise=[t[f"chunk{k}/renoise{i}"][None] for i in range(4)],
            encode_noise=t.get(f"chunk{k}/motion_encode_noise"),
        )  # fmt: skip
        assert rel_l2(chunk.latents[0], t[f"chunk{k}/final_latent"]) <= TOL
        if f"chunk{k}/decoded" in t:
            assert rel_l2(chunk.decoded, t[f"chunk{k}/decoded"]) <= TOL
        assert rel_l2(chunk.video, t[f"chunk{k}/color_corrected"]) <= TOL
        assert rel_l2(chunk.video[:, :, -pipe.motion_frames :], t[f"chunk{k}/motion_frames_video"]) <= TOL
        assert rel_l2(chunk.motion_latents[0], t[f"chunk{k}/motion_latents_out"]) <= TOL
        # The frames a chunk emits: the official float formula, and our uint8 rounding of it.
        official = (((t[f"chunk{k}/color_corrected"][0] + 1) / 2).permute(1, 2, 3, 0).clip(0, 1) * 255)[
            pipe.motion_frames :
        ]
        ours = to_uint8(chunk.video[:, :, pipe.motion_frames :])
        assert ours.shape == (pipe.new_frames, *image.shape)
        assert np.abs(ours.astype(np.float32) - official.numpy()).max() <= 1.0  # rounding + float error
        motion = chunk.motion_latents
