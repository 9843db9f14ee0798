"""Oracle for plugins/qwen-edit-lora's sampling: diffusers 0.42.1's QwenImageEditPlusPipeline on the
tiny random Qwen-Image-Edit-2509 of make_tiny_qwen_edit.py, from given prompt embeddings (prompt and
negative, of different lengths: true CFG with its renormalisation) and given initial latents, with
one control image already at the pipeline's VAE size (1024×1024 for a square image, so its PIL
resize is the identity), 3 steps of the 2509 scheduler's dynamic shift + terminal stretch, and the
VAE decode.

usage: qwen_edit_pipeline_oracle.py --out DIR   (DIR/model = the tiny pipeline; DIR/*.f32 + oracle.json)
"""

import argparse
import json
import os
import subprocess
import sys

import numpy as np
import torch
from PIL import Image

HERE = os.path.dirname(os.path.abspath(__file__))
H = W = 64
STEPS = 3


def write(out, meta, name, t):
    t = torch.as_tensor(t).detach().to(torch.float32).contiguous()
    t.numpy().tofile(os.path.join(out, f"{name}.f32"))
    meta[name] = list(t.shape)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    out = ap.parse_args().out
    model = os.path.join(out, "model")
    subprocess.run([sys.executable, os.path.join(HERE, "make_tiny_qwen_edit.py"), "--out", model], check=True,
                   stdout=subprocess.DEVNULL)
    from diffusers import QwenImageEditPlusPipeline

    pipe = QwenImageEditPlusPipeline.from_pretrained(model, torch_dtype=torch.float32)
    rng = np.random.default_rng(0)
    # A smooth control image (a noise image makes the tiny VAE's latents extreme).
    yy, xx = np.mgrid[0:1024, 0:1024] / 1024.0
    ctrl = np.stack([0.5 + 0.4 * np.sin(6 * xx), 0.5 + 0.4 * np.cos(5 * yy), 0.5 + 0.3 * np.sin(4 * (xx + yy))], -1)
    ctrl_u8 = (ctrl * 255).round().astype(np.uint8)
    image = Image.fromarray(ctrl_u8)
    g = torch.Generator().manual_seed(1)
    pe = torch.randn(1, 7, 16, generator=g)
    ne = torch.randn(1, 5, 16, generator=g)
    latents = torch.randn(1, (H // 16) * (W // 16), 64, generator=g)
    kw = dict(image=image, prompt_embeds=pe, prompt_embeds_mask=torch.ones(1, 7, dtype=torch.long),
              negative_prompt_embeds=ne, negative_prompt_embeds_mask=torch.ones(1, 5, dtype=torch.long),
              true_cfg_scale=4.0, height=H, width=W, num_inference_steps=STEPS)
    with torch.no_grad():
        final = pipe(**kw, latents=latents.clone(), output_type="latent").images
        decoded = pipe(**kw, latents=latents.clone(), output_type="pt").images
        ctrl_latents = pipe._encode_vae_image(pipe.image_processor.preprocess(image, 1024, 1024).unsqueeze(2), g)
        # musubi-tuner's edit-plus training forward (qwen_image_train_network.py call_dit): the noisy
        # target's tokens then the control's, the DiT timestep (t·1000 + 1)/1000, the target's
        # tokens of the prediction; x_t = (1 − t)·x0 + t·ε.
        t = 0.3
        x0 = torch.randn(1, 16, H // 8, W // 8, generator=g)
        eps = torch.randn(1, 16, H // 8, W // 8, generator=g)
        x_t = (1 - t) * x0 + t * eps
        pack = lambda z: pipe._pack_latents(z, 1, 16, z.shape[2], z.shape[3])
        hidden = torch.cat([pack(x_t), pack(ctrl_latents[:, :, 0])], 1)
        shapes = [[(1, H // 16, W // 16), (1, ctrl_latents.shape[3] // 2, ctrl_latents.shape[4] // 2)]]
        pred = pipe.transformer(hidden_states=hidden, timestep=torch.tensor([(t * 1000 + 1) / 1000]),
                                encoder_hidden_states=pe, encoder_hidden_states_mask=None, img_shapes=shapes,
                                return_dict=False)[0][:, : (H // 16) * (W // 16)]
        pred = pipe._unpack_latents(pred, H, W, pipe.vae_scale_factor)[:, :, 0]
        loss = torch.nn.functional.mse_loss(pred, eps - x0)
    meta = {"steps": STEPS, "height": H, "width": W, "train_t": t, "train_loss": loss.item()}
    unpack = lambda x: pipe._unpack_latents(x, H, W, pipe.vae_scale_factor)[:, :, 0]
    for name, t in [("control", torch.from_numpy(ctrl_u8).permute(2, 0, 1)[None].float() / 255.0),
                    ("prompt_embeds", pe), ("negative_embeds", ne), ("latents", unpack(latents)),
                    ("control_latents", ctrl_latents[:, :, 0]), ("final_latents", unpack(final)),
                    ("image", decoded), ("x0", x0), ("eps", eps), ("x_t", x_t), ("train_pred", pred)]:
        write(out, meta, name, t)
    with open(os.path.join(out, "oracle.json"), "w") as f:
        json.dump(meta, f)


if __name__ == "__main__":
    main()
