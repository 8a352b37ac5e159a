"""An identity loss beside the diffusion loss: a departure from the paper, measured as one.

HyperLoRA trains with the diffusion loss alone (facts §5.2). PuLID (Guo et al. 2024) adds an identity loss: the
generated face, embedded by a face recogniser, should match the person's embedding. Here, for the case (a)
samples of a batch at low noise (timestep < `StageConfig.id_loss_max_timestep`), the UNet's prediction gives its
estimate of the clean latents x0 in one step (exact algebra of the noise schedule), the frozen VAE decodes it, a
frozen recogniser embeds the face cut from the training image's known face box, and the loss is 1 - cosine to the
same recogniser's embedding of the training image itself. Gradients flow through the decoder and the recogniser
into the generated LoRA; neither of them trains.

The recogniser reads square crops around the face box (`box_crops`), not insightface's keypoint alignment: the
training set keeps face boxes, and a crop made by `affine_grid` is differentiable. It should be another model than
the judge of the evaluation, so that a gain is not the judge fooled: the toy world trains one with another seed on
box crops (`python -m hyperlora.toy.faces --stages recognizer --recognizer.crop '"box"'`); the sdxl world has no
differentiable recogniser shipped (antelopev2 is ONNX), and any torch module saved the same way can serve.

That one-step estimate reads a latent whose face is already placed by the noise left in it. PuLID's own loss reads a
face generated from pure noise along a short path of a fast sampler, as at inference: `sample_path` (deterministic
DDIM over a few timesteps, classifier-free guidance, differentiable end to end) makes that face, and the loss
backpropagates through every step of the path into the LoRA (`StageConfig.id_loss_path_steps`). A generated face
can land anywhere, so its box comes from a face detector (any `FaceAnalyzer`, no gradient through the box).
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from torch import nn

from ..conditioning.faces import FaceAnalyzer


def box_crops(pixels: torch.Tensor, boxes: torch.Tensor, size: int, expand: float) -> torch.Tensor:
    """Square crops [B, C, size, size] of `pixels` [B, C, H, W] around `boxes` [B, 4] (x1, y1, x2, y2 as fractions
    of the width and height): centred on the box, side `expand` x its longer edge in pixels, bilinear, zeros
    outside the image. Differentiable in `pixels`."""
    if boxes.shape != (len(pixels), 4):
        raise ValueError(f"boxes must be [B, 4] for {len(pixels)} images, got {tuple(boxes.shape)}")
    h, w = pixels.shape[-2:]
    boxes = boxes.to(pixels.device, torch.float32)
    side = expand * torch.maximum((boxes[:, 2] - boxes[:, 0]) * w, (boxes[:, 3] - boxes[:, 1]) * h)  # pixels
    theta = torch.zeros(len(pixels), 2, 3, device=pixels.device)
    theta[:, 0, 0], theta[:, 1, 1] = side / w, side / h  # output [-1, 1] spans `side` pixels
    theta[:, 0, 2] = boxes[:, 0] + boxes[:, 2] - 1  # the box centre in [-1, 1]
    theta[:, 1, 2] = boxes[:, 1] + boxes[:, 3] - 1
    grid = F.affine_grid(theta, [len(pixels), pixels.shape[1], size, size], align_corners=False)
    return F.grid_sample(pixels.float(), grid, mode="bilinear", padding_mode="zeros", align_corners=False)


class FaceEmbedder(nn.Module):
    """A frozen recogniser on box crops: pixels [B, 3, H, W] RGB in [-1, 1] and face boxes -> unit embeddings."""

    def __init__(self, recognizer: nn.Module, *, crop_size: int, expand: float):
        super().__init__()
        self.recognizer = recognizer.eval().requires_grad_(False)
        self.crop_size, self.expand = crop_size, expand

    def forward(self, pixels: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.recognizer(box_crops(pixels, boxes, self.crop_size, self.expand)), dim=-1)

    def views(self, pixels: torch.Tensor, boxes: torch.Tensor, count: int, jitter: float,
              generator: torch.Generator | None = None) -> torch.Tensor:  # fmt: skip
        """Unit embeddings [count, B, D] of `count` random views of each face: the box's centre moved by up to
        `jitter` of its size, its size scaled by 1 +- jitter, the crop read at a resolution down to 1 - 2 x jitter
        of the recogniser's (bilinear down and up: a random blur) and mirrored half the time. Averaging a loss over
        them is expectation over transformation, as the random cut-outs of CLIP-guided generation: a change that
        fools the recogniser from one exact crop only no longer pays. jitter 0: `forward`, once."""
        if not 0 <= jitter < 0.5 or count < 1:
            raise ValueError(f"views need count >= 1 and 0 <= jitter < 0.5, got {count}, {jitter}")
        if jitter == 0:
            return self(pixels, boxes)[None]
        boxes = boxes.float()
        size, centre = boxes[:, 2:] - boxes[:, :2], (boxes[:, :2] + boxes[:, 2:]) / 2
        out = []
        for _ in range(count):
            u = (torch.rand(len(boxes), 4, generator=generator) * 2 - 1).to(boxes.device)
            moved, half = centre + u[:, :2] * jitter * size, size / 2 * (1 + jitter * u[:, 2:3])
            side = round(self.crop_size * (1 - 2 * jitter * float(torch.rand(1, generator=generator))))
            crops = box_crops(pixels, torch.cat([moved - half, moved + half], 1), max(side, 8), self.expand)
            crops = F.interpolate(crops, size=self.crop_size, mode="bilinear", align_corners=False)
            mirrored = (torch.rand(len(boxes), generator=generator) < 0.5).to(crops.device)
            crops = torch.where(mirrored[:, None, None, None], crops.flip(-1), crops)
            out.append(F.normalize(self.recognizer(crops), dim=-1))
        return torch.stack(out)


def predicted_x0(scheduler: DDPMScheduler, noisy: torch.Tensor, timesteps: torch.Tensor,
                 prediction: torch.Tensor) -> torch.Tensor:  # fmt: skip
    """The clean latents a prediction implies: x0 = (x_t - sqrt(1 - a) eps) / sqrt(a) for epsilon, and
    x0 = sqrt(a) x_t - sqrt(1 - a) v for v-prediction (a: alpha_bar at the timestep)."""
    alpha = scheduler.alphas_cumprod.to(noisy.device, torch.float32)[timesteps].view(-1, 1, 1, 1)
    noisy, prediction = noisy.float(), prediction.float()
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return (noisy - (1 - alpha).sqrt() * prediction) / alpha.sqrt()
    if kind == "v_prediction":
        return alpha.sqrt() * noisy - (1 - alpha).sqrt() * prediction
    raise ValueError(f"prediction_type must be 'epsilon' or 'v_prediction', got {kind!r}")


def decode(vae, latents: torch.Tensor) -> torch.Tensor:
    """Latents (scaled by the VAE's scaling factor, as the UNet sees them) -> pixels [B, 3, H, W] in about [-1, 1]."""
    return vae.decode((latents / vae.config.scaling_factor).to(vae.dtype)).sample.float()


def identity_loss(embedder: FaceEmbedder, vae, *, clean: torch.Tensor, noisy: torch.Tensor,
                  timesteps: torch.Tensor, prediction: torch.Tensor, boxes: torch.Tensor,
                  scheduler: DDPMScheduler) -> torch.Tensor:  # fmt: skip
    """Per sample, 1 - cosine between the recogniser's embedding of the face the prediction implies and of the
    training image's own face (decoded from its clean latents, no gradient)."""
    with torch.no_grad():
        goal = embedder(decode(vae, clean), boxes)
    made = embedder(decode(vae, predicted_x0(scheduler, noisy, timesteps, prediction)), boxes)
    return 1 - (made * goal).sum(-1)


def path_timesteps(steps: int, train_steps: int = 1000) -> list[int]:
    """`steps` timesteps from the noisiest down, evenly spaced and "trailing" (the first is train_steps - 1), as the
    few-step samplers PuLID builds on: 4 -> [999, 749, 499, 249]."""
    if steps < 1:
        raise ValueError(f"a sampling path needs at least one step, got {steps}")
    return [train_steps - 1 - round(k * train_steps / steps) for k in range(steps)]


def sample_path(denoise, noise: torch.Tensor, scheduler: DDPMScheduler, steps: int) -> torch.Tensor:
    """Deterministic DDIM (eta 0) from pure `noise` over `path_timesteps(steps)`: the clean latents of the last
    step. `denoise(latents, t)` gives the model's (guided) prediction at integer timestep t; every step stays in
    the autograd graph, so a loss on the result reaches whatever `denoise` depends on."""
    alphas = scheduler.alphas_cumprod.to(noise.device, torch.float32)
    latents, path = noise.float(), path_timesteps(steps, scheduler.config.num_train_timesteps)

    def clean(latents: torch.Tensor, t: int) -> torch.Tensor:
        timesteps = torch.full((len(latents),), t, device=noise.device, dtype=torch.long)
        return predicted_x0(scheduler, latents, timesteps, denoise(latents, t))

    for t, t_next in itertools.pairwise(path):
        x0, a, a_next = clean(latents, t), alphas[t], alphas[t_next]
        eps = (latents - a.sqrt() * x0) / (1 - a).sqrt()  # the noise this prediction implies (exact for eps and v)
        latents = a_next.sqrt() * x0 + (1 - a_next).sqrt() * eps
    return clean(latents, path[-1])


def face_boxes(analyzer: FaceAnalyzer, pixels: torch.Tensor) -> torch.Tensor:
    """Each image's largest detected face box [B, 4] as fractions of its width and height (NaN where none is
    found); pixels [B, 3, H, W] in [-1, 1]. No gradient: the box only says where to cut."""
    from PIL import Image

    images = ((pixels.detach().float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    h, w = pixels.shape[-2:]
    boxes = torch.full((len(images), 4), float("nan"))
    for i, image in enumerate(images):
        faces = analyzer.detect(Image.fromarray(image))
        if faces:
            box = max(faces, key=lambda f: f.area).bbox
            boxes[i] = torch.tensor([box[0] / w, box[1] / h, box[2] / w, box[3] / h])
    return boxes


def sampled_identity(embedder: FaceEmbedder, vae, analyzer: FaceAnalyzer, latents: torch.Tensor, goal: torch.Tensor,
                     *, views: int = 1, jitter: float = 0.0,
                     generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """1 - cosine between the face generated in `latents` (decoded, found by `analyzer`, embedded) and the unit
    embeddings `goal`, for the samples where a face is found: (losses [F], their rows [F]). With jitter > 0, the
    cosine is the mean over `views` random views of the face (`FaceEmbedder.views`)."""
    pixels = decode(vae, latents)
    boxes = face_boxes(analyzer, pixels)
    rows = (~boxes.isnan().any(1)).nonzero().squeeze(1).to(latents.device)
    if not len(rows):
        return latents.new_zeros(0), rows
    made = embedder.views(pixels[rows], boxes[rows.cpu()], views, jitter, generator)  # [V, F, D]
    return 1 - (made * goal[rows]).sum(-1).mean(0), rows
