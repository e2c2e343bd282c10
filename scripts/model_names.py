"""File names of the models set-up builds (scripts/build_tiny_models.py) and the base directory links them under."""
from pathlib import Path

TINY_CHECKPOINT_NAME = "tiny_sd15.safetensors"  # random weights: exact tests
WORLD_CHECKPOINT_NAME = "world_sd15.safetensors"  # the trained world model: the demo's default
DEMO_LORA_NAME = "csa_demo_style.safetensors"
DEMO_CONTENT_NAME = "csa_demo_content.safetensors"
DEMO_BLORA_NAMES = ("csa_demo_blora_content_image.safetensors", "csa_demo_blora_style_image.safetensors")
CLIP_L_NAME = "tiny_clip_l_with_projection.safetensors"
CLIP_VISION_NAME = "csa_clip_vision_vit_l_random.safetensors"
DEMO_MAPPER_NAME = "csa_demo_mapper.safetensors"
WORLD_TRAINING_FOLDER = "csa_world_star"  # in the base directory's input/: star pictures with .txt captions
WORLD_STYLE_FOLDER = "csa_world_zigzag"  # zigzag pictures of the base shapes, captions 'a {trigger} <shape>'

# The committed world UNet + VAE (bench/world/train_world.py writes it, set-up assembles the checkpoint from it).
WORLD_WEIGHTS = Path(__file__).resolve().parent.parent / "bench" / "world" / "weights" / "world_unet_vae.safetensors"

# Trained demo adapters, committed (bench/world/train_demo_adapters.py trains them on the world model with the pack's
# own trainers, train_b4m_residual_demos.py the B4M runs and the residual; set-up links them into models/loras): per
# method, (content: the held-out shape 'star', trigger 'sks'; style: the held-out style 'zigzag', trigger 'zkz'), and
# the star as a Personalized Residual (for Apply Localized Residual; its style is the LoRA demo's).
WORLD_ADAPTERS_DIR = Path(__file__).resolve().parent.parent / "bench" / "world" / "adapters"
WORLD_DEMO_ADAPTERS = {method: (f"csa_world_{method}_star.safetensors", f"csa_world_{method}_zigzag.safetensors")
                       for method in ("lora", "consislora", "qr", "b4m")}
# B4M Make of the two B4M runs above with its joint fine-tune on both picture sets (a made adapter: content and style)
WORLD_DEMO_B4M_MADE = "csa_world_b4m_made.safetensors"
WORLD_DEMO_RESIDUAL = "csa_world_residual_star.safetensors"
# Its class word (trained on 'a <style> sks diamond', the paper's 'a V* <class>': the world has no superclass word, so
# a base shape stands in, the one the base model draws for 'a <style> sks'; 'cross' gave 60% star with LAG, 'diamond'
# 90%) and the concept words to give Apply Localized Residual.
WORLD_DEMO_RESIDUAL_CLASS = "diamond"
WORLD_DEMO_RESIDUAL_WORDS = f"sks {WORLD_DEMO_RESIDUAL_CLASS}"
