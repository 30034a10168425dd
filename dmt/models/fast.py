"""Teachers at full speed: the same tokens as TeacherEnsemble, computed cheaper.

With three ViT-B teachers and a ViT-S student, ~80% of a DMT step's arithmetic is teacher
inference, so the teacher path is where speed is won or lost. What this module does:

- weights converted once to half precision (bf16 by default, fp16 as an option, fp32 for
  CPUs without half-precision matmul units), never autocast per step;
- inference mode: no autograd graph, no saved activations, intermediate buffers freed as
  soon as the next layer has read them;
- fused scaled-dot-product attention (flash / memory-efficient kernels on GPUs);
- optionally torch.compile of the teacher pass (`compile=True`, or a mode name such as
  "reduce-overhead" for CUDA graphs of the fixed-shape pass);
- optionally same-architecture teachers stacked into one batched computation
  (`StackedViT`: every linear is one batched matmul over the teacher axis; LayerNorm
  affines folded into the following linear, each teacher's input re-normalisation into
  its patch-embedding filters);
- optionally FP8 block linears (`fp8=True`, dmt.models.fp8: e4m3 with per-row scales, on
  GPUs with FP8 tensor cores), twice the bf16 tensor-core rate for ~95% of the FLOPs.

Which of loop / stacked is faster depends on the device; `stack="auto"` follows
STACK_IS_FASTER below, which records what benchmarks/throughput.py measured.
"""
from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from dmt.choices import COMPILE_MODES, STACK
from dmt.errors import ConfigError
from dmt.models.fp8 import convert_to_fp8, fp8_blocker, fp8_unsupported
from dmt.models.teachers import FrozenTeacher, TeacherEnsemble
from dmt.models.vit import plain_blocks_error

log = logging.getLogger(__name__)

# Evidence for stack="auto", per device type. CPU: benchmarks/results/throughput_cpu_cpu.json,
# "teacher_variants" (3 teachers, teacher pass + fusion; the machine is in the file): loop
# and stacked lie within the machine's run-to-run noise (10-30 %) once matmuls dominate;
# stacking won only at toy shapes, where per-op overhead dominates. Not measurably faster
# at training shapes -> loop, which is stock timm and bit-exact. CUDA: not measured yet (no
# GPU was available when this was written); the loop is the safe default there too, its
# per-teacher matmuls are already large at training batch sizes. `benchmarks/throughput.py
# --preset gpu` measures both (and torch.compile); update this table with its verdict.
STACK_IS_FASTER: dict[str, bool] = {"cpu": False, "cuda": False}

STACK_CHOICES = (*STACK, True, False)  # a library caller may pass a bool


class LoopTeacher(nn.Module):
    """One frozen teacher in `dtype` with fused attention; forward -> [tokens].

    Exactly FrozenTeacher's computation (input re-normalisation to the teacher's own
    statistics, then the timm encoder), so its tokens are bit for bit the plain path's
    (unless fp8: then the block linears multiply in e4m3).
    """

    def __init__(self, teacher: FrozenTeacher, dtype: torch.dtype, fp8: bool = False):
        super().__init__()
        teacher.encoder.to(dtype).eval().requires_grad_(False)
        if fp8:
            convert_to_fp8(teacher.encoder)
        for module in teacher.encoder.modules():
            if hasattr(module, "fused_attn"):
                module.fused_attn = True  # SDPA instead of softmax(q k^T) v in eager ops
        self.teacher = teacher
        self.dtype = dtype

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        t = self.teacher
        if getattr(t, "renormalise", False):
            images = images * t.input_scale + t.input_shift
        return [t.encoder.forward_features(images.to(self.dtype))]


def _input_affine(teacher: FrozenTeacher) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(scale, shift) per channel mapping ImageNet-normalised input to the teacher's own."""
    if not getattr(teacher, "renormalise", False):
        return None
    return teacher.input_scale.detach().float().view(3), teacher.input_shift.detach().float().view(3)


