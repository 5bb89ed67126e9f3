"""The DearKD student: a DeiT-style ViT whose first K blocks use MHCA.

MHCA (multi-head convolutional attention), per head k, for a patch-token query i:

    A_k[i, :] = (1 - g_k) * softmax(q_i k^T / sqrt(d)) + g_k * [0, 0, softmax_j(v_k . r_ij)],
    r_ij = (dx, dy, dx^2 + dy^2),  dx = x_j - x_i, dy = y_j - y_i,  g_k = sigmoid(lambda_k).

The positional part spans patch keys only; the cls and distillation tokens use content attention
only. v_k is initialised to alpha * (2 dx_k, 2 dy_k, -1) so that head k peaks at its offset
(dx_k, dy_k) of a ceil(sqrt(H)) x ceil(sqrt(H)) kernel grid, and lambda_k = 1 so the positional part
dominates at the start (ConViT's gated positional self-attention).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath, Mlp, PatchEmbed, trunc_normal_
from timm.models import register_model
from torch import Tensor

from ..checkpoint import atomic_save, load_model_file
from ..config import IMAGENET_MEAN, IMAGENET_STD
from ..errors import CheckpointError, InputError

__all__ = ["MHCA", "Attention", "Block", "DearKDViT", "relative_positions", "kernel_offsets", "save_student",
           "load_student"]

NUM_PREFIX_TOKENS = 2  # cls, dist
TIMM_KWARGS = ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir")  # create_model passes these along


def relative_positions(grid_h: int, grid_w: int) -> Tensor:
    """r_ij = (dx, dy, dx^2 + dy^2) for every pair of patches on a grid_h x grid_w grid: [N, N, 3]."""
    ys, xs = torch.meshgrid(torch.arange(grid_h), torch.arange(grid_w), indexing="ij")
    xs, ys = xs.flatten().float(), ys.flatten().float()
    dx = xs.view(1, -1) - xs.view(-1, 1)  # key minus query
    dy = ys.view(1, -1) - ys.view(-1, 1)
    return torch.stack([dx, dy, dx * dx + dy * dy], dim=-1)


def kernel_offsets(num_heads: int) -> list[tuple[int, int]]:
    """The (dx, dy) offset each head attends to at initialisation: a ceil(sqrt(H))^2 kernel grid."""
    ks = math.ceil(math.sqrt(num_heads))
    center = (ks - 1) // 2
    return [(h % ks - center, h // ks - center) for h in range(num_heads)]


class Attention(nn.Module):
    """Plain multi-head self-attention (fused scaled-dot-product)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: Tensor) -> Tensor:
        B, T, D = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        x = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.0)
        return self.proj_drop(self.proj(x.transpose(1, 2).reshape(B, T, D)))


