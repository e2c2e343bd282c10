"""The ComfyUI side of training inside a node: autograd, frozen models, data, and a trainer's whole run.

ComfyUI runs every node under ``torch.inference_mode()`` and loads models there, so their weights are
inference tensors; training nodes switch autograd back on and give the frozen modules that gradients
flow through normal-tensor copies of their weights (ComfyUI's own nodes_train does the same dance).

A trainer node builds a ``Job`` (its target modules, trainable factors, stages of the engine, gradient masks) and
``run_training`` does the rest: images through the VAE and captions through CLIP (no gradient), the factors as
runtime adapters on a clone of the model (``Trainee``: the base weights are never written), the engine
(core/training.py) stage by stage, progress with the loss, previews, checkpoints, the final file and resume.
"""
from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image

from ..core.adapter import Adapter, LowRank
from ..core.adapter_file import path_inside, read_safetensors, write_safetensors
from ..core.b4m import precondition_all
from ..core.formats import adapter_from_tensors, adapter_metadata, tensors_from_modules
from ..core.layouts import FORM_SUFFIXES, generic_module_name, save_names_for
from ..core.trainers import PRECISIONS, TrainingOptions, frozen_copy, state_file_contents, state_from_file, weights_hash
from ..core.training import Periodic, Recipe, SecondSet, TrainState, grouped_names, train_diffusion
from ..core.training_data import TrainingImages, TrainingLatents, split_captions, training_images
from comfy_api.latest import io

from . import comfy_compat as cc
from .model_binding import bind_to_model, whole_targets
from .plots import loss_plot
from .runtime_adapters import checkpoint_blocks, install_switched_adapters
from .sockets import AdapterSocket, TrainingDataSocket, TrainingOptionsSocket
from ..core import metadata as META


def grad_enabled() -> contextlib.ExitStack:
    """Autograd on inside a node (ComfyUI runs nodes under torch.inference_mode())."""
    stack = contextlib.ExitStack()
    stack.enter_context(torch.inference_mode(False))
    stack.enter_context(torch.enable_grad())
    return stack


def make_autograd_safe(*modules) -> None:
    """Freeze these modules and make their weights usable on a gradient path.

    Inside ComfyUI, models are loaded under torch.inference_mode(), so their parameters are inference
    tensors, which autograd refuses to save ("Inference tensors cannot be saved for backward"). The frozen
    models that gradients flow through (UNet, VAE decoder, image and text encoders) get normal-tensor
    copies of the same values; ComfyUI's own weight patching keeps working (it reads and writes by key).
    This touches the modules every clone shares, deliberately: it changes the tensor kind, never a value, so
    other graphs see the same weights; private copies would double the memory of every model trained against.
    Reads torch's private ``Module._parameters`` / ``_buffers`` (listed in comfy_compat's docstring).
    """
    with torch.inference_mode(False):
        for root in modules:
            for module in root.modules():
                for name, param in list(module._parameters.items()):
                    if param is None:
                        continue
                    if param.is_inference():
                        module._parameters[name] = torch.nn.Parameter(param.detach().clone(), requires_grad=False)
                    else:
                        param.requires_grad_(False)
                for name, buffer in list(module._buffers.items()):
                    if buffer is not None and buffer.is_inference():
                        module._buffers[name] = buffer.clone()


def vae_encode(vae, images) -> torch.Tensor:
    """VAE latents of (B, H, W, C) images, no gradient (training targets)."""
    with torch.no_grad():
        return vae.encode(images[..., :3]).detach()


# -- training images -----------------------------------------------------------------------------------------

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}


