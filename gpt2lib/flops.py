"""Peak FLOP/s of GPUs and FLOPs per token, for the MFU that training and --benchmark report."""

import re

import torch


def flops_per_token(config, seq_len):
    """Training FLOPs per token, nanoGPT's estimate: 6N for the matmuls of forward and backward plus
    the attention scores; N counts the (tied) token embedding but not the position embedding."""
    C, L = config.n_embd, config.n_layer
    n = (
        config.padded_vocab_size * C + L * (12 * C * C + 13 * C) + 2 * C
    )  # each block: 12C^2 weights + 13C biases/gains
    return 6 * n + 12 * L * C * seq_len


# Datasheet dense (no sparsity) 16-bit tensor-core FLOP/s, by exact model: torch.cuda.get_device_name()
# with "NVIDIA ", "Tesla " and "GeForce " removed, matched in full. Cards without bf16 (V100, T4) give
# their fp16 peak, the dtype --dtype auto picks there.
GPU_PEAK_FLOPS = [
    (r"H100( 80GB HBM3| SXM5?.*)", 989e12),
    (r"H100 PCIe.*", 756e12),
    (r"H100 NVL.*", 835e12),
    (r"H200( SXM.*)?", 989e12),
    (r"H200 NVL.*", 835e12),
    (r"GH200.*", 989e12),
    (r"H20", 148e12),
    (r"A100[- ](SXM4?|PCIE|PCIe)?[- ]?(40|80)GB( PCIe)?", 312e12),
    (r"A100", 312e12),
    (r"A10", 125e12),
    (r"L4", 121e12),
    (r"L40", 181e12),
    (r"L40S", 362e12),
    (r"RTX 4090", 165e12),
    (r"RTX 3090( Ti)?", 71e12),
    (r"RTX A6000", 155e12),
    (r"RTX 6000 Ada Generation", 364e12),
    (r"V100-SXM2-(16|32)GB", 125e12),
    (r"V100-PCIE-(16|32)GB", 112e12),
    (r"T4", 65e12),
]


def peak_flops(device_name):
    """Dense 16-bit FLOP/s of a GPU by its exact name, or None when it is not in the table."""
    name = re.sub(r"^(NVIDIA |Tesla |GeForce )+", "", device_name.strip())
    return next((flops for pattern, flops in GPU_PEAK_FLOPS if re.fullmatch(pattern, name)), None)


def gpu_peak_flops(device, master_process):
    """Peak FLOP/s of this CUDA device for MFU, or None (said once when the card is unknown)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    flops = peak_flops(name)
    if flops is None and master_process:
        print(f"note: no peak FLOP/s known for '{name}': MFU is not shown")
    return flops