class MHCA(nn.Module):
    """Multi-head convolutional attention (gated content + relative-position attention)."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        grid_size: tuple[int, int],
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
        # it is the faster one (CPU train step, bf16: 285 vs 414 ms for dearkd_micro_patch4_32 at batch 64,
        # 322 vs 367 ms for dearkd_tiny_patch16_224 at batch 8; benchmarks/RESULTS.md)
        self.fused: bool | None = None
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
        fused = self.fused if self.fused is not None else x.is_cuda
        if fused and not (self.training and self.attn_drop.p > 0):
            out = self._attend_fused(q, k, v)
        else:
            out = self._attend_reference(q, k, v)
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(B, T, D)))

    def _attend_fused(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """Patch rows: (1 - g) SDPA(q, k, v) + g P v_patch, with P = softmax_j(v_k . r_ij) [H, N, N]
        shared by the batch; prefix rows: SDPA only. No [B, H, T, T] tensor, forward or backward."""
        P = NUM_PREFIX_TOKENS
        content = F.scaled_dot_product_attention(q, k, v)  # flash / memory-efficient / fused CPU kernel
        g = self.gate()
        pos = torch.matmul(self.positional_attention().to(v.dtype), v[:, :, P:])  # [B,H,N,d]
        patch = (1.0 - g) * content[:, :, P:] + g * pos
        return torch.cat([content[:, :, :P], patch.to(content.dtype)], dim=2)

    def _attend_reference(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """The formulation as written: the full [B, H, T, T] mixed attention matrix (also the path with
        attention dropout, which acts on that matrix)."""
        P = NUM_PREFIX_TOKENS
        content = torch.softmax((q @ k.transpose(-2, -1)).to(self._acc_dtype()) * self.scale, dim=-1)  # [B,H,T,T]
        g = self.gate()
        pos = self.positional_attention().unsqueeze(0)  # [1,H,N,N]
        patch_rows = (1.0 - g) * content[:, :, P:] + F.pad(g * pos, (P, 0))  # keys: prefix get no pos term
        attn = torch.cat([content[:, :, :P], patch_rows], dim=2).to(v.dtype)
        return self.attn_drop(attn) @ v


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


class DearKDViT(nn.Module):
    """DeiT-style distilled ViT with MHCA in its first `num_mhca` blocks.

    Training mode returns (cls_logits, dist_logits, tokens) where tokens are the patch tokens
    [B, N, D] (strided views) after each block in `tap_blocks`; eval mode returns the mean of the
    two heads' logits, so timm-style code sees a plain classifier.
    """

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        num_classes: int = 1000,
        embed_dim: int = 192,
        depth: int = 12,
        num_heads: int = 3,
        num_mhca: int = 4,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.1,
        locality_strength: float = 1.0,
        **kwargs,
    ):
        super().__init__()
        for k in TIMM_KWARGS:
            kwargs.pop(k, None)
        if kwargs:
            raise InputError(f"DearKDViT got unexpected arguments: {sorted(kwargs)}")
        if not 0 <= num_mhca <= depth:
            raise InputError(f"num_mhca must be in [0, depth={depth}], got {num_mhca}")
        self.num_classes = num_classes
        self.embed_dim = self.num_features = embed_dim
        self.num_mhca = num_mhca
        self.patch_embed = PatchEmbed(img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim)
        self.grid_size = tuple(self.patch_embed.grid_size)
        num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.dist_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + NUM_PREFIX_TOKENS, embed_dim))
        self.pos_drop = nn.Dropout(drop_rate)
        dpr = torch.linspace(0, drop_path_rate, depth).tolist()
        blocks = []
        for i in range(depth):
            if i < num_mhca:
                attn = MHCA(embed_dim, num_heads, self.grid_size, qkv_bias, attn_drop_rate, drop_rate, locality_strength)
            else:
                attn = Attention(embed_dim, num_heads, qkv_bias, attn_drop_rate, drop_rate)
            blocks.append(Block(embed_dim, attn, mlp_ratio, drop_rate, dpr[i]))
        self.blocks = nn.ModuleList(blocks)
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.head_dist = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.tap_blocks: tuple[int, ...] = tuple(range(num_mhca))
        for t in (self.cls_token, self.dist_token, self.pos_embed):
            trunc_normal_(t, std=0.02)
        self.apply(self._init_weights)
        for blk in self.blocks:  # _init_weights touched nothing of MHCA's own parameters, but be explicit
            if isinstance(blk.attn, MHCA):
                blk.attn.reset_locality()

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {"pos_embed", "cls_token", "dist_token"}

    def set_tap_blocks(self, blocks: list[int] | tuple[int, ...]) -> None:
        """Choose the blocks whose patch tokens forward() returns in training mode."""
        for b in blocks:
            if not 0 <= b < len(self.blocks):
                raise InputError(f"tap block {b} out of range for depth {len(self.blocks)}")
        self.tap_blocks = tuple(blocks)

    def get_classifier(self) -> nn.Module:
        return self.head

    def forward_features(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        """Run the blocks; return the final normed tokens [B, 2+N, D] and the tapped patch tokens."""
        x = self.patch_embed(x)
        B = x.shape[0]
        x = torch.cat([self.cls_token.expand(B, -1, -1), self.dist_token.expand(B, -1, -1), x], dim=1)
        x = self.pos_drop(x + self.pos_embed)
        tokens = []
        for i, blk in enumerate(self.blocks):
            x = blk(x)
            if i in self.tap_blocks:
                tokens.append(x[:, NUM_PREFIX_TOKENS:])
        return self.norm(x), tokens

    def forward(self, x: Tensor):
        x, tokens = self.forward_features(x)
        cls_logits, dist_logits = self.head(x[:, 0]), self.head_dist(x[:, 1])
        if self.training:
            return cls_logits, dist_logits, tokens
        return (cls_logits + dist_logits) / 2


def _cfg(img_size: int, **kw) -> dict:
    return {
        "num_classes": 1000,
        "input_size": (3, img_size, img_size),
        "pool_size": None,
        "crop_pct": 0.875 if img_size >= 128 else 1.0,
        "interpolation": "bicubic",
        "mean": IMAGENET_MEAN,
        "std": IMAGENET_STD,
        "first_conv": "patch_embed.proj",
        "classifier": ("head", "head_dist"),
        **kw,
    }


def _create(name: str, pretrained: bool, defaults: dict, kwargs: dict) -> DearKDViT:
    """Build a registered variant: its defaults, overridden by the caller's kwargs."""
    if pretrained:
        raise InputError(f"{name}: no pretrained weights exist; train it or load a checkpoint file")
    cfg = {**defaults, **kwargs}
    model = DearKDViT(**cfg)
    model.default_cfg = model.pretrained_cfg = _cfg(cfg["img_size"])
    return model