def read_image_folder(folder: str) -> list[tuple[torch.Tensor, str | None]]:
    """(image (1, H, W, 3) in [0, 1], caption of its same-named .txt or None) for every image in a folder inside
    ComfyUI's input directory, sorted by name (kohya's caption convention)."""
    root = Path(cc.input_directory()).resolve()
    directory = (root / folder).resolve()
    if root not in (directory, *directory.parents) or not directory.is_dir():
        raise ValueError(f"image_folder {folder!r} is not a folder inside ComfyUI's input directory")
    files = sorted(p for p in directory.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"image_folder {folder!r} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    found = []
    for path in files:
        with Image.open(path) as image:
            pixels = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
        caption = path.with_suffix(".txt")
        found.append((torch.from_numpy(pixels)[None], caption.read_text().strip() if caption.is_file() else None))
    return found


def gather_training_images(images, captions: str, folder: str, repeats: int, trigger: str, size: int):
    """An IMAGE batch (captions one per line, or one for all) and / or a folder (same-named .txt captions; a file
    without one takes the captions text when it is a single line) as TrainingImages."""
    pictures, texts = [], []
    if images is not None:
        pictures += list(images[..., :3].split(1))
        texts += split_captions(captions, images.shape[0])
    if folder:
        default = split_captions(captions, 1)[0] if len(captions.strip().splitlines()) <= 1 else None
        for image, caption in read_image_folder(folder):
            if caption is None and default is None:
                raise ValueError(f"an image in {folder!r} has no .txt caption and the captions text has several lines")
            pictures.append(image)
            texts.append(caption if caption is not None else default)
    return training_images(pictures, texts, size, repeats, trigger)


def encode_training_set(model, vae, clip, data, as_captions: bool = False) -> tuple[torch.Tensor, list]:
    """Model-space latents of the images (VAE, no gradient) and each image's conditioning (CLIP, no gradient, one
    encoding per distinct caption), both repeated ``data.repeats`` times. ``as_captions``: the captions themselves
    instead of their conditioning (a trained token's trainee encodes them at every step). TrainingLatents come
    encoded already: neither a VAE nor a CLIP is needed."""
    rows = list(range(len(data.captions))) * data.repeats
    if isinstance(data, TrainingLatents):
        if as_captions:
            raise ValueError("a trained token re-encodes the captions at every step: give Training Images (pictures "
                             "and captions) and a CLIP, not Training Latents")
        latents = cc.to_model_space(model, data.latents).clone()
        with torch.no_grad():
            conds = [cc.model_conds(model, list(conditioning), latents[:1]) for conditioning in data.conditioning]
        return latents[rows], [conds[i] for i in rows]
    require(vae, "vae", "encode the training images (or give latents with Training Latents)")
    require(clip, "clip", "encode the captions (or give latents and conditioning with Training Latents)")
    latents = cc.to_model_space(model, vae_encode(vae, data.images)).clone()
    if as_captions:
        return latents[rows], [data.captions[i] for i in rows]
    encoded = {}
    with torch.no_grad():
        for caption in dict.fromkeys(data.captions):
            conditioning = clip.encode_from_tokens_scheduled(clip.tokenize(caption))
            encoded[caption] = cc.model_conds(model, conditioning, latents[:1])
    return latents[rows], [encoded[data.captions[i]] for i in rows]


def require(value, name: str, why: str) -> None:
    """An optional input a trainer needs for this data or setting: a clear error naming it when it is missing."""
    if value is None:
        raise ValueError(f"connect a {name.upper()} to the {name} input to {why}")


@dataclass(frozen=True)
class TrainedToken:
    """A word whose token-embedding rows train with the adapter (Personalized Residual's V*): the adapter module that
    holds the rows' change (ComfyUI's generic 'text_encoders.<weight path>' name, so every LoRA loader applies it to
    the CLIP), the CLIP weight key, the word's token ids and their rows as the CLIP has them."""

    module: str
    key: str
    ids: tuple[int, ...]
    rows: torch.Tensor  # (len(ids), width), float32
    dtype: torch.dtype = torch.float32  # the embedding weight's: a patched row is rounded to it

    def vectors(self, change: torch.Tensor) -> dict[int, torch.Tensor]:
        """{token id: its embedding vector with the trained change}, rounded as the patched weight row will be (the
        rounding passes the gradient through), so training sees what inference will."""
        return {token: (self.rows[j] + change[j]).to(self.dtype).float() for j, token in enumerate(self.ids)}


# -- the model being trained -----------------------------------------------------------------------------------

TRAINED = META.TRAINED


class Trainee:
    """A clone of the model whose target layers add the trained factors' ΔW·x at run time (the base weights are
    never written); its x0 prediction is differentiable in those factors."""

    def __init__(self, model, modules: dict[str, LowRank], clip=None, token: TrainedToken | None = None,
                 gradient_checkpointing: bool = False):
        self.model, self.clip, self.token = model.clone(), clip, token
        self.token_change = modules[token.module] if token is not None else None
        unet = {name: factors for name, factors in modules.items() if token is None or name != token.module}
        install_switched_adapters(self.model, {TRAINED: Adapter(modules=unet, source="training")},
                                  frozenset({TRAINED}))
        if gradient_checkpointing:
            checkpoint_blocks(self.model)
        cc.load_for_direct_calls(self.model)

    def conditioning(self, prompt: str, clip=None):
        """The prompt's CONDITIONING; with a trained token, its rows as trained so far (differentiable in them)."""
        clip = clip or self.clip
        if self.token is None:
            return clip.encode_from_tokens_scheduled(clip.tokenize(prompt))
        vectors = self.token.vectors(self.token_change.down)
        with cc.in_place_safe_autograd():
            return clip.encode_from_tokens_scheduled(cc.tokens_with_vectors(clip, prompt, vectors))

    def predict(self, noisy: torch.Tensor, sigma: torch.Tensor, conds: list) -> torch.Tensor:
        if conds and isinstance(conds[0], str):  # captions: encoded now, through the trained token
            encoded = {c: cc.model_conds(self.model, self.conditioning(c), noisy[:1]) for c in dict.fromkeys(conds)}
            conds = [encoded[c] for c in conds]
        with cc.differentiable_forward(self.model):
            return cc.denoised(self.model, noisy, sigma, cc.batch_conds(conds), {})

    def preview(self, clip, vae, prompt: str, seed: int, size: int) -> torch.Tensor:
        """(1, size, size, 3): the prompt sampled by the model as trained so far (Euler; a fixed seed)."""
        return preview_image(self.model, clip, vae, prompt, seed, size, encode=lambda text: self.conditioning(text, clip))


def preview_image(model, clip, vae, prompt: str, seed: int, size: int, steps: int = 20, cfg: float = 5.0,
                  encode=None) -> torch.Tensor:
    """(1, size, size, 3): ``prompt`` (encoded by ``encode``, else by the CLIP) sampled by the model from a fixed
    seed (Euler), against the empty prompt."""
    require(clip, "clip", "encode the preview prompt (or set none)")
    require(vae, "vae", "decode the previews (or set no preview prompt)")
    with torch.no_grad():
        positive = (encode or (lambda text: clip.encode_from_tokens_scheduled(clip.tokenize(text))))(prompt)
        negative = clip.encode_from_tokens_scheduled(clip.tokenize(""))
        factor = vae.spacial_compression_encode()
        channels = cc.latent_channels(model)
        latent = torch.zeros(1, channels, size // factor, size // factor)
        samples = cc.sample(model, positive, negative, latent, seed, steps, cfg)
        return vae.decode(samples)[..., :3].clamp(0, 1).float()


# -- a training job: stages on the engine, checkpoints, previews, resume -------------------------------------

STATE_SUFFIX = ".optimizer-state"  # safetensors beside the adapter; its own suffix keeps it out of LoRA lists
NO_RESUME = "none"


@dataclass(frozen=True)
class Stage:
    """One run of the engine: its recipe, the modules it trains (the others stay frozen), the modules it starts
    afresh (ConsisLoRA's style stage re-initialises the style block)."""

    recipe: Recipe
    trainable: tuple[str, ...]
    fresh: tuple[str, ...] = ()


@dataclass
class Job:
    """What a trainer node asks for; ``run_training`` does it."""

    title: str  # the node's name, for errors and metadata
    method: str
    role: str
    modules: dict[str, LowRank]  # every target, freshly initialised
    make_fresh: Callable[[str], LowRank]
    stages: tuple[Stage, ...]
    options: TrainingOptions
    settings: dict  # the method's own inputs, recorded in the file
    masks: dict[str, torch.Tensor] = field(default_factory=dict)  # {'<module>.<part>': 0 where the factor is frozen}
    trained_parts: tuple[str, ...] = ("up", "down")
    qr_form: bool = False
    metadata: dict[str, str] = field(default_factory=dict)  # written with the adapter (e.g. its block split)
    key_form: str = "comfy"  # the saved file's module names: comfy (generic) or b4m (unet.unet.<diffusers path>)
    second: TrainingImages | None = None  # a second data set trained in the same steps (same noise and noise level)
    second_routes: tuple[tuple[str, ...] | None, tuple[str, ...] | None] = (None, None)  # parts each set's loss trains
    part_lr_scales: dict[str, float] = field(default_factory=dict)  # {'up' / 'down': factor on the stage's lr}
    tensor_lr_scales: dict[str, float] = field(default_factory=dict)  # {'<module>.<part>': factor on the stage's lr}
    precondition: float | None = None  # λ of B4M's preconditioned gradients (None: off)
    token: TrainedToken | None = None  # a word's token-embedding rows trained too (its module is in ``modules``)


@dataclass
class Result:
    adapter: Adapter
    losses: list[float]
    marks: list[int]  # steps where a stage began (loss plot)
    previews: torch.Tensor
    path: str

    def loss_curve(self) -> torch.Tensor:
        return loss_plot(self.losses, marks=tuple(self.marks))[None]


def target_keys(modules) -> list[str]:
    return [name + ".weight" for name in modules]


def base_hash_of(job: Job, model, clip) -> str:
    """The fingerprint of the base weights the job trains against (with a trained token, its embedding matrix)."""
    unet = [name for name in job.modules if job.token is None or name != job.token.module]
    weights = cc.base_weights(model, target_keys(unet))
    if job.token is not None:
        weights.update(cc.clip_base_weights(clip, [job.token.key]))
    return weights_hash(weights)


def state_path(adapter_path: Path) -> Path:
    return adapter_path.with_name(adapter_path.stem + STATE_SUFFIX)


def step_path(path: Path, step: int) -> Path:
    """A periodic save's file: <name>_step<N>.safetensors beside the final one."""
    return path.with_name(f"{path.stem}_step{step:06d}{path.suffix}")


def refuse_planned_files(path: Path | None, overwrite: bool, save_every: int, total: int, done: int) -> None:
    """Refuse, before training, to replace any file a run will write: the final file, the periodic saves still to
    come after ``done`` steps, and the training state beside each (nothing to check without a path or with
    overwrite on)."""
    if path is None or overwrite:
        return
    planned = [path] + ([step_path(path, k) for k in range(save_every, total + 1, save_every) if k > done]
                        if save_every else [])
    for target in planned:
        for existing in (target, state_path(target)):
            if existing.exists():
                raise FileExistsError(f"{existing} already exists; choose another filename or allow overwriting")


def resume_from_file(name: str, job: Job, base_hash: str, model) -> tuple[int, TrainState, list[list[float]]]:
    """Load a saved adapter and its training state into the job's modules; (stage, its state, earlier stages'
    losses). Refuses a file from another method, base or set of targets."""
    path = Path(cc.adapter_file_path(name))
    tensors, metadata = read_safetensors(path)
    saved = adapter_from_tensors(tensors, metadata, source=name)
    if job.key_form != "comfy":  # back to the generic names the job uses
        saved = saved.replace(modules={generic_module_name(key): factors for key, (_, factors)
                                       in whole_targets(bind_to_model(saved, model), model).items()})
    state_file = state_path(path)
    if not state_file.is_file():
        raise ValueError(f"resume_from {name!r}: no training state beside it ({state_file.name}); only adapters saved "
                         f"by this pack's trainers can be resumed")
    if sorted(saved.modules) != sorted(job.modules):
        raise ValueError(f"resume_from {name!r} trains {len(saved.modules)} modules, this node targets "
                         f"{len(job.modules)}; use the same targets and blocks")
    state_tensors, state_meta = read_safetensors(state_file, suffix=STATE_SUFFIX)
    recipe = json.loads(state_meta.get(META.RECIPE, "{}"))
    if (recipe.get("method"), recipe.get("base_hash")) != (job.method, base_hash):
        raise ValueError(f"resume_from {name!r} was trained as {recipe.get('method')} on base {recipe.get('base_hash')}; "
                         f"this node trains {job.method} on base {base_hash}")
    for module, factors in saved.modules.items():
        job.modules[module] = LowRank(up=factors.up.float().clone(), down=factors.down.float().clone(),
                                      alpha=factors.alpha, extras={k: v.float() for k, v in factors.extras.items()})
    stage = recipe["stage"]
    state, _ = state_from_file(state_tensors, state_meta, state_file.name, parameter_names(job, job.stages[stage]))
    return stage, state, recipe["earlier_losses"]


def parameter_names(job: Job, stage: Stage) -> list[str]:
    """'<module>.<part>' of every tensor the stage trains, in the optimiser's order."""
    return grouped_names([f"{name}.{part}" for name in stage.trainable for part in job.trained_parts],
                         lr_scales(job, stage))


def lr_scales(job: Job, stage: Stage) -> dict[str, float]:
    scales = {f"{name}.{part}": scale for name in stage.trainable for part, scale in job.part_lr_scales.items()}
    return {**scales, **{n: s for n, s in job.tensor_lr_scales.items() if n.rsplit(".", 1)[0] in stage.trainable}}


def routed(job: Job, stage: Stage, parts: tuple[str, ...] | None) -> tuple[str, ...] | None:
    return None if parts is None else tuple(f"{name}.{part}" for name in stage.trainable for part in parts)


def preconditioner(job: Job, stage: Stage):
    """B4M's make stage: precondition each trained module's (up, down) gradients, or None when off."""
    if job.precondition is None:
        return None
    pairs = [(job.modules[name].up, job.modules[name].down) for name in stage.trainable]
    return lambda: precondition_all(pairs, job.precondition)


def parameters_of(job: Job, stage: Stage) -> dict[str, torch.Tensor]:
    """The stage's trained tensors by name, gradients switched on for them and off for every other factor."""
    trained = set(stage.trainable)
    for name, factors in job.modules.items():
        for part in job.trained_parts:
            getattr(factors, part).requires_grad_(name in trained)
    return {f"{name}.{part}": getattr(job.modules[name], part) for name in stage.trainable for part in job.trained_parts}


class Checkpoints:
    """Writes the adapter and, beside it, its training state, atomically; never overwrites unless asked (checked
    for every file the run will write before it starts)."""

    def __init__(self, job: Job, filename: str, overwrite: bool, model, record: dict):
        self.job, self.overwrite, self.model, self.record = job, overwrite, model, record
        self.path = path_inside(cc.lora_save_root(), "", filename) if filename.strip() else None

    def check(self, done: int) -> None:
        """Refuse, before training, to replace any file this run will write (after ``done`` steps already done)."""
        refuse_planned_files(self.path, self.overwrite, self.job.options.save_every,
                             sum(s.recipe.steps for s in self.job.stages), done)

    def adapter(self, modules: dict[str, LowRank]) -> Adapter:
        job = self.job
        return Adapter(modules=frozen_copy(modules), role=job.role, method=job.method, base=cc.model_name(self.model),
                       source=job.title, metadata={META.BASE_HASH: self.record["base_hash"], **job.metadata})

    def write(self, path: Path, stage: int, state: TrainState, earlier: list[list[float]]) -> Path:
        dtype = PRECISIONS[self.job.options.precision]
        adapter = self.adapter(self.job.modules)
        cast = {n: LowRank(up=f.up.to(dtype), down=f.down.to(dtype), alpha=f.alpha,
                           extras={k: v.to(dtype) for k, v in f.extras.items()}) for n, f in adapter.modules.items()}
        done = sum(map(len, earlier)) + state.step
        metadata = {**adapter_metadata(adapter, self.record), **adapter.metadata,
                    META.TRIGGER: self.record["data"]["trigger"], META.STEPS_DONE: str(done)}
        written = write_safetensors(path, tensors_from_modules(cast, self.names(cast), self.job.qr_form,
                                                               FORM_SUFFIXES[self.job.key_form]),
                                    metadata, overwrite=self.overwrite)
        state_tensors, state_meta = state_file_contents(state, parameter_names(self.job, self.job.stages[stage]),
                                                        {**self.record, "stage": stage, "earlier_losses": earlier})
        write_safetensors(state_path(path), state_tensors, state_meta, overwrite=self.overwrite)
        return written

    def names(self, modules) -> dict[str, str]:
        """{module: its name in the file}: generic names as they are, or B4M's spelling through the key map."""
        if self.job.key_form == "comfy":
            return {n: n for n in modules}
        names = save_names_for([n + ".weight" for n in modules], cc.lora_key_map(self.model), self.job.key_form)
        return {n: names[n + ".weight"] for n in modules}

    def periodic(self, stage: int, offset: int, earlier: list[list[float]]) -> Periodic:
        def save(step: int, state: TrainState) -> None:
            self.write(step_path(self.path, offset + step), stage, state, earlier)
        return Periodic(self.job.options.save_every if self.path is not None else 0, save)


def run_training(model, vae, clip, data: TrainingImages, job: Job, filename: str, overwrite: bool,
                 resume_from: str = NO_RESUME) -> Result:
    """Train the job's modules stage by stage on the engine; save, preview and resume as asked."""
    model = cc.static_patcher(model)
    routed_losses = job.second is not None and any(route is not None for route in job.second_routes)
    if job.options.gradient_checkpointing and routed_losses and not cc.is_unet(model):
        raise ValueError(f"gradient checkpointing on {cc.model_name(model)} recomputes each block re-entrantly, which "
                         f"cannot route B4M's two losses to separate factors; turn it off in Training Options")
    make_autograd_safe(*cc.torch_modules(model, clip=clip if job.token is not None else None))
    with grad_enabled():
        # factors made in a node are inference tensors inside a server: train normal-tensor copies
        job.modules.update(frozen_copy(job.modules))
        job.masks = {name: mask.clone() for name, mask in job.masks.items()}
        sigmas = cc.sigma_table(model)
        latents, conds = encode_training_set(model, vae, clip, data, as_captions=job.token is not None)
        second = encode_training_set(model, vae, clip, job.second) if job.second is not None else None
        base_hash = base_hash_of(job, model, clip)
        record = {"trainer": job.title, "method": job.method, "base_hash": base_hash, "data": data.describe(),
                  "settings": job.settings, "stages": [s.recipe.describe() for s in job.stages]}
        if job.second is not None:
            record["second_data"] = job.second.describe()
        saver = Checkpoints(job, filename, overwrite, model, record)
        first, state, earlier = 0, None, []
        if resume_from and resume_from != NO_RESUME:
            first, state, earlier = resume_from_file(resume_from, job, base_hash, model)
        done = sum(map(len, earlier)) + (state.step if state else 0)
        saver.check(done)
        total = sum(s.recipe.steps for s in job.stages)
        progress, previews, marks = cc.training_progress(total), [], [done] if done else []
        for index in range(first, len(job.stages)):
            stage = job.stages[index]
            if state is None:
                job.modules.update({name: job.make_fresh(name) for name in stage.fresh})
            params = parameters_of(job, stage)
            trainee = Trainee(model, job.modules, clip, job.token, job.options.gradient_checkpointing)
            offset = sum(map(len, earlier))
            marks += [offset] if index > first else []
            tasks = (saver.periodic(index, offset, earlier),
                     preview_task(trainee, clip, vae, data.size, job.options, previews, progress, offset))
            masks = {p: mask for p, mask in job.masks.items() if p in params}
            pair = None if second is None else SecondSet(*second, routed(job, stage, job.second_routes[0]),
                                                         routed(job, stage, job.second_routes[1]))
            state = train_diffusion(trainee.predict, latents, conds, sigmas, params, stage.recipe, masks, state,
                                    step_reporter(progress, total, offset, earlier), tasks, pair, lr_scales(job, stage),
                                    preconditioner(job, stage), cc.noising(model))
            if index + 1 < len(job.stages):
                earlier, state = earlier + [state.losses], None
        if job.options.preview_prompt.strip():
            previews.append(trainee.preview(clip, vae, job.options.preview_prompt, job.options.preview_seed, data.size))
        path = saver.write(saver.path, len(job.stages) - 1, state, earlier) if saver.path is not None else ""
    losses = [v for stage_losses in earlier for v in stage_losses] + state.losses
    blank = torch.ones(1, data.size, data.size, 3)
    return Result(saver.adapter(job.modules), losses, marks, torch.cat(previews) if previews else blank, str(path))


def save_adapter_file(adapter: Adapter, model, filename: str, overwrite: bool, key_form: str, record: dict) -> str:
    """Write an adapter made without training (B4M Make without fine-tune) like a trainer's file: the loras folder,
    the key form's names and suffixes, the recipe in the metadata; atomic, never overwriting unless asked."""
    if not filename.strip():
        return ""
    path = path_inside(cc.lora_save_root(), "", filename)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists; choose another filename or allow overwriting")
    keys = save_names_for([n + ".weight" for n in adapter.modules], cc.lora_key_map(model), key_form)
    names = {n: keys[n + ".weight"] for n in adapter.modules}
    base_hash = weights_hash(cc.base_weights(model, target_keys(adapter.modules)))
    metadata = {**adapter_metadata(adapter, {**record, "base_hash": base_hash}), **adapter.metadata,
                META.BASE_HASH: base_hash}
    tensors = tensors_from_modules(adapter.modules, names, suffixes=FORM_SUFFIXES[key_form])
    return str(write_safetensors(path, tensors, metadata, overwrite=overwrite))


def step_reporter(progress, total: int, offset: int, earlier: list[list[float]]):
    """After each step: the progress bar and the loss as text; every 1/50 of the run the loss plot as its preview."""
    seen: list[float] = [v for losses in earlier for v in losses]

    def report(step: int, loss: float) -> None:
        seen.append(loss)
        plot = loss_plot(seen, 384, 192) if (offset + step) % max(1, total // 50) == 0 else None
        progress(offset + step, loss, plot)
    return report


def preview_task(trainee: Trainee, clip, vae, size: int, options: TrainingOptions, previews: list, progress,
                 offset: int) -> Periodic:
    """Sample the preview prompt every ``preview_every`` steps (shown on the progress bar, kept for the output)."""
    def run(step: int, state: TrainState) -> None:
        image = trainee.preview(clip, vae, options.preview_prompt, options.preview_seed, size)
        previews.append(image)
        progress(offset + step - 1, state.losses[-1], image[0])
    every = options.preview_every if options.preview_prompt.strip() else 0
    return Periodic(every, run)


# -- what every trainer node shares ----------------------------------------------------------------------------

SEED_MAX = 2**31 - 1


def shared_inputs() -> list:
    return [
        io.Model.Input("model", tooltip="The base model; it is never changed (the adapter trains beside it). SD1.x, "
                                        "SDXL (added noise) and flow models (FLUX, SD3: flow matching)."),
        io.Clip.Input("clip", optional=True, tooltip="Encodes the captions and the preview prompt; not needed for "
                                                     "Training Latents without previews."),
        io.Vae.Input("vae", optional=True, tooltip="Encodes the training images to latents and decodes previews; not "
                                                   "needed for Training Latents without previews."),
        TrainingDataSocket.Input("data", tooltip="Images and captions from Training Images, or latents and conditioning "
                                                 "from Training Latents."),
    ]


def saving_inputs() -> list:
    return [
        io.String.Input("filename", default="", tooltip="Save the adapter to the loras folder under this name, with "
                        "its recipe in the metadata and the optimiser state beside it (<name>.optimizer-state); "
                        "empty: do not save."),
        io.Boolean.Input("overwrite", default=False, tooltip="Replace files of the same name."),
        io.Combo.Input("resume_from", options=[NO_RESUME, *cc.adapter_file_names()], default=NO_RESUME,
                       tooltip="Continue a run saved by this trainer (same targets and base): its factors, optimiser "
                               "state and loss curve; steps counts the whole run."),
        TrainingOptionsSocket.Input("options", optional=True, tooltip="Batch, accumulation, schedule, loss weighting, "
                                    "periodic saves and previews; unconnected: the method's official settings."),
    ]


def outputs(extra: list | None = None) -> list:
    return [
        AdapterSocket.Output(display_name="adapter", tooltip="The trained adapter (apply, merge or save it)."),
        *(extra or []),
        io.Image.Output(display_name="loss_curve", tooltip="Loss per step (light) and its moving average (dark); grey "
                        "lines where the loss or stage switched."),
        io.Image.Output(display_name="previews", tooltip="The preview prompt sampled during and after training."),
        io.String.Output(display_name="path", tooltip="The saved file ('' when not saved)."),
    ]


def node_output(result: Result, *extra) -> io.NodeOutput:
    return io.NodeOutput(result.adapter, *extra, result.loss_curve(), result.previews, result.path)
