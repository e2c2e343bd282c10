"""Every key the pack writes: into a file's safetensors metadata, or into a model's transformer_options. One name and
one line each (docs/file-metadata.md lists them for users; a test keeps the two equal and finds any 'csa.' string
written elsewhere)."""
from __future__ import annotations

PREFIX = "csa."

# -- adapter files (Save Adapter and every trainer) ----------------------------------------------------------------
ROLE = "csa.role"
METHOD = "csa.method"
BASE = "csa.base"
RANKS = "csa.ranks"
MODULES = "csa.modules"
KINDS = "csa.kinds"
CREATED_WITH = "csa.created_with"
LAYOUTS = "csa.layouts"
TRIGGER = "csa.trigger"
STEPS_DONE = "csa.steps_done"
BASE_HASH = "csa.base_hash"
BLOCK_SPLIT = "csa.block_split"
CONCEPT_WORDS = "csa.concept_words"
B4M_SEED = "csa.b4m_seed"
B4M_RUN = "csa.b4m_run"
B4M_FINE_TUNE = "csa.b4m_fine_tune"

# -- prompt-mapper files (Train Prompt Mapper) and training-state files (resume) -----------------------------------
KIND = "csa.kind"
MAPPER_KIND = "csa.ipl_latent_mapper"  # KIND of a mapper file
MAPPER_CONFIG = "csa.mapper_config"
SOURCE_LABEL = "csa.source_label"
TARGET_LABEL = "csa.target_label"
FINAL_LOSS = "csa.final_loss"
STATE_KIND = "csa.training_state"  # KIND of a training-state file
STEP = "csa.step"
LOSSES = "csa.losses"
PARAMETERS = "csa.parameters"
OPTIMISER = "csa.optimiser"
RECIPE = "csa.recipe"
VALUES_PREFIX = "csa.values."  # ZipLoRA's merger vectors, one tensor per name

# -- run-time keys in a model's transformer_options (never in a file) ----------------------------------------------
ACTIVE_ADAPTERS = "csa.active_adapters"
RUNTIME_ADAPTERS = "csa.runtime_adapters"
LOCALIZED_RESIDUAL = "csa.localized_residual"
TRAINED = "csa.trained"

KEYS = {
    ROLE: "adapter file: the adapter's role (content, style, concept, generic)",
    METHOD: "adapter file: the method that made it (lora, qr-lora, b4m, consislora, b-lora, ...)",
    BASE: "adapter file: the base model's name",
    RANKS: "adapter file: the ranks of its modules (JSON list)",
    MODULES: "adapter file: how many modules it holds",
    KINDS: "adapter file: the weight-adapter kinds it holds (JSON list)",
    CREATED_WITH: "adapter file: the trainer or merge and its settings (JSON)",
    LAYOUTS: "adapter file: the key layouts it was read from (kept when saved again)",
    TRIGGER: "adapter file: the training data's trigger word",
    STEPS_DONE: "adapter file: optimiser steps trained",
    BASE_HASH: "adapter file: hash of the base weights it was trained on (resume refuses another base)",
    BLOCK_SPLIT: "adapter file: ConsisLoRA / B-LoRA content and style blocks (JSON)",
    CONCEPT_WORDS: "adapter file: a Personalized Residual's identifier and class word",
    B4M_SEED: "adapter file: the seed of B4M's frozen halves",
    B4M_RUN: "adapter file: B4M content, style or made",
    B4M_FINE_TUNE: "adapter file: B4M Make's joint fine-tune settings (JSON)",
    KIND: "mapper and state files: what the file is",
    MAPPER_KIND: "the kind of a prompt-mapper file",
    MAPPER_CONFIG: "mapper file: the mapper's sizes (JSON)",
    SOURCE_LABEL: "mapper file: Zero-shot Adapt's source label",
    TARGET_LABEL: "mapper file: Zero-shot Adapt's target label",
    FINAL_LOSS: "mapper file: the last training loss",
    STATE_KIND: "the kind of a training-state file",
    STEP: "state file: the step it was saved at",
    LOSSES: "state file: every step's loss (JSON)",
    PARAMETERS: "state file: the trained parameters' names, in the optimiser's order (JSON)",
    OPTIMISER: "state file: the optimiser's settings and scalar state (JSON)",
    RECIPE: "state file: the recipe, read again on resume (JSON)",
    VALUES_PREFIX: "state file: ZipLoRA's merger vectors (tensor names)",
    ACTIVE_ADAPTERS: "transformer option: the run-time adapters switched on for a model call",
    RUNTIME_ADAPTERS: "transformer option: the wrapper publishing each model call's options",
    LOCALIZED_RESIDUAL: "transformer option: Apply Localized Residual's per-run state",
    TRAINED: "run-time adapter name: the factors a trainer's model adds (in the active set while it trains)",
}
