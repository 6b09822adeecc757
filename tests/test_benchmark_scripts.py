"""The GPU benchmark scripts still run: each one's CPU check (tiny settings) through its own
``main``, so a change in the harness that breaks a script fails here, not on a lent GPU."""

from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_scoring_runs_on_cpu(tmp_path, one_torch_thread):
    out = tmp_path / "scoring.json"
    # metrics.batch_size 4: a 16-image subject batch is 4 chunks, so the replayed arm captures
    assert _script("gpu_scoring").main(["--device", "cpu", "--n", "16", "--size", "64", "--repeats", "1",
                                        "--batch-size", "4",
                                        "--profile", "--decode-threads", "1,2", "--cuda-graphs", "true",
                                        "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["n_images"] == 16 and result["score_run"]["seconds"] > 0
    by_threads = result["score_run_by_decode_threads"]  # besides the default pool (4 or more)
    assert set(by_threads) == {"1", "2"} and all(row["repeats"][0]["values_computed"] == result["score_run"]
                                                 ["repeats"][0]["values_computed"] for row in by_threads.values())
    graphs = result["score_run_by_cuda_graphs"]["true"]  # the replay plumbing (nothing captured on a CPU)
    compared = dict(graphs["values_vs_default_run"])
    assert compared.pop("default_mode") == "auto"  # off on a CPU: the runs above are plain there
    assert compared and all(row["identical"] and row["images"] > 0 for row in compared.values())
    assert graphs["replays"] and all(f["graphs"] > 0 and f["replays"] > 0 for b in graphs["replays"].values()
                                     for f in b.values())
    profile = result["score_run"]["profile"]
    assert profile["steps"] == 1 and profile["wall_s"] > 0 and profile["top_ops_by_device_time"]
    assert profile["host_op_calls"] > 0 and profile["top_ops_by_host_time"]
    assert result["complete"] is True


def test_gpu_scoring_keeps_what_it_measured_when_cut_off(tmp_path, one_torch_thread):
    """A call cut off in a later stage (here the profile raises) leaves the timed runs on disk."""
    script, out = _script("gpu_scoring"), tmp_path / "scoring.json"

    def cut_off(*args, **kwargs):
        raise KeyboardInterrupt("the call's time limit")

    script.profile_steps = cut_off
    with pytest.raises(KeyboardInterrupt):
        script.main(["--device", "cpu", "--n", "8", "--size", "64", "--repeats", "1", "--profile", "--out", str(out)])
    result = json.loads(out.read_text())
    assert result["complete"] is False and result["score_run"]["seconds"] > 0 and "target" in result
    split = result["score_run"]["repeats"][0]["seconds_split"]
    assert set(split) == set(result["metrics"]) and all(row["score_s"] > 0 for row in split.values())


@pytest.mark.slow  # ~90 s on two cores: inductor compiles the tiny UNet for both methods
def test_gpu_finetune_compile_runs_on_cpu(tmp_path, one_torch_thread, monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    out = tmp_path / "ft.json"
    _script("gpu_finetune_compile").main(["--tiny", "--device", "cpu", "--compile-cache", str(tmp_path / "inductor"),
                                          "--graphs", "--out", str(out)])
    results = json.loads(out.read_text())["results"]
    assert set(results) == {"dreambooth", "dreambooth_lora"}
    for row in results.values():
        assert not row["compiled"]["compile_failed"]
        assert row["agreement"]["max_relative_loss_difference"] < 1e-4
        assert row["agreement"]["weights_gap_share_of_move"] < 0.01
        for arm in ("eager_captured", "compiled_captured"):  # on a CPU: the captured path's plumbing, no capture
            captured = row[arm]
            assert captured["cuda_graphs"] == "not captured on a CPU (same plumbing)" and captured["uncaptured_steps"] == 0
            assert captured["max_relative_loss_difference_vs_eager"] < 1e-4
        assert row["eager_captured"]["max_relative_loss_difference_vs_eager"] == 0  # the same eager step


def test_gpu_sampling_modes_runs_on_cpu(tmp_path, one_torch_thread):
    """Eager arms only (seconds on two cores); a CPU or tiny run never claims the 0.20 s target; the
    FlashAttention-4 arm is refused on a CPU, with why, before it compiles anything."""
    out = tmp_path / "modes.json"
    arms = "eager,eager_cudnn_attention,compile_default_vae_fa4,compile_default_vae_fa4_direct,compile_cudagraphs_vae_fa4_direct"
    assert _script("gpu_sampling_modes").main(["--tiny", "--device", "cpu", "--arms", arms, "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    for arm in ("compile_default_vae_fa4", "compile_default_vae_fa4_direct", "compile_cudagraphs_vae_fa4_direct"):
        assert result["arms"][arm]["refused"] == "FA4 needs a CUDA device"
        assert "s_per_image" not in result["arms"][arm]
    assert result["arms"]["eager"]["s_per_image"] > 0
    assert result["arms"]["eager_cudnn_attention"]["vs_eager_max_levels"] <= 1  # the CPU ignores the SDPA flags
    assert result["target"]["met"] is False


def test_sdpa_preference_orders_the_backends_and_restores_them():
    """``--sdpa cudnn`` (gpu_ti_multi, the sampling arms): cuDNN's attention first, FlashAttention-2
    next, every backend still allowed; torch's own order is back afterwards; a wrong name is refused."""
    import torch
    from torch.nn.attention import SDPBackend

    sdpa_preference = _script("gpu_metrics").sdpa_preference
    before = torch._C._get_sdp_priority_order()
    with sdpa_preference("cudnn"):
        order = torch._C._get_sdp_priority_order()
        assert order[:2] == [int(SDPBackend.CUDNN_ATTENTION), int(SDPBackend.FLASH_ATTENTION)]
        assert torch.backends.cuda.math_sdp_enabled() and torch.backends.cuda.flash_sdp_enabled()
    assert torch._C._get_sdp_priority_order() == before
    with sdpa_preference("default"):
        assert torch._C._get_sdp_priority_order() == before
    with pytest.raises(SystemExit, match="choose from"):
        with sdpa_preference("fastest"):
            pass


def test_gpu_sampling_modes_inductor_options_are_checked(tmp_path, capsys):
    """``--inductor-option``: literals parsed, strings kept; an unknown setting or a missing ``=`` is
    refused at the command line, naming the option, before anything is built."""
    script = _script("gpu_sampling_modes")
    parser = argparse.ArgumentParser()
    assert script.inductor_options(parser, ["layout_optimization=False", "max_autotune_gemm_backends=ATEN"]) == {
        "layout_optimization": False, "max_autotune_gemm_backends": "ATEN"}
    # the options arm is the suite's path (the channels-last cat pass) under the options; the old path has none
    options = script.compile_options("compile_default_vae_options", {"layout_optimization": False})
    assert type(options.pop("post_grad_custom_pre_pass")).__name__ == "ChannelsLastCat"
    assert options == {"layout_optimization": False} and script.compile_options("compile_default_vae") == {}
    # the suite's path (the pass) keeps the UNet's default layout: only "_channels_last" arms convert it
    assert "_channels_last" not in "compile_default_vae_cat_pass"
    for arm, cudagraphs in (("compile_default_vae_cat_pass", False), ("compile_default_channels_last_vae_cat_pass", False),
                            ("compile_cudagraphs_vae_cat_pass", True)):
        options = script.compile_options(arm)
        assert type(options.pop("post_grad_custom_pre_pass")).__name__ == "ChannelsLastCat"
        assert options == ({"triton.cudagraphs": True} if cudagraphs else {}), arm
    # the GroupNorm arms: the suite's kernels (methods.fused_norm) or the shifted sums (benchmarks.shifted_norm)
    for arm, norm_pass in (("compile_default_vae_fused_norm_cat_pass", "FusedGroupNorm"),
                           ("compile_default_vae_shifted_norm_cat_pass", "ShiftedGroupNorm"),
                           ("compile_cudagraphs_vae_shifted_norm_cat_pass", "ShiftedGroupNorm")):
        assert type(script.compile_options(arm)["pre_grad_custom_pass"]).__name__ == norm_pass, arm
    for bad, named in ((["--inductor-option", "no_such_setting=1"], "no_such_setting"),
                       (["--inductor-option", "layout_optimization"], "KEY=VALUE"), ([], "needs at least one")):
        with pytest.raises(SystemExit):
            script.main(["--tiny", "--device", "cpu", "--arms", "compile_default_vae_options", *bad,
                         "--out", str(tmp_path / "x.json")])
        assert named in capsys.readouterr().err


@pytest.mark.slow  # ~50 s on two cores: one CPU compile of the tiny UNet
def test_gpu_sampling_modes_compiled_arm_runs_on_cpu(tmp_path, one_torch_thread):
    out = tmp_path / "modes.json"
    _script("gpu_sampling_modes").main(["--tiny", "--device", "cpu", "--arms", "eager,compile_default,"
                                        "compile_default_cudnn_benchmark", "--out", str(out)])
    arms = json.loads(out.read_text())["arms"]
    assert "error" not in arms["compile_default"] and arms["compile_default"]["vs_eager_max_levels"] <= 2
    assert arms["compile_default_cudnn_benchmark"]["first_call_seconds"] < arms["compile_default"]["first_call_seconds"]


def test_gpu_db_stacked_runs_on_cpu(tmp_path, one_torch_thread):
    """The stacked-subjects DreamBooth probe: each subject's gradients from the one vmapped step
    equal its own module's backward (fp32, tiny) — the precondition for building on it."""
    out = tmp_path / "stacked.json"
    assert _script("gpu_db_stacked").main(["--tiny", "--device", "cpu", "--profile", "1", "--variants", "channels_last",
                                           "--out", str(out)]) == 0
    arms = json.loads(out.read_text())["arms"]
    assert arms["reference"]["s_per_step"] > 0
    assert "error" not in arms["channels_last"] and arms["channels_last"]["s_per_step"] > 0
    assert arms["channels_last"]["profile"]["device_busy_s_per_step"] > 0
    assert arms["reference"]["profile"]["top_ops_by_device_time"]  # on the CPU: CPU time
    stacked = arms["stacked_2"]
    assert "error" not in stacked, stacked
    assert stacked["agreement"]["max_gradient_relative_l2"] < 1e-5
    for row in stacked["agreement"]["subjects"]:
        assert abs(row["loss_stacked"] - row["loss_plain"]) <= 1e-6 * abs(row["loss_plain"])


def test_gpu_db_streams_arm_trains_each_subject_as_alone(tmp_path, one_torch_thread):
    """``--streams 2``: two trainings from two threads (CUDA streams on a GPU) give each subject
    the losses it gets when the two run one after another from the same start."""
    out = tmp_path / "streams.json"
    assert _script("gpu_db_stacked").main(["--tiny", "--device", "cpu", "--counts", "", "--streams", "2",
                                           "--out", str(out)]) == 0
    row = json.loads(out.read_text())["arms"]["streams_2"]
    assert "error" not in row, row
    assert row["threads_s_per_subject_step"] > 0 and row["sequential_s_per_subject_step"] > 0
    assert row["max_relative_loss_difference"] <= 1e-6


def test_gpu_db_graphs_plumbing_on_cpu(tmp_path, one_torch_thread):
    """The whole-step CUDA graph probe without a GPU (nothing captured, a replay is a step): every
    training's losses in the graph arms, warm-up then replays in round-robin order, equal the
    plain arm's exactly, and the subjects' losses differ (each has its own inputs)."""
    out = tmp_path / "graphs.json"
    assert _script("gpu_db_graphs").main(["--tiny", "--device", "cpu", "--out", str(out)]) == 0
    arms = json.loads(out.read_text())["arms"]
    probe = _script("gpu_db_graphs")
    for count in (1, 2):
        plain = arms[f"plain_{count}"]
        assert "error" not in plain and len(plain["losses"]) == count
        assert all(len(row) == probe.WARMUP_STEPS + 2 for row in plain["losses"])
        for name in ("graphs_one_stream", "graphs_k_streams"):
            row = arms[f"{name}_{count}"]
            assert "error" not in row, row
            assert row["captured"] is False and row["losses"] == plain["losses"]
            assert row["max_relative_loss_difference_vs_plain"] == 0.0
    assert arms["plain_2"]["losses"][0] != arms["plain_2"]["losses"][1]


def test_gpu_db_stacked_step_updates_each_subject_as_its_own_trainer_would(one_torch_thread):
    """One stacked step (vmapped gradients, per-subject clipping, one AdamW over stacked tensors)
    moves each subject's weights as a plain step of its own module and optimizer does."""
    import contextlib

    import torch
    from torch.func import stack_module_state

    from methods.backbones import load_backbone, resolve_backbone
    from methods.diffusion import fp32_trainable_copy

    probe = _script("gpu_db_stacked")
    backbone = load_backbone(resolve_backbone("tiny"), "cpu", torch.float32)
    device = torch.device("cpu")
    plain = [fp32_trainable_copy(backbone, "unet") for _ in range(2)]
    start = [{n: p.detach().clone() for n, p in m.named_parameters()} for m in plain]
    stacked, buffers = stack_module_state([fp32_trainable_copy(backbone, "unet") for _ in range(2)])
    inputs = probe.subject_inputs(2, plain[0], 64, device, seed=3)
    inputs["noise"] *= 50  # large gradients, so that clipping (max norm 1) acts
    for k, module in enumerate(plain):
        optimizer = torch.optim.AdamW(module.parameters(), lr=probe.LEARNING_RATE, weight_decay=1e-2)
        probe.plain_step(module, optimizer, inputs, k, contextlib.nullcontext)
    step, _ = probe.make_stacked_step(__import__("copy").deepcopy(plain[0]).to("meta"), contextlib.nullcontext)
    optimizer = torch.optim.AdamW(list(stacked.values()), lr=probe.LEARNING_RATE, weight_decay=1e-2)
    step(stacked, buffers, optimizer, inputs)
    for k, module in enumerate(plain):
        # over all weights (an element whose gradient is near Adam's eps moves by rounding alone)
        moved = sum(float(((p.detach() - start[k][n]) ** 2).sum()) for n, p in module.named_parameters()) ** 0.5
        gap = sum(float(((stacked[n][k].detach() - p.detach()) ** 2).sum()) for n, p in module.named_parameters()) ** 0.5
        assert moved > 0 and gap <= 1e-3 * moved, (k, gap, moved)


def test_gpu_decode_runs_on_cpu(tmp_path, one_torch_thread):
    """The post-denoising probe: uint8 made on the device gives diffusers' PIL pixels exactly."""
    out = tmp_path / "decode.json"
    assert _script("gpu_decode").main(["--tiny", "--device", "cpu", "--no-compile", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["complete"] and result["stages"]["vae_decode_eager"]["s_per_image"] > 0
    assert result["stages"]["uint8_on_gpu"]["vs_postprocess_max_levels"] == 0


def test_gpu_unet_kernels_runs_on_cpu(tmp_path, one_torch_thread):
    """The UNet-forward probe on tiny: the eager arm is timed, every SDPA shape of the forward is
    recorded with its count, and each backend's output is checked against fp32 math. FlashAttention-4
    (the arms and the per-shape candidates) is recorded as refused here, with why, and the rest runs."""
    out = tmp_path / "unet.json"
    arms = ["--arms", "eager,compiled_fa4,compiled_fa4_direct,compiled_bandwidth,compiled_channels_last_cat_bandwidth"]
    assert _script("gpu_unet_kernels").main(["--tiny", "--device", "cpu", *arms, "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    eager = result["arms"]["eager"]
    assert "error" not in eager and eager["ms_per_forward"] > 0 and eager["max_abs_vs_eager"] == 0
    assert eager["sampling_floor_s_per_image"] == pytest.approx(eager["ms_per_latent_forward"] / 10, rel=1e-3)
    shapes = result["attention_shapes"]
    assert shapes and all(row["calls_per_forward"] >= 1 for row in shapes)
    assert {tuple(row["k"])[2] for row in shapes} >= {77}  # the cross-attention to the 77 text tokens
    for row in shapes:
        timed = [row[name] for name in ("DEFAULT", "FLASH_ATTENTION") if "ms" in row.get(name, {})]
        assert timed and all(entry["max_abs_vs_fp32_math"] < 1e-4 for entry in timed)
        assert row["FA4"] == row["FA4_SDPA"] == {"refused": "FA4 needs a CUDA device"}
    assert result["arms"]["compiled_fa4"] == result["arms"]["compiled_fa4_direct"] == {"refused": "FA4 needs a CUDA device"}
    assert "CUDA only" in result["arms"]["compiled_bandwidth"]["refused"]
    assert "CUDA only" in result["arms"]["compiled_channels_last_cat_bandwidth"]["refused"]


@pytest.mark.slow  # ~80 s on two cores: two CPU compiles of the tiny UNet
def test_gpu_unet_kernels_inductor_settings_arm_runs_on_cpu(tmp_path, one_torch_thread, monkeypatch):
    """An arm under other inductor settings compiles under them (recorded), computes eager's output,
    and leaves inductor's settings as they were."""
    from torch._inductor import config as inductor_config

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    out = tmp_path / "unet.json"
    arms = ["--arms", "eager,compiled_no_split_reductions", "--skip-attention"]
    assert _script("gpu_unet_kernels").main(["--tiny", "--device", "cpu", *arms, "--out", str(out)]) == 0
    entry = json.loads(out.read_text())["arms"]["compiled_no_split_reductions"]
    assert "error" not in entry and entry["inductor_settings"] == {"split_reductions": False}
    assert entry["max_abs_vs_eager"] < 1e-4 and inductor_config.split_reductions is True
    # the bandwidth arm's own path (refused by main on a CPU): compiles under profile_bandwidth, puts it back
    from methods.backbones import load_backbone, resolve_backbone

    unet = load_backbone(resolve_backbone("tiny"), "cpu", torch.float32).unet
    inputs = (torch.randn(2, unet.config.in_channels, 8, 8), torch.full((2,), 500), torch.randn(2, 77, unet.config.cross_attention_dim))
    bandwidth = _script("gpu_unet_kernels").bandwidth_arm(unet, inputs, torch.device("cpu"), {"arms": {}})
    assert bandwidth["triton_bandwidth"]["kernels_counted"] == 0  # a CPU compile has no Triton kernels
    assert inductor_config.profile_bandwidth is False
    # <base>_bandwidth: also under the base arm's settings (the channels-last cat pass), joined with that arm
    with_pass = _script("gpu_unet_kernels").bandwidth_arm(unet, inputs, torch.device("cpu"), {"arms": {}},
                                                          "compiled_channels_last_cat_bandwidth")
    assert with_pass["joined_with_arm"] == "compiled_channels_last_cat"
    assert with_pass["inductor_settings"]["post_grad_custom_pre_pass"] == "ChannelsLastCat"
    assert inductor_config.post_grad_custom_pre_pass is None and inductor_config.profile_bandwidth is False


def test_triton_bandwidth_joins_inductor_bytes_with_profiled_calls():
    """Bytes per forward = inductor's bytes per call x the compiled arm's calls; a kernel inductor did
    not count is reported as unmatched time, not left out silently; without a compiled arm, the
    per-call figures alone."""
    script = _script("gpu_unet_kernels")
    kernels = [{"kernel": "triton_a", "calls_per_forward": 5.0, "ms_per_forward": 1.0},
               {"kernel": "triton_b", "calls_per_forward": 1.0, "ms_per_forward": 0.5}]
    collected = [(0.1, 0.2, 2000.0, "triton_a"), (0.1, 0.2, 2000.0, "triton_a")]  # repeats: one per call
    result = script.triton_bandwidth(collected, kernels)
    assert result["gb_per_forward"] == pytest.approx(1.0) and result["tb_per_s"] == pytest.approx(1.0)
    assert result["ms_per_forward"] == 1.0 and result["ms_unmatched"] == 0.5 and result["kernels_matched"] == 1
    assert result["kernels"][0]["tb_per_s_alone"] == pytest.approx(2.0)
    alone = script.triton_bandwidth(collected, None)
    assert alone["kernels_counted"] == 1 and alone["kernels"][0]["tb_per_s_alone"] == pytest.approx(2.0)
    assert "gb_per_forward" not in alone


def test_unet_memory_traffic_counts_what_the_formula_says():
    """conv -> GroupNorm -> SiLU -> conv -> + residual -> conv on N elements: op by op the three
    non-library ops move 7N + 12 elements (GroupNorm's 4+4 weights and 2+2 statistics); fused between
    the library calls, 5N (the first conv's output read by both segments, SiLU's output written, the
    second conv's output read, the sum written); GroupNorm's statistics pass one more N."""
    traffic = _script("unet_memory_traffic")
    convs = [torch.nn.Conv2d(4, 4, 3, padding=1) for _ in range(3)]
    norm = torch.nn.GroupNorm(2, 4)
    x = torch.randn(1, 4, 6, 6)
    with torch.no_grad(), traffic.OpLog() as log:
        first = convs[0](x)
        convs[2](convs[1](torch.nn.functional.silu(norm(first))) + first)
    counts = traffic.traffic(log.ops)
    n = x.numel()
    assert (counts["eager"], counts["fused_floor"], counts["norm_second_pass"], counts["segments"]) == (7 * n + 12, 5 * n, n, 2)


def test_unet_memory_traffic_runs_on_tiny(tmp_path):
    out = tmp_path / "traffic.json"
    script = _script("unet_memory_traffic")
    assert script.main(["--backbone", "tiny", "--resolution", "8", "--latents", "100000", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    elements = result["elements_per_latent"]
    assert 0 < elements["fused_floor"] < elements["eager"] and elements["norm_second_pass"] > 0
    assert result["segments_per_forward"] > 1 and set(result["eager_gb_by_op"]) >= {"native_group_norm", "add"}
    assert result["eager_gb"] == round(elements["eager"] * 100000 * 2 / 1e9, 2) > 0  # 100000 latents, bf16


@pytest.mark.parametrize("min_kv_tokens", [0, 100])
def test_fa4_attention_processor_computes_what_diffusers_processor_does(min_kv_tokens):
    """The FA4 arms' attention processor with SDPA in FA4's place (the same (B, L, H, D) call) gives the
    tiny UNet's output of diffusers' own processor: its projections, head layout and output path are
    diffusers' arithmetic. At 32x32 latents min_kv_tokens=100 sends only the 256-token self-attention
    (tiny attends at half resolution) to the op and the 77-token cross-attention to diffusers' processor."""
    import torch

    from benchmarks.gpu_metrics import fa4_attention_processor
    from methods.backbones import load_backbone, resolve_backbone

    unet = load_backbone(resolve_backbone("tiny"), "cpu", torch.float32).unet
    calls = []

    def sdpa_on_blhd(q, k, v):
        calls.append(k.shape[1])
        return torch.nn.functional.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v))).transpose(1, 2)

    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(2, unet.config.in_channels, 32, 32, generator=generator)
    text = torch.randn(2, 77, unet.config.cross_attention_dim, generator=generator)
    processors = unet.attn_processors  # the tiny backbone is shared by the session's tests: put them back
    try:
        with torch.no_grad():
            reference = unet(latents, 10, encoder_hidden_states=text).sample
            unet.set_attn_processor(fa4_attention_processor(min_kv_tokens, op=sdpa_on_blhd))
            swapped = unet(latents, 10, encoder_hidden_states=text).sample
    finally:
        unet.set_attn_processor(processors)
    assert calls and all(length >= min_kv_tokens for length in calls)
    assert (77 in calls) == (min_kv_tokens == 0)
    torch.testing.assert_close(swapped, reference, rtol=1e-5, atol=1e-5)


def test_gpu_unet_kernels_names_an_unknown_arm():
    with pytest.raises(SystemExit):
        _script("gpu_unet_kernels").main(["--tiny", "--device", "cpu", "--arms", "eager,compiled_fp4"])


def test_gpu_unet_kernels_counts_fused_triton_kernels_apart():
    kind_of = _script("gpu_unet_kernels").kind_of
    assert kind_of("triton_poi_fused_convolution_native_group_norm_silu_119") == "inductor_triton"
    assert kind_of("sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc") == "convolution"
    assert kind_of("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16") == "attention"
    assert kind_of("nvjet_sm90_tst_256x128_64x4_1x2_h_bz_coopA_bias_TNT") == "matmul"
    assert kind_of("group_norm_stats_shifted_kernel") == "group_norm_kernels"  # methods.fused_norm's
    assert kind_of("group_norm_apply_kernel") == "group_norm_kernels"


def test_gpu_fused_norm_runs_on_cpu(tmp_path):
    """On a CPU the op runs its torch reference (the kernels need a GPU or Triton's interpreter)."""
    out = tmp_path / "fused.json"
    _script("gpu_fused_norm").main(["--tiny", "--with-bias", "--repeats", "1", "--out", str(out)])
    document = json.loads(out.read_text())
    assert [row["shape"] for row in document["shapes"]] == [[2, 64, 8, 8], [2, 96, 5, 7]]
    assert all(row[arm]["max_abs_vs_fp32"] < 1e-4 for row in document["shapes"] for arm in ("eager", "compiled", "fused", "shifted"))
    assert all(row["fused"]["timing"] == "host_clock" for row in document["shapes"])


def test_gpu_sampling_modes_refuses_an_unreadable_fused_norm_config(tmp_path, capsys):
    with pytest.raises(SystemExit):
        _script("gpu_sampling_modes").main(["--tiny", "--arms", "compile_default_vae_fused_norm_cat_pass",
                                            "--fused-norm-config", str(tmp_path / "nowhere.json")])
    assert "nowhere.json: cannot read it" in capsys.readouterr().err


@pytest.mark.slow  # the interpreted sweep: ~100 s on two cores
def test_gpu_fused_norm_sweep_under_the_interpreter(tmp_path):
    """The kernel stages and the sweep under Triton's interpreter (a child process: TRITON_INTERPRET
    is read when the kernels are decorated)."""
    import os
    import subprocess
    import sys

    pytest.importorskip("triton")
    swept = tmp_path / "sweep.json"
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, str(root / "benchmarks" / "gpu_fused_norm.py"), "--tiny", "--with-bias",
                             "--sweep", "--repeats", "1", "--shapes", "64x4x4", "--out", str(swept)],
                            env={**os.environ, "TRITON_INTERPRET": "1"}, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    sweep = json.loads(swept.read_text())["sweep"]
    stats = [row for row in sweep["rows"] if row["stage"] == "stats"]
    assert len(stats) == 48 and not [row for row in sweep["rows"] if "error" in row]
    assert sweep["best"]["max_abs_vs_fp32"] < 1e-4 and set(sweep["best"]["stages_ms"]) == {"stats", "finalize", "apply"}


@pytest.mark.slow  # child processes each build the tiny backbone (~30 s on two cores)
@pytest.mark.parametrize("method", ["dreambooth", "dreambooth_lora"])
def test_gpu_speed_concurrency_children_train_either_fine_tune(tmp_path, method):
    """``--concurrency 2`` runs two training processes at once; ``--train-method dreambooth_lora``
    makes them train LoRA's adapters (as the method builds them), its rows kept apart."""
    out = tmp_path / "speed.json"
    assert _script("gpu_speed").main([
        "--backbone", "tiny", "--device", "cpu", "--resolution", "64", "--skip", "sampling,training",
        "--concurrency", "2", "--train-steps", "3", "--train-method", method, "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    rows = result["training_concurrency" if method == "dreambooth" else "training_concurrency_dreambooth_lora"]
    row = rows["2"]
    assert row["returncodes"] == [0, 0] and row["aggregate_steps_per_s"] > 0
    windows = row["clock_windows_each"]  # each child's timed steps on the wall clock, for overlap checks
    assert len(windows) == 2 and all(start < end for start, end in windows)
    first, second = row["losses_first5_each"]
    assert first == second  # the same seeds in both processes


def test_gpu_ti_multi_runs_on_cpu_with_and_without_its_reference(tmp_path, one_torch_thread):
    """Passes of 2 and 3 (``--tiny``'s) beside their single-subject reference (subject 0 checked against it), and with
    ``--skip-reference`` (for timing a pass beside other processes) the pass alone, its clock
    window recorded, no reference claimed."""
    script = _script("gpu_ti_multi")
    full = script.main(["--tiny", "--device", "cpu", "--out", str(tmp_path / "full.json")])
    assert full["reference_single_subject"]["s_per_step"] > 0
    assert full["passes"][0]["subject0_vs_alone_max_abs"] is not None
    bare = script.main(["--tiny", "--device", "cpu", "--skip-reference", "--out", str(tmp_path / "bare.json")])
    assert bare["reference_single_subject"] is None
    assert [row["subjects"] for row in bare["passes"]] == [2, 3]
    for row in bare["passes"]:
        assert "subject0_vs_alone_max_abs" not in row and row["clock_window"][1] > row["clock_window"][0]
    assert json.loads((tmp_path / "bare.json").read_text())["reference_single_subject"] is None


# ----------------------------------------------------------------------------- GroupNorm in channels-last order
# (gpu_metrics.layout_group_norms: a measured dead end for the suite, kept for its benchmark arms),
# checked against torch's own F.group_norm and for what the compiler traces


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize(("channels", "groups", "affine"), [(64, 32, True), (96, 32, True), (12, 3, False)])
def test_layout_group_norm_equals_torch_group_norm_in_fp32(channels, groups, affine, channels_last):
    from benchmarks.gpu_metrics import group_norm_channels_last

    generator = torch.Generator().manual_seed(channels + groups)
    x = torch.randn(3, channels, 9, 7, generator=generator) * 4 + 2
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    weight = torch.randn(channels, generator=generator) if affine else None
    bias = torch.randn(channels, generator=generator) if affine else None
    ours = group_norm_channels_last(x, groups, weight, bias, 1e-5)
    reference = F.group_norm(x, groups, weight, bias, 1e-5)
    assert ours.shape == reference.shape and ours.dtype == reference.dtype
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)
    if channels_last:
        assert ours.is_contiguous(memory_format=torch.channels_last)


def test_layout_group_norm_bf16_within_torchs_own_rounding():
    from benchmarks.gpu_metrics import group_norm_channels_last

    generator = torch.Generator().manual_seed(1)
    x = (torch.randn(2, 64, 8, 8, generator=generator) * 3 + 1).to(torch.bfloat16)
    weight, bias = torch.randn(64, generator=generator), torch.randn(64, generator=generator)
    exact = F.group_norm(x.float(), 32, weight, bias, 1e-5)
    ours = group_norm_channels_last(x, 32, weight.bfloat16(), bias.bfloat16(), 1e-5)
    torchs = F.group_norm(x, 32, weight.bfloat16(), bias.bfloat16(), 1e-5)
    assert ours.dtype == torch.bfloat16
    # both round the same fp32 result to bf16 once: no more error than torch's own bf16 GroupNorm
    assert (ours.float() - exact).abs().max() <= (torchs.float() - exact).abs().max() + 1e-6


def _group_norm_net() -> torch.nn.Sequential:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(4, 64, 3, padding=1), torch.nn.GroupNorm(32, 64), torch.nn.SiLU(),
                               torch.nn.Conv2d(64, 8, 1), torch.nn.GroupNorm(4, 8, affine=False))


def test_layout_group_norms_switch_in_place_eagerly_identical_and_back():
    from benchmarks.gpu_metrics import LayoutGroupNorm, layout_group_norms

    net = _group_norm_net()
    x = torch.randn(2, 4, 10, 10)
    before, keys = net(x), list(net.state_dict())
    norm = net[1]
    with layout_group_norms(net) as switched:
        assert switched == 2
        assert net[1] is norm and isinstance(norm, torch.nn.GroupNorm) and type(norm) is LayoutGroupNorm
        assert list(net.state_dict()) == keys
        assert torch.equal(net(x), before)  # eagerly: nn.GroupNorm.forward itself, bit for bit
        with layout_group_norms(net) as again:
            assert again == 0  # already switched; leaving this block switches nothing back
        assert type(net[4]) is LayoutGroupNorm
    assert type(net[1]) is type(net[4]) is torch.nn.GroupNorm


@torch.no_grad()
def test_layout_group_norm_compiled_trace_uses_the_channels_last_form_and_matches_eager():
    """The graph dynamo hands the compiler (no autograd, as sampling runs) has no group_norm call
    once switched, and inductor's compiled result equals the eager nn.GroupNorm net within fp32
    rounding; with autograd on (a training step) the trace keeps torch's GroupNorm."""
    from benchmarks.gpu_metrics import layout_group_norms

    seen: list[set[str]] = []

    def recording_backend(graph_module, example_inputs):
        seen.append({str(node.target) for node in graph_module.graph.nodes if node.op in ("call_function", "call_method")})
        return graph_module.forward

    net = _group_norm_net()
    x = torch.randn(2, 4, 10, 10)
    reference = net(x)
    torch._dynamo.reset()
    torch.compile(net, backend=recording_backend)(x)
    assert any("group_norm" in target for target in seen[-1])
    try:
        with layout_group_norms(net):
            torch._dynamo.reset()
            torch.compile(net, backend=recording_backend)(x)
            assert not any("group_norm" in target for target in seen[-1])
            assert any("var_mean" in target for target in seen[-1])
            with torch.enable_grad():
                torch.compile(net, backend=recording_backend)(x)
            assert any("group_norm" in target for target in seen[-1])
            torch._dynamo.reset()
            compiled = torch.compile(net)(x)
            torch.testing.assert_close(compiled, reference, rtol=1e-5, atol=1e-5)
    finally:
        torch._dynamo.reset()
