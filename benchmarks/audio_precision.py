"""wav2vec2 over the 8 s audio cache on one GPU: float32 against TF32 GEMMs and a CUDA-graph replay, time and error.

    python3 benchmarks/audio_precision.py [speech.wav]    # prints JSON

The encoder as the pipeline builds it for `flashhead bench` (the wav2vec2-base architecture, random weights) on
8 s of the shared speech. Per variant: median GPU ms of one pass alone (CUDA events, 10 passes), and against
float32: the relative L2 error of the features and the fraction whose bfloat16 rounding (what the DiT receives)
differs. TF32 is cuBLAS's `allow_tf32` for wav2vec2's GEMMs only (its convolutions keep cuDNN's own setting);
"graphed" replays the float32 pass from a CUDA graph (`flashhead.pipeline.graphs.GraphedCall`). Session 19 (one
H100): 7.57 ms float32, 5.42 ms graphed, but the graphed features are not bit-equal to the eager ones, so the
replay was not made a speed switch (docs/performance-log.md).
"""

from __future__ import annotations

import json
import sys

import torch
from block_bench import event_ms  # benchmarks/, the script's folder

from flashhead.benchmark import BenchSettings, _speech, build_pipeline
from flashhead.pipeline.graphs import GraphedCall


def timed(encoder, samples: torch.Tensor) -> tuple[float, torch.Tensor]:
    return event_ms(lambda: encoder(samples), 10, warmup=1)


def main() -> None:
    pipe, _ = build_pipeline(BenchSettings(model="lite"))
    encoder = pipe.audio_encoder
    samples = torch.from_numpy(_speech(sys.argv[1] if len(sys.argv) > 1 else None, 8.0)).cuda()
    report = {"gpu": torch.cuda.get_device_name()}
    torch.backends.cuda.matmul.allow_tf32 = False
    ms, reference = timed(encoder, samples)
    report["fp32_ms"] = round(ms, 3)
    torch.backends.cuda.matmul.allow_tf32 = True
    ms, tf32 = timed(encoder, samples)
    torch.backends.cuda.matmul.allow_tf32 = False
    report["tf32_ms"] = round(ms, 3)
    report["tf32_rel_l2"] = float((tf32 - reference).norm() / reference.norm())
    report["tf32_max_abs"] = float((tf32 - reference).abs().max())
    report["tf32_bf16_differs"] = float((tf32.bfloat16() != reference.bfloat16()).float().mean())
    report["features_shape"] = list(reference.shape)
    ms, graphed = timed(GraphedCall(encoder, "audio_encoder"), samples[None])
    report["fp32_graphed_ms"] = round(ms, 3)
    report["graphed_equal"] = bool(torch.equal(graphed[0], reference))
    report["graphed_rel_l2"] = float((graphed[0] - reference).norm() / reference.norm())
    print(json.dumps(report))


if __name__ == "__main__":
    main()
