"""The DearKD student: a DeiT-style ViT whose first K blocks use MHCA.

MHCA (multi-head convolutional attention), per head k, for a patch-token query i:

    A_k[i, :] = (1 - g_k) * softmax(q_i k^T / sqrt(d)) + g_k * [0, 0, softmax_j(v_k . r_ij)],
    r_ij = (dx, dy, dx^2 + dy^2),  dx = x_j - x_i, dy = y_j - y_i,  g_k = sigmoid(lambda_k).

The positional part spans patch keys only; the cls and distillation tokens use content attention
only. v_k is initialised to alpha * (2 dx_k, 2 dy_k, -1) so that head k peaks at its offset
(dx_k, dy_k) of a ceil(sqrt(H)) x ceil(sqrt(H)) kernel grid, and lambda_k = 1 so the positional part
dominates at the start (ConViT's gated positional self-attention).
"""
import contextlib
import math
from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath, Mlp, PatchEmbed, trunc_normal_
from timm.models import build_model_with_cfg, checkpoint_seq, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from ..checkpoint import atomic_save, load_model_file
from ..config import IMAGENET_MEAN, IMAGENET_STD
from ..errors import CheckpointError, InputError
from .weights import pretrained_kwargs

__all__ = ["MHCA", "Attention", "Block", "DearKDViT", "DistilledOutput", "relative_positions", "kernel_offsets",
           "align_pairing", "save_student", "load_student", "student_state_dict"]

NUM_PREFIX_TOKENS = 2  # cls, dist


