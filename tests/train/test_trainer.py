from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from flashhead.errors import ConfigError
from flashhead.train import train
from flashhead.train.checkpoint import latest_checkpoint, load_checkpoint, rng_state, set_rng_state
from flashhead.train.cli import train_app
from flashhead.train.trainer import lr_factor
from train.helpers import REPO, TINY_CONFIG, tiny_config, torchrun_train

KEYS = ("loss", "flow", "face", "temporal", "lr", "grad_norm", "position")


def test_tiny_run_loss_falls(dataset_dir, tmp_path):
    cfg = tiny_config(dataset_dir, tmp_path / "run", "optim.total_steps=60", "optim.lr=1e-3")
    result = train(cfg)
    flow = np.array([h["flow"] for h in result.history])
    assert len(flow) == 60 and np.isfinite(flow).all()
    # untrained (the first steps, still in the 5-step warm-up) vs. the last 10 steps
    start, end = flow[:3].mean(), flow[-10:].mean()
    assert end < 0.93 * start, (start, end)
    # the run wrote its resolved config, its metrics and a final checkpoint
    assert (tmp_path / "run" / "config.yaml").is_file()
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 60
    assert latest_checkpoint(tmp_path / "run").name == "step-00000060.pt"


def test_resume_continues_bit_exactly(dataset_dir, tmp_path):
    common = ("optim.total_steps=6", "log.checkpoint_interval=3", "loss.audio_drop_prob=0.3")
    full = train(tiny_config(dataset_dir, tmp_path / "a", *common))
    resumed = train(tiny_config(dataset_dir, tmp_path / "b", *common),
                    resume=tmp_path / "a" / "checkpoints" / "step-00000003.pt")  # fmt: skip
    assert [h["step"] for h in resumed.history] == [4, 5, 6]
    for a, b in zip(full.history[3:], resumed.history, strict=True):
        assert {k: a[k] for k in KEYS} == {k: b[k] for k in KEYS}  # exact: same floats, same data position
    final_a, final_b = (load_checkpoint(latest_checkpoint(tmp_path / r)) for r in "ab")
    for part in ("model", "ema"):
        for name, tensor in final_a[part].items():
            assert torch.equal(tensor, final_b[part][name]), (part, name)
    assert final_a["data"] == final_b["data"] == {"position": 12, "epoch": 2, "index": 0}
    # `--resume` on a finished run finds the latest checkpoint and has nothing left to do
    again = train(tiny_config(dataset_dir, tmp_path / "a", *common), resume=True)
    assert again.step == 6 and again.history == []
    with pytest.raises(ConfigError, match="already holds a run"):  # never overwrite a run by accident
        train(tiny_config(dataset_dir, tmp_path / "a", *common))


def test_time_budget_stops_with_a_checkpoint(dataset_dir, tmp_path):
    result = train(tiny_config(dataset_dir, tmp_path / "run", "optim.total_steps=40", "optim.max_minutes=1.0e-5"))
    assert result.step == 1 and latest_checkpoint(tmp_path / "run").name == "step-00000001.pt"


def test_checkpoint_rng_state_round_trip():
    state = rng_state()
    expected = (torch.rand(3), np.random.rand(3), __import__("random").random())
    torch.rand(5), np.random.rand(5)
    set_rng_state(state)
    got = (torch.rand(3), np.random.rand(3), __import__("random").random())
    assert torch.equal(got[0], expected[0]) and np.array_equal(got[1], expected[1]) and got[2] == expected[2]


def test_grad_accumulation_matches_a_bigger_micro_batch(dataset_dir, tmp_path):
    big = train(tiny_config(dataset_dir, tmp_path / "big", "optim.total_steps=3"))
    accum = train(tiny_config(dataset_dir, tmp_path / "acc", "optim.total_steps=3", "data.micro_batch_size=1",
                              "optim.grad_accum_steps=2"))  # fmt: skip
    for a, b in zip(big.history, accum.history, strict=True):
        assert a["position"] == b["position"]
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)


@pytest.mark.slow  # compiling the DiT's forward and backward: about a minute on two cores
def test_compiled_dit_trains_like_the_eager_one(dataset_dir, tmp_path):
    steps = ("optim.total_steps=3", "data.micro_batch_size=1")
    from torch._dynamo.utils import counters

    eager = train(tiny_config(dataset_dir, tmp_path / "eager", *steps))
    graphs = counters["stats"]["unique_graphs"]
    compiled = train(tiny_config(dataset_dir, tmp_path / "compiled", *steps, "model.compile=true"))
    assert counters["stats"]["unique_graphs"] > graphs  # dynamo did compile the DiT
    for a, b in zip(eager.history, compiled.history, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4) and b["position"] == a["position"]
    final_a, final_b = (load_checkpoint(latest_checkpoint(tmp_path / r)) for r in ("eager", "compiled"))
    assert final_a["model"].keys() == final_b["model"].keys()  # compiled in place: the eager parameter names
    for name, tensor in final_a["ema"].items():
        torch.testing.assert_close(final_b["ema"][name], tensor, rtol=0, atol=3e-5)  # fused kernels' rounding


