"""FP8 checkpoints (model/fp8_checkpoint.py): weights stored in float8_e4m3fn with their scales,
per tensor, channel or block, as the Hub's FP8 models are; the tests write such checkpoints from
the test model and the trained default model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from fairswitch import LLM, SamplingParams
from fairswitch.kernels import reference as ref
from fairswitch.model.default_model import default_model_dir
from fairswitch.model.fp8_checkpoint import Fp8Checkpoint, dequantize
from workloads.chat_prompts import CHAT_PROMPTS

BENCH_DIR = Path(__file__).resolve().parents[1] / "benchmarks"
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# The parts our engine fuses into one projection (they share a scale in a per-tensor
# checkpoint written for vLLM, which fuses them too).
FUSED = {"q_proj": "qkv", "k_proj": "qkv", "v_proj": "qkv", "gate_proj": "gu", "up_proj": "gu"}


def _scale_of(w: torch.Tensor, strategy: str, block: int) -> torch.Tensor:
    if strategy == "tensor":
        return ref.fp8_scale(w.abs().amax())
    if strategy == "channel":
        return ref.fp8_scale(w.abs().amax(dim=1, keepdim=True))
    out, cols = w.shape
    padded = torch.zeros(-(-out // block) * block, -(-cols // block) * block)
    padded[:out, :cols] = w.abs()
    tiles = padded.view(padded.shape[0] // block, block, padded.shape[1] // block, block)
    return ref.fp8_scale(tiles.amax(dim=(1, 3)))


def write_fp8_checkpoint(src: Path, dst: Path, strategy: str, quant: dict,
                         scale_name: str = "weight_scale", block: int = 128,
                         keep: tuple[str, ...] = ()) -> Path:
    """``src`` (a bf16/fp32 checkpoint) with its projections in fp8, one scale per tensor
    (shared by the parts the engine fuses), per output channel or per ``block`` square; the
    modules ``keep`` names as they were."""
    tensors = load_file(src / "model.safetensors")
    shared = {}
    if strategy == "tensor":
        for name, w in tensors.items():
            owner = name.rsplit(".", 2)
            if name.endswith(".weight") and owner[-2] in FUSED:
                key = (owner[0], FUSED[owner[-2]])
                amax = w.float().abs().amax()
                shared[key] = torch.maximum(shared.get(key, torch.tensor(0.0)), amax)
    out = {}
    for name, w in tensors.items():
        parts = name.rsplit(".", 2)
        if (not name.endswith(".weight") or parts[-2] not in PROJECTIONS
                or name.startswith(keep) and keep):
            out[name] = w  # (as it was)
            continue
        w = w.float()
        key = (parts[0], FUSED.get(parts[-2]))
        scale = (ref.fp8_scale(shared[key]) if key in shared else _scale_of(w, strategy, block))
        expanded = scale
        if strategy == "block":
            expanded = scale.repeat_interleave(block, 0).repeat_interleave(block, 1)
            expanded = expanded[:w.shape[0], :w.shape[1]]
        out[name] = ref.quantize_fp8(w, expanded)
        out[name[:-len("weight")] + scale_name] = scale.reshape(-1) if strategy == "tensor" \
            else scale
        out[name[:-len("weight")] + "input_scale"] = torch.ones(1)  # (static: not used)
    dst.mkdir(parents=True, exist_ok=True)
    save_file(out, dst / "model.safetensors")
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = quant
    (dst / "config.json").write_text(json.dumps(config))
    for f in src.iterdir():
        if f.name not in ("config.json", "model.safetensors") and f.is_file():
            shutil.copy(f, dst / f.name)
    return dst


AUTOFP8 = {"quant_method": "fp8", "activation_scheme": "dynamic"}


def test_a_per_tensor_checkpoint_serves_as_quantizing_on_load(llama_dir, tmp_path):
    """AutoFP8's format (one scale a tensor, q|k|v and gate|up sharing theirs, as written for
    vLLM): the codes the engine quantizes a bf16 checkpoint to, so the same replies; its static
    activation scales are not used (the engine scales each token)."""
    ckpt = write_fp8_checkpoint(llama_dir, tmp_path / "fp8", "tensor", AUTOFP8)
    params = SamplingParams(max_tokens=8, temperature=0.0, logprobs=2, ignore_eos=True)
    replies = []
    for kwargs in ({"model": str(ckpt)}, {"model": str(llama_dir), "quantization": "fp8"}):
        llm = LLM(dtype="float32", num_gpu_blocks=64, max_model_len=128, **kwargs)
        layer = llm.engine.runner.model.layers[0]
        assert layer.self_attn.qkv_proj.weight.dtype == torch.float8_e4m3fn
        out = llm.generate(["The quick brown fox", "Paged attention"], params, use_tqdm=False)
        replies.append([(o.outputs[0].token_ids, [{k: v.logprob for k, v in lp.items()}
                                                  for lp in o.outputs[0].logprobs])
                        for o in out])
        llm.shutdown()
    (ids_a, lps_a), (ids_b, lps_b) = zip(*replies[0]), zip(*replies[1])
    assert ids_a == ids_b
    for a, b in zip(lps_a, lps_b):
        for x, y in zip(a, b):
            assert x.keys() == y.keys()
            torch.testing.assert_close(list(x.values()), list(y.values()), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("strategy, quant, scale_name", [
    ("channel", {"quant_method": "fbgemm_fp8", "activation_scale_ub": 1200.0}, "weight_scale"),
    ("block", {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
               "weight_block_size": [128, 128]}, "weight_scale_inv"),
    ("channel", {"quant_method": "compressed-tensors", "format": "float-quantized",
                 "config_groups": {"group_0": {
                     "targets": ["Linear"], "input_activations": {
                         "dynamic": True, "num_bits": 8, "strategy": "token", "type": "float"},
                     "weights": {"num_bits": 8, "strategy": "channel", "type": "float"}}},
                 "ignore": ["lm_head"]}, "weight_scale"),
])
def test_channel_and_block_scaled_checkpoints_of_the_trained_model(tmp_path, monkeypatch,
                                                                   strategy, quant, scale_name):
    """fbgemm's per-channel, transformers' (DeepSeek-style) per-block and compressed-tensors'
    formats of the trained default model: its replies stay as close to the unquantized model's
    as quantizing it on load keeps them (benchmarks/fp8_kv_accuracy.py's measure)."""
    monkeypatch.syspath_prepend(str(BENCH_DIR))
    import fp8_kv_accuracy

    ckpt = write_fp8_checkpoint(default_model_dir(), tmp_path / strategy, strategy, quant,
                                scale_name)
    kwargs = dict(dtype="float32", num_gpu_blocks=256, max_model_len=512)
    fp8 = LLM(model=str(ckpt), quantization=quant["quant_method"], **kwargs)  # (as vLLM takes)
    assert fp8.engine.runner.model.layers[0].mlp.down_proj.weight.dtype == torch.float8_e4m3fn
    figures = fp8_kv_accuracy.compare(LLM(**kwargs), fp8, CHAT_PROMPTS[:6], max_tokens=32)
    assert figures["positions"] >= 100
    assert figures["top1_agreement"] >= 0.9, figures
    assert figures["kl_mean"] < 0.05, figures


def test_an_fp8_checkpoints_unquantized_layers_stay_so(llama_dir, tmp_path):
    """compressed-tensors' ``ignore`` (vLLM's): a projection the checkpoint keeps in its dtype
    is served in it, not quantized on load; the others in fp8."""
    keep = "model.layers.0.mlp.down_proj"
    quant = {"quant_method": "compressed-tensors", "format": "float-quantized",
             "config_groups": {"g": {"targets": ["Linear"], "weights": {
                 "num_bits": 8, "type": "float", "strategy": "channel"}}},
             "ignore": ["lm_head", keep]}
    ckpt = write_fp8_checkpoint(llama_dir, tmp_path / "ignore", "channel", quant, keep=(keep,))
    llm = LLM(model=str(ckpt), dtype="float32", num_gpu_blocks=32, max_model_len=64)
    layers = llm.engine.runner.model.layers
    assert layers[0].mlp.down_proj.weight.dtype == torch.float32
    assert torch.equal(layers[0].mlp.down_proj.weight,
                       load_file(ckpt / "model.safetensors")[keep + ".weight"])
    assert layers[0].mlp.gate_up_proj.weight.dtype == torch.float8_e4m3fn
    assert layers[1].mlp.down_proj.weight.dtype == torch.float8_e4m3fn
    out = llm.generate(["Hello"], SamplingParams(max_tokens=4, ignore_eos=True), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 4
    llm.shutdown()


def test_dequantize_per_tensor_channel_and_block():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(40, 70, generator=g)
    fmt = Fp8Checkpoint("fp8", None)
    for strategy, block in (("tensor", 0), ("channel", 0), ("block", 16), ("block", 32)):
        scale = _scale_of(w, strategy, block)
        expanded = scale
        if strategy == "block":
            expanded = scale.repeat_interleave(block, 0).repeat_interleave(block, 1)[:40, :70]
        codes = ref.quantize_fp8(w, expanded)
        declared = Fp8Checkpoint("fp8", (block, block)) if block else fmt
        got = dequantize(codes, scale, declared, "w")
        torch.testing.assert_close(got, codes.float() * expanded)
        assert (got - w).abs().max() <= w.abs().max() / 8
    # Undeclared, a block is transformers' default, 128 x 128.
    scale = _scale_of(w, "block", 128)
    codes = ref.quantize_fp8(w, scale.reshape(()))  # (one 128 x 128 block covers w)
    torch.testing.assert_close(dequantize(codes, scale, fmt, "w"), codes.float() * scale)
    with pytest.raises(ValueError, match="one per \\(16, 16\\) block"):
        dequantize(codes, torch.ones(2, 2), Fp8Checkpoint("fp8", (16, 16)), "w")
    with pytest.raises(ValueError, match="does not fit a weight of shape"):
        dequantize(codes, torch.ones(3), fmt, "w")
    with pytest.raises(ValueError, match="NaN or inf"):
        dequantize(codes, torch.tensor([float("nan")]), fmt, "w")


def _rewrite(ckpt: Path, change) -> None:
    tensors = load_file(ckpt / "model.safetensors")
    change(tensors)
    save_file(tensors, ckpt / "model.safetensors")


def test_bad_fp8_checkpoints_are_refused(llama_dir, tmp_path):
    """A weight without its scale, fp8 tensors in a checkpoint that declares no quantization (the
    loader would have read the codes as values), a scale that fits no weight."""
    name = "model.layers.0.mlp.down_proj.weight"
    cases = [
        (lambda t: t.pop(name[:-len("weight")] + "weight_scale"), None,
         "has no model.layers.0.mlp.down_proj.weight_scale"),
        (lambda t: None, "drop", "scale, but config.json declares no quantization_config"),
        (lambda t: [t.pop(k) for k in list(t) if k.endswith("_scale")], "drop",
         "is F8_E4M3, but config.json declares no quantization_config"),
        (lambda t: t.__setitem__(name[:-len("weight")] + "weight_scale", torch.ones(3)), None,
         "a scale of shape \\(3,\\) does not fit"),
    ]
    for i, (change, config, message) in enumerate(cases):
        ckpt = write_fp8_checkpoint(llama_dir, tmp_path / str(i), "tensor", AUTOFP8)
        _rewrite(ckpt, change)
        if config == "drop":
            raw = json.loads((ckpt / "config.json").read_text())
            del raw["quantization_config"]
            (ckpt / "config.json").write_text(json.dumps(raw))
        with pytest.raises(ValueError, match=message):
            LLM(model=str(ckpt), dtype="float32", num_gpu_blocks=32, max_model_len=64)