def align_pairing(num_blocks: int, num_taps: int) -> List[int]:
    """Teacher tap for each of `num_blocks` aligned student blocks: split evenly, in order."""
    return [i * num_taps // num_blocks for i in range(num_blocks)]


def relative_positions(grid_h: int, grid_w: int) -> Tensor:
    """r_ij = (dx, dy, dx^2 + dy^2) for every pair of patches on a grid_h x grid_w grid: [N, N, 3]."""
    ys, xs = torch.meshgrid(torch.arange(grid_h), torch.arange(grid_w), indexing="ij")
    xs, ys = xs.flatten().float(), ys.flatten().float()
    dx = xs.view(1, -1) - xs.view(-1, 1)  # key minus query
    dy = ys.view(1, -1) - ys.view(-1, 1)
    return torch.stack([dx, dy, dx * dx + dy * dy], dim=-1)


def kernel_offsets(num_heads: int) -> List[Tuple[int, int]]:
    """The (dx, dy) offset each head attends to at initialisation: a ceil(sqrt(H))^2 kernel grid."""
    ks = math.ceil(math.sqrt(num_heads))
    center = (ks - 1) // 2
    return [(h % ks - center, h // ks - center) for h in range(num_heads)]


class Attention(nn.Module):
    """Plain multi-head self-attention: softmax(q k^T / sqrt(d)) v."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        # True: SDPA; False: the explicit product; None (default): SDPA for CUDA inputs, the explicit product on
        # the CPU, where SDPA's bf16 backward is slow (benchmarks/RESULTS.md, "Plain attention on the CPU")
        self.fused: Optional[bool] = None

    def forward(self, x: Tensor) -> Tensor:
        B, T, D = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        p = self.attn_drop if self.training else 0.0
        if _pick_fused(self.fused, x):
            x = F.scaled_dot_product_attention(q, k, v, dropout_p=p)
        else:
            x = F.dropout(torch.softmax((q * self.head_dim**-0.5) @ k.transpose(-2, -1), dim=-1), p) @ v
        return self.proj_drop(self.proj(x.transpose(1, 2).reshape(B, T, D)))


class MHCA(nn.Module):
    """Multi-head convolutional attention (gated content + relative-position attention)."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        grid_size: Tuple[int, int],
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        locality_strength: float = 1.0,
    ):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.qk = nn.Linear(dim, dim * 2, bias=qkv_bias)
        self.v = nn.Linear(dim, dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj_drop = nn.Dropout(proj_drop)
        self.v_pos = nn.Parameter(torch.zeros(num_heads, 3))  # v_k
        self.gate_lambda = nn.Parameter(torch.ones(num_heads))  # lambda_k
        self.locality_strength = locality_strength
        self.register_buffer("rel_pos", relative_positions(*grid_size), persistent=False)
        # True: SDPA + the shared positional product (no [B,H,T,T] tensor); False: the reference formulation
        # with the full attention matrix; None (default): fused for CUDA inputs, the reference on the CPU, where
        # it is the faster one (benchmarks/RESULTS.md, "Training step — CPU")
        self.fused: Optional[bool] = None
        self.num_prefix_tokens = NUM_PREFIX_TOKENS  # an attribute, not a global: TorchScript reads it
        self.reset_locality()

    @torch.no_grad()
    def reset_locality(self) -> None:
        """v_k = alpha * (2 dx_k, 2 dy_k, -1): v_k . r_ij = -alpha ||r_ij[:2] - (dx_k, dy_k)||^2 + const."""
        a = self.locality_strength
        for h, (dx, dy) in enumerate(kernel_offsets(self.num_heads)):
            self.v_pos[h] = torch.tensor([2.0 * a * dx, 2.0 * a * dy, -a])
        self.gate_lambda.fill_(1.0)

    def positional_attention(self) -> Tensor:
        """softmax_j(v_k . r_ij) over patch keys: [H, N, N]."""
        dt = self._acc_dtype()
        return torch.softmax(torch.einsum("ijc,hc->hij", self.rel_pos.to(dt), self.v_pos.to(dt)), dim=-1)

    def _acc_dtype(self) -> torch.dtype:
        """fp32 for the gate and positional softmax (fp64 when the module is fp64)."""
        return torch.promote_types(self.v_pos.dtype, torch.float32)

    def gate(self) -> Tensor:
        """g_k = sigmoid(lambda_k) as [1, H, 1, 1]."""
        return torch.sigmoid(self.gate_lambda.to(self._acc_dtype())).view(1, -1, 1, 1)

    def forward(self, x: Tensor) -> Tensor:
        B, T, D = x.shape
        q, k = self.qk(x).view(B, T, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        v = self.v(x).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)  # [B,H,T,d]
        if _pick_fused(self.fused, x) and not (self.training and self.attn_drop.p > 0):
            out = self._attend_fused(q, k, v)
        else:
            out = self._attend_reference(q, k, v)
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(B, T, D)))

    def _attend_fused(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """Patch rows: (1 - g) SDPA(q, k, v) + g P v_patch, with P = softmax_j(v_k . r_ij) [H, N, N]
        shared by the batch; prefix rows: SDPA only. No [B, H, T, T] tensor, forward or backward."""
        P = self.num_prefix_tokens
        content = F.scaled_dot_product_attention(q, k, v)  # flash / memory-efficient / fused CPU kernel
        g = self.gate()
        pos = shared_attention(self.positional_attention().to(v.dtype), v[:, :, P:])  # [B,H,N,d]
        patch = (1.0 - g) * content[:, :, P:] + g * pos
        return torch.cat([content[:, :, :P], patch.to(content.dtype)], dim=2)

    def _attend_reference(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """The formulation as written: the full [B, H, T, T] mixed attention matrix (also the path with
        attention dropout, which acts on that matrix)."""
        P = self.num_prefix_tokens
        content = torch.softmax((q @ k.transpose(-2, -1)).to(self._acc_dtype()) * self.scale, dim=-1)  # [B,H,T,T]
        g = self.gate()
        pos = self.positional_attention().unsqueeze(0)  # [1,H,N,N]
        patch_rows = (1.0 - g) * content[:, :, P:] + F.pad(g * pos, (P, 0))  # keys: prefix get no pos term
        attn = torch.cat([content[:, :, :P], patch_rows], dim=2).to(v.dtype)
        return self.attn_drop(attn) @ v


def shared_attention(attn: Tensor, v: Tensor) -> Tensor:
    """out[b, h] = attn[h] @ v[b, h] for attn [H, N, N] shared by the batch and v [B, H, N, d], as one product
    per head over the batch folded into the columns ([H, N, N] @ [H, N, B*d]): neither the product nor its
    gradient expands attn over the batch (a broadcasting matmul's backward builds [B, H, N, N])."""
    B, H, N, d = v.shape
    cols = v.permute(1, 2, 0, 3).reshape(H, N, B * d)
    return torch.bmm(attn, cols).view(H, N, B, d).permute(2, 0, 1, 3)


def _pick_fused(choice: Optional[bool], x: Tensor) -> bool:
    """An attention's path: its `fused` attribute when set, else the fused kernels for CUDA inputs."""
    if choice is not None:
        return choice
    if torch.jit.is_scripting():
        return x.is_cuda
    return _default_fused(x)


@torch.jit.ignore
def _default_fused(x: Tensor) -> bool:
    """The fused path for CUDA inputs; the reference under FX symbolic tracing (its device is unknown)."""
    return not torch.fx._symbolic_trace.is_fx_symbolic_tracing() and x.is_cuda


class Block(nn.Module):
    """Pre-norm transformer block around either attention."""

    def __init__(self, dim: int, attn: nn.Module, mlp_ratio: float = 4.0, drop: float = 0.0, drop_path: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = attn
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU, drop=drop)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class DistilledOutput(tuple):
    """The student's output in distilled training: the 2-tuple (cls_logits, dist_logits), exactly what timm's
    distilled DeiT returns, carrying for DearKDLoss the alignment inputs of this forward in `.align`: one
    (patch tokens [B, N, D], projection weight [C, D], bias [C], teacher tap index) per aligned block, and
    the patch grid in `.grid_size`. Code that unpacks two logits never sees them."""

    align: List[Tuple[Tensor, Tensor, Tensor, int]]
    grid_size: Tuple[int, int]

    def __new__(cls, cls_logits: Tensor, dist_logits: Tensor, align=(), grid_size=(0, 0)):
        out = super().__new__(cls, (cls_logits, dist_logits))
        out.align, out.grid_size = list(align), tuple(grid_size)
        return out


class DearKDViT(nn.Module):
    """DeiT-style distilled ViT with MHCA in its first `num_mhca` blocks, timm's conventions throughout.

    Output, as timm's VisionTransformerDistilled: the mean of the two heads' logits, or in training mode with
    `set_distilled_training(True)` the pair (cls_logits, dist_logits). `set_alignment(channels)` adds the
    feature-alignment projections W_l [C_s, D], b_l [C_s] as parameters of the model (so DDP, optimizers,
    clipping, EMA and checkpoints cover them); the distilled output then carries each aligned block's patch
    tokens with its projection for DearKDLoss (see DistilledOutput).
    """

    def __init__(
        self,
        img_size: Union[int, Tuple[int, int]] = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "token",
        embed_dim: int = 192,
        depth: int = 12,
        num_heads: int = 3,
        num_mhca: int = 4,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_rate: float = 0.0,
        proj_drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.1,
        locality_strength: float = 1.0,
        align_channels: Optional[Sequence[int]] = None,
        device=None,
        dtype=None,
    ):
        super().__init__()
        if not 0 <= num_mhca <= depth:
            raise InputError(f"num_mhca must be in [0, depth={depth}], got {num_mhca}")
        _check_pool(global_pool)
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.in_chans = in_chans
        self.embed_dim = self.num_features = self.head_hidden_size = embed_dim
        self.num_prefix_tokens = NUM_PREFIX_TOKENS
        self.num_mhca = num_mhca
        self.distilled_training = False
        self.grad_checkpointing = False
        with torch.device(device) if device is not None else contextlib.nullcontext():
            self.patch_embed = PatchEmbed(img_size=img_size, patch_size=patch_size, in_chans=in_chans,
                                          embed_dim=embed_dim)
            self.grid_size: Tuple[int, int] = tuple(self.patch_embed.grid_size)
            num_patches = self.patch_embed.num_patches
            self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
            self.dist_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
            self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + NUM_PREFIX_TOKENS, embed_dim))
            self.pos_drop = nn.Dropout(drop_rate)
            dpr = torch.linspace(0, drop_path_rate, depth, device="cpu").tolist()
            blocks = []
            for i in range(depth):
                if i < num_mhca:
                    attn = MHCA(embed_dim, num_heads, self.grid_size, qkv_bias, attn_drop_rate, proj_drop_rate,
                                locality_strength)
                else:
                    attn = Attention(embed_dim, num_heads, qkv_bias, attn_drop_rate, proj_drop_rate)
                blocks.append(Block(embed_dim, attn, mlp_ratio, proj_drop_rate, dpr[i]))
            self.blocks = nn.Sequential(*blocks)
            self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
            self.head_drop = nn.Dropout(drop_rate)
            self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
            self.head_dist = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.feature_info = [dict(module=f"blocks.{i}", num_chs=embed_dim, reduction=patch_size) for i in range(depth)]
        self.align_proj = nn.ModuleList()
        self.align_blocks: List[int] = []
        self.align_taps: List[int] = []
        for t in (self.cls_token, self.dist_token, self.pos_embed):
            trunc_normal_(t, std=0.02)
        self.apply(self._init_weights)
        for blk in self.blocks:  # _init_weights touched nothing of MHCA's own parameters, but be explicit
            if isinstance(blk.attn, MHCA):
                blk.attn.reset_locality()
        if align_channels:
            self.set_alignment(align_channels)
        if dtype is not None:
            self.to(dtype=dtype)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    # ------------------------------------------------------------------------------------ timm's model API

    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        return {"pos_embed", "cls_token", "dist_token"}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        return dict(stem=r"^cls_token|^dist_token|^pos_embed|^patch_embed",
                    blocks=[(r"^blocks\.(\d+)", None), (r"^align_proj\.(\d+)", (99998,)), (r"^norm", (99999,))])

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def set_distilled_training(self, enable: bool = True) -> None:
        """On: training mode returns (cls_logits, dist_logits) (a DistilledOutput); off: their mean."""
        self.distilled_training = enable

    @torch.jit.ignore
    def get_classifier(self) -> Tuple[nn.Module, nn.Module]:
        return self.head, self.head_dist

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """New heads for `num_classes` (0: none, forward returns the pooled features), same device and dtype."""
        if global_pool is not None:
            _check_pool(global_pool)
            self.global_pool = global_pool
        self.num_classes = num_classes
        ref = self.cls_token
        for name in ("head", "head_dist"):
            head = nn.Linear(self.embed_dim, num_classes, device=ref.device, dtype=ref.dtype) if num_classes > 0 \
                else nn.Identity()
            if num_classes > 0 and ref.device.type != "meta":
                self._init_weights(head)
            head.train(self.training)
            head.requires_grad_(ref.requires_grad)
            setattr(self, name, head)

    @torch.jit.ignore
    def set_alignment(self, channels: Optional[Sequence[int]], blocks: Optional[Sequence[int]] = None) -> None:
        """Add one projection Linear(D, C_s) per aligned block (default: the MHCA blocks), block l paired with
        teacher tap s by an even split in order; `channels` are the teacher taps' channel counts. None or []
        removes them. Call once, before the optimizer is built."""
        channels = list(channels or [])
        blocks = list(range(self.num_mhca) if blocks is None else blocks) if channels else []
        for b in blocks:
            if not 0 <= b < len(self.blocks):
                raise InputError(f"alignment block {b} out of range for depth {len(self.blocks)}")
        if channels and not blocks:
            raise InputError("alignment needs at least one student block (the model has no MHCA block)")
        if any(int(c) <= 0 for c in channels):
            raise InputError(f"alignment channels must be positive, got {channels}")
        ref = self.cls_token
        self.align_blocks = blocks
        self.align_taps = align_pairing(len(blocks), len(channels)) if channels else []
        proj = [nn.Linear(self.embed_dim, int(channels[s]), device=ref.device, dtype=ref.dtype) for s in self.align_taps]
        for p in proj:
            if ref.device.type != "meta":
                self._init_weights(p)
        self.align_proj = nn.ModuleList(proj)
        self.align_channels = channels

    # ------------------------------------------------------------------------------------ forward

    def _pos_embed(self, x: Tensor) -> Tensor:
        x = self.patch_embed(x)
        B = x.shape[0]
        x = torch.cat([self.cls_token.expand(B, -1, -1), self.dist_token.expand(B, -1, -1), x], dim=1)
        return self.pos_drop(x + self.pos_embed)

    def forward_features(self, x: Tensor) -> Tensor:
        """Final normed tokens [B, 2 + N, D] (cls, dist, patches)."""
        x = self._pos_embed(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            x = checkpoint_seq(self.blocks, x)
        else:
            x = self.blocks(x)
        return self.norm(x)

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """pre_logits: the mean of the cls and dist tokens [B, D]; else the mean of the two heads' logits."""
        x, x_dist = self.head_drop(x[:, 0]), self.head_drop(x[:, 1])
        if pre_logits:
            return (x + x_dist) / 2
        return (self.head(x) + self.head_dist(x_dist)) / 2

    def forward(self, x: Tensor) -> Tensor:
        if self.distilled_training and self.training and not torch.jit.is_scripting():
            return self._forward_distilled(x)
        return self.forward_head(self.forward_features(x))

    @torch.jit.ignore
    def _forward_distilled(self, x: Tensor) -> DistilledOutput:
        """(cls_logits, dist_logits) with the aligned blocks' patch tokens (strided views) attached."""
        # its own block loop rather than forward_intermediates: the taps are sliced as each block finishes, which
        # fixes the order autograd sums their gradients (bit-exact results, the README's main-job table)
        x = self._pos_embed(x)
        taps = {}
        for i, blk in enumerate(self.blocks):
            x = checkpoint(blk, x, use_reentrant=False) if self.grad_checkpointing else blk(x)
            if i in self.align_blocks:
                taps[i] = x[:, NUM_PREFIX_TOKENS:]
        x = self.norm(x)
        cls_logits, dist_logits = self.head(self.head_drop(x[:, 0])), self.head_dist(self.head_drop(x[:, 1]))
        align = [(taps[b], p.weight, p.bias, s) for b, p, s in zip(self.align_blocks, self.align_proj, self.align_taps)]
        if align:
            # every projection reaches the outputs (with zero gradient through this path): DDP then sees them used
            # whether or not the loss aligns this step (stage 2), with or without find_unused_parameters
            anchor = sum(p.weight.sum() + p.bias.sum() for p in self.align_proj) * 0.0
            cls_logits = cls_logits + anchor.to(cls_logits.dtype)
        return DistilledOutput(cls_logits, dist_logits, align, self.grid_size)

    def forward_intermediates(
        self,
        x: Tensor,
        indices: Optional[Union[int, List[int]]] = None,
        return_prefix_tokens: bool = False,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> Union[List[Tensor], Tuple[Tensor, List[Tensor]]]:
        """timm's feature API: the outputs of the blocks in `indices` (last n if int, all if None) as NCHW
        patch maps (or NLC tokens), optionally normed, with their prefix tokens, and the final features."""
        if output_fmt not in ("NCHW", "NLC"):
            raise InputError(f"output_fmt must be NCHW or NLC, got {output_fmt}")
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        B, _, height, width = x.shape
        x = self._pos_embed(x)
        intermediates: List[Tensor] = []
        last = len(self.blocks) - 1 if torch.jit.is_scripting() or not stop_early else max_index
        for i, blk in enumerate(self.blocks):
            if i > last:
                break
            if self.grad_checkpointing and not torch.jit.is_scripting():
                x = checkpoint(blk, x, use_reentrant=False)
            else:
                x = blk(x)
            if i in take_indices:
                intermediates.append(self.norm(x) if norm else x)
        prefix = [y[:, :NUM_PREFIX_TOKENS] for y in intermediates]
        feats = [y[:, NUM_PREFIX_TOKENS:] for y in intermediates]
        if output_fmt == "NCHW":
            h, w = height // self.patch_embed.patch_size[0], width // self.patch_embed.patch_size[1]
            feats = [y.reshape(B, h, w, -1).permute(0, 3, 1, 2).contiguous() for y in feats]
        if not torch.jit.is_scripting() and return_prefix_tokens:
            feats = list(zip(feats, prefix))
        if intermediates_only:
            return feats
        return self.norm(x), feats

    @torch.jit.ignore
    def prune_intermediate_layers(self, indices: Union[int, List[int]] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> List[int]:
        """Drop the blocks after the last one in `indices` (and the norm / heads when asked)."""
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        self.blocks = self.blocks[: max_index + 1]
        self.feature_info = self.feature_info[: max_index + 1]
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0)
        return take_indices


def _check_pool(global_pool: str) -> None:
    if global_pool != "token":
        raise InputError(f"DearKDViT pools the cls and dist tokens only (global_pool='token'), got '{global_pool}'")


def _cfg(img_size: int) -> dict:
    return {
        "num_classes": 1000,
        "input_size": (3, img_size, img_size),
        "fixed_input_size": True,  # the position embedding and the MHCA relative positions fix the grid
        "pool_size": None,
        "crop_pct": 0.875 if img_size >= 128 else 1.0,
        "interpolation": "bicubic",
        "mean": IMAGENET_MEAN,
        "std": IMAGENET_STD,
        "first_conv": "patch_embed.proj",
        "classifier": ("head", "head_dist"),
        "license": "apache-2.0",
    }


# timm reads a module's `default_cfgs` when register_model runs: these must come before the entry points
default_cfgs = generate_default_cfgs({
    "dearkd_tiny_patch16_224": _cfg(224),
    "dearkd_small_patch16_224": _cfg(224),
    "dearkd_base_patch16_224": _cfg(224),
    "dearkd_tiny_patch4_32": _cfg(32),
    "dearkd_micro_patch4_32": _cfg(32),
    "dearkd_nano_patch4_32": _cfg(32),
})


def _create(variant: str, pretrained: bool, defaults: dict, kwargs: dict) -> DearKDViT:
    """Build a registered variant through timm's builder: its defaults, overridden by the caller's kwargs."""
    kwargs = pretrained_kwargs(variant, pretrained, kwargs, ("head", "head_dist"))
    return build_model_with_cfg(DearKDViT, variant, pretrained, feature_cfg=dict(out_indices=3, feature_cls="getter"),
                                **{**defaults, **kwargs})


@register_model
def dearkd_tiny_patch16_224(pretrained: bool = False, **kwargs) -> DearKDViT:
    """DeiT-Ti widths: dim 192, depth 12, 3 heads, MHCA in blocks 0-3."""
    defaults = dict(patch_size=16, embed_dim=192, depth=12, num_heads=3, num_mhca=4)
    return _create("dearkd_tiny_patch16_224", pretrained, defaults, kwargs)


@register_model
def dearkd_small_patch16_224(pretrained: bool = False, **kwargs) -> DearKDViT:
    """DeiT-S widths: dim 384, depth 12, 6 heads, MHCA in blocks 0-3."""
    defaults = dict(patch_size=16, embed_dim=384, depth=12, num_heads=6, num_mhca=4)
    return _create("dearkd_small_patch16_224", pretrained, defaults, kwargs)


@register_model
def dearkd_base_patch16_224(pretrained: bool = False, **kwargs) -> DearKDViT:
    """DeiT-B widths: dim 768, depth 12, 12 heads, MHCA in blocks 0-3."""
    defaults = dict(patch_size=16, embed_dim=768, depth=12, num_heads=12, num_mhca=4)
    return _create("dearkd_base_patch16_224", pretrained, defaults, kwargs)


@register_model
def dearkd_tiny_patch4_32(pretrained: bool = False, **kwargs) -> DearKDViT:
    """32 px inputs, patch 4 (8x8 grid): dim 192, depth 12, 3 heads, MHCA in blocks 0-3."""
    defaults = dict(patch_size=4, embed_dim=192, depth=12, num_heads=3, num_mhca=4)
    return _create("dearkd_tiny_patch4_32", pretrained, defaults, kwargs)


@register_model
def dearkd_micro_patch4_32(pretrained: bool = False, **kwargs) -> DearKDViT:
    """The CPU demo model: 32 px, patch 4, dim 96, depth 6, 3 heads, MHCA in blocks 0-1 (a third)."""
    defaults = dict(patch_size=4, embed_dim=96, depth=6, num_heads=3, num_mhca=2, drop_path_rate=0.0)
    return _create("dearkd_micro_patch4_32", pretrained, defaults, kwargs)


@register_model
def dearkd_nano_patch4_32(pretrained: bool = False, **kwargs) -> DearKDViT:
    """The CPU study's student: 32 px, patch 4, dim 64, depth 4, 2 heads, MHCA in block 0."""
    defaults = dict(patch_size=4, embed_dim=64, depth=4, num_heads=2, num_mhca=1, drop_path_rate=0.0)
    return _create("dearkd_nano_patch4_32", pretrained, defaults, kwargs)


STUDENT_FORMAT = "dearkd_fast.student/2"


def student_state_dict(model: nn.Module) -> dict:
    """The model's weights without the training-only alignment projections: loads strictly into
    `timm.create_model(arch, num_classes=...)`."""
    return {k: v for k, v in model.state_dict().items() if not k.startswith("align_proj.")}


def save_student(model: DearKDViT, name: str, class_names: list, inputs, path: str) -> None:
    """Write student.pt atomically, in the ecosystem's shape: {"model": state_dict, ...metadata} with the
    timm name in "arch", the classes and the input spec (size, mean, std)."""
    atomic_save({"format": STUDENT_FORMAT, "arch": name, "model": student_state_dict(model),
                 "num_classes": len(class_names), "class_names": list(class_names), "input_size": inputs.size,
                 "mean": tuple(inputs.mean), "std": tuple(inputs.std)}, path)


def load_student(path: str, device: Union[str, torch.device] = "cpu") -> Tuple[DearKDViT, dict]:
    """Rebuild a student from student.pt (strict): (model on device, the file's metadata without the weights)."""
    import timm

    ck = load_model_file(path, "student", STUDENT_FORMAT)
    meta = {k: v for k, v in ck.items() if k != "model"}
    try:
        model = timm.create_model(ck["arch"], num_classes=ck["num_classes"])
        model.load_state_dict(ck["model"], strict=True)
    except (RuntimeError, KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"student checkpoint '{path}' does not fit its model ({type(e).__name__})") from None
    return model.to(device), meta