@register_model
def dearkd_tiny_patch16_224(pretrained: bool = False, **kwargs) -> DearKDViT:
    """DeiT-Ti widths: dim 192, depth 12, 3 heads, MHCA in blocks 0-3."""
    defaults = dict(img_size=224, patch_size=16, embed_dim=192, depth=12, num_heads=3, num_mhca=4)
    return _create("dearkd_tiny_patch16_224", pretrained, defaults, kwargs)


@register_model
def dearkd_small_patch16_224(pretrained: bool = False, **kwargs) -> DearKDViT:
    """DeiT-S widths: dim 384, depth 12, 6 heads, MHCA in blocks 0-3."""
    defaults = dict(img_size=224, patch_size=16, embed_dim=384, depth=12, num_heads=6, num_mhca=4)
    return _create("dearkd_small_patch16_224", pretrained, defaults, kwargs)


@register_model
def dearkd_base_patch16_224(pretrained: bool = False, **kwargs) -> DearKDViT:
    """DeiT-B widths: dim 768, depth 12, 12 heads, MHCA in blocks 0-3."""
    defaults = dict(img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12, num_mhca=4)
    return _create("dearkd_base_patch16_224", pretrained, defaults, kwargs)


@register_model
def dearkd_tiny_patch4_32(pretrained: bool = False, **kwargs) -> DearKDViT:
    """32 px inputs, patch 4 (8x8 grid): dim 192, depth 12, 3 heads, MHCA in blocks 0-3."""
    defaults = dict(img_size=32, patch_size=4, embed_dim=192, depth=12, num_heads=3, num_mhca=4)
    return _create("dearkd_tiny_patch4_32", pretrained, defaults, kwargs)


@register_model
def dearkd_micro_patch4_32(pretrained: bool = False, **kwargs) -> DearKDViT:
    """The CPU demo model: 32 px, patch 4, dim 96, depth 6, 3 heads, MHCA in blocks 0-1 (a third)."""
    defaults = dict(img_size=32, patch_size=4, embed_dim=96, depth=6, num_heads=3, num_mhca=2, drop_path_rate=0.0)
    return _create("dearkd_micro_patch4_32", pretrained, defaults, kwargs)


STUDENT_FORMAT = "dearkd_fast.student/1"


def save_student(model: DearKDViT, name: str, class_names: list[str], inputs, path: str) -> None:
    """Write student.pt atomically: the timm name, classes, input spec (size, mean, std) and weights."""
    atomic_save({"format": STUDENT_FORMAT, "model": name, "num_classes": len(class_names),
                 "class_names": list(class_names), "input_size": inputs.size, "mean": tuple(inputs.mean),
                 "std": tuple(inputs.std), "state_dict": model.state_dict()}, path)


def load_student(path: str, device: str | torch.device = "cpu") -> tuple[DearKDViT, dict]:
    """Rebuild a student from student.pt: (model on device, the file's metadata without the weights)."""
    import timm

    ck = load_model_file(path, "student", STUDENT_FORMAT)
    meta = {k: v for k, v in ck.items() if k != "state_dict"}
    try:
        model = timm.create_model(ck["model"], num_classes=ck["num_classes"])
        model.load_state_dict(ck["state_dict"])
    except (RuntimeError, KeyError, TypeError) as e:
        raise CheckpointError(f"student checkpoint '{path}' does not fit its model ({type(e).__name__})") from None
    return model.to(device), meta
