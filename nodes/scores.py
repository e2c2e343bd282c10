"""Score Content / Style / Prompt: the papers' DINOv2, CLIP image and CLIP text scores of a generated batch."""
from __future__ import annotations

import math

from comfy_api.latest import io

from ..core.scores import METRICS, means, score_table
from .common import PackNode, schema
from .plots import score_table_plot
from .scoring import build_scorer, check_batch, preprocessing, score_inputs


SCORED_BY = {"content": "content: DINOv2 cosine with the content images", "style": "style: CLIP image cosine with "
             "the style images", "prompt": "prompt: CLIP text score"}


def table_image(scores: dict, count: int):
    """(1, H, W, 3): the per-image and mean scores as a titled table."""
    header = ["image", *scores]
    rows = [[str(i), *(f"{float(values[i]):.4f}" for values in scores.values())] for i in range(count)]
    rows.append(["mean", *(f"{value:.4f}" for value in means(scores).values())])
    note = "\n".join(SCORED_BY[metric] for metric in scores)
    return score_table_plot(header, rows, f"Scores of {count} image{'s' * (count != 1)} (cosines in [-1, 1])",
                            note)[None]


class ScoreContentStylePrompt(PackNode):
    """The papers' scores on ComfyUI's own encoders: content = DINOv2 cosine with the content references, style =
    CLIP image cosine with the style references (both averaged over the references), prompt = CLIP text score
    (cosine of projected text and image features). Each encoder preprocesses as it expects (resize, centre crop,
    its own normalisation)."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        per_image = "One value per image, in batch order (NaN each when this score was not computed)."
        return schema(cls, "ScoreContentStylePrompt", "Score Content / Style / Prompt", inputs=[io.Image.Input("images", tooltip="The generated images to score (a batch)."), *score_inputs()],
            outputs=[
                *[io.Float.Output(display_name=metric, tooltip=f"Mean {metric} score over the batch (cosine in "
                                                               f"[-1, 1]; NaN when not computed).")
                  for metric in METRICS],
                *[io.Float.Output(display_name=f"{metric}_per_image", tooltip=per_image, is_output_list=True)
                  for metric in METRICS],
                io.String.Output(display_name="table", tooltip="Per-image and mean scores as text, and how each "
                                                               "encoder preprocessed the images."),
                io.Image.Output(display_name="table_image", tooltip="The same table as a picture."),
            ],
        )

    @classmethod
    def execute(cls, images, prompt: str = "", content_images=None, content_encoder=None, style_images=None,
                style_encoder=None, clip=None) -> io.NodeOutput:
        check_batch("images", images)
        scores = build_scorer(content_images, content_encoder, style_images, style_encoder, prompt, clip).score(images)
        count = images.shape[0]
        mean = means(scores)
        encoders = [f"{name}: {preprocessing(enc)}" for name, enc in (("content_encoder", content_encoder),
                                                                    ("style_encoder", style_encoder)) if enc is not None]
        return io.NodeOutput(*[mean.get(metric, math.nan) for metric in METRICS],
                             *[[float(v) for v in scores[metric]] if metric in scores else [math.nan] * count
                               for metric in METRICS],
                             "\n".join([score_table(scores), *encoders]), table_image(scores, count))
