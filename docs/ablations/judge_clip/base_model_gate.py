"""The toy base model's prompt-following gate read by the judge CLIP (data/toy/clip_judge) instead of the
conditioning CLIP its card was measured with: `python docs/ablations/judge_clip/base_model_gate.py OUT.json`."""

import json
import sys

from hyperlora.toy.pipeline import clip_judge, evaluate_base_model, face_judges

detector, embedder = face_judges("data/toy/faces")
figures = evaluate_base_model("data/toy/sdxl", judge=clip_judge("data/toy/clip_judge"), detector=detector,
                              embedder=embedder)  # the card's protocol: 32 prompts x 4, guidance TOY_GUIDANCE
print(json.dumps(figures, indent=2, default=float))
with open(sys.argv[1], "w") as f:
    json.dump(figures, f, indent=2, default=float)