def stack_blocker(encoder: nn.Module) -> str | None:
    """Why `encoder` cannot be stacked (None when it can): only plain pre-norm ViTs are."""
    from timm.layers import PatchEmbed
    from timm.models.vision_transformer import LayerScale

    reason = plain_blocks_error(encoder)
    if reason:
        return reason
    patch = encoder.patch_embed
    if type(patch) is not PatchEmbed or not patch.flatten or not isinstance(patch.norm, nn.Identity) \
            or patch.proj.bias is None or getattr(patch, "dynamic_img_pad", False):
        return "non-standard patch embedding"
    if getattr(encoder, "dynamic_img_size", False) or encoder.pos_embed is None:
        return "dynamic image size or no absolute position embedding"
    if not isinstance(encoder.norm_pre, nn.Identity) or not isinstance(encoder.norm, nn.LayerNorm):
        return "pre-norm or final norm is not a plain LayerNorm"
    for i, blk in enumerate(encoder.blocks):
        attn, mlp = blk.attn, blk.mlp
        # getattr: older timm releases have no attention norm or gate
        if not (isinstance(attn.q_norm, nn.Identity) and isinstance(attn.k_norm, nn.Identity)
                and isinstance(getattr(attn, "norm", nn.Identity()), nn.Identity)
                and getattr(attn, "gate", None) is None):
            return f"block {i} has qk-norm, attention norm or gating"
        if not isinstance(mlp.norm, nn.Identity) or type(mlp.act) is not nn.GELU:
            return f"block {i} MLP is not Linear-GELU-Linear"
        if not (isinstance(blk.norm1, nn.LayerNorm) and isinstance(blk.norm2, nn.LayerNorm)):
            return f"block {i} norms are not LayerNorm"
        for ls in (blk.ls1, blk.ls2):
            if not isinstance(ls, (nn.Identity, LayerScale)):
                return f"block {i} has an unknown layer scale"
        if attn.qkv.bias is None or attn.proj.bias is None or mlp.fc1.bias is None:
            return f"block {i} has bias-free linears"
    return None


def _signature(encoder: nn.Module) -> tuple:
    """Teachers with equal signatures can share one stacked computation."""
    blk = encoder.blocks[0]
    return (encoder.embed_dim, len(encoder.blocks), blk.attn.num_heads, blk.mlp.fc1.out_features,
            tuple(encoder.patch_embed.patch_size), encoder.patch_embed.num_patches,
            encoder.num_prefix_tokens, bool(getattr(encoder, "no_embed_class", False)),
            blk.mlp.act.approximate, not isinstance(blk.ls1, nn.Identity),
            blk.norm1.eps, encoder.norm.eps)


def _folded_linear(norm: nn.LayerNorm, linear: nn.Linear) -> tuple[torch.Tensor, torch.Tensor]:
    """linear(norm(x)) = normalize(x) @ W' + b': the LayerNorm affine folded in, in fp32.

    Saves one elementwise pass over the activations per LayerNorm, and the folded weight is
    stored transposed ([in, out]) for baddbmm.
    """
    w = linear.weight.float()                       # [out, in]
    gamma, beta = norm.weight.float(), norm.bias.float()
    w_t = (w * gamma[None, :]).t()                  # [in, out]
    b = linear.bias.float() + w @ beta
    return w_t, b


def _plain_linear(linear: nn.Linear) -> tuple[torch.Tensor, torch.Tensor]:
    return linear.weight.float().t(), linear.bias.float()


