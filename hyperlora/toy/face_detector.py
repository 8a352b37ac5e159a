"""The toy world's face detector, in SCRFD's role: one image -> face box, 5 keypoints and a score.

A small CNN looks at the whole image resized to 64 x 64 (one face per image in this world) and
regresses the box and keypoints, normalised to the image, plus a face logit. It learns from
renders of train identities, augmented the way generated images differ from renders (zoom, shift,
colour, blur, noise, JPEG: `degrade`), and from negatives without a face (the face painted over
with the wall behind it, or a zoomed window away from the face), so the score means something.

Coordinates follow the renderer (pixel centres at integers); the network's targets are
`(x + 0.5) / size`, the fraction of the image's extent, which survives any resize. The ONNX file
takes float RGB in [-1, 1], 1 x 3 x 64 x 64 (dynamic batch), and returns `boxes` [N, 4], `kps`
[N, 5, 2] (both normalised) and `scores` [N] in [0, 1]; `FaceDetector` runs it with onnxruntime
on any image size and answers in pixels.
"""

from __future__ import annotations

import dataclasses
import json
import time
import warnings
from dataclasses import dataclass, field
from typing import NamedTuple

import cv2
import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from .render import Render, _background, render_sample, split_identities

INPUT_SIZE = 64  # the detector's input side, whatever the image size


@dataclass
class DegradeConfig:
    """Photometric augmentation: what a generator does to a face that a renderer does not."""

    colour: float = 0.25  # max relative change of brightness, contrast, saturation (and a third of it per channel)
    blur_prob: float = 0.5  # share of images blurred
    max_blur_sigma: float = 1.2  # px at the image's own size; generated 64 px faces are soft
    noise_prob: float = 0.5  # share of images with Gaussian noise
    max_noise: float = 8.0  # max noise std, in 0..255 units
    jpeg_prob: float = 0.2  # share of images JPEG-compressed at quality 30..90


def degrade(image: np.ndarray, rng: np.random.Generator, config: DegradeConfig) -> np.ndarray:
    """A uint8 RGB image with random colour jitter, blur, noise and JPEG (each with its probability)."""
    x = image.astype(np.float32)
    c = config.colour
    if c > 0:
        grey = x.mean(axis=2, keepdims=True)
        x = grey + (x - grey) * rng.uniform(1 - c, 1 + c)  # saturation
        x = (x - x.mean()) * rng.uniform(1 - c, 1 + c) + x.mean()  # contrast
        x = x * rng.uniform(1 - c, 1 + c) * rng.uniform(1 - c / 3, 1 + c / 3, 3)  # brightness, white balance
    if rng.random() < config.blur_prob:
        x = cv2.GaussianBlur(x, (0, 0), rng.uniform(0.3, config.max_blur_sigma))
    if rng.random() < config.noise_prob:
        x = x + rng.normal(0.0, rng.uniform(0, config.max_noise), x.shape)
    x = np.clip(x, 0, 255).round().astype(np.uint8)
    if rng.random() < config.jpeg_prob:
        ok, buf = cv2.imencode(".jpg", x[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, int(rng.integers(30, 91))])
        x = cv2.imdecode(buf, cv2.IMREAD_COLOR)[:, :, ::-1]
    return np.ascontiguousarray(x)


@dataclass
class DetectorTrainConfig:
    """How the detector is built and trained."""

    num_train: int = 2000  # train identities rendered (ids 0..num_train-1); val/test ids are never used
    images_per_identity: int = 2  # renders per identity in the training pool
    render_size: int = 64  # pool renders are drawn at this size and resized to INPUT_SIZE
    width: int = 16  # channels of the first stage, doubled at each of the 4 stride-2 stages
    hidden: int = 256  # units of the regression head's hidden layer
    negative_fraction: float = 0.3  # share of each batch without a face (painted over, or a window beside it)
    zoom: tuple[float, float] = (0.8, 1.7)  # positives' zoom range (1 = the render's framing); 1.4 = ArcFace crops
    shift: float = 0.15  # max shift of the face centre from the image centre, fraction of the image
    degrade: DegradeConfig = field(default_factory=DegradeConfig)  # so that it finds blurry generated faces
    coord_weight: float = 10.0  # weight of the L1 box + keypoint loss (normalised units) against the score's BCE
    steps: int = 1500  # the shipped detector's recipe (data/toy/faces/model_card.json)
    batch_size: int = 64
    lr: float = 2e-3  # AdamW peak, cosine decay after a 5 % warmup
    weight_decay: float = 1e-4
    seed: int = 0  # pool renders, augmentation and initialisation
    num_threads: int = 1  # torch.set_num_threads; on a machine shared with other jobs 1 ran 3-5x faster than 2
    progress: bool = True  # tqdm bars

    def __post_init__(self):
        if isinstance(self.degrade, dict):
            self.degrade = DegradeConfig(**self.degrade)
        self.zoom = tuple(self.zoom)

    @classmethod
    def smoke(cls, **overrides) -> DetectorTrainConfig:
        """Tiny sizes and a handful of steps: plumbing only."""
        return cls(**{"num_train": 8, "images_per_identity": 1, "width": 4, "hidden": 16, "steps": 3,
                      "batch_size": 8, "progress": False, **overrides})  # fmt: skip


