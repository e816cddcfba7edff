"""Line 8, CUDA (skipped without a GPU): stage-2 training-step images/s at 224 px, batch 64, bf16
AMP vs fp32, with model FLOP utilisation; feature-extraction images/s."""

from __future__ import annotations

import time
from collections.abc import Callable

from ..model.registry import THESIS_BACKBONES
from .harness import Context, Row, make_row, skipped_row

# Dense peak throughput (FLOP/s) by device-name fragment: (bf16 tensor core, fp32 non-tensor).
PEAK_FLOPS: dict[str, tuple[float, float]] = {
    "H200": (989e12, 67e12), "H100 PCIe": (756e12, 51e12), "H100": (989e12, 67e12),
    "A100": (312e12, 19.5e12), "L40S": (362e12, 91.6e12), "L4": (121e12, 30.3e12),
    "A10": (125e12, 31.2e12), "RTX 4090": (165e12, 82.6e12), "RTX 3090": (71e12, 35.6e12),
}


def peak_flops(device_name: str) -> tuple[float, float] | None:
    for fragment, peaks in PEAK_FLOPS.items():
        if fragment in device_name:
            return peaks
    return None


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seconds_per_step(step: Callable[[], None], device, steps: int) -> float:
    """Mean wall time of ``steps`` calls, with the device's queue drained before and after."""
    sync(device)
    started = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    return (time.perf_counter() - started) / steps


def channels_last(model: str, device) -> bool:
    """Whether the model's batches use channels-last memory (convolutional towers on CUDA)."""
    from ..model.registry import backbone_spec

    return device.type == "cuda" and backbone_spec(model).channels_last


def _build_image_model(model: str, profile: str, device, classes: int):
    import torch

    from ..model.backbone import configure_visual_trainable, create_backbone
    from ..model.heads import ReIDHead

    backbone = create_backbone(model, profile, "none")
    configure_visual_trainable(backbone, len(backbone.visual_blocks), "all")
    head = ReIDHead(backbone.embed_dim, classes)
    backbone.to(device)
    head.to(device)
    if channels_last(model, device):
        backbone.to(memory_format=torch.channels_last)
    return backbone, head


def synthetic_images(model: str, profile: str, device, batch_size: int):
    """Random input batch [B,3,S,S] at the backbone's input size, in its memory format."""
    import torch

    from ..model.registry import backbone_spec

    size = backbone_spec(model).input_size(profile)
    images = torch.randn(batch_size, 3, size, size, device=device)
    if channels_last(model, device):
        images = images.contiguous(memory_format=torch.channels_last)
    return images


def make_train_step(model: str, profile: str, device, amp: bool, batch_size: int):
    """The stage-2 training step (image tower + BNNeck/ID head, ID + triplet losses, AdamW) of a
    random-init model: returns ``step(images, labels)`` and the labels of one batch."""
    import torch
    import torch.nn.functional as F

    from ..losses import batch_hard_triplet

    torch.manual_seed(0)
    classes = max(2, batch_size // 4)
    backbone, head = _build_image_model(model, profile, device, classes)
    backbone.train()
    head.train()
    params = [p for p in backbone.parameters() if p.requires_grad] + list(head.parameters())
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    labels = torch.arange(batch_size, device=device) % classes

    def step(images, labels) -> None:
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=amp):
            features = backbone.encode_image(images)
            _, logits = head(features, labels)
        loss = F.cross_entropy(logits.float(), labels) + batch_hard_triplet(features.float(),
                                                                            labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step, labels


def train_step_throughput(model: str, profile: str, device, amp: bool, batch_size: int,
                          steps: int, warmup: int = 2) -> dict[str, float]:
    """Images/s of the stage-2 training step on synthetic tensors; FLOPs of one step counted by
    torch."""
    from torch.utils.flop_counter import FlopCounterMode

    train_step, labels = make_train_step(model, profile, device, amp, batch_size)
    images = synthetic_images(model, profile, device, batch_size)

    def step() -> None:
        train_step(images, labels)

    for _ in range(warmup):
        step()
    with FlopCounterMode(display=False) as counter:
        step()
    step_s = seconds_per_step(step, device, steps)
    return {"images_per_s": batch_size / step_s, "step_s": step_s,
            "flops_per_step": float(counter.get_total_flops()), "image_size": images.shape[-1]}


def extract_throughput(model: str, profile: str, device, amp: bool, batch_size: int,
                       steps: int, warmup: int = 2) -> dict[str, float]:
    """Images/s of evaluation feature extraction (eval mode, no grad) on synthetic tensors."""
    import torch

    backbone, head = _build_image_model(model, profile, device, 2)
    backbone.eval()
    images = synthetic_images(model, profile, device, batch_size)

    @torch.no_grad()
    def step() -> None:
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=amp):
            backbone.encode_image(images)

    for _ in range(warmup):
        step()
    return {"images_per_s": batch_size / seconds_per_step(step, device, steps),
            "image_size": images.shape[-1]}


def cuda_throughput(ctx: Context, device=None, profile: str = "full") -> list[Row]:
    """Line 8 on ``device`` (default: CUDA, else one skipped row). The test runs it with the
    CPU and the tiny profile, so this code runs even where no GPU is."""
    import torch

    from ..model.registry import backbone_spec

    if device is None:
        if not torch.cuda.is_available():
            return [skipped_row(8, "cuda", "CUDA stage-2 throughput", "no CUDA device")]
        device = torch.device("cuda")
    s = ctx.settings
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peaks = peak_flops(name)
    rows = []
    # the thesis backbones, not the whole registry: ViT-L/14 would make this line's CPU test slow
    for model in THESIS_BACKBONES:
        title = backbone_spec(model).label
        fp32 = train_step_throughput(model, profile, device, False, s.cuda_batch, s.cuda_steps,
                                     s.cuda_warmup)
        bf16 = train_step_throughput(model, profile, device, True, s.cuda_batch, s.cuda_steps,
                                     s.cuda_warmup)
        for label, result, peak_index in (("fp32", fp32, 1), ("bf16 AMP", bf16, 0)):
            achieved = result["flops_per_step"] / result["step_s"]
            mfu = None if peaks is None else 100 * achieved / peaks[peak_index]
            note = (f"{name}; batch {s.cuda_batch}, {result['image_size']} px, AdamW; "
                    f"{result['flops_per_step'] / 1e12:.2f} TFLOP/step, "
                    f"{achieved / 1e12:.1f} TFLOP/s; MFU "
                    + ("n/a (unknown peak)" if mfu is None else
                       f"{mfu:.1f}% of the {'bf16' if peak_index == 0 else 'fp32'} dense peak"))
            if label == "bf16 AMP":
                note += f"; {bf16['images_per_s'] / fp32['images_per_s']:.2f}x fp32"
            rows.append(make_row(
                8, f"train_{model}_{'bf16' if peak_index == 0 else 'fp32'}",
                f"CUDA {title} train step, {label}", result["images_per_s"], "img/s",
                (">", fp32["images_per_s"]) if label == "bf16 AMP" else None, note,
                {"step_s": result["step_s"], "flops_per_step": result["flops_per_step"],
                 "mfu_percent": mfu if mfu is not None else float("nan")}))
        extract = extract_throughput(model, profile, device, True, 4 * s.cuda_batch,
                                     s.cuda_steps, s.cuda_warmup)
        rows.append(make_row(8, f"extract_{model}", f"CUDA {title} feature extraction (bf16)",
                             extract["images_per_s"], "img/s", None,
                             f"{name}; batch {4 * s.cuda_batch}, {extract['image_size']} px, "
                             f"eval mode, no grad"))
    return rows
