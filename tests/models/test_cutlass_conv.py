"""vae_cutlass_conv: the Wan2.1 VAE's convolutions through `flashhead::conv3d_ndhwc` (CUTLASS on a Hopper GPU with
the library built, else cuDNN / torch's CPU convolution). Here on the CPU: the operator's fallback equals
`F.conv3d`, it compiles without a graph break into a channels-last result, the switch turns exactly the eligible
layers over and back and keeps the decode, and the library builds with nvcc from the CUTLASS headers and loads.
The kernels themselves run on the device (benchmarks/speed_device.sh cutlass; the GPU equivalence test)."""

from __future__ import annotations

import ctypes
import shutil

import pytest
import torch
import torch.nn.functional as F

from flashhead.errors import ConfigError
from flashhead.models.vae import cutlass_conv
from flashhead.models.vae.cutlass_conv import CL3D, TILES, Conv3dLibrary, Tile, conv3d_ndhwc, registry_source
from flashhead.models.vae.wan_conv import (
    CutlassCausalConv3d,
    KernelPaddedCausalConv3d,
    set_cutlass_conv,
    set_kernel_padding,
)
from flashhead.pipeline.fast_path import apply_vae_switches
from flashhead.pipeline.speed import SpeedConfig
from models.test_wan_conv import CONVS, TOL, decode_encode, max_diff, one_convolution, tiny_wan


@pytest.mark.parametrize("padding", [[0, 1, 1], [1, 0, 0], [0, 0, 0]])
def test_operator_falls_back_to_the_plain_convolution_off_hopper(padding):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 8, 4, 6, 7, generator=g)
    w = torch.randn(16, 8, 3, 3, 3, generator=g)
    b = torch.randn(16, generator=g)
    out = conv3d_ndhwc(x, w, b, padding)
    assert torch.equal(out, F.conv3d(x, w, b, 1, padding))
    assert out.is_contiguous(memory_format=CL3D)
    assert torch.equal(conv3d_ndhwc(x, w, None, padding), F.conv3d(x, w, None, 1, padding))


