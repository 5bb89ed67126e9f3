"""Launch-grid sizing shared by the kernels: how many programs split a reduction over rows."""
import torch
import triton

PROGRAMS_PER_SM = 4  # enough programs in flight to hide memory latency, few enough partial sums to add up


def row_split(rows: int, block_rows: int, tiles: int, device: torch.device) -> int:
    """Programs along the rows of a reduction whose other grid axes hold `tiles` programs: about
    PROGRAMS_PER_SM per SM in all (2 SMs are assumed off the GPU, e.g. under TRITON_INTERPRET=1)."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 2
    return max(1, min(triton.cdiv(rows, block_rows), triton.cdiv(PROGRAMS_PER_SM * sms, tiles)))