def _metrics(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_processes_match_one_process(dataset_dir, tmp_path, parallel):
    """gloo on CPU: 2 processes x micro batch 1 == 1 process x micro batch 2, step by step (FSDP2: and resume)."""
    steps = ("optim.total_steps=4", "log.checkpoint_interval=2")
    single = train(tiny_config(dataset_dir, tmp_path / "single", *steps))
    cfg = tiny_config(dataset_dir, tmp_path / "multi", *steps, "data.micro_batch_size=1", f"parallel={parallel}")
    torchrun_train("stage1", cfg.save(tmp_path / "multi.yaml"), tmp_path / "multi")
    multi = _metrics(tmp_path / "multi")
    assert len(multi) == 4
    for a, b in zip(single.history, multi, strict=True):
        assert a["position"] == b["position"]
        for key in ("loss", "flow", "face", "temporal", "grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=1e-5), (a["step"], key)
    # and the weights after the last step agree too (within a tenth of one lr step: Adam's g / sqrt(v)
    # magnifies the last-bit differences of all-reduced gradients where a gradient is nearly zero)
    ema_a = load_checkpoint(latest_checkpoint(tmp_path / "single"))["ema"]
    ema_b = load_checkpoint(latest_checkpoint(tmp_path / "multi"))["ema"]
    for name, tensor in ema_a.items():
        torch.testing.assert_close(ema_b[name], tensor, rtol=0, atol=1e-4)
    if parallel == "fsdp":  # the sharded run resumes from its full-state checkpoint bit-exactly
        cfg = tiny_config(dataset_dir, tmp_path / "resumed", *steps, "data.micro_batch_size=1", "parallel=fsdp")
        checkpoint = tmp_path / "multi" / "checkpoints" / "step-00000002.pt"
        torchrun_train("stage1", cfg.save(tmp_path / "resumed.yaml"), tmp_path / "resumed", "--resume-from",
                       str(checkpoint))  # fmt: skip
        resumed = _metrics(tmp_path / "resumed")
        assert [{k: h[k] for k in KEYS} for h in resumed] == [{k: h[k] for k in KEYS} for h in multi[2:]]


def test_cli_train_export_and_generate(dataset_dir, tmp_path):
    from flashhead.models.audio import AudioContextCache
    from flashhead.pipeline.flashhead_pipeline import FlashHeadPipeline

    run = tmp_path / "run"
    cfg = tiny_config(dataset_dir, run, "optim.total_steps=2", "export_at_end=true", "val.interval=2",
                      "val.num_inference_steps=2", "val.seconds=1.0", "val.loss_samples=2")  # fmt: skip
    config_file = cfg.save(tmp_path / "cfg.yaml")
    runner = CliRunner()
    result = runner.invoke(train_app, ["stage1", str(config_file), "--set", "seed=1"])
    assert result.exit_code == 0, result.output
    assert (run / "export" / "model_index.json").is_file()
    assert sorted(p.name for p in (run / "val" / "step-00000002").iterdir()) == ["val0.mp4"]
    result = runner.invoke(train_app, ["export", str(run), str(tmp_path / "exported")])
    assert result.exit_code == 0, result.output

    pipe = FlashHeadPipeline.from_pretrained(tmp_path / "exported", device="cpu")
    assert (
        pipe.config.use_euler
        and pipe.config.guidance_scale == 3.0
        and (pipe.config.height, pipe.config.width) == (64, 64)
    )
    ema = load_checkpoint(latest_checkpoint(run))["ema"]
    for name, tensor in pipe.dit.state_dict().items():
        assert torch.equal(tensor, ema[name]), name
    image = np.full((64, 64, 3), 128, np.uint8)
    reference = pipe.encode_reference(image, generator=torch.Generator().manual_seed(0))
    cache = AudioContextCache(pipe.audio_encoder, pipe.new_frames, pipe.audio_config())
    context = cache.push(np.zeros(cache.slice_samples, np.float32) + 0.01)
    chunk = pipe.generate_chunk(reference, reference.first_motion, context, generator=torch.Generator().manual_seed(0))
    assert chunk.video.shape == (1, 3, 33, 64, 64) and torch.isfinite(chunk.video).all()

    bad = runner.invoke(train_app, ["stage1", str(config_file), "--set", "optim.warmup=3"])
    assert bad.exit_code == 2 and "unknown setting(s) optim.warmup" in bad.output


def test_shipped_configs_parse_and_schedule():
    from flashhead.train.config import Stage1Config

    tiny = Stage1Config.from_file(TINY_CONFIG)
    lite = Stage1Config.from_file(REPO / "configs" / "stage1_lite.yaml")
    assert lite.optim.lr == 2e-4 and lite.optim.total_steps == 100_000 and lite.model.variant == "lite"
    assert lite.data.micro_batch_size * 32 * lite.optim.grad_accum_steps == 256  # on 32 GPUs, as the report
    assert tiny.model.config["dim"] == 128 and tiny.loss.face_weight == 0.1
    cfg = Stage1Config.from_file(TINY_CONFIG, ["optim.warmup_steps=10", "optim.total_steps=110", "optim.lr=1e-3"])
    assert cfg.optim.lr == 1e-3  # "1e-3" is a string to YAML 1.1; numbers are coerced
    assert lr_factor(0, cfg) == pytest.approx(0.1) and lr_factor(9, cfg) == 1.0
    assert lr_factor(60, cfg) == pytest.approx(cfg.optim.min_lr_ratio + (1 - cfg.optim.min_lr_ratio) * 0.5)
    assert lr_factor(110, cfg) == pytest.approx(cfg.optim.min_lr_ratio)
    with pytest.raises(Exception, match="parallel must be one of ddp, fsdp"):
        Stage1Config.from_file(TINY_CONFIG, ["parallel=zero"])
