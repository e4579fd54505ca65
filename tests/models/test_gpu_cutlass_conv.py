"""vae_cutlass_conv on a Hopper GPU with the library built (the device; FLASHHEAD_CONV3D_LIB): the tuning's choice is
kept in the choices file, and a new process (here: the in-memory choices cleared) takes it without timing anything,
with the same result."""

from __future__ import annotations

import pytest
import torch

from flashhead.models.vae import cutlass_conv
from flashhead.models.vae.cutlass_conv import CL3D, conv3d_ndhwc

pytestmark = pytest.mark.gpu


def test_a_tuned_choice_is_kept_and_taken_by_the_next_process(tmp_path, monkeypatch):
    if not cutlass_conv.available():
        pytest.skip("needs a Hopper GPU and the built library (python -m flashhead.models.vae.cutlass_conv build)")
    kept = cutlass_conv.TunedChoices(tmp_path / "choices.json")
    monkeypatch.setattr(cutlass_conv, "tuned_choices", lambda: kept)
    monkeypatch.setattr(cutlass_conv, "_choices", {})
    gen = torch.Generator("cuda").manual_seed(0)
    x = torch.randn(1, 96, 3, 128, 128, device="cuda", generator=gen).bfloat16().contiguous(memory_format=CL3D)
    w = (0.05 * torch.randn(96, 96, 3, 3, 3, device="cuda", generator=gen)).bfloat16().contiguous(memory_format=CL3D)
    b = torch.randn(96, device="cuda", generator=gen).bfloat16()
    tuned = conv3d_ndhwc(x, w, b, [0, 1, 1])
    (problem,) = cutlass_conv.choices()
    scope = cutlass_conv._scope(cutlass_conv.load_library(), x.device.index)
    chosen = cutlass_conv.choices()[problem]
    assert cutlass_conv.TunedChoices(kept.path).get(scope, problem) == chosen

    monkeypatch.setattr(cutlass_conv, "_choices", {})  # a new process: nothing tuned in memory, the file kept

    def no_timing(*args, **kwargs):
        raise AssertionError("a kept choice must not be timed again")

    monkeypatch.setattr(cutlass_conv, "_time", no_timing)
    again = conv3d_ndhwc(x, w, b, [0, 1, 1])
    assert cutlass_conv.choices() == {problem: chosen}
    assert torch.equal(again, tuned)  # the same kernel on the same data


def test_every_tile_pads_time_in_front_only():
    """Causal time padding [2, 0, h, w] in the kernel (TMA im2col's zeros) is the convolution of the input with two
    zero frames in front, for every tile that runs the problem."""
    lib = cutlass_conv.load_library()
    if not cutlass_conv.available() or lib is None:
        pytest.skip("needs a Hopper GPU and the built library (python -m flashhead.models.vae.cutlass_conv build)")
    gen = torch.Generator("cuda").manual_seed(1)
    x = torch.randn(1, 96, 4, 64, 64, device="cuda", generator=gen).bfloat16().contiguous(memory_format=CL3D)
    w = (0.05 * torch.randn(96, 96, 3, 3, 3, device="cuda", generator=gen)).bfloat16().contiguous(memory_format=CL3D)
    b = torch.zeros(96, device="cuda", dtype=torch.bfloat16)
    reference = torch.nn.functional.conv3d(torch.nn.functional.pad(x, (0, 0, 0, 0, 2, 0)), w, None, 1, [0, 1, 1])
    out = torch.empty_like(reference, memory_format=CL3D)
    ran = []
    for i, name in enumerate(lib.tiles):
        out.fill_(float("nan"))
        status = lib.run(i, x, w, b, out, (2, 0, 1, 1))
        if status == 1:
            continue
        assert status == 0, name
        assert cutlass_conv.agrees(out, reference), name
        ran.append(name)
    assert ran  # the 96-wide tiles at least run this layer
    assert cutlass_conv.agrees(conv3d_ndhwc(x, w, None, [2, 0, 1, 1]), reference)