class TinyDetector(nn.Module):
    """4 stride-2 conv stages (64 -> 4 px) and an MLP head: 4 box + 10 keypoint coordinates and a face logit."""

    def __init__(self, *, width: int = 16, hidden: int = 256):
        super().__init__()
        layers, channels = [], 3
        for stage in range(4):
            out = width * 2**stage
            layers += [nn.Conv2d(channels, out, 3, 2, 1, bias=False), nn.BatchNorm2d(out), nn.ReLU(inplace=True)]
            if stage > 0:  # a second conv per stage, except at 32 px where it would cost as much as all the others
                layers += [nn.Conv2d(out, out, 3, 1, 1, bias=False), nn.BatchNorm2d(out), nn.ReLU(inplace=True)]
            channels = out
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(channels * (INPUT_SIZE // 16) ** 2, hidden),
                                  nn.ReLU(inplace=True), nn.Linear(hidden, 15))  # fmt: skip

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels [B, 3, 64, 64] in [-1, 1] -> [B, 15]: box (4), keypoints (10), logit (1)."""
        return self.head(self.features(pixels))


class _ExportedDetector(nn.Module):
    """The ONNX graph: split the raw outputs, keypoints as [N, 5, 2], the logit as a probability."""

    def __init__(self, net: TinyDetector):
        super().__init__()
        self.net = net

    def forward(self, pixels):
        out = self.net(pixels)
        return out[:, :4], out[:, 4:14].reshape(-1, 5, 2), torch.sigmoid(out[:, 14])  # kps: [N, 10] -> [N, 5, 2]


# ---------------------------------------------------------------------------------------------
# Training data: a pool of renders, augmented afresh at every step


class Pool(NamedTuple):
    images: np.ndarray  # [N, S, S, 3] uint8 renders
    faceless: np.ndarray  # [N, S, S, 3] uint8: the same renders with the face painted over by the wall
    boxes: np.ndarray  # [N, 4] px
    keypoints: np.ndarray  # [N, 5, 2] px


def faceless(r: Render) -> np.ndarray:
    """The render with its face (mask dilated by 1/16 of the image) painted over by its background, lit the same."""
    size = r.image.shape[0]
    wall = np.asarray(cv2.resize(_background(r.look, 2 * size), (size, size), interpolation=cv2.INTER_AREA), np.float32)
    gain = r.look.brightness * (1 + 0.22 * r.look.light_direction * np.linspace(-1, 1, size, dtype=np.float32))
    wall = np.clip(wall * gain[None, :, None], 0, 255).astype(np.uint8)  # the renderer's lighting
    grow = max(1, size // 16) * 2 + 1
    mask = cv2.dilate(r.mask.astype(np.uint8), np.ones((grow, grow), np.uint8)).astype(bool)
    return np.where(mask[..., None], wall, r.image)


def render_pool(identities, images_per_identity: int, seed: int, size: int, progress: bool = True) -> Pool:
    """Render every (identity, index) once, with its faceless twin."""
    bar = tqdm(identities, desc="rendering", disable=not progress, mininterval=2)
    renders = [render_sample(i, k, seed, size) for i in bar for k in range(images_per_identity)]
    return Pool(np.stack([r.image for r in renders]), np.stack([faceless(r) for r in renders]),
                np.array([r.box for r in renders], np.float32), np.stack([r.keypoints for r in renders]))  # fmt: skip


def _zoom_matrix(zoom: float, centre: np.ndarray, target: np.ndarray, size: int) -> np.ndarray:
    """2x3 affine: scale by zoom * INPUT_SIZE / size about `centre` (source px), which lands on `target` (output px)."""
    a = zoom * INPUT_SIZE / size
    return np.array([[a, 0, target[0] - a * centre[0]], [0, a, target[1] - a * centre[1]]], np.float32)


def _apply(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    return points @ matrix[:, :2].T + matrix[:, 2]


def positive_matrix(box: np.ndarray, size: int, rng: np.random.Generator, config: DetectorTrainConfig) -> np.ndarray:
    """A random zoom and shift that keeps the whole face box inside the output."""
    lo, hi = np.log(config.zoom)
    zoom = float(np.exp(rng.uniform(lo, hi)))
    centre = (box[:2] + box[2:]) / 2
    half = (box[2:] - box[:2]) / 2 * zoom * INPUT_SIZE / size
    mid = (INPUT_SIZE - 1) / 2
    reach = np.maximum(np.minimum(config.shift * INPUT_SIZE, mid - half - 1), 0)  # shift that stays inside
    return _zoom_matrix(zoom, centre, mid + rng.uniform(-reach, reach), size)


def window_matrix(box: np.ndarray, size: int, rng: np.random.Generator, tries: int = 10) -> np.ndarray | None:
    """A zoomed window (zoom 1.5..3) that holds under 5 % of the face box, or None."""
    area = np.prod(box[2:] - box[:2])
    for _ in range(tries):
        side = size / rng.uniform(1.5, 3.0)
        corner = rng.uniform(-side / 4, size - 3 * side / 4, 2)
        overlap = np.clip(np.minimum(box[2:], corner + side) - np.maximum(box[:2], corner), 0, None).prod()
        if overlap < 0.05 * area:
            return _zoom_matrix(size / side, corner + side / 2, np.full(2, (INPUT_SIZE - 1) / 2), size)
    return None


def sample_batch(pool: Pool, rng: np.random.Generator, config: DetectorTrainConfig) -> dict[str, torch.Tensor]:
    """One augmented batch: pixels [B, 3, 64, 64] in [-1, 1], targets [B, 14] normalised, labels [B]."""
    size = pool.images.shape[1]
    pixels, targets, labels = [], [], []
    for _ in range(config.batch_size):
        i = int(rng.integers(len(pool.images)))
        box, kps, image, label = pool.boxes[i], pool.keypoints[i], pool.images[i], 1.0
        matrix = positive_matrix(box, size, rng, config)
        if rng.random() < config.negative_fraction:
            label, window = 0.0, window_matrix(box, size, rng) if rng.random() < 0.5 else None
            image, matrix = (pool.faceless[i], matrix) if window is None else (image, window)
        out = cv2.warpAffine(image, matrix, (INPUT_SIZE, INPUT_SIZE), flags=cv2.INTER_LINEAR,
                             borderMode=cv2.BORDER_REPLICATE)  # fmt: skip
        pixels.append(degrade(out, rng, config.degrade))
        points = _apply(matrix, np.concatenate([box.reshape(2, 2), kps]))  # zoom + shift: corners stay corners
        targets.append(((points + 0.5) / INPUT_SIZE).ravel())
        labels.append(label)
    # contiguous: see face_recognizer.to_pixels (a channels-last batch crashed oneDNN's conv backward on AVX2)
    pixels = torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2).contiguous().float().div(127.5).sub(1.0)
    return {"pixels": pixels, "targets": torch.from_numpy(np.stack(targets)).float(), "labels": torch.tensor(labels)}


def detector_loss(out: torch.Tensor, batch: dict, coord_weight: float) -> torch.Tensor:
    """BCE on the face logit plus coord_weight x L1 on box and keypoints of the images that hold a face."""
    labels = batch["labels"]
    score = nn.functional.binary_cross_entropy_with_logits(out[:, 14], labels)
    coords = (out[:, :14] - batch["targets"]).abs().mean(dim=1)
    return score + coord_weight * (coords * labels).sum() / labels.sum().clamp(min=1)


def fit_detector(config: DetectorTrainConfig) -> tuple[TinyDetector, dict]:
    """Train a TinyDetector on augmented train-identity renders; returns it (eval mode) and the history."""
    from accelerate import Accelerator

    torch.set_num_threads(config.num_threads)
    torch.manual_seed(config.seed)
    rng = np.random.default_rng([config.seed, 1])
    start = time.perf_counter()
    pool = render_pool(split_identities("train", config.num_train), config.images_per_identity, config.seed,
                       config.render_size, config.progress)  # fmt: skip
    render_seconds = time.perf_counter() - start
    model = TinyDetector(width=config.width, hidden=config.hidden)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    warmup = max(1, config.steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (
        1 + np.cos(np.pi * min(1.0, s / max(1, config.steps)))))  # fmt: skip
    accelerator = Accelerator(cpu=True)
    model, optimizer = accelerator.prepare(model, optimizer)
    losses = []
    model.train()
    for _ in (bar := tqdm(range(config.steps), desc="detector", disable=not config.progress, mininterval=2)):
        batch = sample_batch(pool, rng, config)
        loss = detector_loss(model(batch["pixels"]), batch, config.coord_weight)
        optimizer.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}", refresh=False)
    model = accelerator.unwrap_model(model).eval()
    history = {"steps": config.steps, "images_seen": config.steps * config.batch_size, "pool_size": len(pool.images),
               "render_seconds": round(render_seconds, 2), "train_seconds": round(time.perf_counter() - start, 2),
               "final_loss": float(np.mean(losses[-50:])) if losses else None}  # fmt: skip
    return model, history


def export_detector(model: TinyDetector, config: DetectorTrainConfig, path) -> None:
    """Write the ONNX file (opset 17, dynamic batch) with the training config in its metadata."""
    import onnx

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the legacy exporter's deprecation notice: onnxscript is not installed here
        torch.onnx.export(_ExportedDetector(model.eval()), torch.zeros(1, 3, INPUT_SIZE, INPUT_SIZE), str(path),
                          input_names=["pixels"], output_names=["boxes", "kps", "scores"], opset_version=17,
                          dynamic_axes={k: {0: "batch"} for k in ("pixels", "boxes", "kps", "scores")},
                          dynamo=False)  # fmt: skip
    graph = onnx.load(str(path))
    onnx.helper.set_model_props(graph, {"hyperlora": "toy face detector", "input": "RGB in [-1, 1]",
                                        "config": json.dumps(dataclasses.asdict(config))})  # fmt: skip
    onnx.save(graph, str(path))


# ---------------------------------------------------------------------------------------------
# Inference with onnxruntime


class Detection(NamedTuple):
    box: np.ndarray  # [4] x1, y1, x2, y2 px
    kps: np.ndarray  # [5, 2] px, insightface order
    score: float  # face probability


class FaceDetector:
    """detector.onnx through onnxruntime: any RGB uint8 image -> [Detection] (0 or 1: one face per toy image)."""

    def __init__(self, path, *, threshold: float = 0.5, providers=("CPUExecutionProvider",), num_threads: int = 0):
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = num_threads  # 0: onnxruntime's default
        self.session = onnxruntime.InferenceSession(str(path), options, providers=list(providers))
        self.threshold = threshold

    def __call__(self, image: np.ndarray) -> list[Detection]:
        return self.detect(image)

    def detect(self, image: np.ndarray) -> list[Detection]:
        """The face of one image if its score reaches the threshold, else []."""
        (found,) = self.detect_batch([image])
        return [found] if found.score >= self.threshold else []

    def detect_batch(self, images: list[np.ndarray]) -> list[Detection]:
        """The best face candidate of each image, whatever its score."""
        squares, sides = zip(*(letterbox(np.asarray(image)) for image in images))
        pixels = np.stack(squares).transpose(0, 3, 1, 2).astype(np.float32) / 127.5 - 1.0
        boxes, kps, scores = self.session.run(None, {"pixels": pixels})
        return [Detection(box=b * side - 0.5, kps=k * side - 0.5, score=float(s))
                for b, k, s, side in zip(boxes, kps, scores, sides)]  # fmt: skip


def letterbox(image: np.ndarray) -> tuple[np.ndarray, int]:
    """Pad an RGB image to a square (black, bottom and right) and resize it to INPUT_SIZE; returns it and the side."""
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"the detector takes uint8 RGB images [H, W, 3], got {image.dtype} {list(image.shape)}")
    h, w = image.shape[:2]
    side = max(h, w)
    if h != w:
        image = cv2.copyMakeBorder(image, 0, side - h, 0, side - w, cv2.BORDER_CONSTANT, value=(0, 0, 0))
    if side != INPUT_SIZE:
        interpolation = cv2.INTER_AREA if side > INPUT_SIZE else cv2.INTER_LINEAR
        image = cv2.resize(image, (INPUT_SIZE, INPUT_SIZE), interpolation=interpolation)
    return image, side