@pytest.mark.parametrize("front", [2, 1, 0])
def test_operator_pads_time_per_side(front):
    """[time front, time back, h, w]: a causal convolution's zero frames in front only (the kernel's padding on the
    GPU; a padded copy on the fallback path), with the output shape the fake kernel reports."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(1, 8, 4, 6, 5, generator=g)
    w = torch.randn(16, 8, 3, 3, 3, generator=g)
    out = conv3d_ndhwc(x, w, None, [front, 0, 1, 1])
    expected = F.conv3d(F.pad(x, (0, 0, 0, 0, front, 0)), w, None, 1, [0, 1, 1])
    assert out.shape == expected.shape == (1, 16, 2 + front, 6, 5)
    torch.testing.assert_close(out, expected)
    assert out.is_contiguous(memory_format=CL3D)
    assert cutlass_conv.time_padded([1, 2, 3]) == (1, 1, 2, 3)
    assert cutlass_conv.time_padded((2, 0, 1, 1)) == (2, 0, 1, 1)
    with pytest.raises(ValueError, match="padding"):
        cutlass_conv.time_padded([1, 1])


def test_operator_compiles_whole_with_the_layout_of_its_result():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 8, 3, 5, 5, generator=g)
    w = torch.randn(8, 8, 3, 3, 3, generator=g).contiguous(memory_format=CL3D)
    b = torch.randn(8, generator=g)

    def block(x):  # an activation before and after: Inductor fuses around the opaque call
        return torch.nn.functional.silu(conv3d_ndhwc(torch.nn.functional.silu(x), w, b, [0, 1, 1])) * 2

    torch._dynamo.reset()
    compiled = torch.compile(block, fullgraph=True)  # fullgraph: a graph break would raise
    x = x.contiguous(memory_format=CL3D)
    expected = block(x)
    before = cutlass_conv.layout_copies
    assert torch.allclose(compiled(x), expected, atol=1e-5)
    # The op takes its input in the traced (channels-last) strides: the fused SiLU before it writes that layout.
    assert cutlass_conv.layout_copies == before
    fake = torch.library.opcheck(conv3d_ndhwc, (x, w, b, [0, 1, 1]))  # the fake kernel's shapes and strides agree
    assert all(v == "SUCCESS" for v in fake.values())


def test_switch_takes_the_eligible_layers_and_keeps_the_decode():
    wan = tiny_wan(0)  # base dim 8: every convolution but the 3-channel output one has channels divisible by 8
    g = torch.Generator().manual_seed(5)
    video = torch.rand(1, 3, 5, 16, 24, generator=g) * 2 - 1
    latent = torch.randn(1, 16, 2, 2, 3, generator=g)
    apply_vae_switches(wan, SpeedConfig(vae_conv_pad=True, vae_channels_last=True))
    padded = decode_encode(wan, video, latent)
    apply_vae_switches(wan, SpeedConfig(vae_conv_pad=True, vae_channels_last=True, vae_cutlass_conv=True))
    layers = [m for m in wan.model.modules() if isinstance(m, KernelPaddedCausalConv3d)]
    cut = [m for m in layers if type(m) is CutlassCausalConv3d]
    left = [m for m in layers if type(m) is KernelPaddedCausalConv3d]
    assert cut and all(m.stride == (1, 1, 1) and m.in_channels % 8 == 0 and m.out_channels % 8 == 0 for m in cut)
    # What stays: the RGB in/out layers (3 channels) and the encoder's stride-2 time convolutions.
    assert left and all(m.stride != (1, 1, 1) or 3 in (m.in_channels, m.out_channels) for m in left)
    switched = decode_encode(wan, video, latent)
    assert max_diff(switched[0], padded[0]) <= TOL and max_diff(switched[1], padded[1]) <= TOL
    assert padded[0].std() > 0.01
    apply_vae_switches(wan, SpeedConfig())  # all the way back to diffusers' class
    assert not any(isinstance(m, KernelPaddedCausalConv3d) for m in wan.model.modules())
    assert set_cutlass_conv(wan.model, True) == 0  # only kernel-padded layers are turned over


def test_switch_needs_kernel_padding():
    with pytest.raises(ConfigError, match="vae_conv_pad"):
        SpeedConfig(vae_cutlass_conv=True)
    assert not SpeedConfig.optimized().vae_cutlass_conv or SpeedConfig.optimized().vae_conv_pad


def test_registry_dispatches_every_tile_by_index():
    tiles = (Tile(128, 96, 64), Tile(128, 64, 64, 4))
    src = registry_source(tiles)
    assert 'kNames[] = {"m128n96k64", "m128n64k64s4"}' in src
    assert "case 0: return fh_conv3d_fprop_m128n96k64(" in src and "case 1: return fh_conv3d_fprop_m128n64k64s4(" in src
    assert "fh_conv3d_count() { return 2; }" in src
    assert f"fh_conv3d_abi() {{ return {cutlass_conv.ABI}; }}" in src  # the C interface's version
    assert "int pad_front, int pad_back, int pad_h, int pad_w" in src
    assert len({t.name for t in TILES}) == len(TILES)


def test_cluster_tiles_are_named_and_compiled_with_their_cluster():
    assert Tile(128, 96, 32, 4, cluster_m=2).name == "m128n96k32s4c2x1"
    assert Tile(128, 192, 64, cluster_n=2).name == "m128n192k64c1x2" and Tile(128, 96, 64).name == "m128n96k64"
    assert all(Tile.parse(t.name) == t for t in TILES)  # names round-trip, so --tiles takes any tile by its name
    assert Tile.parse("m128n96k32s4c4x1") == Tile(128, 96, 32, 4, cluster_m=4)
    with pytest.raises(ValueError, match="not a tile name"):
        Tile.parse("m128n96")
    cmd = cutlass_conv.nvcc_command(Tile(128, 96, 64, cluster_n=2), [], cutlass_conv.SOURCE.with_suffix(".o"))
    assert "-DFH_CLUSTER_M=1" in cmd and "-DFH_CLUSTER_N=2" in cmd and "-DFH_NAME=m128n96k64c1x2" in cmd


def test_tuning_rejects_a_tile_that_computes_something_else():
    """Each tile's output is checked against cuDNN's before it may be chosen: rounding passes, a wrong result not."""
    x = torch.randn(1, 8, 3, 6, 6, generator=torch.Generator().manual_seed(0))
    w = torch.randn(8, 8, 3, 3, 3, generator=torch.Generator().manual_seed(1))
    ref = F.conv3d(x, w, None, 1, [0, 1, 1])
    assert cutlass_conv.agrees(ref.bfloat16(), ref)  # bf16 rounding of the same values
    assert cutlass_conv.agrees(F.conv3d(x.bfloat16(), w.bfloat16(), None, 1, [0, 1, 1]), ref)
    assert not cutlass_conv.agrees(ref.roll(1, dims=-1), ref)  # a shifted tap
    assert not cutlass_conv.agrees(torch.zeros_like(ref), ref)
    bad = ref.clone()
    bad[0, 0, 0, 0, 0] = float("nan")
    assert not cutlass_conv.agrees(bad, ref)


def test_kept_choices_outlive_the_process_and_merge_with_other_writers(tmp_path, caplog):
    path = tmp_path / "kernels" / "conv3d_choices.json"
    first, second = cutlass_conv.TunedChoices(path), cutlass_conv.TunedChoices(path)
    assert first.get("gpu a", "p1") is None and not path.exists()
    first.put("gpu a", "p1", "m128n96k32s4c2x1")
    second.put("gpu a", "p2", "cudnn")  # another process, which had read the file before the first wrote
    second.put("gpu b", "p1", "m128n192k64")
    fresh = cutlass_conv.TunedChoices(path)  # a new process
    assert fresh.get("gpu a", "p1") == "m128n96k32s4c2x1" and fresh.get("gpu a", "p2") == "cudnn"
    assert fresh.get("gpu b", "p1") == "m128n192k64" and fresh.get("gpu b", "p2") is None
    assert sorted(p.name for p in path.parent.iterdir()) == ["conv3d_choices.json"]  # no temporaries left
    path.write_text("{not json")
    assert cutlass_conv.TunedChoices(path).get("gpu a", "p1") is None and "ignoring" in caplog.text
    cutlass_conv.TunedChoices(path).put("gpu a", "p1", "cudnn")  # a corrupt file is replaced whole
    assert cutlass_conv.TunedChoices(path).get("gpu a", "p1") == "cudnn"
    blocked = cutlass_conv.TunedChoices(path / "under_a_file.json")  # cannot be written: one warning, kept in memory
    caplog.clear()
    blocked.put("gpu a", "p1", "cudnn")
    blocked.put("gpu a", "p2", "m128n192k64")
    assert caplog.text.count("cannot keep") == 1 and blocked.get("gpu a", "p2") == "m128n192k64"


def test_kept_choices_follow_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv(cutlass_conv.LIBRARY_ENV, str(tmp_path / "lib" / cutlass_conv.LIBRARY_NAME))
    cases = [(None, tmp_path / "lib" / "conv3d_choices.json"), (str(tmp_path / "c.json"), tmp_path / "c.json"),
             ("off", None)]  # fmt: skip
    for value, expected in cases:
        if value is None:
            monkeypatch.delenv(cutlass_conv.CHOICES_ENV, raising=False)
        else:
            monkeypatch.setenv(cutlass_conv.CHOICES_ENV, value)
        cutlass_conv.tuned_choices.cache_clear()
        kept = cutlass_conv.tuned_choices()
        assert (kept and kept.path) == expected
    cutlass_conv.tuned_choices.cache_clear()


def test_a_kept_choice_is_taken_without_timing_and_a_stale_one_is_not(tmp_path, monkeypatch):
    """A shape another process tuned takes its tile at once (no timing: none could run on this CPU, nor inside a
    CUDA-graph capture); a kept tile the library no longer has is ignored."""

    class Library:
        tiles = ["m128n96k64", "m128n96k32s4c2x1"]

    kept = cutlass_conv.TunedChoices(tmp_path / "choices.json")
    monkeypatch.setattr(cutlass_conv, "tuned_choices", lambda: kept)
    monkeypatch.setattr(cutlass_conv, "_scope", lambda lib, device: "this gpu")
    monkeypatch.setattr(cutlass_conv, "_choices", {})
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)  # tuning would give up: cuDNN
    x, w = torch.zeros(1, 8, 3, 6, 6), torch.zeros(16, 8, 3, 3, 3)
    key = (*x.shape, *w.shape[2:], 0, 0, 1, 1, w.shape[0], x.device.index)
    kept.put("this gpu", cutlass_conv._label(key), "m128n96k32s4c2x1")
    assert cutlass_conv._choose(Library(), x, w, None, [0, 1, 1]) == 1
    assert cutlass_conv._choices == {key: 1}
    kept.put("this gpu", cutlass_conv._label(key), "m128n64k64s4")  # rebuilt without that tile
    monkeypatch.setattr(cutlass_conv, "_choices", {})
    assert cutlass_conv._choose(Library(), x, w, None, [0, 1, 1]) is None and cutlass_conv._choices == {}


@pytest.mark.skipif(shutil.which("cc") is None, reason="needs a C compiler")
def test_a_library_of_another_interface_version_is_refused(tmp_path, monkeypatch, caplog):
    """A library built by an older flashhead (no version symbol: one symmetric time padding) would be called with the
    wrong arguments: it is not loaded, with a warning that says to rebuild it."""
    import subprocess

    src = tmp_path / "old.c"
    src.write_text('int fh_conv3d_count(void) { return 0; }\nconst char* fh_conv3d_name(int i) { return 0; }\n')
    lib = tmp_path / cutlass_conv.LIBRARY_NAME
    subprocess.run(["cc", "-shared", "-fPIC", "-o", str(lib), str(src)], check=True)
    with pytest.raises(OSError, match="rebuild"):
        Conv3dLibrary(lib)
    monkeypatch.setenv(cutlass_conv.LIBRARY_ENV, str(lib))
    cutlass_conv.load_library.cache_clear()
    try:
        assert cutlass_conv.load_library() is None
        assert "rebuild" in caplog.text
    finally:
        cutlass_conv.load_library.cache_clear()


def test_library_is_not_available_without_a_build(tmp_path, monkeypatch):
    monkeypatch.setenv(cutlass_conv.LIBRARY_ENV, str(tmp_path / "missing.so"))
    cutlass_conv.load_library.cache_clear()
    try:
        assert cutlass_conv.load_library() is None and not cutlass_conv.available()
    finally:
        cutlass_conv.load_library.cache_clear()


def _headers_or_skip():
    if shutil.which("nvcc") is None:
        pytest.skip("no nvcc on this machine")
    try:
        return cutlass_conv.cutlass_include_dirs()
    except FileNotFoundError:
        pytest.skip("no CUTLASS headers (pip install nvidia-cutlass)")


@pytest.mark.slow
def test_library_builds_and_loads(tmp_path):
    _headers_or_skip()
    path = cutlass_conv.build_library(tmp_path / "lib.so", tiles=(Tile(128, 96, 64),), jobs=1)
    assert path.is_file() and [p.name for p in tmp_path.iterdir()] == ["lib.so"]  # no half-written leftovers
    lib = Conv3dLibrary(path)  # loads without a GPU: the CUDA runtime is linked in, the driver opened lazily
    assert lib.tiles == ["m128n96k64"]
    raw = ctypes.CDLL(str(path))
    assert raw.fh_conv3d_count() == 1 and hasattr(raw, "fh_conv3d_fprop_m128n96k64")


def test_build_reports_a_missing_cutlass_tree(tmp_path, capsys):
    assert cutlass_conv.main(["build", "--cutlass", str(tmp_path), "--dest", str(tmp_path / "x.so")]) == 1
    assert "not a CUTLASS source tree" in capsys.readouterr().err
    assert cutlass_conv.main(["build", "--tiles", "m1n1k1"]) == 2  # no tile: m is 64 or 128
    assert cutlass_conv.main(["build", "--tiles", "m128n96k64,bogus"]) == 2


@pytest.mark.parametrize("kind", [k for k in CONVS if "stride" not in k])
@pytest.mark.parametrize("cached", [None, 1, 2, 3])  # frames of cache: none, shorter than, as long as, longer
def test_cutlass_layer_takes_the_causal_context_in_every_cache_case(kind, cached):
    """The layer hands the operator the cached frames in front and the zero frames still missing as time padding
    (here the CPU fallback pads them; on the GPU the kernel does): diffusers' output in every cache case."""
    conv, x, cache = one_convolution(kind, cached, channels_last=True)
    with torch.no_grad():
        stock = conv(x, cache)
        set_kernel_padding(conv, True)
        conv.__class__ = CutlassCausalConv3d
        out = conv(x, cache)
    assert out.shape == stock.shape and max_diff(out, stock) <= TOL