class StackedViT(nn.Module):
    """M same-architecture ViT encoders run as one computation over a teacher axis.

    Activations are [M, B*T, D]; each linear is a single baddbmm over the M teachers,
    attention one SDPA call over M*B sequences. Produces the tokens of each encoder's
    forward_features (up to rounding: the LayerNorm affines are folded into the linears).
    """

    def __init__(self, encoders: list[nn.Module], dtype: torch.dtype,
                 input_affines: list[tuple[torch.Tensor, torch.Tensor] | None] | None = None):
        super().__init__()
        first = encoders[0]
        input_affines = input_affines or [None] * len(encoders)
        for enc in encoders:
            reason = stack_blocker(enc)
            if reason:
                raise ConfigError(f"cannot stack teacher: {reason}")
            if _signature(enc) != _signature(first):
                raise ConfigError("stacked teachers must share one architecture")
        self.num_teachers = len(encoders)
        self.dtype = dtype
        self.width = first.embed_dim
        self.num_heads = first.blocks[0].attn.num_heads
        self.num_prefix = first.num_prefix_tokens
        self.no_embed_class = bool(getattr(first, "no_embed_class", False))
        self.gelu_approximate = first.blocks[0].mlp.act.approximate
        self.norm_eps = [(b.norm1.eps, b.norm2.eps) for b in first.blocks]
        self.final_eps = first.norm.eps
        self.patch_size = tuple(first.patch_embed.patch_size)

        def stack(tensors) -> torch.Tensor:
            return torch.stack([t.detach().float() for t in tensors]).to(dtype).contiguous()

        # Buffers, not parameters: frozen for good, moved by .to(), left out of state_dict.
        def put(name: str, tensor: torch.Tensor) -> None:
            self.register_buffer(name, tensor, persistent=False)

        # One convolution with M*D filters embeds the patches for every teacher at once. A
        # teacher's input re-normalisation x*s + t (per channel) is folded into its filters:
        # the patch conv is linear and unpadded, so conv(x*s + t) = conv'(x).
        weights, biases = [], []
        for e, affine in zip(encoders, input_affines):
            w = e.patch_embed.proj.weight.detach().float()   # [D, C, p, p]
            b = e.patch_embed.proj.bias.detach().float()
            if affine is not None:
                scale, shift = (v.to(w.device) for v in affine)
                b = b + (w * shift.view(1, -1, 1, 1)).sum((1, 2, 3))
                w = w * scale.view(1, -1, 1, 1)
            weights.append(w)
            biases.append(b)
        put("patch_w", torch.cat(weights).to(dtype))
        put("patch_b", torch.cat(biases).to(dtype))
        prefix = []
        for e in encoders:
            parts = [t for t in (e.cls_token, getattr(e, "reg_token", None)) if t is not None]
            prefix.append(torch.cat(parts, dim=1) if parts else torch.zeros(1, 0, self.width))
        put("prefix", stack(prefix))                           # [M, 1, P, D]
        put("pos_embed", stack([e.pos_embed for e in encoders]))  # [M, 1, T or N, D]

        self.depth = len(first.blocks)
        for i in range(self.depth):
            blocks = [e.blocks[i] for e in encoders]
            qkv = [_folded_linear(b.norm1, b.attn.qkv) for b in blocks]
            proj = [_plain_linear(b.attn.proj) for b in blocks]
            fc1 = [_folded_linear(b.norm2, b.mlp.fc1) for b in blocks]
            fc2 = [_plain_linear(b.mlp.fc2) for b in blocks]
            for name, pairs in (("qkv", qkv), ("proj", proj), ("fc1", fc1), ("fc2", fc2)):
                put(f"b{i}_{name}_w", stack([w for w, _ in pairs]))               # [M, in, out]
                put(f"b{i}_{name}_b", stack([b[None, :] for _, b in pairs]))      # [M, 1, out]
            if not isinstance(blocks[0].ls1, nn.Identity):
                put(f"b{i}_ls1", stack([b.ls1.gamma[None, :] for b in blocks]))
                put(f"b{i}_ls2", stack([b.ls2.gamma[None, :] for b in blocks]))
        put("norm_w", stack([e.norm.weight[None, :] for e in encoders]))          # [M, 1, D]
        put("norm_b", stack([e.norm.bias[None, :] for e in encoders]))

    def _embed(self, images: torch.Tensor) -> torch.Tensor:
        m, d = self.num_teachers, self.width
        x = F.conv2d(images, self.patch_w, self.patch_b, stride=self.patch_size)  # [B, M*D, h, w]
        b = x.shape[0]
        x = x.view(b, m, d, -1).permute(1, 0, 3, 2)                               # [M, B, N, D]
        prefix = self.prefix.expand(m, b, -1, -1)
        if self.no_embed_class:
            x = torch.cat([prefix, x + self.pos_embed], dim=2)
        else:
            x = torch.cat([prefix, x], dim=2) + self.pos_embed
        return x                                                                  # [M, B, T, D]

    def _attention(self, h: torch.Tensor, i: int, batch: int, tokens: int) -> torch.Tensor:
        m, d, heads = self.num_teachers, self.width, self.num_heads
        qkv = torch.baddbmm(getattr(self, f"b{i}_qkv_b"), h, getattr(self, f"b{i}_qkv_w"))
        q, k, v = qkv.view(m * batch, tokens, 3, heads, d // heads).permute(2, 0, 3, 1, 4).unbind(0)
        a = F.scaled_dot_product_attention(q, k, v)                               # [M*B, H, T, hd]
        a = a.transpose(1, 2).reshape(m, batch * tokens, d)
        return torch.baddbmm(getattr(self, f"b{i}_proj_b"), a, getattr(self, f"b{i}_proj_w"))

    def _mlp(self, h: torch.Tensor, i: int) -> torch.Tensor:
        h = torch.baddbmm(getattr(self, f"b{i}_fc1_b"), h, getattr(self, f"b{i}_fc1_w"))
        h = F.gelu(h, approximate=self.gelu_approximate)
        return torch.baddbmm(getattr(self, f"b{i}_fc2_b"), h, getattr(self, f"b{i}_fc2_w"))

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        x = self._embed(images.to(self.dtype))
        m, b, t, d = x.shape
        x = x.reshape(m, b * t, d)
        for i in range(self.depth):
            eps1, eps2 = self.norm_eps[i]
            a = self._attention(F.layer_norm(x, (d,), eps=eps1), i, b, t)
            x = x + (a * getattr(self, f"b{i}_ls1") if hasattr(self, f"b{i}_ls1") else a)
            h = self._mlp(F.layer_norm(x, (d,), eps=eps2), i)
            x = x + (h * getattr(self, f"b{i}_ls2") if hasattr(self, f"b{i}_ls2") else h)
        x = torch.addcmul(self.norm_b, F.layer_norm(x, (d,), eps=self.final_eps), self.norm_w)
        return list(x.view(m, b, t, d).unbind(0))


@dataclass(frozen=True)
class TeacherInfo:
    """What code written for TeacherEnsemble reads from ensemble.teachers[i]."""

    name: str
    mean: tuple
    std: tuple
    embed_dim: int
    num_tokens: int
    dtype: torch.dtype


class FastTeachers(nn.Module):
    """Drop-in for TeacherEnsemble: forward(images) -> list of [B, T, D] tokens, one per
    teacher in the ensemble's order, computed by loop and/or stacked runners."""

    def __init__(self, runners: list[tuple[list[int], nn.Module]], names: list[str],
                 embed_dim: int, num_tokens: int, dtype: torch.dtype, compile_mode: str | None,
                 means: list[tuple], stds: list[tuple], fp8: bool = False):
        super().__init__()
        self.runners = nn.ModuleList(r for _, r in runners)
        self.slots = [idx for idx, _ in runners]  # ensemble positions each runner produces
        self._names, self._embed_dim, self._num_tokens = names, embed_dim, num_tokens
        self.dtype = dtype
        self.compile_mode = compile_mode
        self.fp8 = fp8
        # Plain records, not modules: `ensemble.teachers[0].mean` keeps working.
        self.teachers = [TeacherInfo(n, m, s, embed_dim, num_tokens, dtype)
                         for n, m, s in zip(names, means, stds)]
        # One compiled function for the whole teacher pass, not one per runner: with CUDA
        # graphs ("reduce-overhead") every call of a compiled function starts a new graph
        # generation and frees the previous call's outputs, i.e. the earlier teachers' tokens.
        self._run = (torch.compile(self._run_all, mode=compile_mode, dynamic=False)
                     if compile_mode else self._run_all)
        self.train(False)

    @property
    def names(self) -> list[str]:
        return list(self._names)

    @property
    def embed_dim(self) -> int:
        return self._embed_dim

    @property
    def num_tokens(self) -> int:
        return self._num_tokens

    @property
    def stacked(self) -> bool:
        return any(isinstance(r, StackedViT) for r in self.runners)

    def describe(self) -> dict:
        return {"dtype": str(self.dtype).replace("torch.", ""), "fp8": self.fp8,
                "compile": self.compile_mode,
                "runners": [f"{type(r).__name__}x{len(s)}"
                            for r, s in zip(self.runners, self.slots)]}

    def train(self, mode: bool = True):
        return super().train(False)  # frozen for good

    def _run_all(self, images: torch.Tensor) -> list[torch.Tensor]:
        # Each runner casts to its dtype itself, after any input re-normalisation (in the
        # input's precision, as FrozenTeacher does).
        out: list[torch.Tensor | None] = [None] * len(self._names)
        for slots, runner in zip(self.slots, self.runners):
            for slot, tokens in zip(slots, runner(images)):
                out[slot] = tokens
        return out

    @torch.inference_mode()
    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        return self._run(images)


def _resolve_stack(stack, device_type: str) -> bool:
    if stack not in STACK_CHOICES:
        raise ConfigError(f"stack must be one of {STACK_CHOICES}, got {stack!r}")
    if stack == "auto":
        return STACK_IS_FASTER.get(device_type, False)
    return stack in ("always", True)


def _compile_mode(compile) -> str | None:
    if compile is True:
        return "default"
    if compile in (False, None, "", "none"):
        return None
    if compile in COMPILE_MODES:
        return compile
    raise ConfigError(f"compile must be a bool or a torch.compile mode {COMPILE_MODES}, "
                      f"got {compile!r}")


def optimize_teachers(ensemble: TeacherEnsemble, dtype: torch.dtype = torch.bfloat16,
                      compile: bool | str = False, stack: bool | str = "auto",
                      fp8: bool = False) -> FastTeachers:
    """The ensemble's teachers, ready to run at full speed, with TeacherEnsemble's interface.

    dtype: weight and activation precision of the teacher pass (bf16 default; fp16; fp32 on
    CPUs without half-precision matmul units). compile: False, True, or a torch.compile mode
    ("reduce-overhead" = CUDA graphs). stack: "auto" (what was measured faster on this
    device type, see STACK_IS_FASTER), "always"/True, "never"/False. fp8: block linears in
    e4m3 (needs dtype bf16 and a device where torch._scaled_mm runs; teachers then loop).

    The ensemble's encoders are converted in place (no copy: teachers are large); stacked
    teachers get new stacked weights, so drop the ensemble afterwards to free the originals.
    """
    if dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ConfigError(f"teacher dtype must be bf16, fp16 or fp32, got {dtype}")
    teachers = list(ensemble.teachers)
    device = next(teachers[0].encoder.parameters()).device
    use_stack = _resolve_stack(stack, device.type)
    if fp8:
        if dtype != torch.bfloat16:
            raise ConfigError(f"fp8 teacher matmuls write bf16: set the teacher dtype to "
                              f"bfloat16 (got {dtype})")
        if stack in ("always", True):
            raise ConfigError("fp8 teacher matmuls run per teacher: use stack 'auto' or 'never'")
        reason = fp8_unsupported(device) or next(
            (f"teacher {t.name}: {r}" for t in teachers if (r := fp8_blocker(t.encoder))), None)
        if reason:
            raise ConfigError(f"fp8 teacher matmuls unavailable: {reason}")
        use_stack = False  # _scaled_mm is 2-D: stacked (batched) matmuls stay in bf16

    groups: OrderedDict[tuple, list[int]] = OrderedDict()
    for i, t in enumerate(teachers):
        reason = stack_blocker(t.encoder) if use_stack else "stacking off"
        key = _signature(t.encoder) if reason is None else ("loop", i)
        if reason and use_stack:
            log.info("teacher %s runs on its own: %s", t.name, reason)
        groups.setdefault(key, []).append(i)

    runners: list[tuple[list[int], nn.Module]] = []
    for key, idx in groups.items():
        if use_stack and len(idx) > 1 and key[0] != "loop":
            device = next(teachers[idx[0]].encoder.parameters()).device
            runner = StackedViT([teachers[i].encoder for i in idx], dtype,
                                [_input_affine(teachers[i]) for i in idx]).to(device)
            runners.append((idx, runner))
        else:
            runners.extend(([i], LoopTeacher(teachers[i], dtype, fp8)) for i in idx)
    return FastTeachers(runners, ensemble.names, ensemble.embed_dim, ensemble.num_tokens, dtype,
                        _compile_mode(compile), [t.mean for t in teachers],
                        [t.std for t in teachers], fp8=fp8)
